//! The text-conditioned model: captions steer the prediction through joint attention and
//! adaLN, guidance at scale 1 through the doubled batch is the conditional prediction,
//! caption dropout gives the empty caption's encoding, a tiny model trains and samples
//! from prompts (the same images from 1 or 2 ranks), and bad prompts exit 2.

mod common;

use common::{assert_bad_input, bin, json_lines, mpirun, ok, repo, tensorboard, train_args};
use reg::config::Config;
use reg::diffusion::sampler::{sample_ode, sample_sde, Guidance, PerImageNoise};
use reg::diffusion::{Parameterization, PathType};
use reg::encoders::text::TextEncoder;
use reg::model::{build_sit, Caption, Cond, SiT};
use std::path::{Path, PathBuf};
use std::process::Output;
use tch::{Device, Kind, Tensor};

const CLIP: &str = "tests/data/clip_tiny";

/// The demo model conditioned on captions of the tiny CLIP (32 wide, 77 tokens). Its path is
/// relative to the repository: the binary runs there (`current_dir`) for a text model and its
/// checkpoints.
const TEXT: [&str; 8] = [
    "--set",
    "model.condition=text",
    "--set",
    "model.text_dim=32",
    "--set",
    "data.text_encoder_path=tests/data/clip_tiny",
    "--set",
    "model.num_classes=4",
];

fn config(extra: &[&str]) -> Config {
    let mut sets: Vec<String> = TEXT.chunks(2).map(|c| c[1].to_string()).collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(&repo().join("configs/demo.yaml"), &sets).unwrap()
}

/// A text model with random weights whose zero-initialised gates and heads are given
/// values, so that every path from the caption to the output carries signal.
fn model() -> (SiT, TextEncoder) {
    let (m, p) = build_sit(&config(&[]).dims(), Device::Cpu, 3).unwrap();
    tch::manual_seed(11);
    let _g = tch::no_grad_guard();
    p.flat.shallow_clone().copy_(&(Tensor::randn_like(&p.flat) * 0.05));
    (m, TextEncoder::load(&repo().join(CLIP), Device::Cpu).unwrap())
}

fn caption(enc: &TextEncoder, texts: &[&str]) -> Cond {
    let o = enc.encode(texts, Kind::Float).unwrap();
    Cond::Text(Caption { hidden: o.last_hidden_state, pooled: o.pooled })
}

fn null(enc: &TextEncoder, rows: &Cond) -> Cond {
    let n = enc.null(Kind::Float).unwrap();
    rows.null_like(0, Some(&Caption { hidden: n.last_hidden_state, pooled: n.pooled }))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn a_text_model_has_caption_projections_and_no_label_table() {
    let (_, p) = build_sit(&config(&[]).dims(), Device::Cpu, 0).unwrap();
    let names: Vec<String> = p.named(&p.flat).into_iter().map(|(n, _)| n).collect();
    for want in ["context_embedder.weight", "pooled_embedder.mlp.0.weight", "pooled_embedder.mlp.2.bias"] {
        assert!(names.iter().any(|n| n == want), "{want} missing");
    }
    assert!(!names.iter().any(|n| n.starts_with("y_embedder")), "a text model has no label table");
}

#[test]
fn the_caption_steers_every_output_through_joint_attention() {
    let (m, enc) = model();
    tch::manual_seed(0);
    let x = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let cls = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[0.3f32, 0.7]);
    let a = m.forward_cond(&x, &t, &caption(&enc, &["a red disc", "a blue square"]), &cls, Kind::Float);
    let b = m.forward_cond(&x, &t, &caption(&enc, &["a red disc", "two green rings on the left"]), &cls, Kind::Float);
    // Shapes are those of the class model: the caption's tokens leave no trace in them.
    assert_eq!(a.x.size(), [2, 4, 8, 8]);
    assert_eq!(a.zs.size(), [2, 17, 32]);
    assert_eq!(a.cls.size(), [2, 32]);
    // Row 0 kept its caption: unchanged; row 1 changed in every output.
    for (what, p, q) in [("x", &a.x, &b.x), ("zs", &a.zs, &b.zs), ("cls", &a.cls, &b.cls)] {
        assert_eq!(max_diff(&p.get(0), &q.get(0)), 0.0, "{what}: row 0 must not see row 1's caption");
        assert!(max_diff(&p.get(1), &q.get(1)) > 1e-4, "{what}: the caption does not reach it");
    }
    // The tokens themselves matter, not only the pooled state: the same pooled state with
    // another caption's token states changes the prediction (joint attention). (The order
    // of the tokens alone would not: CLIP's states carry their positions, the model adds none.)
    let Cond::Text(c) = caption(&enc, &["a red disc", "a blue square"]) else { unreachable!() };
    let Cond::Text(o) = caption(&enc, &["three yellow crosses", "a cyan ring at the bottom"]) else { unreachable!() };
    let swapped = Cond::Text(Caption { hidden: o.hidden, pooled: c.pooled.shallow_clone() });
    let s = m.forward_cond(&x, &t, &swapped, &cls, Kind::Float);
    assert!(max_diff(&a.x, &s.x) > 1e-4, "token states do not reach the image");
}

