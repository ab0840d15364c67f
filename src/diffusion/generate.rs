//! Generating images for evaluation: the global image index decides the label (or
//! caption) and the noise, so the same seed gives the same images whatever the batch
//! or rank.

use crate::diffusion::path::Parameterization;
use crate::diffusion::sampler::{NoiseSource, PerImageNoise, Sampler};
use crate::encoders::decoder::Decoder;
use crate::encoders::text::TextEncoder;
use crate::model::sit::SiT;
use crate::model::{Caption, Cond};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// How labels are assigned to image indices.
#[derive(Debug, Clone)]
pub enum Labels {
    /// Uniform random classes, keyed by (seed, index).
    Random,
    /// `index % num_classes`: every class equally often.
    Balanced,
    /// `list[index % len]`.
    List(Vec<i64>),
    /// A text model's prompts: `captions[index % len]`.
    Captions(Vec<String>),
}

impl Labels {
    pub fn parse(s: &str, num_classes: i64) -> Result<Labels, String> {
        match s {
            "random" => Ok(Labels::Random),
            "balanced" => Ok(Labels::Balanced),
            list => {
                let v: Vec<i64> = list
                    .split(',')
                    .map(|x| x.trim().parse::<i64>().map_err(|_| format!("{x:?} is not a class index")))
                    .collect::<Result<_, _>>()?;
                if let Some(bad) = v.iter().find(|&&y| !(0..num_classes).contains(&y)) {
                    return Err(format!("class {bad} is outside [0, {num_classes})"));
                }
                Ok(Labels::List(v))
            }
        }
    }

    pub fn of(&self, seed: u64, index: u64, num_classes: i64) -> i64 {
        match self {
            Labels::Random => (crate::rng::step_seed(seed, index, crate::rng::stream::SAMPLE_LABEL) as u64 % num_classes as u64) as i64,
            Labels::Balanced => (index % num_classes as u64) as i64,
            Labels::List(v) => v[(index % v.len() as u64) as usize],
            Labels::Captions(_) => panic!("a caption is not a class label"),
        }
    }

    /// The conditions of the images `indices` and their null conditions; captions are
    /// encoded by `text` in `kind`.
    pub fn conditions(
        &self,
        seed: u64,
        indices: &[u64],
        num_classes: i64,
        text: Option<&TextEncoder>,
        kind: Kind,
        device: Device,
    ) -> Result<(Cond, Cond)> {
        match self {
            Labels::Captions(captions) => {
                let enc = text.ok_or_else(|| anyhow::anyhow!("captions need a text encoder (data.text_encoder_path)"))?;
                let texts: Vec<&str> = indices.iter().map(|&g| captions[(g % captions.len() as u64) as usize].as_str()).collect();
                let out = enc.encode(&texts, kind)?;
                let null = enc.null(kind)?;
                let caption =
                    |hidden: Tensor, pooled: Tensor| Caption { hidden: hidden.to_device(device), pooled: pooled.to_device(device) };
                let y = Cond::Text(caption(out.last_hidden_state, out.pooled));
                let null = caption(null.last_hidden_state, null.pooled);
                let y_null = y.null_like(num_classes, Some(&null));
                Ok((y, y_null))
            }
            _ => {
                let y: Vec<i64> = indices.iter().map(|&g| self.of(seed, g, num_classes)).collect();
                let y = Cond::Class(Tensor::from_slice(&y).to_device(device));
                let y_null = y.null_like(num_classes, None);
                Ok((y, y_null))
            }
        }
    }
}

/// What decides a generated image besides the weights: the sampler, the model's path and
/// prediction,
/// the seed of its noise and labels, the compute precision.
#[derive(Debug, Clone)]
pub struct SampleSpec {
    pub sampler: Sampler,
    pub param: Parameterization,
    pub seed: u64,
    pub labels: Labels,
    pub kind: Kind,
}

/// Final latents (scaled, as the model sees them) of the images `indices`; a text model
/// encodes its captions with `text`. [B, C, H, W] f32
pub fn latents(model: &SiT, indices: &[u64], spec: &SampleSpec, text: Option<&TextEncoder>, device: Device) -> Result<Tensor> {
    let d = &model.dims;
    let mut noise = PerImageNoise::new(spec.seed, indices.to_vec());
    let b = indices.len() as i64;
    // The first two draws of every image: its starting latents and REG token.
    let z = noise.draw(&[b, d.in_channels, d.input_size, d.input_size]).to_device(device);
    let cls = noise.draw(&[b, d.z_dim]).to_device(device);
    let (y, y_null) = spec.labels.conditions(spec.seed, indices, d.num_classes, text, spec.kind, device)?;
    Ok(spec.sampler.run(model, &z, &cls, &y, &y_null, spec.param, spec.kind, &mut noise).to_kind(Kind::Float))
}

/// Images as `[B, H, W, 3]` u8: decoded by the VAE (or the identity map of the pixel-space
/// path), or without one (synthetic data) the first three latent channels mapped to
/// colours, for a look at training.
pub fn to_images(latents: &Tensor, vae: Option<&Decoder>, kind: Kind) -> Tensor {
    let px = match vae {
        Some(v) => v.decode(latents, kind),
        None => {
            let x = latents.narrow(1, 0, 3.min(latents.size()[1]));
            let lo = x.amin([1, 2, 3], true);
            let hi = x.amax([1, 2, 3], true);
            ((x - &lo) / (hi - lo + 1e-6) * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8)
        }
    };
    px.permute([0, 2, 3, 1]).contiguous().to_device(Device::Cpu)
}

/// Tiles `[B, H, W, 3]` images into a `rows x cols` grid image.
pub fn grid(images: &Tensor, cols: i64) -> image::RgbImage {
    let (b, h, w) = (images.size()[0], images.size()[1], images.size()[2]);
    let rows = (b + cols - 1) / cols;
    let mut out = image::RgbImage::new((cols * w) as u32, (rows * h) as u32);
    let data: Vec<u8> = Vec::<u8>::try_from(images.flatten(0, -1)).expect("u8 images");
    for i in 0..b {
        let (r, c) = (i / cols, i % cols);
        for y in 0..h {
            for x in 0..w {
                let o = (((i * h + y) * w + x) * 3) as usize;
                out.put_pixel((c * w + x) as u32, (r * h + y) as u32, image::Rgb([data[o], data[o + 1], data[o + 2]]));
            }
        }
    }
    out
}

/// Tiles images of one size into rows of `cols`.
pub fn grid_of(images: &[image::RgbImage], cols: u32) -> image::RgbImage {
    let (w, h) = images.first().map(|i| (i.width(), i.height())).unwrap_or((1, 1));
    let cols = cols.max(1);
    let rows = (images.len() as u32).div_ceil(cols).max(1);
    let mut g = image::RgbImage::new(cols * w, rows * h);
    for (i, img) in images.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(&mut g, img, (c * w) as i64, (r * h) as i64);
    }
    g
}

/// Writes `images` as one PNG, `cols` a row, each pixel blown up to `scale` x `scale`
/// (small samples, for a look by eye).
pub fn save_grid(images: &[image::RgbImage], cols: u32, scale: u32, path: &std::path::Path) -> Result<()> {
    let g = grid_of(images, cols);
    let big = image::imageops::resize(&g, g.width() * scale, g.height() * scale, image::imageops::FilterType::Nearest);
    big.save(path).map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))
}
