//! The reference side of an evaluation: an ADM batch (`VIRTUAL_imagenet256_labeled.npz`)
//! holding images and/or precomputed statistics, or a folder of real images (COCO val2014).
//! As in the ADM evaluator, statistics stored in a file are used as they are, and its
//! images give the pool features for precision/recall (and the statistics when the file
//! has none); a folder's images get the ADM center crop at the samples' resolution first.
//! What had to be computed is cached beside the file or folder, keyed by the Inception
//! weights and the reference (file size and time, or the folder's listing).

use super::features::{check_images, features_by_rank, features_of, ImageSet};
use super::{frechet_distance, inception_score, Stats};
use crate::bail_input;
use crate::dist::{agree, all_ok, Comm};
use crate::encoders::inception::{Inception, InceptionOutput};
use crate::error::bad_input;
use crate::formats::npy::NpzArray;
use crate::formats::pillow_decode::decode_rgb;
use crate::formats::pillow_resample::center_crop_adm;
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
        // Rank 0 alone keys the cache (hashing the weights); all ranks follow.
        let key = if root { cache_key(path, inception).map(Some) } else { Ok(None) };
        let map = cached(&cache_path(path), key, comm, || {
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
                // Only computed features are worth a cache.
                return Ok((map, true));
            }
            if let Some(k) = STATS.iter().find(|k| !map.contains_key(**k)) {
                bail_input!("{file}: {k}: missing (and no arr_0 images to compute it from)");
            }
            Ok((map, false))
        })?;
        let reference = if root { Self::checked(&file, &map).map(Some) } else { Ok(None) };
        all_ok(reference, comm)
    }

    /// Reads (or computes, split over ranks, and caches in `folder_cache_path`) the
    /// statistics of a folder of real images (JPEG/PNG, subfolders included, in sorted
    /// path order), each decoded as Pillow does and ADM-center-cropped to `resolution`,
    /// the samples' size. Every rank must call it; rank 0 gets the reference.
    pub fn load_folder(
        dir: &Path,
        resolution: u32,
        net: &Inception,
        inception: &Path,
        batch: i64,
        comm: &dyn Comm,
    ) -> Result<Option<Reference>> {
        let name = dir.display().to_string();
        if resolution == 0 {
            bail_input!("{name}: the samples have no pixels to crop the reference images to");
        }
        let files = list_images(dir)?;
        let cache = folder_cache_path(dir, resolution)?;
        let root = comm.rank() == 0;
        let key = if root { folder_key(dir, &files, resolution, inception).map(Some) } else { Ok(None) };
        let map = cached(&cache, key, comm, || {
            let out = features_by_rank(files.len() as i64, batch, net, comm, |lo, count| {
                let crops: Vec<Tensor> = files[lo as usize..(lo + count) as usize]
                    .iter()
                    .map(|p| {
                        let why = |e: &dyn std::fmt::Display| bad_input(format!("{}: {e}", p.display()));
                        let bytes = std::fs::read(p).map_err(|e| why(&e))?;
                        let img = decode_rgb(&bytes).map_err(|e| why(&e))?;
                        let c = center_crop_adm(&img, resolution);
                        Ok(Tensor::from_slice(c.as_raw()).view([resolution as i64, resolution as i64, 3]))
                    })
                    .collect::<Result<_>>()?;
                Ok(Tensor::stack(&crops, 0))
            })?;
            let (s, ss) = (Stats::of(&out.pool), Stats::of(&out.spatial));
            let map = HashMap::from(
                [("mu", s.mu), ("sigma", s.sigma), ("mu_s", ss.mu), ("sigma_s", ss.sigma), ("pool", out.pool)]
                    .map(|(k, v)| (k.to_string(), v)),
            );
            Ok((map, true))
        })?;
        let reference = if root { Self::checked(&name, &map).map(Some) } else { Ok(None) };
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
    Ok(format!("inception {} reference {} bytes mtime {}", weights::sha256_hex(&weights), meta.len(), mtime_ns(&meta)))
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

/// The cache of a folder reference at `resolution`: `<folder>.<resolution>.reg-ddp-stats.safetensors`
/// beside the folder (its path made absolute, so that `.` or a trailing slash still name it).
pub fn folder_cache_path(dir: &Path, resolution: u32) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(dir).map_err(|e| bad_input(format!("{}: {e}", dir.display())))?;
    let Some(name) = abs.file_name() else { bail_input!("{}: a reference folder needs a parent to keep its cache in", dir.display()) };
    Ok(abs.with_file_name(format!("{}.{resolution}.reg-ddp-stats.safetensors", name.to_string_lossy())))
}

/// The JPEG and PNG files under `dir` (subfolders too; symbolic links to folders are not
/// followed), sorted by path.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let rd = std::fs::read_dir(dir).map_err(|e| bad_input(format!("{}: cannot list: {e}", dir.display())))?;
        for e in rd {
            let e = e.map_err(|e| bad_input(format!("{}: cannot list: {e}", dir.display())))?;
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|x| ["jpg", "jpeg", "png"].contains(&x.to_string_lossy().to_lowercase().as_str())) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort();
    if out.is_empty() {
        bail_input!("{}: no JPEG or PNG images", dir.display());
    }
    Ok(out)
}

/// What a folder's cache depends on: the Inception weights, the crop size, and the
/// listing (every image's path, size and modification time), so that adding, removing,
/// replacing or touching an image recomputes the statistics.
fn folder_key(dir: &Path, files: &[PathBuf], resolution: u32, inception: &Path) -> Result<String> {
    let weights = std::fs::read(inception).map_err(|e| bad_input(format!("{}: cannot read: {e}", inception.display())))?;
    let mut listing = String::new();
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| bad_input(format!("{}: {e}", f.display())))?;
        let rel = f.strip_prefix(dir).unwrap_or(f);
        listing += &format!("{}\t{}\t{}\n", rel.display(), meta.len(), mtime_ns(&meta));
    }
    Ok(format!(
        "inception {} folder adm-crop {resolution} images {} listing {}",
        weights::sha256_hex(&weights),
        files.len(),
        weights::sha256_hex(listing.as_bytes())
    ))
}

fn mtime_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos())
}

/// The named tensors of a reference: read from `cache` when its key is `key` (rank 0's;
/// the others pass `Ok(None)`), else `compute`d on every rank (it may be collective) and
/// written to the cache by rank 0 when `compute` says it is worth keeping. Only rank 0's
/// map is filled when the cache is read.
fn cached(
    cache: &Path,
    key: Result<Option<String>>,
    comm: &dyn Comm,
    compute: impl FnOnce() -> Result<(HashMap<String, Tensor>, bool)>,
) -> Result<HashMap<String, Tensor>> {
    let key = all_ok(key, comm)?;
    let valid = key.as_ref().is_some_and(|k| cached_key(cache).as_deref() == Some(k.as_str()));
    let valid = agree(comm, &[valid as i64 as f64])?[0] > 0.0;
    if valid {
        return if comm.rank() == 0 { weights::read_map(cache) } else { Ok(HashMap::new()) };
    }
    let (map, keep) = compute()?;
    // A read-only folder just means computing them again next time.
    if let (true, Some(key)) = (keep, key) {
        let named: Vec<(String, Tensor)> = map.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        if let Err(e) = weights::write(cache, &named, Some(HashMap::from([("key".to_string(), key)]))) {
            eprintln!("warning: {}: reference statistics not cached: {e:#}", cache.display());
        }
    }
    Ok(map)
}
