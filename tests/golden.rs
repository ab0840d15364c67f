//! The model, loss, gradients and AdamW + EMA steps reproduce the original REG
//! implementation on every case tests/data/reg_*.json describes (its outputs in the
//! case's .safetensors, made by tools/golden/reg_step.py from REG's own code).

mod common;

use common::{golden, rel};
use reg::config::{LossConfig, ModelConfig, OptimConfig, SitDims};
use reg::diffusion::loss::{drop_labels, reg_loss, sample_posterior, LossInputs};
use reg::diffusion::path::{PathType, Weighting};
use reg::formats::weights;
use reg::model::{build_sit, Params, SiT};
use reg::optim::{clip_factor, sq_sum, AdamW, Ema};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// One golden case: its settings (the JSON) and REG's tensors.
struct Case {
    name: String,
    json: Value,
    g: HashMap<String, Tensor>,
}

/// Every `tests/data/reg_*.json` with its `.safetensors`, in name order.
fn cases() -> Vec<Case> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(common::repo().join("tests/data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && p.file_name().unwrap().to_string_lossy().starts_with("reg_"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let g = golden(&format!("{name}.safetensors"));
            Case { name, json: serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(), g }
        })
        .collect()
}

/// A setting the case must state: a missing key fails rather than falling back to a default.
fn setting<'a>(c: &'a Case, key: &str) -> &'a Value {
    c.json.get(key).unwrap_or_else(|| panic!("{}.json: no {key:?}", c.name))
}

fn num(c: &Case, key: &str) -> f64 {
    setting(c, key).as_f64().unwrap_or_else(|| panic!("{}.json: {key:?} is not a number", c.name))
}

fn int(c: &Case, key: &str) -> i64 {
    setting(c, key).as_i64().unwrap_or_else(|| panic!("{}.json: {key:?} is not an integer", c.name))
}

fn flag(c: &Case, key: &str) -> bool {
    setting(c, key).as_bool().unwrap_or_else(|| panic!("{}.json: {key:?} is not a boolean", c.name))
}

fn model_config(c: &Case) -> ModelConfig {
    // Our final layer reads the blocks' width: REG's separate decoder width must equal it.
    assert_eq!(int(c, "decoder_hidden_size"), int(c, "hidden_size"), "{}: decoder_hidden_size", c.name);
    let z_dims = setting(c, "z_dims").as_array().unwrap();
    assert_eq!(z_dims.len(), 1, "{}: one encoder", c.name);
    ModelConfig {
        arch: None,
        depth: Some(int(c, "depth")),
        hidden_size: Some(int(c, "hidden_size")),
        num_heads: Some(int(c, "num_heads")),
        patch_size: Some(int(c, "patch_size")),
        input_size: int(c, "input_size"),
        in_channels: int(c, "in_channels"),
        num_classes: int(c, "num_classes"),
        encoder_depth: Some(int(c, "encoder_depth")),
        z_dim: z_dims[0].as_i64().unwrap(),
        projector_dim: int(c, "projector_dim"),
        qk_norm: flag(c, "qk_norm"),
        mlp_ratio: num(c, "mlp_ratio"),
        class_dropout_prob: num(c, "class_dropout_prob"),
        encoder: Default::default(),
        condition: Default::default(),
        text_dim: None,
        text_len: None,
        text_encoder: Default::default(),
        reg_token: true,
    }
}

fn dims(c: &Case) -> SitDims {
    model_config(c).dims(&c.name).unwrap()
}

fn loss_config(c: &Case) -> LossConfig {
    // The original trains v-prediction only; `Prediction::Data` has no golden.
    assert_eq!(setting(c, "prediction"), "v", "{}: the goldens are v-prediction", c.name);
    LossConfig {
        path: serde_json::from_value::<PathType>(setting(c, "path_type").clone()).unwrap(),
        prediction: reg::diffusion::Prediction::Velocity,
        weighting: serde_json::from_value::<Weighting>(setting(c, "weighting").clone()).unwrap(),
        proj_coeff: num(c, "proj_coeff"),
        cls_coeff: num(c, "cls_coeff"),
        latent_scale: num(c, "latent_scale"),
    }
}

fn optim_config(c: &Case) -> OptimConfig {
    OptimConfig {
        lr: num(c, "learning_rate"),
        beta1: num(c, "adam_beta1"),
        beta2: num(c, "adam_beta2"),
        eps: num(c, "adam_epsilon"),
        weight_decay: num(c, "adam_weight_decay"),
        max_grad_norm: num(c, "max_grad_norm"),
        ema_decay: num(c, "ema_decay"),
    }
}

