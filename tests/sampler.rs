//! The samplers: the SDE reproduces the original REG sampler's output given its noise
//! draws; the ODE's Heun and Euler agree as steps grow; guidance 1 is no guidance; a
//! clean-data prediction reads as the path's velocity.

mod common;

use common::{golden, rel};
use reg::config::{ModelConfig, PathType};
use reg::diffusion::sampler::{sample_ode, sample_sde, FixedNoise, Guidance, PerImageNoise};
use reg::diffusion::{Interpolant, Parameterization, Prediction};
use reg::model::{build_sit, Cond, SiT};
use std::collections::{HashMap, VecDeque};
use tch::{Device, Kind, Tensor};

/// The REG model's parameterization: velocity prediction on the linear path.
const V: Parameterization = Parameterization { path: PathType::Linear, prediction: Prediction::Velocity };

/// REG's tiny model: its weights and the SDE sampler's data (tests/data).
const GOLDEN: &str = "reg_tiny.safetensors";

/// The golden tiny model, weights loaded by their REG names.
fn model(g: &HashMap<String, Tensor>) -> SiT {
    let m: ModelConfig = serde_yaml::from_str(
        "{depth: 4, hidden_size: 64, num_heads: 4, patch_size: 2, input_size: 8, num_classes: 10, encoder_depth: 2, z_dim: 32, projector_dim: 64}",
    )
    .unwrap();
    let (model, params) = build_sit(&m.dims("tiny").unwrap(), Device::Cpu, 0).unwrap();
    let names: Vec<String> = params.named(&params.flat).into_iter().map(|(n, _)| n).collect();
    let sub: HashMap<String, Tensor> = names.iter().map(|n| (n.clone(), g[n].shallow_clone())).collect();
    params.load_into(&params.flat, &sub, "golden").unwrap();
    model
}

#[test]
fn sde_reproduces_the_reference_sampler() {
    let g = golden(GOLDEN);
    let m = model(&g);
    let mut draws = VecDeque::new();
    for i in 0.. {
        match g.get(&format!("sde.noise.{i:02}")) {
            Some(t) => draws.push_back(t.shallow_clone()),
            None => break,
        }
    }
    assert_eq!(draws.len(), 10, "5 stochastic steps x (latents, token)");
    let guide = Guidance { cfg: 2.3, cls_cfg: 2.3, low: 0.0, high: 0.85, force_doubled: false };
    let (y, y_null) = labels(&g["sde.y"]);
    let out = sample_sde(
        &m,
        &g["sde.z"],
        &g["sde.cls"],
        &y,
        &y_null,
        6,
        guide,
        Parameterization::velocity(PathType::Linear),
        Kind::Float,
        &mut FixedNoise(draws),
    );
    let r = rel(&out, &g["sde.out"]);
    assert!(r <= 1e-4, "SDE output: relative error {r:e}");
}

/// Labels and the null labels (class 10 of the tiny model's 10) of the same rows.
fn labels(y: &Tensor) -> (Cond, Cond) {
    (Cond::Class(y.shallow_clone()), Cond::Class(y.full_like(10)))
}

fn start(seed: i64) -> (Tensor, Tensor, (Cond, Cond)) {
    tch::manual_seed(seed);
    let z = Tensor::randn([3, 4, 8, 8], (Kind::Float, Device::Cpu));
    let c = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
    (z, c, labels(&Tensor::from_slice(&[1i64, 4, 9])))
}

#[test]
fn heun_and_euler_converge_to_the_same_endpoint() {
    let g = golden(GOLDEN);
    let m = model(&g);
    let (z, c, y) = start(3);
    let guide = Guidance { cfg: 1.5, cls_cfg: 1.5, low: 0.0, high: 1.0, force_doubled: false };
    let heun = sample_ode(&m, &z, &c, &y.0, &y.1, 32, true, guide, V, Kind::Float);
    let euler = sample_ode(&m, &z, &c, &y.0, &y.1, 512, false, guide, V, Kind::Float);
    let coarse = sample_ode(&m, &z, &c, &y.0, &y.1, 4, false, guide, V, Kind::Float);
    let (fine, rough) = (rel(&heun, &euler), rel(&coarse, &euler));
    eprintln!("Heun-32 vs Euler-512: {fine:e}; Euler-4 vs Euler-512: {rough:e}");
    assert!(fine < 5e-4, "Heun-32 vs Euler-512: {fine:e}");
    assert!(rough > 10.0 * fine, "a 4-step Euler is visibly worse ({rough:e}), so the check can fail");
}

