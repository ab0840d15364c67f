//! `train-encoder`: the shapes set's small DINOv2 trains (the ViT itself, not only its heads),
//! is saved in transformers' `Dinov2Model` layout that `Dinov2::load` reads back exactly, and
//! feeds `prepare --encoder --encoder-resolution` and online REG with one token per SiT patch.

mod common;

use common::{assert_bad_input, bin, json_lines, losses, ok, repo};
use reg::encoders::dinov2::{Dinov2, Dinov2Config};
use reg::formats::weights;
use reg::shapes::encoder::{read_set, EncoderSize, ShapeEncoder, TrainOptions};
use reg::shapes::{Position, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use tch::{Device, Kind, Tensor};

/// `demo-images --captioned` of `split` at 32 px, `per_class` images per shape.
fn shapes_set(out: &Path, split: &str, per_class: u32) {
    ok(bin().args(["demo-images", "--captioned", "--split", split, "--per-class", &per_class.to_string(), "--out"]).arg(out));
}

/// The tiny ViT of these tests: the width and depth of tests/data/dinov2_tiny, patch 4.
const TINY: [&str; 8] = ["--hidden", "32", "--layers", "2", "--heads", "2", "--patch", "4"];

fn tiny() -> EncoderSize {
    EncoderSize { hidden: 32, layers: 2, heads: 2, patch: 4, resolution: 32 }
}

/// The (name, shape) of every tensor of a safetensors file.
fn layout(path: &Path) -> BTreeMap<String, Vec<i64>> {
    weights::read(path).unwrap().into_iter().map(|(n, t)| (n, t.size())).collect()
}

#[test]
fn trained_folder_has_the_transformers_layout_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (enc, held, model) = (tmp.path().join("enc"), tmp.path().join("held"), tmp.path().join("model"));
    shapes_set(&enc, "encoder", 8);
    shapes_set(&held, "heldout", 4);
    let o = ok(bin().args(["train-encoder", "--images"]).arg(&enc).arg("--heldout").arg(&held).arg("--out").arg(&model).args(TINY).args([
        "--steps",
        "3",
        "--batch",
        "8",
        "--threads",
        "1",
    ]));
    let report = &json_lines(&o.stdout)[0];
    assert_eq!((report["images"].as_i64(), report["tokens"].as_i64()), (Some(40), Some(65)));
    let acc = &report["heldout_accuracy"];
    assert_eq!(acc["images"], 20);
    for k in ["shape", "colour", "size", "position", "all", "patch_object", "patch_shape", "patch_colour"] {
        let a = acc[k].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&a), "{k}: {a}");
    }

    // Names and shapes: those `save_pretrained` gave the tiny transformers model of the same
    // width and depth (tests/data/dinov2_tiny, checked against transformers by tests/dinov2.rs),
    // except the two that follow from patch 4 at 32 px; no training head is left in.
    let ours = layout(&model.join("model.safetensors"));
    let mut want = layout(&repo().join("tests/data/dinov2_tiny/model.safetensors"));
    want.insert("embeddings.patch_embeddings.projection.weight".into(), vec![32, 3, 4, 4]);
    want.insert("embeddings.position_embeddings".into(), vec![1, 65, 32]);
    assert_eq!(ours, want);
    // config.json: only fields transformers' own file has, and the values we trained.
    let read_json = |p: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let cfg = read_json(&model.join("config.json"));
    let theirs = read_json(&repo().join("tests/data/dinov2_tiny/config.json"));
    for k in cfg.as_object().unwrap().keys() {
        assert!(theirs.get(k).is_some(), "config.json field {k} is not one transformers writes");
    }
    let parsed = Dinov2Config::parse(&cfg.to_string(), "config.json").unwrap();
    assert_eq!(parsed, tiny().config().unwrap());

    // It loads through the --encoder path: 8 x 8 patches + class token at 32 px.
    let dino = Dinov2::load(&model, Device::Cpu, 32).unwrap();
    let data = read_set(&held, 32, 4).unwrap();
    let f = dino.features(&data.images.narrow(0, 0, 6), Kind::Float);
    assert_eq!(f.size(), [6, 65, 32]);
    assert!(f.isfinite().all().int64_value(&[]) == 1);

    // Bad input: one line, exit 2, naming the flag or the file.
    let bad = |extra: &[&str], needles: &[&str]| {
        let o = bin().args(["train-encoder", "--images"]).arg(&enc).arg("--out").arg(tmp.path().join("bad")).args(extra).output().unwrap();
        assert_bad_input(&o, needles);
    };
    bad(&["--hidden", "32", "--heads", "3"], &["--heads"]);
    bad(&["--resolution", "64"], &["img00000.png", "32x32", "--resolution"]);
    std::fs::write(tmp.path().join("broken.jsonl"), "{\"file\": 3}\n").unwrap();
    std::fs::copy(tmp.path().join("broken.jsonl"), enc.join("attributes.jsonl")).unwrap();
    bad(&[], &["attributes.jsonl", "line 1"]);
}