/// The case's model with REG's weights, loaded from a safetensors file through
/// the same path `train --init` and `sample --weights` use.
fn golden_model(c: &Case) -> (SiT, Params) {
    let (model, params) = build_sit(&dims(c), tch::Device::Cpu, 0).unwrap();
    let names: Vec<String> = params.named(&params.flat).into_iter().map(|(n, _)| n).collect();
    let subset: Vec<(String, Tensor)> = names.iter().map(|n| (n.clone(), c.g[n].shallow_clone())).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{}_weights.safetensors", c.name));
    weights::write(&path, &subset, None).unwrap();
    params.load_file(&path).unwrap();
    (model, params)
}

/// The largest error of each kind of comparison over a case, for the report.
#[derive(Default)]
struct Worst(Vec<(&'static str, f64)>);

impl Worst {
    fn note(&mut self, kind: &'static str, err: f64) {
        match self.0.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, e)) => *e = e.max(err),
            None => self.0.push((kind, err)),
        }
    }

    fn rel(&mut self, kind: &'static str, what: &str, a: &Tensor, b: &Tensor, tol: f64) {
        assert_eq!(a.size(), b.size(), "{what}: shape");
        let r = rel(a, b);
        self.note(kind, r);
        assert!(r <= tol, "{what}: relative error {r:e} > {tol:e}");
    }

    fn abs(&mut self, kind: &'static str, what: &str, a: &Tensor, b: &Tensor, tol: f64) {
        assert_eq!(a.size(), b.size(), "{what}: shape");
        let err = (a - b).abs().max().double_value(&[]);
        self.note(kind, err);
        assert!(err <= tol, "{what}: absolute error {err:e}");
    }
}

/// Prefix of training step `step`'s tensors (1-based): the first has none.
fn prefix(step: i64) -> String {
    if step == 1 {
        String::new()
    } else {
        format!("s{step}.")
    }
}

/// REG's loss inputs for step `step`. The labels are the ones after REG's dropout where
/// the case recorded REG's draws; reg_tiny's loss took the forward's labels.
fn golden_loss(model: &SiT, c: &Case, step: i64, kind: Kind) -> reg::diffusion::LossTerms {
    let p = prefix(step);
    let g = |k: &str| &c.g[&format!("{p}{k}")];
    let y = reg::model::Cond::Class(if flag(c, "reg_draws") { g("loss.y") } else { &c.g["in.y"] }.shallow_clone());
    let inp = LossInputs {
        x0: g("loss.x0"),
        feat: g("loss.feat"),
        cls0: g("loss.cls0"),
        y: &y,
        t: g("loss.time"),
        noise: g("loss.noise"),
        noise_cls: g("loss.noise_cls"),
    };
    reg_loss(model, &inp, &loss_config(c), kind)
}

/// The step's time, latents and labels from REG's raw draws, as the trainer makes them.
fn check_draws(c: &Case, step: i64, w: &mut Worst) {
    let p = prefix(step);
    let g = |k: &str| &c.g[&format!("{p}{k}")];
    let name = |k: &str| format!("{}: {p}{k}", c.name);
    let cfg = loss_config(c);
    w.rel("draws", &name("loss.time"), &cfg.weighting.time(cfg.path, g("draw.time")), g("loss.time"), 1e-6);
    w.rel("draws", &name("loss.x0"), &sample_posterior(g("draw.moments"), g("draw.eps"), cfg.latent_scale), g("loss.x0"), 1e-6);
    let drop = g("draw.drop").lt(num(c, "class_dropout_prob"));
    let y = drop_labels(g("draw.labels"), &drop, int(c, "num_classes"));
    assert!(y.equal(g("loss.y")), "{}: labels after dropout {y} vs REG's {}", name("loss.y"), g("loss.y"));
}

/// The parts a parameter is compared in: a fused qkv bias by its thirds, anything else
/// whole. (suffix, first row, rows)
fn parts(name: &str, rows: i64) -> Vec<(String, i64, i64)> {
    if name.ends_with("attn.qkv.bias") {
        let d = rows / 3;
        return ["[q]", "[k]", "[v]"].iter().enumerate().map(|(i, p)| (p.to_string(), i as i64 * d, d)).collect();
    }
    vec![(String::new(), 0, rows)]
}

