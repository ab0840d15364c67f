//! `reg-ddp prepare`: images to shards that train, resumable, bad images reported,
//! the same bytes from 1 or 2 MPI ranks, and REG's preprocessed layout imported.

mod common;

use common::{bin, mpirun, ok, repo};
use std::path::Path;
use std::process::Output;

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
    ok(bin().args(args))
}

fn demo_images(dir: &Path, per_class: u32) {
    ok(bin().args(["demo-images", "--classes", "10", "--per-class", &per_class.to_string(), "--out"]).arg(dir));
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
    ok(&mut mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(shas(&one), shas(&two));

    // Resume: remove one shard; only it is redone, the others are verified and kept.
    let kept = std::fs::metadata(one.join("shard-00000.safetensors")).unwrap().modified().unwrap();
    std::fs::remove_file(one.join("shard-00002.safetensors")).unwrap();
    let o = run(&prepare_args(&images, &one));
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 already done"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(kept, std::fs::metadata(one.join("shard-00000.safetensors")).unwrap().modified().unwrap());
    assert_eq!(shas(&one), shas(&two));

    // The dataset trains the demo model.
    ok(bin()
        .args(["train", "--config"])
        .arg(repo().join("configs/demo.yaml"))
        .args(["--set", "data.source=shards", "--set", &format!("data.path={}", one.display())])
        .args(["--set", &format!("train.output_dir={}", tmp.path().join("runs").display()), "--set", "train.steps=5", "--threads", "1"]));
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

/// The files of one tree of REG's preprocessing output (a folder or a `.zip`), by name.
fn upstream_files(tree: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    if tree.extension().is_some_and(|e| e == "zip") {
        let mut z = zip::ZipArchive::new(std::fs::File::open(tree).unwrap()).unwrap();
        for i in 0..z.len() {
            let mut e = z.by_index(i).unwrap();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
            out.insert(e.name().to_string(), bytes);
        }
    } else {
        let mut todo = vec![tree.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    todo.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(tree).unwrap().to_string_lossy().replace('\\', "/");
                    out.insert(rel, std::fs::read(e.path()).unwrap());
                }
            }
        }
    }
    out
}

/// The data bytes of a version-1 `.npy` (after its header).
fn npy_data(bytes: &[u8]) -> &[u8] {
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    &bytes[10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize..]
}

fn prepare_from_reg(root: &Path, out: &Path) -> Output {
    let enc = repo().join("tests/data/dinov2_tiny");
    bin()
        .args(["prepare", "--from-reg"])
        .arg(root)
        .arg("--out")
        .arg(out)
        .arg("--encoder")
        .arg(enc)
        .args(["--shard-size", "4"])
        .output()
        .unwrap()
}

#[test]
fn reg_preprocessing_output_is_imported_exactly_from_folders_and_zips() {
    // Made by REG's own dataset_tools.py convert + encode (tools/golden/reg_preprocess.py).
    let data = repo().join("tests/data/reg_preprocessed");
    let tmp = tempfile::tempdir().unwrap();
    let mut latents_of = Vec::new();
    for (form, ext) in [("folder", ""), ("zip", ".zip")] {
        let root = data.join(form);
        let out = tmp.path().join(form);
        let o = prepare_from_reg(&root, &out);
        assert!(o.status.success(), "{form}: {}", String::from_utf8_lossy(&o.stderr));
        let moments = upstream_files(&root.join(format!("vae-sd{ext}")));
        let meta: serde_json::Value = serde_json::from_slice(&moments["dataset.json"]).unwrap();
        let labels: std::collections::HashMap<&str, i64> =
            meta["labels"].as_array().unwrap().iter().map(|l| (l[0].as_str().unwrap(), l[1].as_i64().unwrap())).collect();
        // REG's dataset.py order: the sorted .npy names (BTreeMap order), paired with the sorted images.
        let npys: Vec<(&String, &Vec<u8>)> = moments.iter().filter(|(n, _)| n.ends_with(".npy")).collect();
        assert_eq!(npys.len(), 9);
        let ds = reg::data::shards::Dataset::open(&out, true).unwrap();
        assert_eq!(ds.len(), 9, "{form}");
        assert_eq!(ds.index.num_classes(), 3, "{form}");
        // The resolution came from the images: 32 px, so 4x4 latents of 4 channels.
        assert_eq!(ds.index.latent_shape, vec![8, 4, 4], "{form}");
        let mut all = Vec::new();
        for (i, (name, bytes)) in npys.iter().enumerate() {
            let (s, row) = ds.locate(i as i64);
            let lat = ds.record_bytes(s, "latents", row).unwrap();
            assert!(lat == npy_data(bytes), "{form}: record {i}: latents differ from {name}");
            let y = i64::from_le_bytes(ds.record_bytes(s, "labels", row).unwrap().try_into().unwrap());
            assert_eq!(y, labels[name.as_str()], "{form}: record {i} ({name})");
            all.extend_from_slice(lat);
        }
        latents_of.push(all);
    }
    assert_eq!(latents_of[0], latents_of[1], "the folder and the zip hold the same dataset");
}

#[test]
fn broken_reg_layouts_exit_2_naming_the_file() {
    let data = repo().join("tests/data/reg_preprocessed");
    let tmp = tempfile::tempdir().unwrap();
    // Images converted without classes: dataset.json says "labels": null.
    let o = prepare_from_reg(&data.join("nolabels"), &tmp.path().join("o1"));
    common::assert_bad_input(&o, &["vae-sd/dataset.json", "labels: null"]);
    // A copy of the upstream folders with one moments file gone: the counts differ.
    let copy = |name: &str| {
        let dst = tmp.path().join(name);
        for (rel, bytes) in upstream_files(&data.join("folder")) {
            std::fs::create_dir_all(dst.join(&rel).parent().unwrap()).unwrap();
            std::fs::write(dst.join(&rel), bytes).unwrap();
        }
        dst
    };
    let short = copy("short");
    std::fs::remove_file(short.join("vae-sd/00000/img-mean-std-00000004.npy")).unwrap();
    common::assert_bad_input(&prepare_from_reg(&short, &tmp.path().join("o2")), &["imagenet_256_vae", "9 images", "8 moment files"]);
    // An image and its moments gone: dataset.json names a file that is not there.
    let gone = copy("gone");
    std::fs::remove_file(gone.join("vae-sd/00000/img-mean-std-00000004.npy")).unwrap();
    std::fs::remove_file(gone.join("imagenet_256_vae/00000/img00000004.png")).unwrap();
    common::assert_bad_input(&prepare_from_reg(&gone, &tmp.path().join("o3")), &["dataset.json", "00000/img-mean-std-00000004.npy"]);
    // Neither form of a tree.
    let o = prepare_from_reg(tmp.path(), &tmp.path().join("o4"));
    common::assert_bad_input(&o, &["imagenet_256_vae/ nor imagenet_256_vae.zip"]);
}

fn train_json(data: &Path, out: &Path, extra: &[&str]) -> Vec<f64> {
    let o = ok(bin()
        .args(["train", "--config"])
        .arg(repo().join("configs/demo.yaml"))
        .args(["--set", "data.source=shards", "--set", &format!("data.path={}", data.display())])
        .args(["--set", &format!("train.output_dir={}", out.display()), "--set", "train.steps=4", "--set", "train.log_every=1"])
        .args(["--threads", "1", "--json"])
        .args(extra));
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
