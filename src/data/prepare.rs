//! Preparation of a dataset folder: images -> ADM center crop -> SD-VAE moments and
//! DINOv2 tokens (and captions -> token ids, or CLIP text states) -> shards. Work is split by shard, so ranks write disjoint shards and
//! a rerun skips the shards already finished (verified by checksum).

use super::captions::CaptionEncoder;
use super::reg_layout::Blob;
use super::shards::{shard_name, write_index, EncoderInfo, Index, ShardInfo, TextInfo, NULL_CAPTION};
use super::sources::Entry;
use crate::bail_input;
use crate::encoders::{decoder::Decoder, dinov2::Dinov2};
use crate::formats::pillow_resample::center_crop_adm;
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The precomputed moments of a `--from-reg` record. [2C, H, W] f32
pub fn read_moments(blob: &Blob) -> Result<Tensor> {
    let t = match blob {
        Blob::File(p) => crate::formats::npy::read_npy(p)?,
        Blob::Zipped(..) => crate::formats::npy::parse(&blob.bytes()?, &blob.name())?,
    };
    Ok(t.to_kind(Kind::Float))
}

/// The models preparation runs, on one device.
pub struct Encoders {
    /// The SD-VAE or the identity map of the pixel-space path.
    pub vae: Option<Decoder>,
    pub encoder: Option<(String, Dinov2)>,
    /// The tokenizer (and text tower) of a captioned dataset.
    pub text: Option<CaptionEncoder>,
    pub device: Device,
    pub kind: Kind,
}

/// What a finished shard leaves beside itself (`shard-NNNNN.json`): its index entry
/// and the images that could not be read. Its presence marks the shard as done.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardDone {
    pub shard: ShardInfo,
    pub bad: Vec<(String, String)>,
}

pub struct Options {
    pub resolution: u32,
    pub latent_bf16: bool,
    pub store_features: bool,
    pub store_images: bool,
    pub batch: usize,
}

/// Decodes and crops one image: [3, R, R] u8, or why it failed (then `make_shard` lists it
/// as a bad image). JPEGs decode as Pillow does (`decode`), other formats under
/// `formats::images::limits()`: an image too large is a bad image, not an allocation.
pub fn load_image(blob: &Blob, resolution: u32, crop: bool) -> std::result::Result<Tensor, String> {
    let img = crate::formats::pillow_decode::decode_rgb(&blob.bytes().map_err(|e| e.to_string())?).map_err(|e| format!("{e:#}"))?;
    let img = if crop {
        center_crop_adm(&img, resolution)
    } else if img.width() == resolution && img.height() == resolution {
        img
    } else {
        return Err(format!("{}x{} image, expected {resolution}x{resolution}", img.width(), img.height()));
    };
    let t = Tensor::from_slice(img.as_raw()).view([resolution as i64, resolution as i64, 3]);
    Ok(t.permute([2, 0, 1]).contiguous())
}

fn sidecar(out: &Path, i: usize) -> PathBuf {
    out.join(format!("shard-{i:05}.json"))
}

/// A shard counts as done when its sidecar exists and the shard file matches the
/// checksum recorded there.
pub fn shard_done(out: &Path, i: usize) -> Option<ShardDone> {
    let done: ShardDone = serde_json::from_str(&std::fs::read_to_string(sidecar(out, i)).ok()?).ok()?;
    let bytes = std::fs::read(out.join(shard_name(i))).ok()?;
    (crate::formats::weights::sha256_hex(&bytes) == done.shard.sha256).then_some(done)
}

