//! REG/EDM2's preprocessed layout, read as `dataset_tools.py` writes it: images
//! `imagenet_256_vae/NNNNN/imgNNNNNNNN.png` and VAE moments
//! `vae-sd/NNNNN/img-mean-std-NNNNNNNN.npy` with `vae-sd/dataset.json`, each tree a
//! folder or a `.zip` of stored entries. Records pair as REG's `dataset.py` pairs them.

use crate::bail_input;
use crate::error::bad_input;
use crate::formats::stored_zip::StoredZip;
use anyhow::Result;
use serde::Deserialize;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The images' tree and the moments' tree under `--from-reg DIR` (REG's `dataset.py` names).
pub const IMAGES: &str = "imagenet_256_vae";
pub const MOMENTS: &str = "vae-sd";

/// One file of a dataset: on disk, or an entry of a zip archive.
#[derive(Clone)]
pub enum Blob {
    File(PathBuf),
    Zipped(Arc<StoredZip>, String),
}

impl Blob {
    /// Where it is, for messages: the path, or `archive.zip:entry`.
    pub fn name(&self) -> String {
        match self {
            Blob::File(p) => p.display().to_string(),
            Blob::Zipped(z, e) => format!("{}:{e}", z.path().display()),
        }
    }

    pub fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        match self {
            Blob::File(p) => Ok(Cow::Owned(std::fs::read(p).map_err(|e| bad_input(format!("{}: cannot read: {e}", p.display())))?)),
            Blob::Zipped(z, e) => Ok(Cow::Borrowed(z.get(e).ok_or_else(|| bad_input(format!("{}: missing", self.name())))?)),
        }
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// A tree of `dataset_tools.py` output: `DIR/name/` or `DIR/name.zip`.
enum Tree {
    Folder(PathBuf),
    Zip(Arc<StoredZip>),
}

impl Tree {
    fn open(root: &Path, name: &str) -> Result<Tree> {
        let (dir, zip) = (root.join(name), root.join(format!("{name}.zip")));
        match (dir.is_dir(), zip.is_file()) {
            (true, false) => Ok(Tree::Folder(dir)),
            (false, true) => Ok(Tree::Zip(Arc::new(StoredZip::open(&zip)?))),
            (true, true) => bail_input!("{}: both {name}/ and {name}.zip exist; keep one", root.display()),
            (false, false) => bail_input!("{}: neither {name}/ nor {name}.zip exists", root.display()),
        }
    }

    /// Every file's name relative to the tree, `/`-separated, sorted (as `dataset.py` sorts them).
    fn files(&self) -> Result<Vec<String>> {
        let mut out = match self {
            Tree::Zip(z) => z.names().map(str::to_string).collect(),
            Tree::Folder(dir) => {
                let mut out = Vec::new();
                let mut todo = vec![dir.clone()];
                while let Some(d) = todo.pop() {
                    let rd = std::fs::read_dir(&d).map_err(|e| bad_input(format!("{}: cannot list: {e}", d.display())))?;
                    for e in rd.flatten() {
                        let p = e.path();
                        if p.is_dir() {
                            todo.push(p);
                        } else if let Ok(rel) = p.strip_prefix(dir) {
                            out.push(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
                        }
                    }
                }
                out
            }
        };
        out.sort();
        Ok(out)
    }

    fn blob(&self, rel: &str) -> Blob {
        match self {
            Tree::Folder(dir) => Blob::File(dir.join(rel)),
            Tree::Zip(z) => Blob::Zipped(z.clone(), rel.to_string()),
        }
    }

    fn shown(&self) -> String {
        match self {
            Tree::Folder(d) => d.display().to_string(),
            Tree::Zip(z) => z.path().display().to_string(),
        }
    }
}

#[derive(Deserialize)]
struct DatasetJson {
    labels: Option<Vec<(String, i64)>>,
}

/// One record: its image, its moments, its class.
pub struct RegRecord {
    pub image: Blob,
    pub moments: Blob,
    pub label: i64,
}

/// The records of `--from-reg DIR` in REG's order: the sorted image files paired with
/// the sorted moment files by position, labels from `vae-sd/dataset.json`.
pub fn list(root: &Path) -> Result<Vec<RegRecord>> {
    let (images, moments) = (Tree::open(root, IMAGES)?, Tree::open(root, MOMENTS)?);
    let meta = moments.blob("dataset.json");
    let json: DatasetJson = serde_json::from_slice(&meta.bytes()?).map_err(|e| bad_input(format!("{}: labels: {e}", meta.name())))?;
    let Some(labels) = json.labels else {
        bail_input!("{}: labels: null (the images were converted without classes); --from-reg needs class labels", meta.name());
    };
    let mut by_file: std::collections::HashMap<String, i64> = std::collections::HashMap::with_capacity(labels.len());
    for (file, label) in labels {
        if label < 0 {
            bail_input!("{}: labels: {file}: negative class {label}", meta.name());
        }
        by_file.insert(file, label);
    }
    let ext = |f: &str| f.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    let image_files: Vec<String> = images.files()?.into_iter().filter(|f| ["png", "jpg", "jpeg"].contains(&ext(f).as_str())).collect();
    let moment_files: Vec<String> = moments.files()?.into_iter().filter(|f| ext(f) == "npy").collect();
    if image_files.len() != moment_files.len() {
        bail_input!(
            "{}: {} images, but {} has {} moment files (.npy); they pair one to one",
            images.shown(),
            image_files.len(),
            moments.shown(),
            moment_files.len()
        );
    }
    if image_files.is_empty() {
        bail_input!("{}: no images", images.shown());
    }
    for listed in by_file.keys() {
        if moment_files.binary_search(listed).is_err() {
            bail_input!("{}: labels: {listed}: no such file in {}", meta.name(), moments.shown());
        }
    }
    image_files
        .iter()
        .zip(&moment_files)
        .map(|(img, npy)| {
            let Some(&label) = by_file.get(npy) else {
                bail_input!("{}: labels: no label for {npy}", meta.name());
            };
            Ok(RegRecord { image: images.blob(img), moments: moments.blob(npy), label })
        })
        .collect()
}
