//! `reg-ddp sample`: the same images from 1 or 2 ranks, a readable `.npz`, resume
//! without touching finished images, and bad input refused with exit code 2.

mod common;

use common::{assert_bad_input, bin, mpirun, ok, repo};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A 2-step demo checkpoint to sample from.
fn checkpoint(dir: &Path) -> PathBuf {
    ok(bin().args(["train", "--config"]).arg(repo().join("configs/demo.yaml")).args([
        "--set",
        &format!("train.output_dir={}", dir.display()),
        "--set",
        "train.steps=2",
        "--threads",
        "1",
    ]));
    dir.join("demo/step-0000002")
}

fn sample_args(ckpt: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["sample".into(), "--ckpt".into(), ckpt.display().to_string(), "--ema".into()];
    v.extend(["--vae".into(), repo().join("tests/data/vae_tiny").display().to_string(), "--out".into(), out.display().to_string()]);
    let defaults = [("--num", "6"), ("--steps", "8"), ("--batch", "4"), ("--threads", "1"), ("--labels", "balanced")];
    for (flag, value) in defaults {
        // A flag given in `extra` (as `--flag v` or `--flag=v`) replaces the default.
        if !extra.iter().any(|e| *e == flag || e.starts_with(&format!("{flag}="))) {
            v.extend([flag.to_string(), value.to_string()]);
        }
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn pngs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn one_and_two_ranks_give_identical_images_and_a_valid_npz() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(bin().args(sample_args(&ckpt, &one, &[])));
    let args = sample_args(&ckpt, &two, &[]);
    ok(&mut mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>()));
    let (a, b) = (pngs(&one), pngs(&two));
    assert_eq!(a.len(), 6);
    assert!(a == b, "PNGs differ between 1 and 2 ranks");
    let check = "import numpy as np, sys; a = np.load(sys.argv[1])['arr_0']; print(a.shape, a.dtype)";
    let o = ok(Command::new(repo().join(".venv/bin/python")).args(["-c", check]).arg(one.with_extension("npz")));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "(6, 64, 64, 3) uint8");
    // Another seed gives other images (the comparison above can fail).
    let three = tmp.path().join("three");
    ok(bin().args(sample_args(&ckpt, &three, &["--seed", "1"])));
    assert!(pngs(&three) != a);
}

#[test]
fn an_interrupted_run_resumes_without_changing_finished_images() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let out = tmp.path().join("s");
    ok(bin().args(sample_args(&ckpt, &out, &["--mode", "ode", "--heun"])));
    let full = pngs(&out);
    // As if killed after four images: two are missing; the others must stay untouched.
    std::fs::remove_file(out.join("000001.png")).unwrap();
    std::fs::remove_file(out.join("000005.png")).unwrap();
    let kept = std::fs::metadata(out.join("000000.png")).unwrap().modified().unwrap();
    let o = ok(bin().args(sample_args(&ckpt, &out, &["--mode", "ode", "--heun"])));
    assert!(String::from_utf8_lossy(&o.stderr).contains("(2 to do on rank 0)"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(kept, std::fs::metadata(out.join("000000.png")).unwrap().modified().unwrap());
    assert!(pngs(&out) == full);
}

#[test]
fn bad_input_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let out = tmp.path().join("bad");
    let run = |extra: &[&str]| bin().args(sample_args(&ckpt, &out, extra)).output().unwrap();
    assert_bad_input(&run(&["--interval", "0.5,0.5"]), &["--interval"]);
    assert_bad_input(&run(&["--cfg=-1"]), &["--cfg"]);
    assert_bad_input(&run(&["--num", "0"]), &["--num"]);
    // A VAE folder that holds something else (a DINOv2 model).
    let mut args = sample_args(&ckpt, &out, &[]);
    let i = args.iter().position(|a| a == "--vae").unwrap();
    args[i + 1] = repo().join("tests/data/dinov2_tiny").display().to_string();
    assert_bad_input(&bin().args(&args).output().unwrap(), &["dinov2_tiny"]);
    // Weights whose shapes do not match the preset.
    let w = tmp.path().join("w.safetensors");
    ok(bin().args(["export", "--ckpt"]).arg(&ckpt).arg("--out").arg(&w));
    let wide = tmp.path().join("wide.yaml");
    std::fs::write(&wide, std::fs::read_to_string(repo().join("configs/demo.yaml")).unwrap().replace("hidden_size: 64", "hidden_size: 96"))
        .unwrap();
    let o = bin()
        .args(["sample", "--weights"])
        .arg(&w)
        .arg("--config")
        .arg(&wide)
        .arg("--vae")
        .arg(repo().join("tests/data/vae_tiny"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_bad_input(&o, &["w.safetensors", "shape"]);
}
