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

/// How training times are drawn.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    Uniform,
    Lognormal,
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