/// Encodes `entries` into shard `i`; unreadable images are skipped and reported.
pub fn make_shard(out: &Path, i: usize, entries: &[Entry], m: &Encoders, o: &Options, on_batch: &dyn Fn(usize)) -> Result<ShardDone> {
    let (mut lat, mut feat, mut imgs, mut labels, mut bad) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Captions of the records kept (an unreadable image takes its captions with it).
    let (mut captions, mut offsets): (Vec<&str>, Vec<i64>) = (Vec::new(), vec![0]);
    for chunk in entries.chunks(o.batch) {
        let crop = chunk.iter().all(|e| e.moments.is_none());
        let loaded: Vec<_> = chunk.par_iter().map(|e| load_image(&e.image, o.resolution, crop)).collect();
        let mut ok = Vec::new();
        for (e, r) in chunk.iter().zip(loaded) {
            match r {
                Ok(t) => ok.push((e, t)),
                Err(why) => bad.push((e.image.name(), why)),
            }
        }
        if ok.is_empty() {
            continue;
        }
        let pixels = Tensor::stack(&ok.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>(), 0);
        let on_dev = pixels.to_device(m.device);
        let moments = if let Some(vae) = &m.vae {
            vae.encode_moments(&on_dev, m.kind).to_device(Device::Cpu)
        } else {
            let ms: Vec<Tensor> =
                ok.iter().map(|(e, _)| read_moments(e.moments.as_ref().expect("from-reg entry"))).collect::<Result<_>>()?;
            Tensor::stack(&ms, 0)
        };
        lat.push(if o.latent_bf16 { moments.to_kind(Kind::BFloat16) } else { moments });
        if o.store_features {
            let (_, enc) = m.encoder.as_ref().context("features need an encoder")?;
            feat.push(enc.features(&on_dev, m.kind).to_device(Device::Cpu).to_kind(Kind::BFloat16));
        }
        if o.store_images {
            imgs.push(pixels);
        }
        labels.extend(ok.iter().map(|(e, _)| e.label));
        for (e, _) in &ok {
            captions.extend(e.captions.iter().map(String::as_str));
            offsets.push(captions.len() as i64);
        }
        on_batch(chunk.len());
    }
    if labels.is_empty() {
        bail_input!(
            "shard {i}: none of its {} images could be read (first: {})",
            entries.len(),
            bad.first().map(|b| b.0.as_str()).unwrap_or("?")
        );
    }
    let mut tensors = vec![("latents".to_string(), Tensor::cat(&lat, 0)), ("labels".to_string(), Tensor::from_slice(&labels))];
    if o.store_features {
        tensors.push(("features".into(), Tensor::cat(&feat, 0)));
    }
    if o.store_images {
        tensors.push(("images".into(), Tensor::cat(&imgs, 0)));
    }
    if let Some(text) = &m.text {
        let ids = text.ids(&captions)?;
        if text.info.precomputed {
            let (hidden, pooled) = text.encode(&ids.to_device(m.device), o.batch, m.kind)?;
            tensors.push(("caption_hidden".into(), hidden.to_kind(Kind::BFloat16)));
            tensors.push(("caption_pooled".into(), pooled.to_kind(Kind::BFloat16)));
        }
        tensors.push(("caption_ids".into(), ids));
        tensors.push(("caption_offsets".into(), Tensor::from_slice(&offsets)));
    }
    let shard = super::shards::write_shard(out, i, &tensors)?;
    let done = ShardDone { shard, bad };
    crate::formats::weights::write_atomic(&sidecar(out, i), serde_json::to_string(&done)?.as_bytes())?;
    Ok(done)
}

/// Writes `index.json` from the shards' sidecars and the bad-image report; fails when
/// more than `max_bad_fraction` of the images could not be read.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    out: &Path,
    shards: usize,
    total: usize,
    classes: Vec<String>,
    m: &Encoders,
    o: &Options,
    latent_shape: Vec<i64>,
    vae_name: &str,
    max_bad_fraction: f64,
) -> Result<Index> {
    let mut infos = Vec::new();
    let mut bad = Vec::new();
    for i in 0..shards {
        let done = shard_done(out, i).ok_or_else(|| anyhow::anyhow!("{}: shard {i} is missing or corrupt", out.display()))?;
        infos.push(done.shard);
        bad.extend(done.bad);
    }
    let report = out.join("bad_images.txt");
    let lines: String = bad.iter().map(|(p, why)| format!("{p}\t{why}\n")).collect();
    std::fs::write(&report, lines).with_context(|| format!("{}: cannot write", report.display()))?;
    let encoder = m.encoder.as_ref().map(|(name, e)| EncoderInfo { name: name.clone(), tokens: e.num_tokens(), z_dim: e.hidden_size() });
    let text = match &m.text {
        Some(t) => {
            if let Some(i) = infos.iter().position(|s| s.captions.is_none()) {
                bail_input!("{}: shard {i} was prepared without captions; remove the folder to prepare it again", out.display());
            }
            if t.info.precomputed {
                write_null_caption(out, t, m)?;
            }
            Some(TextInfo { captions: infos.iter().filter_map(|s| s.captions).sum(), ..t.info.clone() })
        }
        None => None,
    };
    let index = Index {
        format_version: super::shards::FORMAT_VERSION,
        resolution: o.resolution as i64,
        latent_shape,
        latent_dtype: if o.latent_bf16 { "bf16" } else { "f32" }.into(),
        vae: vae_name.into(),
        encoder,
        features: o.store_features,
        images: o.store_images,
        class_names: classes,
        shards: infos,
        bad_images: bad.len() as i64,
        bad_images_report: Some("bad_images.txt".into()),
        text,
    };
    let fraction = bad.len() as f64 / total.max(1) as f64;
    if fraction > max_bad_fraction {
        bail_input!(
            "{}: {} of {total} images could not be read ({:.3}%, more than the allowed {:.3}%); see {}",
            out.display(),
            bad.len(),
            100.0 * fraction,
            100.0 * max_bad_fraction,
            report.display()
        );
    }
    write_index(out, &index)?;
    Ok(index)
}

/// `null_caption.safetensors`: the text tower's output for the empty caption "", the
/// null condition of guidance and caption dropout. hidden [1, L, D], pooled [1, D] f32.
fn write_null_caption(out: &Path, t: &CaptionEncoder, m: &Encoders) -> Result<()> {
    let ids = t.ids(&[""])?.to_device(m.device);
    let (hidden, pooled) = t.encode(&ids, 1, m.kind)?;
    crate::formats::weights::write(&out.join(NULL_CAPTION), &[("hidden".into(), hidden), ("pooled".into(), pooled)], None)
}
