//! The binary as a user runs it: bad input exits 2 with one line naming file and field,
//! runs are deterministic, and TensorBoard's own reader reads our event files.

mod common;

use common::{assert_bad_input, bin, json_lines, ok, repo};

use std::path::{Path, PathBuf};
use std::process::Output;

fn demo_config() -> String {
    std::fs::read_to_string(repo().join("configs/demo.yaml")).unwrap()
}

/// Writes `text` as a config in `dir` with the run's output redirected into `dir`.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn train(dir: &Path, config: &Path, extra: &[&str]) -> Output {
    let out_dir = format!("train.output_dir={}", dir.join("runs").display());
    bin().args(["train", "--config"]).arg(config).args(["--set", &out_dir, "--threads", "2"]).args(extra).output().unwrap()
}

#[test]
fn bad_config_exits_2_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = write_config(d, "malformed.yaml", "model: {depth: 4\ntrain: [");
    assert_bad_input(&train(d, &cfg, &[]), &["malformed.yaml", "YAML"]);

    let cfg = write_config(d, "unknown.yaml", &demo_config().replace("  qk_norm: false", "  qk_nrom: false"));
    assert_bad_input(&train(d, &cfg, &[]), &["unknown.yaml", "qk_nrom"]);

    let cfg = write_config(d, "patch.yaml", &demo_config().replace("  patch_size: 2", "  patch_size: 3"));
    assert_bad_input(&train(d, &cfg, &[]), &["patch.yaml", "model.patch_size"]);

    let cfg = write_config(d, "enc.yaml", &demo_config().replace("  encoder_depth: 2", "  encoder_depth: 5"));
    assert_bad_input(&train(d, &cfg, &[]), &["enc.yaml", "model.encoder_depth"]);

    let cfg = write_config(d, "type.yaml", &demo_config().replace("  steps: 300", "  steps: many"));
    assert_bad_input(&train(d, &cfg, &[]), &["type.yaml", "train.steps"]);

    // A launcher that says 3 ranks: 16 does not split.
    let cfg = write_config(d, "batch.yaml", &demo_config());
    let out_dir = format!("train.output_dir={}", d.join("runs").display());
    let out = bin().args(["train", "--config"]).arg(&cfg).args(["--set", &out_dir]).env("OMPI_COMM_WORLD_SIZE", "3").output().unwrap();
    assert_bad_input(&out, &["batch.yaml", "train.global_batch", "world size 3"]);

    let out = bin().args(["train", "--config", "/nonexistent/x.yaml"]).output().unwrap();
    assert_bad_input(&out, &["/nonexistent/x.yaml"]);
}

