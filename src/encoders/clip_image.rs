//! CLIP's image preprocessing (`CLIPImageProcessor` of transformers, as for `openai/clip-vit-*`): RGB u8 -> `pixel_values`.
//
// transformers' PIL backend (`CLIPImageProcessorPil`, and the original OpenAI
// preprocessing) resizes the short side with Pillow's BICUBIC on u8, cuts the center,
// rescales by 1/255 and normalises. `formats::pillow_resample::resize` is Pillow's resampler bit for
// bit, and the float steps below follow numpy's order and precision (the rescale in
// f64 then cast to f32, the normalisation in f32), so the pixel values come out the
// same (tests/clip_score.rs). transformers 5's default `CLIPImageProcessor` resizes
// with torchvision instead, which lands up to one grey level (0.015 after the
// normalisation) away from Pillow.

use crate::bail_input;
use crate::error::bad_input;
use crate::formats::pillow_resample::{resize, Filter};
use anyhow::Result;
use image::RgbImage;
use serde_json::Value;
use std::path::Path;
use tch::Tensor;

/// `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` of transformers.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// How the image is resized before the crop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTo {
    /// `{"shortest_edge": s}`: the short side to `s`, the long one to
    /// `int(s * long / short)` (aspect ratio kept, truncated as transformers does).
    ShortestEdge(u32),
    /// `{"height": h, "width": w}`: exactly this size.
    Exact { height: u32, width: u32 },
}