/// Scale 1 through the guided code (doubled batch with the empty caption, `u + 1 (c - u)`)
/// gives the conditional samples; scale 2 moves them. The halves go through f32 kernels
/// of another batch size and the combination rounds in f64: 1e-6, as for classes.
#[test]
fn guidance_scale_one_equals_the_conditional_prediction() {
    let (m, enc) = model();
    tch::manual_seed(5);
    let z = Tensor::randn([3, 4, 8, 8], (Kind::Float, Device::Cpu));
    let c = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
    let y = caption(&enc, &["a red disc", "a small blue square at the top", "a ring"]);
    let n = null(&enc, &y);
    let none = Guidance::none();
    let one = Guidance { cfg: 1.0, cls_cfg: 1.0, low: 0.0, high: 1.0, force_doubled: true };
    let a = sample_ode(&m, &z, &c, &y, &n, 6, true, none, Parameterization::velocity(PathType::Linear), Kind::Float);
    let b = sample_ode(&m, &z, &c, &y, &n, 6, true, one, Parameterization::velocity(PathType::Linear), Kind::Float);
    let r = common::rel(&b, &a);
    assert!(r <= 1e-6, "ODE: {r:e}");
    let (mut n1, mut n2) = (PerImageNoise::new(9, vec![0, 1, 2]), PerImageNoise::new(9, vec![0, 1, 2]));
    let a = sample_sde(&m, &z, &c, &y, &n, 6, none, Parameterization::velocity(PathType::Linear), Kind::Float, &mut n1);
    let b = sample_sde(&m, &z, &c, &y, &n, 6, one, Parameterization::velocity(PathType::Linear), Kind::Float, &mut n2);
    let r = common::rel(&b, &a);
    assert!(r <= 1e-6, "SDE: {r:e}");
    let two = Guidance { cfg: 2.0, ..one };
    let d = sample_ode(&m, &z, &c, &y, &n, 6, true, two, Parameterization::velocity(PathType::Linear), Kind::Float);
    let e = sample_ode(&m, &z, &c, &y, &n, 6, true, none, Parameterization::velocity(PathType::Linear), Kind::Float);
    assert!(common::rel(&d, &e) > 1e-3, "scale 2 must move the samples (the null half is there)");
}

#[test]
fn caption_dropout_gives_the_empty_captions_encoding() {
    let (_, enc) = model();
    let y = caption(&enc, &["a red disc", "a blue square", "a ring"]);
    let n = null(&enc, &y);
    let dropped = y.drop_to(&Tensor::from_slice(&[false, true, false]), &n);
    let (Cond::Text(d), Cond::Text(y), Cond::Text(n)) = (dropped, y, n) else { unreachable!() };
    for (what, got, kept, empty) in [("hidden", &d.hidden, &y.hidden, &n.hidden), ("pooled", &d.pooled, &y.pooled, &n.pooled)] {
        assert_eq!(max_diff(&got.get(0), &kept.get(0)), 0.0, "{what}: kept row");
        assert_eq!(max_diff(&got.get(2), &kept.get(2)), 0.0, "{what}: kept row");
        assert_eq!(max_diff(&got.get(1), &empty.get(0)), 0.0, "{what}: dropped row is the empty caption");
        assert!(max_diff(&kept.get(1), &empty.get(0)) > 1e-4, "{what}: the empty caption differs from the caption");
    }
}