#[test]
fn bad_weights_exit_2_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = write_config(d, "demo.yaml", &demo_config());
    // A good weights file: the checkpoint of a 1-step run.
    let out = train(d, &cfg, &["--set", "train.steps=1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let good = d.join("model.safetensors");
    let ckpt = d.join("runs/demo/step-0000001");
    ok(bin().args(["export", "--ckpt"]).arg(&ckpt).arg("--out").arg(&good));
    let init = train(d, &cfg, &["--set", "train.steps=1", "--set", "train.name=init", "--init", good.to_str().unwrap()]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    let missing = d.join("missing.safetensors");
    assert_bad_input(&train(d, &cfg, &["--init", missing.to_str().unwrap()]), &["missing.safetensors"]);

    let bytes = std::fs::read(&good).unwrap();
    let truncated = d.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_bad_input(&train(d, &cfg, &["--init", truncated.to_str().unwrap()]), &["truncated.safetensors"]);

    // Weights of another shape: a wider model's checkpoint.
    let wide =
        write_config(d, "wide.yaml", &demo_config().replace("hidden_size: 64", "hidden_size: 96").replace("name: demo", "name: wide"));
    assert!(train(d, &wide, &["--set", "train.steps=1"]).status.success());
    let wrong_shape = d.join("wide.safetensors");
    let ckpt = d.join("runs/wide/step-0000001");
    ok(bin().args(["export", "--ckpt"]).arg(&ckpt).arg("--out").arg(&wrong_shape));
    assert_bad_input(&train(d, &cfg, &["--init", wrong_shape.to_str().unwrap()]), &["wide", "x_embedder.proj.weight", "shape"]);

    // A renamed tensor.
    let renamed = d.join("renamed.safetensors");
    let text = bytes.clone();
    let pos = text.windows(8).position(|w| w == b"wg_norm.").unwrap();
    let mut b = text;
    b[pos..pos + 8].copy_from_slice(b"wx_norm.");
    std::fs::write(&renamed, b).unwrap();
    assert_bad_input(&train(d, &cfg, &["--init", renamed.to_str().unwrap()]), &["renamed.safetensors", "wx_norm"]);
}

#[test]
fn same_seed_gives_bitwise_identical_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = write_config(d, "demo.yaml", &demo_config());
    let mut runs = Vec::new();
    for name in ["a", "b"] {
        let out = train(d, &cfg, &["--json", "--set", "train.steps=30", "--set", &format!("train.name={name}")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let losses: Vec<u64> = json_lines(&out.stdout).iter().filter_map(|j| j.get("loss")?.as_f64()).map(f64::to_bits).collect();
        assert_eq!(losses.len(), 3);
        // The whole state (weights, moments, EMA) of the single rank.
        let state = std::fs::read(d.join(format!("runs/{name}/step-0000030/rank-00000-of-00001.safetensors"))).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join(format!("runs/{name}/step-0000030/manifest.json"))).unwrap()).unwrap();
        let (weights, ema) = (state, manifest["shards"][0]["sha256"].as_str().unwrap().to_string());
        runs.push((losses, weights, ema));
    }
    assert_eq!(runs[0].0, runs[1].0, "losses differ");
    assert!(runs[0].1 == runs[1].1, "weights differ");
    assert!(runs[0].2 == runs[1].2, "checksums differ");
    // And a different seed does change them (the comparison can fail).
    let out = train(d, &cfg, &["--json", "--set", "train.steps=30", "--set", "train.name=c", "--set", "train.seed=1"]);
    let losses: Vec<u64> = json_lines(&out.stdout).iter().filter_map(|j| j.get("loss")?.as_f64()).map(f64::to_bits).collect();
    assert_ne!(runs[0].0, losses);
}

#[test]
fn tensorboard_reads_our_event_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = write_config(d, "demo.yaml", &demo_config());
    let out = train(
        d,
        &cfg,
        &[
            "--set",
            "train.steps=12",
            "--set",
            "train.log_every=4",
            "--set",
            "sample.every=6",
            "--set",
            "sample.num=4",
            "--set",
            "sample.steps=2",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tb = d.join("runs/demo/tb");
    let tags = common::tensorboard(&tb);
    for tag in [
        "loss/total",
        "loss/denoise",
        "loss/proj",
        "loss/cls",
        "train/grad_norm",
        "train/lr",
        "train/skipped_steps",
        "perf/images_per_s",
        "perf/step_ms",
        "perf/comm_ms",
        "perf/comm_gb",
    ] {
        let steps: Vec<i64> =
            tags[tag].as_array().unwrap_or_else(|| panic!("tag {tag} missing")).iter().map(|p| p[0].as_i64().unwrap()).collect();
        assert_eq!(steps, vec![4, 8, 12], "{tag}");
    }
    // The EMA sample grid (2 x 2 latent-channel images of 8 x 8) at steps 6 and 12.
    assert_eq!(tags["images"]["samples/ema"], serde_json::json!([[6, 16, 16], [12, 16, 16]]));
    let lr = tags["train/lr"][0][1].as_f64().unwrap();
    assert!((lr - 1e-3).abs() < 1e-9);
    assert!(tags["loss/total"][0][1].as_f64().unwrap().is_finite());
}
