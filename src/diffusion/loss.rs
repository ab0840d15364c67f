//! The REG loss: velocity matching of latents and REG token, plus REPA alignment.

use crate::diffusion::path::{expand_like, Interpolant, Parameterization, PathType, Prediction, Weighting};
use crate::model::sit::SiT;
use crate::model::Cond;
use crate::rng::{step_seed, stream};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The `loss` section of a run config: REG's loss terms and their weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub path: PathType,
    /// What the network predicts (`velocity`, as REG; `data` for pixel space).
    pub prediction: Prediction,
    pub weighting: Weighting,
    /// Weight of the REPA projection (cosine) term.
    pub proj_coeff: f64,
    /// Weight of the REG-token velocity term.
    pub cls_coeff: f64,
    /// SD-VAE latent scale.
    pub latent_scale: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            path: PathType::Linear,
            prediction: Prediction::Velocity,
            weighting: Weighting::Uniform,
            proj_coeff: 0.5,
            cls_coeff: 0.03,
            latent_scale: 0.18215,
        }
    }
}

impl LossConfig {
    pub fn parameterization(&self) -> Parameterization {
        Parameterization { path: self.path, prediction: self.prediction }
    }
}

/// Every random draw of one training step, for the whole global batch, from a
/// generator keyed by (seed, step): a data-parallel rank takes its rows, and a
/// resumed run needs no RNG state.
pub struct StepDraws {
    /// Times in (0, 1). [B]
    pub t: Tensor,
    /// Latent noise. [B, C, H, W]
    pub noise: Tensor,
    /// REG-token noise. [B, Dz]
    pub noise_cls: Tensor,
    /// Posterior sample noise `x = mean + std * eps`. [B, C, H, W]
    pub eps: Tensor,
    /// Label or caption dropped for guidance. [B] bool
    pub drop: Tensor,
}

impl StepDraws {
    /// Draws on the CPU (identical on every machine and device), in a fixed order.
    pub fn generate(seed: u64, step: u64, global_batch: i64, latent: [i64; 3], z_dim: i64, cfg: &LossConfig, class_dropout: f64) -> Self {
        tch::manual_seed(step_seed(seed, step, stream::STEP_DRAWS));
        let b = global_batch;
        let opts = (Kind::Float, Device::Cpu);
        let u = match cfg.weighting {
            Weighting::Uniform => Tensor::rand([b], opts),
            Weighting::Lognormal => Tensor::randn([b], opts),
        };
        let t = cfg.weighting.time(cfg.path, &u);
        let [c, h, w] = latent;
        let noise = Tensor::randn([b, c, h, w], opts);
        let noise_cls = Tensor::randn([b, z_dim], opts);
        let eps = Tensor::randn([b, c, h, w], opts);
        let drop = Tensor::rand([b], opts).lt(class_dropout);
        StepDraws { t, noise, noise_cls, eps, drop }
    }

    /// Rows `[lo, lo + n)` moved to `device`.
    pub fn rows(&self, lo: i64, n: i64, device: Device) -> Self {
        let r = |x: &Tensor| x.narrow(0, lo, n).to_device(device);
        StepDraws { t: r(&self.t), noise: r(&self.noise), noise_cls: r(&self.noise_cls), eps: r(&self.eps), drop: r(&self.drop) }
    }
}

/// `x = (mean + std * eps) * scale` from stored VAE moments `[mean; std]` (8 channels).
pub fn sample_posterior(moments: &Tensor, eps: &Tensor, scale: f64) -> Tensor {
    let c = moments.size()[1] / 2;
    let mean = moments.narrow(1, 0, c);
    let std = moments.narrow(1, c, c);
    (mean + std * eps) * scale
}

/// Replaces dropped labels by the null label `num_classes`.
pub fn drop_labels(y: &Tensor, drop: &Tensor, num_classes: i64) -> Tensor {
    y.where_self(&drop.logical_not(), &y.full_like(num_classes))
}

