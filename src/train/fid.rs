//! FID during training: the EMA model generates `eval.fid_num` images, each rank its block
//! of the global image indices, and their Inception statistics meet the reference's.

use super::Trainer;
use crate::config::Config;
use crate::diffusion::generate::{latents, to_images, Labels, SampleSpec};
use crate::diffusion::sampler::Guidance;
use crate::eval::features::{block, Collector};
use crate::eval::reference::Reference;
use crate::eval::{frechet_distance, inception_score, Stats};
use crate::model::inception::Inception;
use crate::model::vae::Vae;
use anyhow::Result;
use std::path::Path;

/// What an evaluation reports.
#[derive(Debug, Clone, Copy)]
pub struct FidScore {
    pub fid: f64,
    /// sFID (spatial features).
    pub sfid: f64,
    /// Inception Score (mean over 10 splits).
    pub inception_score: f64,
}

/// The networks and reference an evaluation needs, loaded once per run.
pub struct FidProbe {
    net: Inception,
    vae: Vae,
    reference: Reference,
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
        let vae = Vae::load(Path::new(vae), t.device)?;
        if vae.latent_channels() != t.dims.in_channels {
            crate::bail_input!(
                "eval.vae: latent_channels {} but the model has {} input channels",
                vae.latent_channels(),
                t.dims.in_channels
            );
        }
        let net = Inception::load(Path::new(inception), t.device)?;
        let reference = Reference::load(Path::new(reference), &net, Path::new(inception), e.batch, t.comm.as_ref())?;
        let spec = SampleSpec {
            ode: e.mode == "ode",
            heun: true,
            steps: e.steps,
            guidance: Guidance { cfg: e.cfg, cls_cfg: e.cls_cfg, low: 0.0, high: 1.0 },
            path: cfg.loss.path,
            seed: e.seed,
            labels: Labels::Random,
            kind: t.kind,
        };
        Ok(Some(FidProbe { net, vae, reference, spec, num: e.fid_num, batch: e.batch }))
    }

    /// Generates and scores the images with the model's current weights (the caller puts
    /// the EMA in place). Every rank must call it; rank 0 gets the score. `progress` is
    /// called after each batch (an evaluation can outlast the watchdog's timeout).
    pub fn score(&self, t: &Trainer, progress: &dyn Fn()) -> Result<Option<FidScore>> {
        let _g = tch::no_grad_guard();
        let (lo, hi) = block(self.num, t.rank(), t.world());
        let mut c = Collector::default();
        for at in (lo..hi).step_by(self.batch as usize) {
            let indices: Vec<u64> = (at as u64..(at + self.batch).min(hi) as u64).collect();
            let images = to_images(&latents(&t.model, &indices, &self.spec, t.device), Some(&self.vae), t.kind);
            c.add(&self.net, &images);
            progress();
        }
        let out = c.gather(self.num, t.comm.as_ref())?;
        if t.rank() != 0 {
            return Ok(None);
        }
        let fid = frechet_distance(&Stats::of(&out.pool), &self.reference.fid);
        let sfid = frechet_distance(&Stats::of(&out.spatial), &self.reference.sfid);
        Ok(Some(FidScore { fid, sfid, inception_score: inception_score(&out.probs, 10).0 }))
    }
}
