//! AdamW, global-norm clipping and EMA over a contiguous slice of the flat fp32
//! parameter buffer: a data-parallel rank hands in just its own slice (ZeRO-1).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The `optim` section of a run config: AdamW, clipping and EMA.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    pub ema_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 1.0, ema_decay: 0.9999 }
    }
}

/// AdamW (decoupled weight decay) with the update of `torch.optim.AdamW`.
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Number of updates taken so far.
    pub step: i64,
    /// The same count as a tensor on the slice's device (the fused kernel reads it).
    step_t: Tensor,
    /// First moment of this slice. [n] f32
    pub exp_avg: Tensor,
    /// Second moment of this slice. [n] f32
    pub exp_avg_sq: Tensor,
}

impl AdamW {
    /// Zero moments for a slice like `param`.
    pub fn new(cfg: &OptimConfig, param: &Tensor) -> Self {
        AdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            step: 0,
            step_t: Tensor::zeros([], (Kind::Float, param.device())),
            exp_avg: param.zeros_like(),
            exp_avg_sq: param.zeros_like(),
        }
    }

    /// One update of `param` (a slice of the flat weights) in place from `grad`:
    /// one fused kernel (`torch.optim.AdamW(fused=True)`), one pass over the slice.
    pub fn update(&mut self, param: &Tensor, grad: &Tensor) -> anyhow::Result<()> {
        self.update_unless(param, grad, None)
    }

    /// As `update`, but a no-op on the device when `found_inf` (0-d f32) is non-zero,
    /// without waiting for it; call `undo_step` once the host knows it was skipped.
    pub fn update_unless(&mut self, param: &Tensor, grad: &Tensor, found_inf: Option<&Tensor>) -> anyhow::Result<()> {
        self.update_parts_unless(param, grad, found_inf, &[(0, param.size()[0])], |_| Ok(()))
    }

    /// As `update_unless` over `parts` of the slice ((start, length) each), one after
    /// another, with `after(i)` called once part `i` is queued: the same update, which
    /// lets the caller start sending part `i` while later parts are computed.
    pub fn update_parts_unless(
        &mut self,
        param: &Tensor,
        grad: &Tensor,
        found_inf: Option<&Tensor>,
        parts: &[(i64, i64)],
        mut after: impl FnMut(usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let _ = self.step_t.fill_(self.step as f64);
        let args =
            crate::shim::AdamWArgs { lr: self.lr, beta1: self.beta1, beta2: self.beta2, weight_decay: self.weight_decay, eps: self.eps };
        for (i, &(lo, len)) in parts.iter().enumerate() {
            let cut = |t: &Tensor| t.narrow(0, lo, len);
            crate::shim::fused_adamw(&cut(param), &cut(grad), &cut(&self.exp_avg), &cut(&self.exp_avg_sq), &self.step_t, &args, found_inf)?;
            after(i)?;
        }
        Ok(())
    }

    /// The last update was skipped: its step does not count.
    pub fn undo_step(&mut self) {
        self.set_step(self.step - 1);
    }

    /// Restores the step count (after loading moments from a checkpoint).
    pub fn set_step(&mut self, step: i64) {
        self.step = step;
        let _ = self.step_t.fill_(step as f64);
    }
}

/// Clip factor of `torch.nn.utils.clip_grad_norm_`: `min(1, max / (norm + 1e-6))`.
/// `sq_sum` is the global sum of squared gradients (already reduced over ranks).
/// Returns (total norm, factor) as 0-d tensors on the gradient's device, so no sync.
pub fn clip_factor(sq_sum: &Tensor, max_norm: f64) -> (Tensor, Tensor) {
    let norm = sq_sum.sqrt();
    if max_norm <= 0.0 {
        return (norm.shallow_clone(), norm.ones_like());
    }
    let factor = ((&norm + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    (norm, factor)
}

/// Sum of squares of a gradient slice, accumulated in f64: the slices differ with the
/// rank count, and at f64 the clip factor they give rounds to the same f32 whatever
/// the split. Chunked, so the f64 temporaries stay small.
pub fn sq_sum(grad: &Tensor) -> Tensor {
    let chunks = grad.split(1 << 24, 0);
    let parts: Vec<Tensor> = chunks.iter().map(|c| c.norm_scalaropt_dtype(2.0, Kind::Double).square()).collect();
    Tensor::stack(&parts, 0).sum(Kind::Double)
}

/// Exponential moving average of the weights: `ema = decay * ema + (1 - decay) * w`.
pub struct Ema {
    pub decay: f64,
    /// This rank's slice of the averaged weights. [n] f32
    pub shadow: Tensor,
}

impl Ema {
    /// Starts as a copy of the weights.
    pub fn new(decay: f64, param: &Tensor) -> Self {
        Ema { decay, shadow: param.detach().copy() }
    }

    pub fn update(&mut self, param: &Tensor) {
        let _g = tch::no_grad_guard();
        // lerp: one pass, `ema + (1 - decay) (w - ema)`, the same average.
        let _ = self.shadow.lerp_(param, 1.0 - self.decay);
    }

    /// As `update`, but leaves the average untouched when `skip` (0-d f32) is non-zero,
    /// decided on the device.
    pub fn update_unless(&mut self, param: &Tensor, skip: &Tensor) {
        let _g = tch::no_grad_guard();
        let weight = (skip * -1.0 + 1.0) * (1.0 - self.decay);
        let _ = self.shadow.lerp_tensor_(param, &weight.to_kind(self.shadow.kind()));
    }
}