/// The loss and its parts.
pub struct LossTerms {
    /// `mean(denoise) + proj_coeff * proj + cls_coeff * mean(cls)`, f32 scalar.
    pub total: Tensor,
    /// Per-sample latent velocity MSE. [N]
    pub denoise: Tensor,
    /// Per-sample REG-token velocity MSE. [N]
    pub cls: Tensor,
    /// Mean over samples and tokens of `-cos(zs, z)`. []
    pub proj: Tensor,
}

/// Inputs of the loss for this rank's rows.
pub struct LossInputs<'a> {
    /// Clean latents (already sampled from the posterior and scaled). [N, C, H, W]
    pub x0: &'a Tensor,
    /// Encoder tokens, class token first: the REPA targets. [N, T+1, Dz]
    pub feat: &'a Tensor,
    /// Clean REG token (the encoder's class token, i.e. `feat[:, 0]` in training). [N, Dz]
    pub cls0: &'a Tensor,
    /// Labels or captions after dropout. [N]
    pub y: &'a Cond,
    /// Times. [N]
    pub t: &'a Tensor,
    pub noise: &'a Tensor,
    pub noise_cls: &'a Tensor,
}

/// REG loss: velocity matching (of the velocity the output stands for, see `Prediction`); the model computes in `kind`, the loss in f32.
pub fn reg_loss(model: &SiT, inp: &LossInputs, cfg: &LossConfig, kind: Kind) -> LossTerms {
    let cls0 = inp.cls0.to_kind(Kind::Float);
    let p = Interpolant::at(cfg.path, inp.t);
    let e = |v: &Tensor| expand_like(v, inp.x0);
    let x_t = e(&p.alpha) * inp.x0 + e(&p.sigma) * inp.noise;
    let v = e(&p.d_alpha) * inp.x0 + e(&p.d_sigma) * inp.noise;
    let e2 = |v: &Tensor| v.unsqueeze(1);
    let cls_t = e2(&p.alpha) * &cls0 + e2(&p.sigma) * inp.noise_cls;
    let v_cls = e2(&p.d_alpha) * &cls0 + e2(&p.d_sigma) * inp.noise_cls;

    let out = model.forward_cond(&x_t, inp.t, inp.y, &cls_t, kind);
    let param = cfg.parameterization();
    let out_x = param.to_velocity(&out.x.to_kind(Kind::Float), &x_t, inp.t);
    let out_cls = param.to_velocity(&out.cls.to_kind(Kind::Float), &cls_t, inp.t);
    // A data prediction's target is read the same way, sigma floor included (JiT): the
    // loss is then a weighted |x_hat - x|^2, zero for the exact data at every t.
    let (v, v_cls) = match cfg.prediction {
        Prediction::Velocity => (v, v_cls),
        Prediction::Data => (param.to_velocity(&inp.x0.to_kind(Kind::Float), &x_t, inp.t), param.to_velocity(&cls0, &cls_t, inp.t)),
    };
    let denoise = (out_x - v).square().flatten(1, -1).mean_dim(-1, false, None);
    let cls = (out_cls - v_cls).square().mean_dim(-1, false, None);
    // Cosine in float32 even under bf16: low precision here is a known NaN source late in training.
    let zs = normalize(&out.zs.to_kind(Kind::Float));
    let z = normalize(&inp.feat.to_kind(Kind::Float));
    let proj = -(zs * z).sum_dim_intlist(-1, false, None).mean(None);
    let total = denoise.mean(None) + &proj * cfg.proj_coeff + cls.mean(None) * cfg.cls_coeff;
    LossTerms { total, denoise, cls, proj }
}

/// `F.normalize(x, dim=-1)`: `x / max(|x|, 1e-12)`.
fn normalize(x: &Tensor) -> Tensor {
    let n = x.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12);
    x / n
}