/// Parameters whose gradient is exactly zero in exact arithmetic: the last bias the keys
/// get (the key bias, or the key norm's bias with `qk_norm`) adds `q . b` to a whole row
/// of attention logits, which softmax ignores. Both implementations hold rounding noise
/// there, so their values after a step are compared against the bound of what noise can
/// do, not against each other's noise.
fn zero_gradient(name: &str, part: &str, qk_norm: bool) -> bool {
    match qk_norm {
        false => name.ends_with("attn.qkv.bias") && part == "[k]",
        true => name.ends_with("attn.k_norm.bias"),
    }
}

fn norm_of(t: &Tensor) -> f64 {
    t.square().sum(Kind::Double).sqrt().double_value(&[])
}

#[test]
fn every_reference_case_matches() {
    let cases = cases();
    assert!(cases.iter().any(|c| c.name == "reg_tiny"), "the original case is among them");
    for c in &cases {
        let mut w = Worst::default();
        let (model, params) = golden_model(c);
        w.rel("pos_embed", &format!("{}: pos_embed", c.name), &model.pos_embed, &c.g["pos_embed"], 1e-6);
        {
            let _ng = tch::no_grad_guard();
            let g = &c.g;
            let out = model.forward(&g["in.x"], &g["in.t"], &g["in.y"], &g["in.cls"], Kind::Float);
            for (key, got) in [("out.x", &out.x), ("out.zs0", &out.zs), ("out.cls", &out.cls)] {
                w.rel("forward", &format!("{}: {key}", c.name), got, &g[key], 1e-5);
            }
        }

        // Clip, AdamW, EMA started as a copy of the weights before the first step.
        let o = optim_config(c);
        let mut ema = Ema::new(o.ema_decay, &params.flat);
        let mut opt = AdamW::new(&o, &params.flat);
        for step in 1..=int(c, "steps") {
            let p = prefix(step);
            let key = |k: &str| format!("{p}{k}");
            let name = |k: &str| format!("{}: {p}{k}", c.name);
            if flag(c, "reg_draws") {
                check_draws(c, step, &mut w);
            }
            let terms = golden_loss(&model, c, step, Kind::Float);
            for (k, got) in
                [("loss.denoise", &terms.denoise), ("loss.cls", &terms.cls), ("loss.proj", &terms.proj), ("loss.total", &terms.total)]
            {
                w.rel("loss", &name(k), got, &c.g[&key(k)], 1e-5);
            }
            params.zero_grad();
            terms.total.backward();
            // Every gradient of the first step (the position table is fixed: it has none);
            // later steps' gradients show in their weights.
            if step == 1 {
                let trainable = params.named(&params.grad).into_iter().filter(|(n, _)| params.entries.iter().any(|e| &e.name == n));
                let scale = norm_of(&params.grad);
                for (n, grad) in trainable {
                    let want = c.g.get(&key(&format!("grad.{n}"))).unwrap_or_else(|| panic!("{}: no gradient", name(&n)));
                    for (part, lo, len) in parts(&n, grad.size()[0]) {
                        let what = name(&format!("grad.{n}{part}"));
                        let (got, want) = (grad.narrow(0, lo, len), want.narrow(0, lo, len));
                        if zero_gradient(&n, &part, flag(c, "qk_norm")) {
                            // Rounding noise on both sides, far below the gradient's scale.
                            w.abs("zero grad (abs)", &what, &got, &got.zeros_like(), 1e-6 * scale);
                            w.abs("zero grad (abs)", &what, &want, &want.zeros_like(), 1e-6 * scale);
                        } else {
                            w.rel("grad", &what, &got, &want, 1e-4);
                        }
                    }
                }
            }
            let (norm, factor) = clip_factor(&sq_sum(&params.grad), o.max_grad_norm);
            w.rel("grad_norm", &name("step.grad_norm"), &norm, &c.g[&key("step.grad_norm")], 1e-5);
            let _ = params.grad.shallow_clone().g_mul_(&factor);
            opt.update(&params.flat, &params.grad).unwrap();
            ema.update(&params.flat);
            for (kind, flat) in [("param", &params.flat), ("ema", &ema.shadow)] {
                for (n, t) in params.named(flat) {
                    let k = format!("step.{kind}.{n}");
                    let want = c.g.get(&key(&k)).unwrap_or_else(|| panic!("{}: missing", name(&k)));
                    for (part, lo, len) in parts(&n, t.size()[0]) {
                        let what = name(&format!("{k}{part}"));
                        let (got, want) = (t.narrow(0, lo, len), want.narrow(0, lo, len));
                        if zero_gradient(&n, &part, flag(c, "qk_norm")) {
                            // Rounding noise in a zero gradient, divided by sqrt(v) + eps, is a
                            // step of up to lr per update on either side, whatever the CPU: that
                            // is the bound such a parameter is held to.
                            w.abs("zero-grad step (abs)", &what, &got, &want, 2.0 * o.lr * step as f64);
                        } else {
                            w.abs("step (abs)", &what, &got, &want, 1e-6);
                        }
                    }
                }
            }
        }
        let report: Vec<String> = w.0.iter().map(|(k, e)| format!("{k} {e:.1e}")).collect();
        eprintln!("{}: {}", c.name, report.join(", "));
    }
}