/// The saved folder is the trained network: `Dinov2::load` computes the same features bit
/// for bit (same forward code, same f32 weights), and training moved the ViT's own weights.
#[test]
fn short_training_lowers_the_loss_and_saves_what_it_trained() {
    let tmp = tempfile::tempdir().unwrap();
    let enc = tmp.path().join("enc");
    shapes_set(&enc, "encoder", 8);
    let data = read_set(&enc, 32, 4).unwrap();
    tch::manual_seed(0);
    let mut model = ShapeEncoder::new(tiny().config().unwrap()).unwrap();
    let name = "encoder.layer.0.attention.attention.query.weight";
    let before = model.vs.variables()[name].copy();
    let report = model.train(&data, &TrainOptions { steps: 40, batch: 20, lr: 2e-3 }, |_, _| {}).unwrap();
    eprintln!("{report:?}");
    // The seven terms start near the sum of their log class counts (~10): colour and the
    // object mask alone, learnt in the first tens of steps, remove a third of it.
    assert!(report.loss_end < 0.7 * report.loss_start, "{report:?}");
    let after = model.vs.variables()[name].copy();
    assert!(!after.equal(&before), "the ViT's weights did not move: only the heads trained");

    let dir = tmp.path().join("model");
    model.save(&dir).unwrap();
    let loaded = Dinov2::load(&dir, Device::Cpu, 32).unwrap();
    let images = data.images.narrow(0, 0, 8);
    assert!(loaded.features(&images, Kind::Float).equal(&model.model.features(&images, Kind::Float)));
}

/// The patch targets sit in the quadrant the attributes name, also on mirrored images.
#[test]
fn patch_targets_follow_the_object() {
    let tmp = tempfile::tempdir().unwrap();
    let enc = tmp.path().join("enc");
    shapes_set(&enc, "encoder", 6);
    let data = read_set(&enc, 32, 4).unwrap();
    assert_eq!(data.coverage.size(), [30, 64]);
    let grid = Tensor::arange(8, (Kind::Float, Device::Cpu)) + 0.5;
    let check = |data: &reg::shapes::encoder::Labelled, what: &str| {
        let cov = data.coverage.view([30, 8, 8]);
        let mass = cov.sum_dim_intlist([1, 2].as_slice(), false, Kind::Float);
        let cy = (&cov * grid.view([1, 8, 1])).sum_dim_intlist([1, 2].as_slice(), false, Kind::Float) / &mass;
        let cx = (&cov * grid.view([1, 1, 8])).sum_dim_intlist([1, 2].as_slice(), false, Kind::Float) / &mass;
        for i in 0..30 {
            assert!(mass.double_value(&[i]) > 0.5, "{what} image {i}: no object");
            let pos = Position::ALL[data.labels.int64_value(&[i, 3]) as usize];
            let got = Position::from_halves(cx.double_value(&[i]) > 4.0, cy.double_value(&[i]) > 4.0);
            assert_eq!(got, pos, "{what} image {i}");
        }
    };
    check(&data, "original");
    // Mirrored images keep their targets on the object, and their position label follows.
    let flip = Tensor::arange(30, (Kind::Int64, Device::Cpu)).remainder(2).eq(1);
    let m = data.mirrored(&flip);
    check(&m, "mirrored");
    assert!(m.images.get(1).equal(&data.images.get(1).flip([2])) && m.images.get(0).equal(&data.images.get(0)));
    assert!(m.labels.narrow(1, 0, 3).equal(&data.labels.narrow(1, 0, 3)), "shape, colour and size are kept");
}

