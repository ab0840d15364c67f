//! The inputs of `prepare`: an ImageNet-style image tree (one folder per class) or REG's
//! preprocessed data, listed as records with their labels.

use super::reg_layout::{self, Blob};
use crate::bail_input;
use crate::error::bad_input;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// One input record.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The image (a JPEG/PNG of any size, or an already-cropped PNG for `--from-reg`).
    pub image: Blob,
    /// Precomputed VAE moments (`img-mean-std-*.npy`), for `--from-reg`.
    pub moments: Option<Blob>,
    pub label: i64,
    /// Its captions, for a captioned dataset (empty otherwise).
    pub captions: Vec<String>,
}

pub const IMAGE_EXT: [&str; 5] = ["jpg", "jpeg", "png", "JPEG", "PNG"];

/// An ImageNet-style tree: one folder per class (class index = sorted folder names).
pub fn list_image_tree(root: &Path) -> Result<(Vec<String>, Vec<Entry>)> {
    let rd = std::fs::read_dir(root).map_err(|e| bad_input(format!("{}: cannot list: {e}", root.display())))?;
    let mut classes: Vec<String> =
        rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    classes.sort();
    if classes.is_empty() {
        bail_input!("{}: no class folders", root.display());
    }
    let mut entries = Vec::new();
    for (label, c) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(c))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().map(|x| IMAGE_EXT.contains(&x.to_string_lossy().as_ref())).unwrap_or(false))
            .collect();
        files.sort();
        entries.extend(files.into_iter().map(|image| Entry {
            image: Blob::File(image),
            moments: None,
            label: label as i64,
            captions: Vec::new(),
        }));
    }
    Ok((classes, entries))
}

/// REG/EDM2's preprocessed data (`reg_layout`): its records with their moments, and
/// class names `0000`, `0001`, ... up to the largest label.
pub fn list_reg(root: &Path) -> Result<(Vec<String>, Vec<Entry>)> {
    let records = reg_layout::list(root)?;
    let k = records.iter().map(|r| r.label + 1).max().unwrap_or(0);
    let entries =
        records.into_iter().map(|r| Entry { image: r.image, moments: Some(r.moments), label: r.label, captions: Vec::new() }).collect();
    Ok(((0..k).map(|c| format!("{c:04}")).collect(), entries))
}

/// Width and height of an image, from its header.
pub fn image_size(blob: &Blob) -> Result<(u32, u32)> {
    let r = match blob {
        Blob::File(p) => image::image_dimensions(p),
        Blob::Zipped(..) => {
            let bytes = blob.bytes()?;
            image::ImageReader::new(std::io::Cursor::new(&bytes[..])).with_guessed_format()?.into_dimensions()
        }
    };
    r.map_err(|e| bad_input(format!("{}: cannot read: {e}", blob.name())))
}