/// Trains the tiny text model on synthetic captions, with grids of fixed prompts.
fn train(dir: &Path, steps: &str) -> Output {
    let out = dir.display().to_string();
    let mut extra: Vec<&str> = TEXT.to_vec();
    let steps = format!("train.steps={steps}");
    extra.extend(["--set", &steps, "--set", "sample.every=20", "--set", "sample.num=4", "--set", "sample.steps=4"]);
    extra.extend(["--set", "sample.prompts=[a red disc, a blue square]"]);
    ok(bin().current_dir(repo()).args(train_args(&out, "text", &extra)))
}

fn pngs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

fn sample_args(ckpt: &Path, prompts: &Path, out: &Path) -> Vec<String> {
    let vae = repo().join("tests/data/vae_tiny");
    [
        "sample",
        "--ckpt",
        &ckpt.display().to_string(),
        "--ema",
        "--vae",
        &vae.display().to_string(),
        "--prompts",
        &prompts.display().to_string(),
        "--num",
        "5",
        "--steps",
        "6",
        "--batch",
        "2",
        "--threads",
        "1",
        "--out",
        &out.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn a_tiny_text_model_learns_and_samples_the_same_images_on_one_and_two_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let o = train(tmp.path(), "60");
    let losses: Vec<f64> = json_lines(&o.stdout).iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert!(losses.len() >= 6, "{losses:?}");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < 0.8 * first, "the loss does not fall: {losses:?}");
    let run = tmp.path().join("text");
    let tb = tensorboard(&run.join("tb"));
    assert_eq!(tb["images"]["samples/ema"].as_array().map(|v| v.len()), Some(3), "grids at steps 20, 40, 60: {tb}");

    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red disc\n\na blue square at the top\nthree rings\n").unwrap();
    let ckpt = run.join("step-0000060");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(bin().current_dir(repo()).args(sample_args(&ckpt, &prompts, &one)));
    let args = sample_args(&ckpt, &prompts, &two);
    ok(mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>()).current_dir(repo()));
    let (a, b) = (pngs(&one), pngs(&two));
    assert_eq!(a.len(), 5);
    assert!(a == b, "PNGs differ between 1 and 2 ranks");
    // Image i was asked for prompt i % 3 (the empty line is not a prompt): captions.json says so.
    let captions: Vec<String> = serde_json::from_slice(&std::fs::read(one.join("captions.json")).unwrap()).unwrap();
    assert_eq!(captions, ["a red disc", "a blue square at the top", "three rings", "a red disc", "a blue square at the top"]);
    // COCO's evaluation protocol: --num captions drawn without replacement, seeded.
    let coco = repo().join("tests/data/coco_captions/captions_val2014_excerpt.json");
    let all: serde_json::Value = serde_json::from_slice(&std::fs::read(&coco).unwrap()).unwrap();
    let all: Vec<String> =
        all["annotations"].as_array().unwrap().iter().map(|a| a["caption"].as_str().unwrap().trim().to_string()).collect();
    let drawn = |out: &Path, seed: &str| {
        let mut args = sample_args(&ckpt, &prompts, out);
        let at = args.iter().position(|a| a == "--prompts").unwrap();
        args.splice(at..at + 2, ["--captions".to_string(), coco.display().to_string(), "--seed".into(), seed.into()]);
        ok(bin().current_dir(repo()).args(&args));
        serde_json::from_slice::<Vec<String>>(&std::fs::read(out.join("captions.json")).unwrap()).unwrap()
    };
    let (c1, c2, c3) = (drawn(&tmp.path().join("c1"), "0"), drawn(&tmp.path().join("c2"), "0"), drawn(&tmp.path().join("c3"), "1"));
    assert_eq!(c1.len(), 5);
    assert!(c1.iter().all(|c| all.contains(c)), "{c1:?}");
    assert_eq!(c1.iter().collect::<std::collections::BTreeSet<_>>().len(), 5, "drawn without replacement");
    assert_eq!(c1, c2, "the same seed draws the same captions");
    assert_ne!(c1, c3, "another seed draws others");
    // The same noise under another prompt list gives other images.
    std::fs::write(&prompts, "a green cross\n").unwrap();
    let other = tmp.path().join("other");
    ok(bin().current_dir(repo()).args(sample_args(&ckpt, &prompts, &other)));
    assert!(pngs(&other)[0] != a[0]);
}