fn index(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
}

/// SiT on identity:2 latents of 32 px images (16 x 16 x 12) with patch 2: 64 patches + the
/// REG token, the 65 tokens of the patch-4 encoder at 32 px.
fn sit_args(data: &Path, out: &Path, extra: &[&str]) -> Output {
    ok(bin()
        .args(["train", "--config"])
        .arg(repo().join("configs/demo.yaml"))
        .args(["--set", "data.source=shards", "--set", &format!("data.path={}", data.display())])
        .args(["--set", "model.input_size=16", "--set", "model.in_channels=12", "--set", "model.num_classes=5"])
        .args(["--set", "loss.latent_scale=1.0", "--set", "train.steps=2", "--set", "train.log_every=1"])
        .args(["--set", &format!("train.output_dir={}", out.display()), "--threads", "1", "--json"])
        .args(extra))
}

#[test]
fn prepare_with_encoder_resolution_matches_sit_and_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let (enc, train, model) = (tmp.path().join("enc"), tmp.path().join("train"), tmp.path().join("model"));
    shapes_set(&enc, "encoder", 4);
    shapes_set(&train, "train", 4);
    ok(bin().args(["train-encoder", "--images"]).arg(&enc).arg("--out").arg(&model).args(TINY).args(["--steps", "2", "--threads", "1"]));
    let prepare = |out: &Path, extra: &[&str]| {
        ok(bin()
            .args(["prepare", "--images"])
            .arg(&train)
            .arg("--out")
            .arg(out)
            .args(["--vae", "identity:2", "--resolution", "32", "--store-images", "--threads", "1", "--encoder"])
            .arg(&model)
            .args(extra));
        index(out)
    };
    let data = tmp.path().join("data");
    let ix = prepare(&data, &["--encoder-resolution", "32"]);
    assert_eq!(ix["latent_shape"], serde_json::json!([24, 16, 16]));
    assert_eq!((ix["encoder"]["tokens"].as_i64(), ix["encoder"]["z_dim"].as_i64()), (Some(65), Some(32)));
    // Without it, REG's 224/256 of the side: 28 px, 7 x 7 patches.
    assert_eq!(prepare(&tmp.path().join("d28"), &[])["encoder"]["tokens"], 50);

    // Two SiT steps on the stored features, and two with the encoder run online at the
    // resolution its own patch gives the SiT grid (8 x 4 = 32 px): the same losses up to
    // the stored features' bf16 rounding (as tests/prepare.rs bounds it, 1e-2 relative).
    let pre = losses(&sit_args(&data, &tmp.path().join("runs"), &[]).stdout);
    let encoder = format!("data.encoder_path={}", model.display());
    let online = losses(&sit_args(&data, &tmp.path().join("online"), &["--set", "model.encoder=online", "--set", &encoder]).stdout);
    assert_eq!((pre.len(), online.len()), (2, 2));
    for (a, b) in pre.iter().zip(&online) {
        assert!(a.is_finite() && ((a - b) / a).abs() < 1e-2, "precomputed {a} vs online {b}");
    }
}