/// The settings of a `preprocessor_config.json` that the pixels depend on.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipImageProcessor {
    pub size: ResizeTo,
    /// Center crop (height, width); zero padding where the resized image is smaller.
    pub crop_size: (u32, u32),
    pub rescale_factor: f64,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl ClipImageProcessor {
    /// OpenAI's preprocessing at `size` px (224 for `openai/clip-vit-*-patch*`).
    pub fn openai(size: u32) -> ClipImageProcessor {
        ClipImageProcessor {
            size: ResizeTo::ShortestEdge(size),
            crop_size: (size, size),
            rescale_factor: 1.0 / 255.0,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
        }
    }

    /// The processor of a CLIP folder: `dir/preprocessor_config.json` when present, else
    /// OpenAI's at the vision tower's `image_size`.
    pub fn load(dir: &Path, image_size: i64) -> Result<ClipImageProcessor> {
        let path = dir.join("preprocessor_config.json");
        let size = u32::try_from(image_size).map_err(|_| bad_input(format!("{}: image_size {image_size} out of range", dir.display())))?;
        if !path.exists() {
            return Ok(ClipImageProcessor::openai(size));
        }
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| bad_input(format!("{file}: cannot read: {e}")))?;
        Self::parse(&text, &file, size)
    }

    /// Reads a `preprocessor_config.json` (fields it does not name default to OpenAI's at
    /// `default_size`). Settings these pixels cannot follow (another resampling filter,
    /// a step switched off) are refused rather than ignored.
    pub fn parse(text: &str, file: &str, default_size: u32) -> Result<ClipImageProcessor> {
        let j: Value = serde_json::from_str(text).map_err(|e| bad_input(format!("{file}: not valid JSON: {e}")))?;
        let Some(obj) = j.as_object() else { bail_input!("{file}: expected a JSON object") };
        let field_err = |name: &str, want: &str, v: &Value| bad_input(format!("{file}: field {name}: expected {want}, found {v}"));
        let mut p = ClipImageProcessor::openai(default_size);
        let positive = |name: &str, v: &Value| -> Result<u32> {
            v.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|&n| n > 0).ok_or_else(|| field_err(name, "a positive integer", v))
        };
        let hw = |name: &str, v: &Value| -> Result<Option<(u32, u32)>> {
            match (v.get("height"), v.get("width")) {
                (Some(h), Some(w)) => Ok(Some((positive(&format!("{name}.height"), h)?, positive(&format!("{name}.width"), w)?))),
                _ => Ok(None),
            }
        };
        if let Some(v) = obj.get("size") {
            p.size = if v.is_number() {
                ResizeTo::ShortestEdge(positive("size", v)?)
            } else if let Some(s) = v.get("shortest_edge") {
                if v.get("longest_edge").is_some_and(|l| !l.is_null()) {
                    bail_input!("{file}: field size.longest_edge: not supported (CLIP resizes the shortest edge only)");
                }
                ResizeTo::ShortestEdge(positive("size.shortest_edge", s)?)
            } else if let Some((height, width)) = hw("size", v)? {
                ResizeTo::Exact { height, width }
            } else {
                return Err(field_err("size", "an integer, {\"shortest_edge\"} or {\"height\", \"width\"}", v));
            };
        }
        if let Some(v) = obj.get("crop_size") {
            p.crop_size = if v.is_number() {
                let s = positive("crop_size", v)?;
                (s, s)
            } else {
                hw("crop_size", v)?.ok_or_else(|| field_err("crop_size", "an integer or {\"height\", \"width\"}", v))?
            };
        }
        if let Some(v) = obj.get("rescale_factor") {
            p.rescale_factor =
                v.as_f64().filter(|f| f.is_finite() && *f > 0.0).ok_or_else(|| field_err("rescale_factor", "a positive number", v))?;
        }
        for (name, out) in [("image_mean", &mut p.image_mean), ("image_std", &mut p.image_std)] {
            if let Some(v) = obj.get(name) {
                let xs: Option<Vec<f64>> = v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect());
                match xs {
                    Some(xs) if xs.len() == 3 && v.as_array().is_some_and(|a| a.len() == 3) => out.copy_from_slice(&xs),
                    _ => return Err(field_err(name, "3 numbers", v)),
                }
            }
        }
        if p.image_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail_input!("{file}: field image_std: must be positive, found {:?}", p.image_std);
        }
        // Pillow's BICUBIC is 3.
        if let Some(v) = obj.get("resample") {
            if v.as_i64() != Some(3) {
                bail_input!("{file}: field resample: only 3 (bicubic) is supported, found {v}");
            }
        }
        for flag in ["do_resize", "do_center_crop", "do_rescale", "do_normalize"] {
            if let Some(v) = obj.get(flag) {
                if v.as_bool() != Some(true) {
                    bail_input!("{file}: field {flag}: only true is supported, found {v}");
                }
            }
        }
        Ok(p)
    }

    /// The (width, height) an image of `w` x `h` is resized to.
    pub fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        match self.size {
            ResizeTo::Exact { height, width } => (width, height),
            ResizeTo::ShortestEdge(s) => {
                let (short, long) = (w.min(h), w.max(h));
                // Python's int(s * long / short): a float division, truncated.
                let new_long = (f64::from(s) * f64::from(long) / f64::from(short)) as u32;
                if w <= h {
                    (s, new_long.max(1))
                } else {
                    (new_long.max(1), s)
                }
            }
        }
    }

    /// The resized, center-cropped u8 pixels (`crop_size`, RGB), before the rescale.
    pub fn crop(&self, img: &RgbImage) -> Result<RgbImage> {
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            bail_input!("an image of {w}x{h} pixels has nothing to resize");
        }
        let (rw, rh) = self.resized_size(w, h);
        let resized = if (rw, rh) == (w, h) { img.clone() } else { resize(img, rw, rh, Filter::Bicubic) };
        let (ch, cw) = self.crop_size;
        // transformers' center_crop: offset (size - crop) // 2 (floor division); where the
        // image is smaller than the crop it is centred on zeros, which is the same offset.
        let top = (i64::from(rh) - i64::from(ch)).div_euclid(2);
        let left = (i64::from(rw) - i64::from(cw)).div_euclid(2);
        Ok(RgbImage::from_fn(cw, ch, |x, y| {
            let (sx, sy) = (i64::from(x) + left, i64::from(y) + top);
            if (0..i64::from(rw)).contains(&sx) && (0..i64::from(rh)).contains(&sy) {
                *resized.get_pixel(sx as u32, sy as u32)
            } else {
                image::Rgb([0, 0, 0])
            }
        }))
    }

    /// `pixel_values` of one image: [3, crop_h, crop_w] f32.
    pub fn pixel_values(&self, img: &RgbImage) -> Result<Tensor> {
        let crop = self.crop(img)?;
        let (w, h) = crop.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        // numpy's order: u8 -> f64 times the factor -> f32; then (x - mean) / std in f32.
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        for (i, px) in crop.pixels().enumerate() {
            for c in 0..3 {
                let x = (f64::from(px.0[c]) * self.rescale_factor) as f32;
                out[c * plane + i] = (x - mean[c]) / std[c];
            }
        }
        Ok(Tensor::from_slice(&out).view([3, h as i64, w as i64]))
    }

    /// `pixel_values` of a batch: [N, 3, crop_h, crop_w] f32.
    pub fn batch(&self, images: &[RgbImage]) -> Result<Tensor> {
        let px: Vec<Tensor> = images.iter().map(|i| self.pixel_values(i)).collect::<Result<_>>()?;
        Ok(Tensor::stack(&px, 0))
    }
}
