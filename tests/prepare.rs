//! `reg-ddp prepare`: images to shards that train, resumable, bad images reported,
//! the same bytes from 1 or 2 MPI ranks, and REG's preprocessed layout imported.

mod common;

use common::{mpirun, repo};
use std::path::Path;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_reg-ddp"))
}

fn prepare_args(images: &Path, out: &Path) -> Vec<String> {
    let r = repo();
    vec![
        "prepare".into(),
        "--images".into(),
        images.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--vae".into(),
        r.join("tests/data/vae_tiny").display().to_string(),
        "--encoder".into(),
        r.join("tests/data/dinov2_tiny").display().to_string(),
        "--resolution".into(),
        "64".into(),
        "--shard-size".into(),
        "16".into(),
        "--batch".into(),
        "8".into(),
        "--threads".into(),
        "1".into(),
    ]
}

fn run(args: &[String]) -> Output {
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn demo_images(dir: &Path, per_class: u32) {
    let o = bin().args(["demo-images", "--classes", "10", "--per-class", &per_class.to_string(), "--out"]).arg(dir).output().unwrap();
    assert!(o.status.success());
}

fn index(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
}

fn shas(dir: &Path) -> Vec<String> {
    index(dir)["shards"].as_array().unwrap().iter().map(|s| s["sha256"].as_str().unwrap().to_string()).collect()
}

#[test]
fn prepared_shards_train_resume_and_match_across_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let (images, one, two) = (tmp.path().join("images"), tmp.path().join("one"), tmp.path().join("two"));
    demo_images(&images, 5); // 50 images -> 4 shards of 16, 16, 16, 2
    run(&prepare_args(&images, &one));
    let ix = index(&one);
    assert_eq!(ix["shards"].as_array().unwrap().len(), 4);
    assert_eq!(ix["bad_images"], 0);
    assert_eq!(ix["encoder"]["tokens"], 17);

    // Two ranks write disjoint shards; the dataset is byte-identical.
    let args = prepare_args(&images, &two);
    let o = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(shas(&one), shas(&two));

    // Resume: remove one shard; only it is redone, the others are verified and kept.
    let kept = std::fs::metadata(one.join("shard-00000.safetensors")).unwrap().modified().unwrap();
    std::fs::remove_file(one.join("shard-00002.safetensors")).unwrap();
    let o = run(&prepare_args(&images, &one));
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 already done"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(kept, std::fs::metadata(one.join("shard-00000.safetensors")).unwrap().modified().unwrap());
    assert_eq!(shas(&one), shas(&two));

    // The dataset trains the demo model.
    let o = bin()
        .args(["train", "--config"])
        .arg(repo().join("configs/demo.yaml"))
        .args(["--set", "data.source=shards", "--set", &format!("data.path={}", one.display())])
        .args(["--set", &format!("train.output_dir={}", tmp.path().join("runs").display()), "--set", "train.steps=5", "--threads", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn unreadable_images_are_listed_and_too_many_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    demo_images(&images, 4);
    std::fs::write(images.join("class03/broken.png"), b"not a png at all").unwrap();
    std::fs::write(images.join("class07/empty.jpg"), b"").unwrap();
    let out = tmp.path().join("out");
    let mut args = prepare_args(&images, &out);
    args.extend(["--max-bad-fraction".into(), "0.1".into()]);
    run(&args);
    let ix = index(&out);
    assert_eq!(ix["bad_images"], 2);
    let report = std::fs::read_to_string(out.join("bad_images.txt")).unwrap();
    assert!(report.contains("broken.png") && report.contains("empty.jpg"), "{report}");
    let records: i64 = ix["shards"].as_array().unwrap().iter().map(|s| s["records"].as_i64().unwrap()).sum();
    assert_eq!(records, 40);

    let strict = tmp.path().join("strict");
    let o = bin().args(prepare_args(&images, &strict)).args(["--max-bad-fraction", "0.01"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("2 of 42 images could not be read") && err.contains("bad_images.txt"), "{err}");
    assert!(!strict.join("index.json").exists());
}

/// A `.npy` of float32 in C order.
fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for v in data {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn reg_preprocessed_layout_is_imported_with_its_moments() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("reg");
    let mut labels = Vec::new();
    for i in 0..6usize {
        let npy = format!("00000/img-mean-std-{i:08}.npy");
        let data: Vec<f32> = (0..8 * 8 * 8).map(|k| (i * 1000 + k) as f32 * 0.001).collect();
        write_npy(&root.join("vae-sd").join(&npy), &[8, 8, 8], &data);
        let png = root.join(format!("imagenet_256_vae/00000/img-{i:08}.png"));
        std::fs::create_dir_all(png.parent().unwrap()).unwrap();
        image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, (i * 40) as u8])).save(&png).unwrap();
        labels.push(serde_json::json!([npy, i % 3]));
    }
    std::fs::write(root.join("vae-sd/dataset.json"), serde_json::json!({ "labels": labels }).to_string()).unwrap();
    let out = tmp.path().join("out");
    let r = repo();
    let o = bin()
        .args(["prepare", "--from-reg"])
        .arg(&root)
        .arg("--out")
        .arg(&out)
        .arg("--encoder")
        .arg(r.join("tests/data/dinov2_tiny"))
        .args(["--resolution", "64", "--shard-size", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ds = reg::data::shards::Dataset::open(&out, true).unwrap();
    assert_eq!(ds.len(), 6);
    assert_eq!(ds.index.num_classes(), 3);
    // Record 5's moments are exactly the .npy's.
    let (s, row) = ds.locate(5);
    let bytes = ds.record_bytes(s, "latents", row).unwrap();
    let first = f32::from_le_bytes(bytes[..4].try_into().unwrap());
    let last = f32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap());
    assert_eq!((first, last), (5000.0 * 0.001, (5000 + 511) as f32 * 0.001));
    let y = i64::from_le_bytes(ds.record_bytes(s, "labels", row).unwrap().try_into().unwrap());
    assert_eq!(y, 2);
}

fn train_json(data: &Path, out: &Path, extra: &[&str]) -> Vec<f64> {
    let o = bin()
        .args(["train", "--config"])
        .arg(repo().join("configs/demo.yaml"))
        .args(["--set", "data.source=shards", "--set", &format!("data.path={}", data.display())])
        .args(["--set", &format!("train.output_dir={}", out.display()), "--set", "train.steps=4", "--set", "train.log_every=1"])
        .args(["--threads", "1", "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    common::losses(&o.stdout)
}

#[test]
fn online_encoding_trains_like_precomputed_features() {
    let tmp = tempfile::tempdir().unwrap();
    let (images, both) = (tmp.path().join("images"), tmp.path().join("both"));
    demo_images(&images, 4);
    let mut args = prepare_args(&images, &both);
    args.push("--store-images".into());
    run(&args);
    let ix = index(&both);
    assert_eq!((ix["features"].as_bool(), ix["images"].as_bool()), (Some(true), Some(true)));
    let pre = train_json(&both, &tmp.path().join("pre"), &[]);
    let encoder = format!("data.encoder_path={}", repo().join("tests/data/dinov2_tiny").display());
    let online = train_json(&both, &tmp.path().join("online"), &["--set", "model.encoder=online", "--set", &encoder]);
    assert_eq!(pre.len(), 4);
    // The stored features are the same encoder's output, rounded to bf16.
    for (a, b) in pre.iter().zip(&online) {
        assert!(((a - b) / a).abs() < 1e-2, "precomputed {a} vs online {b}");
    }
    // Images only: online works, precomputed is refused naming the field.
    let only = tmp.path().join("only");
    let mut args = prepare_args(&images, &only);
    args.extend(["--store-images".into(), "--no-features".into()]);
    run(&args);
    assert_eq!(train_json(&only, &tmp.path().join("o2"), &["--set", "model.encoder=online", "--set", &encoder]).len(), 4);
    let o = bin()
        .args(["train", "--config"])
        .arg(repo().join("configs/demo.yaml"))
        .args(["--set", "data.source=shards", "--set", &format!("data.path={}", only.display())])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("features: false"));
}
