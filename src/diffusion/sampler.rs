//! Samplers for SiT + REG: the Euler-Maruyama SDE of the paper (latents and REG token
//! sampled jointly, float64 state, diffusion 2t, deterministic last step) and the
//! probability-flow ODE (Euler or Heun), with classifier-free guidance inside an
//! interval and a separate scale for the token.

use crate::diffusion::path::{expand_like, Interpolant, Parameterization, PathType};
use crate::model::sit::SiT;
use crate::model::Cond;
use crate::rng::{step_seed, stream};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// `sde`: Euler-Maruyama, the paper's sampler; `ode`: the probability-flow ODE.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SamplerMode {
    Sde,
    Ode,
}

/// A sampler and its settings: what the `sample` and `eval` config sections, `reg-ddp
/// sample`'s flags and `bench --sample` each describe.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    pub mode: SamplerMode,
    /// With the ODE: Heun instead of Euler.
    pub heun: bool,
    pub steps: i64,
    pub guidance: Guidance,
}

impl Sampler {
    /// Guidance over the whole of [0, 1] and Heun for the ODE: the sampler of the
    /// training-time grids and FID.
    pub fn whole_interval(mode: SamplerMode, steps: i64, cfg: f64, cls_cfg: f64) -> Self {
        Sampler { mode, heun: true, steps, guidance: Guidance { cfg, cls_cfg, low: 0.0, high: 1.0, force_doubled: false } }
    }

    /// The paper's headline sampler: SDE, w = 2.3 for the image and the token, interval [0, 0.85].
    pub fn paper(steps: i64) -> Self {
        Sampler {
            mode: SamplerMode::Sde,
            heun: false,
            steps,
            guidance: Guidance { cfg: 2.3, cls_cfg: 2.3, low: 0.0, high: 0.85, force_doubled: false },
        }
    }

    /// At least 2 steps, non-negative scales, `0 <= low < high <= 1`; the message names what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let g = &self.guidance;
        if self.steps < 2 {
            return Err(format!("steps: at least 2, got {}", self.steps));
        }
        if !(g.cfg >= 0.0 && g.cls_cfg >= 0.0) {
            return Err("cfg / cls_cfg: guidance scales must not be negative".into());
        }
        if !((0.0..=1.0).contains(&g.low) && (0.0..=1.0).contains(&g.high) && g.low < g.high) {
            return Err(format!("interval: {},{} must be low,high with 0 <= low < high <= 1", g.low, g.high));
        }
        Ok(())
    }

    /// Final latents [N, C, H, W] f64 from the start latents `z`, REG token `cls` and
    /// condition `y` (`y_null`: the null condition of the same rows, for guidance).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        model: &SiT,
        z: &Tensor,
        cls: &Tensor,
        y: &Cond,
        y_null: &Cond,
        param: Parameterization,
        kind: Kind,
        noise: &mut dyn NoiseSource,
    ) -> Tensor {
        match self.mode {
            SamplerMode::Sde => sample_sde(model, z, cls, y, y_null, self.steps, self.guidance, param, kind, noise),
            SamplerMode::Ode => sample_ode(model, z, cls, y, y_null, self.steps, self.heun, self.guidance, param, kind),
        }
    }
}

/// Guidance settings. `cfg <= 1` means no guidance (no doubled batch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    pub cfg: f64,
    /// The REG token's scale; 0 takes the conditional drift alone.
    pub cls_cfg: f64,
    pub low: f64,
    pub high: f64,
    /// Evaluate the doubled batch and combine it inside the interval even when
    /// `cfg <= 1`: how the tests check the guided arithmetic itself at scale 1.
    pub force_doubled: bool,
}

impl Guidance {
    pub fn none() -> Self {
        Guidance { cfg: 1.0, cls_cfg: 0.0, low: 0.0, high: 1.0, force_doubled: false }
    }
    fn active(&self, t: f64) -> bool {
        (self.cfg > 1.0 || self.force_doubled) && t <= self.high && t >= self.low
    }
}

