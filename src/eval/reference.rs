//! The reference side of an evaluation: an ADM batch (`VIRTUAL_imagenet256_labeled.npz`)
//! holding images and/or precomputed statistics. As in the ADM evaluator, statistics stored
//! in the file are used as they are, and its images give the pool features for
//! precision/recall (and the statistics when the file has none). What had to be computed
//! is cached beside the file, keyed by the Inception weights and the reference file.

use super::features::{check_images, features_of, ImageSet};
use super::{frechet_distance, inception_score, Stats};
use crate::bail_input;
use crate::dist::{agree, all_ok, Comm};
use crate::encoders::inception::{Inception, InceptionOutput};
use crate::error::bad_input;
use crate::formats::npy::NpzArray;
use crate::formats::weights;
use anyhow::Result;
use std::collections::HashMap;
use std::io::Read;
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

/// Scores of a sample set against the reference.
#[derive(Debug, Clone, Copy)]
pub struct Scores {
    pub fid: f64,
    pub sfid: f64,
    /// Inception Score over 10 splits: mean and standard deviation.
    pub inception_score: f64,
    pub inception_score_std: f64,
}

const STATS: [&str; 4] = ["mu", "sigma", "mu_s", "sigma_s"];

/// The cache file of reference `path`.
pub fn cache_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.reg-ddp-stats.safetensors", path.display()))
}

impl Reference {
    /// Reads (or computes, split over ranks, and caches) the reference statistics. Every
    /// rank must call it; rank 0 gets the reference, the others only help compute it.
    /// `inception` is the weights file `net` was loaded from.
    pub fn load(path: &Path, net: &Inception, inception: &Path, batch: i64, comm: &dyn Comm) -> Result<Option<Reference>> {
        let file = path.display().to_string();
        if !path.is_file() {
            bail_input!("{file}: no such reference file");
        }
        let root = comm.rank() == 0;
        let cache = cache_path(path);
        // Rank 0 alone keys the cache (hashing the weights) and decides; all ranks follow,
        // since computing the statistics is collective.
        let key = all_ok(if root { cache_key(path, inception).map(Some) } else { Ok(None) }, comm)?;
        let valid = key.as_ref().is_some_and(|k| cached_key(&cache).as_deref() == Some(k.as_str()));
        let valid = agree(comm, &[valid as i64 as f64])?[0] > 0.0;
        let map: HashMap<String, Tensor> = if valid {
            if root {
                weights::read_map(&cache)?
            } else {
                HashMap::new()
            }
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
                // Only computed features are worth a cache; a read-only folder just means
                // computing them again next time.
                if let Some(key) = key {
                    let named: Vec<(String, Tensor)> = map.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
                    if let Err(e) = weights::write(&cache, &named, Some(HashMap::from([("key".to_string(), key)]))) {
                        eprintln!("warning: {}: reference statistics not cached: {e:#}", cache.display());
                    }
                }
            } else if let Some(k) = STATS.iter().find(|k| !map.contains_key(**k)) {
                bail_input!("{file}: {k}: missing (and no arr_0 images to compute it from)");
            }
            map
        };
        let reference = if root { Self::checked(&file, &map).map(Some) } else { Ok(None) };
        all_ok(reference, comm)
    }

    /// The reference from its named statistics, whose dimensions must be the Inception's.
    fn checked(file: &str, map: &HashMap<String, Tensor>) -> Result<Reference> {
        for (m, s, d) in [("mu", "sigma", 2048), ("mu_s", "sigma_s", 2023)] {
            let (mu, sigma) = (&map[m], &map[s]);
            if mu.size() != [d] || sigma.size() != [d, d] {
                bail_input!("{file}: {m}/{s}: dimensions {:?}/{:?}, the Inception features have {d}", mu.size(), sigma.size());
            }
        }
        let stats = |m: &str, s: &str| Stats { mu: map[m].to_kind(Kind::Double), sigma: map[s].to_kind(Kind::Double) };
        Ok(Reference { fid: stats("mu", "sigma"), sfid: stats("mu_s", "sigma_s"), pool: map.get("pool").map(|t| t.shallow_clone()) })
    }

    /// FID, sFID and Inception Score of the samples' Inception outputs.
    pub fn scores(&self, samples: &InceptionOutput) -> Scores {
        let (inception_score, inception_score_std) = inception_score(&samples.probs, 10);
        Scores {
            fid: frechet_distance(&Stats::of(&samples.pool), &self.fid),
            sfid: frechet_distance(&Stats::of(&samples.spatial), &self.sfid),
            inception_score,
            inception_score_std,
        }
    }
}

/// What a cache depends on: the Inception weights (their SHA-256) and the reference file
/// (its size and modification time).
fn cache_key(reference: &Path, inception: &Path) -> Result<String> {
    let weights = std::fs::read(inception).map_err(|e| bad_input(format!("{}: cannot read: {e}", inception.display())))?;
    let meta = std::fs::metadata(reference).map_err(|e| bad_input(format!("{}: {e}", reference.display())))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok(format!("inception {} reference {} bytes mtime {mtime}", weights::sha256_hex(&weights), meta.len()))
}

/// The key a cache file was written with (from its header alone), if it is readable.
fn cached_key(cache: &Path) -> Option<String> {
    let mut f = std::fs::File::open(cache).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let mut header = vec![0u8; usize::try_from(u64::from_le_bytes(len)).ok().filter(|&n| n <= 1 << 24)?];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(v.get("__metadata__")?.get("key")?.as_str()?.to_string())
}
