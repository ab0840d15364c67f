//! FID during training: the EMA model generates `eval.fid_num` images, each rank its block
//! of the global image indices, and their Inception statistics meet the reference's.

use super::Trainer;
use crate::config::Config;
use crate::diffusion::generate::{latents, to_images, Labels, SampleSpec};
use crate::encoders::decoder::Decoder;
use crate::encoders::inception::Inception;
use crate::eval::features::features_by_rank;
use crate::eval::reference::{Reference, Scores};
use anyhow::Result;
use std::path::Path;

/// The networks and reference an evaluation needs, loaded once per run.
pub struct FidProbe {
    net: Inception,
    vae: Decoder,
    /// On rank 0 only.
    reference: Option<Reference>,
    spec: SampleSpec,
    num: i64,
    batch: i64,
}

impl FidProbe {
    /// `None` when the config has no FID tracking. Every rank must call it: reference
    /// statistics missing from the cache are computed over all ranks.
    pub fn new(t: &Trainer) -> Result<Option<FidProbe>> {
        let cfg: &Config = &t.cfg;
        let e = &cfg.eval;
        if e.fid_every == 0 {
            return Ok(None);
        }
        // Validation made sure these are present.
        let (reference, inception) = (e.reference.as_deref().expect("eval.ref"), e.inception.as_deref().expect("eval.inception"));
        let vae = e.vae.as_ref().or(cfg.sample.vae.as_ref()).expect("eval.vae or sample.vae");
        let vae = Decoder::load(vae, t.device)?;
        if vae.latent_channels() != t.dims.in_channels {
            crate::bail_input!(
                "eval.vae: latent_channels {} but the model has {} input channels",
                vae.latent_channels(),
                t.dims.in_channels
            );
        }
        let net = Inception::load(Path::new(inception), t.device)?;
        let reference = Reference::load(Path::new(reference), &net, Path::new(inception), e.batch, t.comm.as_ref())?;
        let spec = t.sample_spec(e.sampler(), e.seed, Labels::Random);
        Ok(Some(FidProbe { net, vae, reference, spec, num: e.fid_num, batch: e.batch }))
    }

    /// Generates and scores the images with the model's current weights (the caller puts
    /// the EMA in place). Every rank must call it; rank 0 gets the score. `progress` is
    /// called after each batch (an evaluation can outlast the watchdog's timeout).
    pub fn score(&self, t: &Trainer, progress: &dyn Fn()) -> Result<Option<Scores>> {
        let _g = tch::no_grad_guard();
        let out = features_by_rank(self.num, self.batch, &self.net, t.comm.as_ref(), |at, count| {
            let indices: Vec<u64> = (at as u64..(at + count) as u64).collect();
            let images = to_images(&latents(&t.model, &indices, &self.spec, t.text_encoder(), t.device)?, Some(&self.vae), t.kind);
            progress();
            Ok(images)
        })?;
        Ok(self.reference.as_ref().map(|r| r.scores(&out)))
    }
}