#[test]
fn bf16_compute_keeps_f32_masters_and_close_loss() {
    let c = cases().into_iter().find(|c| c.name == "reg_tiny").unwrap();
    let (model, params) = golden_model(&c);
    let f32_loss = golden_loss(&model, &c, 1, Kind::Float).total.double_value(&[]);
    let terms = golden_loss(&model, &c, 1, Kind::BFloat16);
    let bf16_loss = terms.total.double_value(&[]);
    assert!(((bf16_loss - f32_loss) / f32_loss).abs() <= 2e-2, "bf16 {bf16_loss} vs f32 {f32_loss}");
    params.zero_grad();
    terms.total.backward();
    let mut opt = AdamW::new(&optim_config(&c), &params.flat);
    opt.update(&params.flat, &params.grad).unwrap();
    assert_eq!(params.flat.kind(), Kind::Float);
    assert_eq!(params.grad.kind(), Kind::Float);
    assert!(params.handles().iter().all(|h| h.kind() == Kind::Float));
    assert!(bool::try_from(params.grad.isfinite().all()).unwrap());
}

fn count(arch: &str, enc: Option<i64>) -> (i64, i64) {
    let mut m: ModelConfig = serde_yaml::from_str(&format!("arch: {arch}")).unwrap();
    m.encoder_depth = enc;
    let mut pb = reg::model::params::ParamBuilder::new(tch::Device::Cpu);
    let _model = SiT::new(&mut pb, &m.dims("count").unwrap());
    pb.declared_numel()
}

#[test]
fn preset_parameter_counts_match_reference() {
    let (p, b) = count("SiT-XL/2", None);
    assert_eq!((p + b, p), (685_017_360, 684_721_296));
    assert_eq!(count("SiT-L/2", None).0 + count("SiT-L/2", None).1, 467_533_328);
    assert_eq!(count("SiT-B/2", Some(4)).0 + count("SiT-B/2", Some(4)).1, 139_028_496);
}

#[test]
fn all_presets_run_forward_with_right_shapes() {
    for size in ["S", "B"] {
        for p in [2, 4, 8] {
            let mut m: ModelConfig = serde_yaml::from_str(&format!("arch: SiT-{size}/{p}")).unwrap();
            // Narrow inputs keep the check quick; the shapes logic is the same.
            m.input_size = 16;
            m.num_classes = 10;
            let d = m.dims("x").unwrap();
            let (model, _) = build_sit(&d, tch::Device::Cpu, 1).unwrap();
            let _ng = tch::no_grad_guard();
            let x = Tensor::randn([2, 4, 16, 16], (Kind::Float, tch::Device::Cpu));
            let cls = Tensor::randn([2, 768], (Kind::Float, tch::Device::Cpu));
            let out = model.forward(&x, &Tensor::from_slice(&[0.3f32, 0.9]), &Tensor::from_slice(&[1i64, 10]), &cls, Kind::Float);
            assert_eq!(out.x.size(), vec![2, 4, 16, 16]);
            assert_eq!(out.zs.size(), vec![2, (16 / p) * (16 / p) + 1, 768]);
            assert_eq!(out.cls.size(), vec![2, 768]);
        }
    }
    // L and XL differ from B only in the numbers counted above; qk-norm adds its parameters.
    let mut m: ModelConfig = serde_yaml::from_str("arch: SiT-S/8\nqk_norm: true").unwrap();
    m.num_classes = 10;
    let (_, params) = build_sit(&m.dims("x").unwrap(), tch::Device::Cpu, 1).unwrap();
    assert!(params.entries.iter().any(|e| e.name == "blocks.0.attn.q_norm.weight"));
}
