//! The reference side of an evaluation: an ADM batch (`VIRTUAL_imagenet256_labeled.npz`)
//! holding images and/or precomputed statistics. As in the ADM evaluator, statistics stored
//! in the file are used as they are, and its images give the pool features for
//! precision/recall (and the statistics when the file has none). What had to be computed
//! is cached beside the file, keyed by the Inception weights that computed it.

use super::features::{check_images, features_of, ImageSet};
use super::Stats;
use crate::bail_input;
use crate::data::npy::NpzArray;
use crate::dist::{agree, Comm};
use crate::error::bad_input;
use crate::model::inception::Inception;
use crate::model::weights;
use anyhow::Result;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Statistics to compare samples with.
pub struct Reference {
    /// Pool features (FID).
    pub fid: Stats,
    /// Spatial features (sFID).
    pub sfid: Stats,
    /// Pool features of the reference images, when the file has images (precision/recall).
    pub pool: Option<Tensor>,
}

const STATS: [&str; 4] = ["mu", "sigma", "mu_s", "sigma_s"];

/// The cache file of reference `path`.
pub fn cache_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.reg-ddp-stats.safetensors", path.display()))
}

impl Reference {
    /// Reads (or computes, split over ranks, and caches) the reference statistics. Every
    /// rank must call it; `inception` is the weights file `net` was loaded from.
    pub fn load(path: &Path, net: &Inception, inception: &Path, batch: i64, comm: &dyn Comm) -> Result<Reference> {
        let file = path.display().to_string();
        if !path.is_file() {
            bail_input!("{file}: no such reference file");
        }
        let cache = cache_path(path);
        let key =
            weights::sha256_hex(&std::fs::read(inception).map_err(|e| bad_input(format!("{}: cannot read: {e}", inception.display())))?);
        // Rank 0 decides, so that all ranks take the same (collective) path.
        let valid = comm.rank() == 0 && cached_key(&cache).as_deref() == Some(key.as_str());
        let valid = agree(comm, &[valid as i64 as f64])?[0] > 0.0;
        let map: HashMap<String, Tensor> = if valid {
            weights::read_map(&cache)?
        } else {
            let mut map = HashMap::new();
            for k in STATS {
                if let Some(a) = NpzArray::open(path, k)? {
                    map.insert(k.to_string(), a.load().to_kind(Kind::Double));
                }
            }
            if let Some(images) = NpzArray::open(path, "arr_0")? {
                check_images(images.kind, &images.shape, &file)?;
                let out = features_of(&ImageSet::Npz(images), net, batch, comm)?;
                let (s, ss) = (Stats::of(&out.pool), Stats::of(&out.spatial));
                for (k, v) in [("mu", s.mu), ("sigma", s.sigma), ("mu_s", ss.mu), ("sigma_s", ss.sigma)] {
                    map.entry(k.to_string()).or_insert(v);
                }
                map.insert("pool".into(), out.pool);
            } else if let Some(k) = STATS.iter().find(|k| !map.contains_key(**k)) {
                bail_input!("{file}: {k}: missing (and no arr_0 images to compute it from)");
            }
            if comm.rank() == 0 {
                let named: Vec<(String, Tensor)> = map.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
                let meta = HashMap::from([("inception_sha256".to_string(), key)]);
                weights::write(&cache, &named, Some(meta))?;
            }
            map
        };
        for (m, s, d) in [("mu", "sigma", 2048), ("mu_s", "sigma_s", 2023)] {
            let (mu, sigma) = (&map[m], &map[s]);
            if mu.size() != [d] || sigma.size() != [d, d] {
                bail_input!("{file}: {m}/{s}: dimensions {:?}/{:?}, the Inception features have {d}", mu.size(), sigma.size());
            }
        }
        let stats = |m: &str, s: &str| Stats { mu: map[m].to_kind(Kind::Double), sigma: map[s].to_kind(Kind::Double) };
        Ok(Reference { fid: stats("mu", "sigma"), sfid: stats("mu_s", "sigma_s"), pool: map.get("pool").map(|t| t.shallow_clone()) })
    }
}

/// The Inception key a cache file was computed with, if it is readable.
fn cached_key(cache: &Path) -> Option<String> {
    let bytes = std::fs::read(cache).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    meta.metadata().as_ref()?.get("inception_sha256").cloned()
}
