//! Interpolants `x_t = alpha_t x + sigma_t n` and their time derivatives.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use tch::Tensor;

/// Interpolant between data (t = 0) and noise (t = 1).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PathType {
    Linear,
    Cosine,
}

/// What the network outputs. `velocity`: the velocity itself (SiT, REG). `data`: the clean
/// data, turned into a velocity at the input's `(x_t, t)` before the loss and the
/// samplers (JiT, Li & He 2025): in pixel space a token holds more values than a small
/// network's width, and a clean image is a much simpler target than noise.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    #[default]
    Velocity,
    Data,
}

/// A model's path and what it predicts: everything the loss and the samplers need to
/// read its output as a velocity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameterization {
    pub path: PathType,
    pub prediction: Prediction,
}

impl Parameterization {
    /// The REG / SiT model: velocity prediction on `path`.
    pub fn velocity(path: PathType) -> Self {
        Parameterization { path, prediction: Prediction::Velocity }
    }

    /// The velocity the output `out` of the network stands for at `(x_t, t)`; `t` is
    /// `[N]`, or a scalar for a whole batch.
    pub fn to_velocity(&self, out: &Tensor, x_t: &Tensor, t: &Tensor) -> Tensor {
        match self.prediction {
            Prediction::Velocity => out.shallow_clone(),
            Prediction::Data => {
                // eps = (x_t - alpha x) / sigma, v = d_alpha x + d_sigma eps. sigma is held at
                // 0.05 or more, as JiT does, so that t -> 0 does not divide by zero.
                let p = Interpolant::at(self.path, t);
                let e = |v: &Tensor| if v.dim() == 0 { v.shallow_clone() } else { expand_like(v, out) };
                let eps = (x_t - e(&p.alpha) * out) / e(&p.sigma.clamp_min(0.05));
                e(&p.d_alpha) * out + e(&p.d_sigma) * eps
            }
        }
    }
}

/// How training times are drawn.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    Uniform,
    Lognormal,
}

impl Weighting {
    /// Training times from the raw draw `u` of this weighting: `u` itself for uniform
    /// (`rand`); for lognormal (`randn`, EDM's log-normal sigma `s = exp(u)`) the time
    /// at which the path's noise-to-signal ratio is `s`: `s / (1 + s)` on the linear
    /// path, `2 atan(s) / pi` on the cosine one.
    pub fn time(self, path: PathType, u: &Tensor) -> Tensor {
        match self {
            Weighting::Uniform => u.shallow_clone(),
            Weighting::Lognormal => {
                let s = u.exp();
                match path {
                    PathType::Linear => &s / (&s + 1.0),
                    PathType::Cosine => s.atan() * (2.0 / PI),
                }
            }
        }
    }
}

/// `alpha`, `sigma` and their derivatives at `t`, broadcastable against the data.
pub struct Interpolant {
    pub alpha: Tensor,
    pub sigma: Tensor,
    pub d_alpha: Tensor,
    pub d_sigma: Tensor,
}

impl Interpolant {
    /// Linear: `alpha = 1 - t, sigma = t`; cosine: `alpha = cos(pi t / 2), sigma = sin(pi t / 2)`.
    pub fn at(path: PathType, t: &Tensor) -> Self {
        match path {
            PathType::Linear => {
                Interpolant { alpha: 1.0 - t, sigma: t.shallow_clone(), d_alpha: t.ones_like() * -1.0, d_sigma: t.ones_like() }
            }
            PathType::Cosine => {
                let a = t * (PI / 2.0);
                Interpolant { alpha: a.cos(), sigma: a.sin(), d_alpha: a.sin() * (-PI / 2.0), d_sigma: a.cos() * (PI / 2.0) }
            }
        }
    }
}

/// Reshapes a per-sample `[N]` vector to broadcast against `like` (`[N, 1, 1, ...]`).
pub fn expand_like(t: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![t.size()[0]];
    shape.resize(like.dim(), 1);
    t.reshape(shape.as_slice())
}