/// Scale 1 through the guided code itself (doubled batch, null labels, `u + 1 (c - u)`
/// for both the latents and the REG token) gives the unguided samples. The halves of
/// the doubled batch go through f32 kernels of another batch size, and `u + (c - u)`
/// rounds in f64: equal within 1e-6, not bit for bit.
#[test]
fn guidance_scale_one_equals_no_guidance() {
    let g = golden(GOLDEN);
    let m = model(&g);
    let (z, c, y) = start(5);
    let none = Guidance::none();
    let one = Guidance { cfg: 1.0, cls_cfg: 1.0, low: 0.0, high: 1.0, force_doubled: true };
    let a = sample_ode(&m, &z, &c, &y.0, &y.1, 8, true, none, V, Kind::Float);
    let b = sample_ode(&m, &z, &c, &y.0, &y.1, 8, true, one, V, Kind::Float);
    assert!(rel(&b, &a) <= 1e-6, "ODE: {:e}", rel(&b, &a));
    let mut n1 = PerImageNoise::new(9, vec![0, 1, 2]);
    let mut n2 = PerImageNoise::new(9, vec![0, 1, 2]);
    let a = sample_sde(&m, &z, &c, &y.0, &y.1, 8, none, Parameterization::velocity(PathType::Linear), Kind::Float, &mut n1);
    let b = sample_sde(&m, &z, &c, &y.0, &y.1, 8, one, Parameterization::velocity(PathType::Linear), Kind::Float, &mut n2);
    assert!(rel(&b, &a) <= 1e-6, "SDE: {:e}", rel(&b, &a));
    // The null-label half is really there: a scale above 1 on the same path moves the
    // samples, and so does a scale above 1 on the REG token alone.
    let w = Guidance { cfg: 2.0, ..one };
    let d = sample_ode(&m, &z, &c, &y.0, &y.1, 8, true, w, V, Kind::Float);
    assert!(rel(&d, &a) > 1e-3);
    let token = Guidance { cls_cfg: 2.0, ..one };
    assert!(
        rel(
            &sample_ode(&m, &z, &c, &y.0, &y.1, 8, true, token, V, Kind::Float),
            &sample_ode(&m, &z, &c, &y.0, &y.1, 8, true, none, V, Kind::Float)
        ) > 1e-6
    );
}

#[test]
fn per_image_noise_does_not_depend_on_the_batch() {
    let mut all = PerImageNoise::new(4, vec![10, 11, 12, 13]);
    let mut part = PerImageNoise::new(4, vec![12, 13]);
    let a = all.draw_for_test(&[4, 2, 3]);
    let b = part.draw_for_test(&[2, 2, 3]);
    assert!(a.narrow(0, 2, 2).equal(&b));
}

trait DrawForTest {
    fn draw_for_test(&mut self, shape: &[i64]) -> Tensor;
}

impl<T: reg::diffusion::sampler::NoiseSource> DrawForTest for T {
    fn draw_for_test(&mut self, shape: &[i64]) -> Tensor {
        self.draw(shape)
    }
}

/// `loss.prediction: data`: the clean data itself, given as the network's output, is read
/// as the exact velocity `d_alpha x + d_sigma n` of both paths, per sample or for a whole
/// batch at one time (the samplers' case), wherever sigma is above the 0.05 floor.
#[test]
fn clean_data_prediction_is_the_path_velocity() {
    tch::manual_seed(3);
    let (x, n) = (Tensor::randn([6, 4, 3, 3], (Kind::Double, Device::Cpu)), Tensor::randn([6, 4, 3, 3], (Kind::Double, Device::Cpu)));
    let t = Tensor::from_slice(&[0.06, 0.2, 0.4, 0.6, 0.8, 0.999]);
    for path in [PathType::Linear, PathType::Cosine] {
        let data = Parameterization { path, prediction: Prediction::Data };
        let p = Interpolant::at(path, &t);
        let e = |v: &Tensor| v.reshape([6, 1, 1, 1]);
        let x_t = e(&p.alpha) * &x + e(&p.sigma) * &n;
        let v = e(&p.d_alpha) * &x + e(&p.d_sigma) * &n;
        let got = data.to_velocity(&x, &x_t, &t);
        assert!(rel(&got, &v) < 1e-12, "{path:?}: per-sample times, rel {}", rel(&got, &v));
        let one = x_t.narrow(0, 2, 1);
        let got = data.to_velocity(&x.narrow(0, 2, 1), &one, &Tensor::from(0.4f64));
        assert!(rel(&got, &v.narrow(0, 2, 1)) < 1e-12, "{path:?}: one time for the batch");
        // Velocity prediction passes the output through.
        assert!(rel(&Parameterization::velocity(path).to_velocity(&v, &x_t, &t), &v) == 0.0);
    }
}