/// Where the sampler's Gaussian draws come from (a test hands in recorded ones).
pub trait NoiseSource {
    /// A standard normal f64 tensor of `shape` (first dimension: the batch).
    fn draw(&mut self, shape: &[i64]) -> Tensor;
}

/// Noise keyed by each image's global index: image `g` at draw `k` always gets the
/// same numbers, whatever batch or rank it is generated in.
pub struct PerImageNoise {
    pub seed: u64,
    pub indices: Vec<u64>,
    draws: u64,
}

impl PerImageNoise {
    pub fn new(seed: u64, indices: Vec<u64>) -> Self {
        PerImageNoise { seed, indices, draws: 0 }
    }
}

impl NoiseSource for PerImageNoise {
    fn draw(&mut self, shape: &[i64]) -> Tensor {
        let k = self.draws;
        self.draws += 1;
        let rows: Vec<Tensor> = self
            .indices
            .iter()
            .map(|&g| {
                tch::manual_seed(step_seed(self.seed, g, stream::SAMPLE_NOISE + k));
                Tensor::randn(&shape[1..], (Kind::Double, Device::Cpu))
            })
            .collect();
        Tensor::stack(&rows, 0)
    }
}

/// Recorded draws, handed out in order.
pub struct FixedNoise(pub std::collections::VecDeque<Tensor>);

impl NoiseSource for FixedNoise {
    fn draw(&mut self, shape: &[i64]) -> Tensor {
        let t = self.0.pop_front().expect("ran out of recorded noise");
        assert_eq!(t.size(), shape, "recorded noise has another shape");
        t.to_kind(Kind::Double)
    }
}

/// The model as the samplers call it: f64 state in, f64 velocities out, on the
/// doubled (conditional, null-condition) batch while guidance is active.
struct Stepper<'a> {
    model: &'a SiT,
    kind: Kind,
    y: &'a Cond,
    y_null: &'a Cond,
    g: Guidance,
    param: Parameterization,
}

impl Stepper<'_> {
    /// Model velocities at (x, c, t), on the doubled batch when guidance is active.
    /// Returns (x_in, c_in, v, v_cls, guided) with the inputs the score needs.
    fn velocity(&self, x: &Tensor, c: &Tensor, t: f64) -> (Tensor, Tensor, Tensor, Tensor, bool) {
        let guided = self.g.active(t);
        let (xi, ci, yi) = if guided {
            (Tensor::cat(&[x, x], 0), Tensor::cat(&[c, c], 0), self.y.cat(self.y_null))
        } else {
            (x.shallow_clone(), c.shallow_clone(), self.y.shallow_clone())
        };
        let ti = Tensor::full([xi.size()[0]], t, (Kind::Double, x.device()));
        let out = self.model.forward_cond(&xi.to_kind(self.kind), &ti.to_kind(self.kind), &yi, &ci.to_kind(self.kind), self.kind);
        let tt = Tensor::from(t).to_device(x.device());
        let v = self.param.to_velocity(&out.x.to_kind(Kind::Double), &xi, &tt);
        let vc = self.param.to_velocity(&out.cls.to_kind(Kind::Double), &ci, &tt);
        (xi, ci, v, vc, guided)
    }

    /// Combines the conditional and unconditional halves: `u + w (c - u)`; a token
    /// scale of 0 keeps the conditional half.
    fn guide(&self, d: Tensor, w: f64, guided: bool) -> Tensor {
        if !guided {
            return d;
        }
        let h = d.chunk(2, 0);
        if w > 0.0 {
            &h[1] + (&h[0] - &h[1]) * w
        } else {
            h[0].shallow_clone()
        }
    }
}

/// `s = (alpha / d_alpha * v - x) / (sigma^2 - alpha / d_alpha * d_sigma * sigma)`.
fn score(path: PathType, v: &Tensor, x: &Tensor, t: f64) -> Tensor {
    let tt = Tensor::from(t).to_kind(Kind::Double).to_device(x.device());
    let p = Interpolant::at(path, &tt);
    let ratio = &p.alpha / &p.d_alpha;
    let var = p.sigma.square() - &ratio * &p.d_sigma * &p.sigma;
    (expand_like(&ratio.reshape([1]), v) * v - x) / expand_like(&var.reshape([1]), x)
}