#[test]
fn bad_prompts_and_mismatched_conditions_exit_2_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    train(tmp.path(), "2");
    let ckpt = tmp.path().join("text/step-0000002");
    let out = tmp.path().join("s");
    let run = |prompts: &Path| bin().current_dir(repo()).args(sample_args(&ckpt, prompts, &out)).output().unwrap();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    assert_bad_input(&run(&empty), &["empty.txt", "no prompts"]);
    let binary = tmp.path().join("binary.txt");
    std::fs::write(&binary, [0x61, 0xff, 0xfe, 0x0a]).unwrap();
    assert_bad_input(&run(&binary), &["binary.txt", "UTF-8"]);
    assert_bad_input(&run(&tmp.path().join("missing.txt")), &["missing.txt", "cannot read"]);
    // A text model without prompts; COCO captions that are not COCO captions.
    let mut args = sample_args(&ckpt, &empty, &out);
    let at = args.iter().position(|a| a == "--prompts").unwrap();
    args.drain(at..at + 2);
    assert_bad_input(&bin().current_dir(repo()).args(&args).output().unwrap(), &["--prompts or --captions"]);
    let coco = tmp.path().join("captions_val2014.json");
    std::fs::write(&coco, r#"{"annotations": [{"image_id": 1, "id": 2}]}"#).unwrap();
    let mut bad = args.clone();
    bad.extend(["--captions".into(), coco.display().to_string()]);
    assert_bad_input(&bin().current_dir(repo()).args(&bad).output().unwrap(), &["captions_val2014.json", "annotations[].caption"]);
    std::fs::write(&coco, r#"{"annotations": [{"image_id": 1, "id": 2, "caption": "a dog"}]}"#).unwrap();
    assert_bad_input(&bin().current_dir(repo()).args(&bad).output().unwrap(), &["captions_val2014.json", "1 captions, fewer than --num 5"]);
    // A class model asked for prompts.
    ok(bin().args(train_args(&tmp.path().display().to_string(), "class", &["--set", "train.steps=1"])));
    let class_ckpt: PathBuf = tmp.path().join("class/step-0000001");
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "a red disc\n").unwrap();
    assert_bad_input(&bin().args(sample_args(&class_ckpt, &prompts, &out)).output().unwrap(), &["--prompts", "classes"]);
}

/// Captions beside the classic demo images: class `c` is described in two wordings.
fn captioned_demo(dir: &Path) {
    ok(bin().args(["demo-images", "--classes", "3", "--per-class", "8", "--out"]).arg(dir));
    let words = ["a bright disc", "a square block", "a thin ring"];
    for (c, w) in words.iter().enumerate() {
        for e in std::fs::read_dir(dir.join(format!("class{c:02}"))).unwrap().flatten() {
            let txt = e.path().with_extension("txt");
            std::fs::write(txt, format!("{w}\nthe picture shows {w} on a dark background\n")).unwrap();
        }
    }
}

