//! What turns latents back into pixels: the SD-VAE, or the identity "autoencoder" of
//! the pixel-space path (`identity`, `identity:K` with space-to-depth by K), chosen by
//! one string wherever a VAE folder was given (`prepare --vae`, `sample --vae`,
//! `sample.vae`, `eval.vae`).
//
// Identity latents are the ADM-cropped pixels scaled to [-1, 1] (x / 127.5 - 1), so
// training on them wants `loss.latent_scale: 1.0` (the default 0.18215 is the SD-VAE's
// factor; with it the model would learn pixels shrunk five times and `decode` here,
// which knows no loss config, would write them back too dark).

use super::vae::Vae;
use crate::error::bad_input;
use anyhow::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A latent-to-pixel map.
pub enum Decoder {
    SdVae(Box<Vae>),
    /// Pixels in [-1, 1], space-to-depth by `s2d` (1: none): C = 3 * s2d^2, side R / s2d.
    Identity {
        s2d: i64,
    },
}

/// `Some(K)` when `spec` names the identity map (`identity` is K = 1, `identity:K`),
/// `None` when it is something else (a VAE folder); an error for `identity:` with a bad K.
pub fn identity_factor(spec: &str) -> Result<Option<i64>> {
    match spec.strip_prefix("identity") {
        Some("") => Ok(Some(1)),
        Some(rest) => match rest.strip_prefix(':').map(|k| k.parse::<i64>()) {
            Some(Ok(k)) if (1..=64).contains(&k) => Ok(Some(k)),
            Some(_) => Err(bad_input(format!("{spec:?}: identity:K needs a factor K in 1..=64"))),
            // e.g. a folder named `identity_vae`.
            None => Ok(None),
        },
        None => Ok(None),
    }
}

/// Pixels [N, 3, R, R] u8 -> identity moments [N, 2 * 3K^2, R/K, R/K] f32: mean = x / 127.5 - 1
/// (space-to-depth by K), std = 0, so `sample_posterior` returns the pixels unchanged.
pub fn identity_moments(pixels: &Tensor, s2d: i64) -> Tensor {
    let x = pixels.to_kind(Kind::Float) / 127.5 - 1.0;
    let mean = if s2d > 1 { x.pixel_unshuffle(s2d) } else { x };
    let std = mean.zeros_like();
    Tensor::cat(&[mean, std], 1)
}

impl Decoder {
    /// `identity`, `identity:K`, or an SD-VAE folder (diffusers layout) loaded onto `device`.
    pub fn load(spec: &str, device: Device) -> Result<Decoder> {
        Ok(match identity_factor(spec)? {
            Some(s2d) => Decoder::Identity { s2d },
            None => Decoder::SdVae(Box::new(Vae::load(Path::new(spec), device)?)),
        })
    }

    /// Pixels [N, 3, R, R] u8 -> moments [N, 2C, R/d, R/d] f32 (`prepare`), on the pixels' device.
    pub fn encode_moments(&self, pixels: &Tensor, kind: Kind) -> Tensor {
        match self {
            Decoder::SdVae(v) => v.encode_moments(pixels, kind),
            Decoder::Identity { s2d } => identity_moments(pixels, *s2d),
        }
    }

    /// Channels of the latents it decodes (what the model's `in_channels` must be).
    pub fn latent_channels(&self) -> i64 {
        match self {
            Decoder::SdVae(v) => v.latent_channels(),
            Decoder::Identity { s2d } => 3 * s2d * s2d,
        }
    }

    /// Pixels per latent along a side (8 for the SD-VAE).
    pub fn downsampling(&self) -> i64 {
        match self {
            Decoder::SdVae(_) => 8,
            Decoder::Identity { s2d } => *s2d,
        }
    }

    /// Scaled latents [N, C, h, w] -> pixels [N, 3, H, W] u8 on the latents' device. The
    /// identity clamps to [-1, 1] and writes (x + 1) * 127.5 rounded, so stored pixels come
    /// back exactly (f32 latents; bf16 ones keep 8 bits of mantissa, about 1 grey level).
    pub fn decode(&self, latents: &Tensor, kind: Kind) -> Tensor {
        match self {
            Decoder::SdVae(v) => v.decode(latents, kind),
            Decoder::Identity { s2d } => tch::no_grad(|| {
                let x = latents.to_kind(Kind::Float);
                let x = if *s2d > 1 { x.pixel_shuffle(*s2d) } else { x };
                ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to_kind(Kind::Uint8)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_specs_parse() {
        assert_eq!(identity_factor("identity").unwrap(), Some(1));
        assert_eq!(identity_factor("identity:4").unwrap(), Some(4));
        assert_eq!(identity_factor("identity_vae").unwrap(), None);
        assert_eq!(identity_factor("/models/sd-vae").unwrap(), None);
        assert!(identity_factor("identity:0").is_err() && identity_factor("identity:x").is_err());
    }

    #[test]
    fn every_grey_level_round_trips() {
        let px = Tensor::arange(256, (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8).view([1, 1, 16, 16]).repeat([2, 3, 1, 1]);
        for k in [1, 2, 4] {
            let m = identity_moments(&px, k);
            assert_eq!(m.size(), [2, 6 * k * k, 16 / k, 16 / k]);
            assert_eq!(f64::try_from(m.narrow(1, 3 * k * k, 3 * k * k).abs().max()).unwrap(), 0.0);
            let back = Decoder::Identity { s2d: k }.decode(&m.narrow(1, 0, 3 * k * k), Kind::Float);
            assert!(back.equal(&px), "identity:{k}");
        }
    }
}