/// Euler-Maruyama sampling. `z`: start latents [N, C, H, W]; `cls`: start REG token
/// [N, Dz]; `y`: the condition and `y_null` the null one; returns the final latents
/// [N, C, H, W] f64.
#[allow(clippy::too_many_arguments)]
pub fn sample_sde(
    model: &SiT,
    z: &Tensor,
    cls: &Tensor,
    y: &Cond,
    y_null: &Cond,
    steps: i64,
    g: Guidance,
    param: Parameterization,
    kind: Kind,
    noise: &mut dyn NoiseSource,
) -> Tensor {
    let _ng = tch::no_grad_guard();
    let dev = z.device();
    let path = param.path;
    let s = Stepper { model, kind, y, y_null, g, param };
    // t: 1 -> 0.04 in `steps` points, then 0.
    let mut ts: Vec<f64> = (0..steps).map(|i| 1.0 + (0.04 - 1.0) * i as f64 / (steps - 1).max(1) as f64).collect();
    ts.push(0.0);
    let mut x = z.to_kind(Kind::Double);
    let mut c = cls.to_kind(Kind::Double);
    let drift = |x: &Tensor, c: &Tensor, t: f64| {
        let (xi, ci, v, vc, guided) = s.velocity(x, c, t);
        let diffusion = 2.0 * t;
        let d = &v - score(path, &v, &xi, t) * (0.5 * diffusion);
        let dc = &vc - score(path, &vc, &ci, t) * (0.5 * diffusion);
        (s.guide(d, g.cfg, guided), s.guide(dc, g.cls_cfg, guided))
    };
    for w in ts.windows(2).take(ts.len() - 2) {
        let (t, dt) = (w[0], w[1] - w[0]);
        let eps = noise.draw(&x.size()).to_device(dev);
        let eps_c = noise.draw(&c.size()).to_device(dev);
        let (d, dc) = drift(&x, &c, t);
        let scale = (2.0 * t).sqrt() * dt.abs().sqrt();
        x = &x + d * dt + eps * scale;
        c = &c + dc * dt + eps_c * scale;
    }
    let (t, dt) = (ts[ts.len() - 2], ts[ts.len() - 1] - ts[ts.len() - 2]);
    let (d, _) = drift(&x, &c, t);
    x + d * dt
}

/// Probability-flow ODE on `linspace(1, 0, steps + 1)`: Euler, or Heun (a second
/// evaluation at the end of each step except the last). The velocity is the ODE's
/// drift on any path: the path enters only to read a data prediction as a velocity.
#[allow(clippy::too_many_arguments)]
pub fn sample_ode(
    model: &SiT,
    z: &Tensor,
    cls: &Tensor,
    y: &Cond,
    y_null: &Cond,
    steps: i64,
    heun: bool,
    g: Guidance,
    param: Parameterization,
    kind: Kind,
) -> Tensor {
    let _ng = tch::no_grad_guard();
    let s = Stepper { model, kind, y, y_null, g, param };
    let vel = |x: &Tensor, c: &Tensor, t: f64| {
        let (_, _, v, vc, guided) = s.velocity(x, c, t);
        (s.guide(v, g.cfg, guided), s.guide(vc, g.cls_cfg, guided))
    };
    let mut x = z.to_kind(Kind::Double);
    let mut c = cls.to_kind(Kind::Double);
    for i in 0..steps {
        let (t, tn) = (1.0 - i as f64 / steps as f64, 1.0 - (i + 1) as f64 / steps as f64);
        let dt = tn - t;
        let (d, dc) = vel(&x, &c, t);
        let (xe, ce) = (&x + &d * dt, &c + &dc * dt);
        if heun && i + 1 < steps {
            let (d2, dc2) = vel(&xe, &ce, tn);
            x = &x + (d + d2) * (0.5 * dt);
            c = &c + (dc + dc2) * (0.5 * dt);
        } else {
            (x, c) = (xe, ce);
        }
    }
    x
}
