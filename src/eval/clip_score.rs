//! CLIP score of images against their captions, split over ranks like the Inception features.

use super::features::{block, ImageSet};
use crate::bail_input;
use crate::dist::{agree, all_ok, Comm};
use crate::encoders::clip::Clip;
use crate::encoders::clip_image::ClipImageProcessor;
use crate::encoders::clip_tokenizer::ClipTokenizer;
use crate::error::bad_input;
use anyhow::Result;
use std::path::Path;
use tch::{Kind, Tensor};

/// Per-pair CLIP scores `100 * max(cos(image_i, text_i), 0)`. [N, D] x [N, D] -> [N] f64
pub fn pair_scores(image_embeds: &Tensor, text_embeds: &Tensor) -> Tensor {
    let (a, b) = (image_embeds.to_kind(Kind::Double), text_embeds.to_kind(Kind::Double));
    let cos = (&a * &b).sum_dim_intlist(1, false, Kind::Double)
        / (a.norm_scalaropt_dim(2, [1], false) * b.norm_scalaropt_dim(2, [1], false)).clamp_min(1e-12);
    cos.clamp_min(0.0) * 100.0
}

/// CLIP score: the mean over images of `100 * max(cos(image_embeds_i, text_embeds_i), 0)`,
/// caption `i` belonging to image `i`. This is CLIPScore (Hessel et al. 2021) with the
/// weight 100 instead of 2.5, the figure text-to-image papers report (U-ViT/REPA-style
/// MS-COCO tables). torchmetrics' `CLIPScore` clamps the mean instead of each pair; the
/// two agree whenever no cosine is negative, which holds for real CLIP models on real
/// captions (cosines around 0.2 to 0.35).
///
/// Every rank must call it; rank `r` embeds its `features::block` of the images, and the
/// sums meet in one all-reduce, so every rank returns the score. Images are preprocessed
/// one by one (`processor`), so they need not share a size.
pub fn clip_score(
    clip: &Clip,
    processor: &ClipImageProcessor,
    tokenizer: &ClipTokenizer,
    images: &ImageSet,
    captions: &[String],
    batch: i64,
    comm: &dyn Comm,
) -> Result<f64> {
    let n = images.len();
    if captions.len() as i64 != n {
        bail_input!("{} captions for {n} images", captions.len());
    }
    let device = clip.text_projection.as_ref().map(|p| p.weight.device()).unwrap_or(tch::Device::Cpu);
    let (lo, hi) = block(n, comm.rank(), comm.world());
    let local = (lo..hi).step_by(batch.max(1) as usize).try_fold(0.0f64, |sum, at| -> Result<f64> {
        let count = batch.min(hi - at);
        let imgs: Vec<_> = (at..at + count).map(|i| images.image(i)).collect::<Result<_>>()?;
        let px = processor.batch(&imgs)?.to_device(device);
        let texts: Vec<&str> = captions[at as usize..(at + count) as usize].iter().map(String::as_str).collect();
        let ids = tokenizer.batch(&texts)?.to_device(device);
        let s = pair_scores(&clip.image_embeds(&px, Kind::Float)?, &clip.text_embeds(&ids, Kind::Float)?);
        Ok(sum + s.sum(Kind::Double).double_value(&[]))
    });
    let local = all_ok(local, comm)?;
    Ok(agree(comm, &[local])?[0] / n.max(1) as f64)
}

/// A captions file: a JSON array of strings, caption `i` for image `i` (what
/// `reg-ddp sample --captions` writes as `captions.json` beside its images).
pub fn read_captions(path: &Path) -> Result<Vec<String>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| bad_input(format!("{file}: cannot read: {e}")))?;
    serde_json::from_str::<Vec<String>>(&text)
        .map_err(|e| bad_input(format!("{file}: expected a JSON array of strings (caption i for image i): {e}")))
}