/// The whole text pipeline on a tiny captioned set: `prepare` with captions -> `train`
/// (CLIP online, then from precomputed states) -> `sample --prompts` -> `eval` with CLIP
/// score and FID against the real images.
#[test]
fn captions_go_through_prepare_train_sample_and_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let images = d.join("images");
    captioned_demo(&images);
    let (vae, dino, clip) = (repo().join("tests/data/vae_tiny"), repo().join("tests/data/dinov2_tiny"), repo().join(CLIP));
    let prepare = |out: &Path, extra: &[&str]| {
        let mut c = bin();
        c.args(["prepare", "--images"]).arg(&images).arg("--out").arg(out).arg("--vae").arg(&vae).arg("--encoder").arg(&dino);
        c.args(["--resolution", "64", "--shard-size", "16", "--batch", "8", "--caption-files", "--text-encoder"]).arg(&clip);
        ok(c.args(extra))
    };
    let (online, pre) = (d.join("online"), d.join("pre"));
    prepare(&online, &[]);
    prepare(&pre, &["--text-precomputed"]);

    let run = |data: &Path, name: &str, extra: &[&str]| {
        let path = format!("data.path={}", data.display());
        let mut sets: Vec<&str> = TEXT.to_vec();
        sets.extend(["--set", &path, "--set", "data.source=shards", "--set", "train.global_batch=8", "--set", "model.num_classes=1"]);
        sets.extend(extra);
        ok(bin().current_dir(repo()).args(train_args(&d.display().to_string(), name, &sets)))
    };
    run(&online, "online", &["--set", "train.steps=20"]);
    // Precomputed states train without CLIP: the empty caption comes from the dataset.
    let o =
        run(&pre, "pre", &["--set", "train.steps=2", "--set", "model.text_encoder=precomputed", "--set", "data.text_encoder_path=null"]);
    assert_eq!(json_lines(&o.stdout).iter().filter(|l| l["loss"].as_f64().is_some_and(f64::is_finite)).count(), 1);

    let prompts = d.join("prompts.txt");
    std::fs::write(&prompts, "a bright disc\na square block\na thin ring\n").unwrap();
    let samples = d.join("samples");
    ok(bin().current_dir(repo()).args(sample_args(&d.join("online/step-0000020"), &prompts, &samples)));

    let inception = d.join("inception.safetensors");
    reg::formats::weights::write(&inception, &common::make_weights(), None).unwrap();
    let result = d.join("eval.json");
    let mut e = bin();
    e.args(["eval", "--device", "cpu", "--threads", "1", "--batch", "3", "--samples"]).arg(&samples);
    e.arg("--clip").arg(&clip).arg("--ref").arg(&images).arg("--inception").arg(&inception).arg("--out").arg(&result);
    ok(&mut e);
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    let (clip_score, fid) = (j["clip_score"].as_f64().unwrap(), j["fid"].as_f64().unwrap());
    assert!(clip_score.is_finite() && (0.0..=100.0).contains(&clip_score), "{j}");
    assert!(fid.is_finite() && fid > 0.0, "{j}");

    // A text model refuses a dataset without captions, and another tokenizer's ids.
    let plain = d.join("plain");
    let mut c = bin();
    c.args(["prepare", "--images"]).arg(&images).arg("--out").arg(&plain).arg("--vae").arg(&vae).arg("--encoder").arg(&dino);
    ok(c.args(["--resolution", "64", "--shard-size", "16", "--batch", "8"]));
    let path = format!("data.path={}", plain.display());
    let mut sets: Vec<&str> = TEXT.to_vec();
    sets.extend(["--set", &path, "--set", "data.source=shards", "--set", "train.global_batch=8", "--set", "train.steps=1"]);
    let o = bin().current_dir(repo()).args(train_args(&d.display().to_string(), "plain", &sets)).output().unwrap();
    common::assert_bad_input_midway(&o, &["index.json", "text: missing"]);
}

/// `model.reg_token: false` (the study's SiT and SiT + REPA arms): the token's input is
/// ignored, so the prediction does not depend on it; with the token it does.
#[test]
fn without_the_reg_token_its_input_is_ignored() {
    for (reg_token, moves) in [("true", true), ("false", false)] {
        let dims = config(&[&format!("model.reg_token={reg_token}")]).dims();
        let (m, p) = build_sit(&dims, Device::Cpu, 1).unwrap();
        tch::manual_seed(2);
        let _g = tch::no_grad_guard();
        p.flat.shallow_clone().copy_(&(Tensor::randn_like(&p.flat) * 0.05));
        let x = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[1i64]);
        let t = Tensor::from_slice(&[0.5f32]);
        let (a, b) = (Tensor::randn([1, 32], (Kind::Float, Device::Cpu)), Tensor::randn([1, 32], (Kind::Float, Device::Cpu)));
        let mut class = dims;
        class.text_dim = 0;
        class.text_len = 0;
        let (m2, p2) = build_sit(&class, Device::Cpu, 1).unwrap();
        p2.flat.shallow_clone().copy_(&(Tensor::randn_like(&p2.flat) * 0.05));
        for (model, cond) in [
            (&m, caption(&TextEncoder::load(&repo().join(CLIP), Device::Cpu).unwrap(), &["a disc"])),
            (&m2, Cond::Class(y.shallow_clone())),
        ] {
            let d = max_diff(&model.forward_cond(&x, &t, &cond, &a, Kind::Float).x, &model.forward_cond(&x, &t, &cond, &b, Kind::Float).x);
            assert_eq!(d > 1e-6, moves, "reg_token {reg_token}: the token input moved the prediction by {d:e}");
        }
    }
}
