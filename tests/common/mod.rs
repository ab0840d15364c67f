//! Helpers shared by the integration tests that drive the binary.
#![allow(dead_code)]

use reg::formats::weights;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

pub mod torch_saves;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The variables by which an MPI or Slurm launcher tells a process how many ranks it has.
pub const LAUNCHER_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"];

/// The reg-ddp binary, alone: without the launcher variables this test process may have
/// inherited (a suite run inside `srun`), so that it runs as one process.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_reg-ddp"));
    for v in LAUNCHER_VARS {
        c.env_remove(v);
    }
    c
}

/// Runs `c` and returns its output; panics with its command line, exit status and stderr
/// unless it succeeds.
#[track_caller]
pub fn ok(c: &mut Command) -> Output {
    let o = c.output().unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(o.status.success(), "{c:?} failed ({}):\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    o
}

/// `ok`, and the command's stdout as text.
#[track_caller]
pub fn ok_stdout(c: &mut Command) -> String {
    String::from_utf8(ok(c).stdout).expect("stdout is UTF-8")
}

/// A script run by the project's Python (.venv, which ./launch/setup.sh installs) with `dir`
/// as its argument; panics with its stderr if it fails.
#[track_caller]
pub fn python(script: &str, dir: &Path) {
    let py = repo().join(".venv/bin/python");
    assert!(py.exists(), "{}: missing (./launch/setup.sh installs it)", py.display());
    ok(Command::new(py).arg("-c").arg(script).arg(dir));
}

/// A golden file of tests/data (`name` relative to it): every tensor by name.
#[track_caller]
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = repo().join("tests/data").join(name);
    weights::read_map(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// `mpirun -np N reg-ddp train ...` with the variables Open MPI needs as root, in a
/// container, oversubscribed (launch/env.sh sets the same).
pub fn mpirun(np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), env!("CARGO_BIN_EXE_reg-ddp")]).args(args);
    for (k, v) in MPI_ENV {
        c.env(k, v);
    }
    c
}

/// What Open MPI needs to run as root, in a container, oversubscribed.
pub const MPI_ENV: [(&str, &str); 4] = [
    ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
    ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
    ("OMPI_MCA_btl_vader_single_copy_mechanism", "none"),
    ("OMPI_MCA_rmaps_base_oversubscribe", "1"),
];

pub fn train_args<'a>(out: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<String> {
    let config = repo().join("configs/demo.yaml");
    let mut v: Vec<String> =
        vec!["train".into(), "--config".into(), config.display().to_string(), "--json".into(), "--threads".into(), "1".into()];
    for s in [format!("train.output_dir={out}"), format!("train.name={name}")] {
        v.push("--set".into());
        v.push(s);
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Relative error of `a` against `b`: max |a - b| / max |b|, in f64 on the CPU.
pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let cpu = tch::Device::Cpu;
    let (a, b) = (a.to_device(cpu).to_kind(Kind::Double), b.to_device(cpu).to_kind(Kind::Double));
    (a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30)
}

/// `a` matches `b` in shape and within `tol` relative (`rel`); prints the error.
#[track_caller]
pub fn assert_rel(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.size(), b.size(), "{what}: shape");
    let r = rel(a, b);
    assert!(r <= tol, "{what}: relative error {r:.3e} > {tol:.0e}");
    println!("{what}: relative error {r:.3e}");
}

/// A copy of a hub model folder (`config.json` + `model.safetensors`) that a test may break.
pub fn copy_model_folder(from: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(from.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// The weights (or EMA) of a checkpoint by name, through `reg-ddp export`.
pub fn export(ckpt: &Path, ema: bool) -> HashMap<String, Tensor> {
    let out = ckpt.join(if ema { "ema-export.safetensors" } else { "export.safetensors" });
    let mut c = bin();
    c.args(["export", "--ckpt"]).arg(ckpt).arg("--out").arg(&out);
    if ema {
        c.arg("--ema");
    }
    ok(&mut c);
    weights::read_map(&out).unwrap()
}

/// Losses of the logged steps, in order.
pub fn losses(stdout: &[u8]) -> Vec<f64> {
    json_lines(stdout).iter().filter_map(|j| j.get("loss")?.as_f64()).collect()
}

/// Same model bit for bit: every weight and every EMA value. Runs that keep
/// `train.micro_batch` add their gradients in the same tree whatever the rank count,
/// so nothing may differ, not even the rounding noise of the attention key bias.
pub fn assert_identical_model(
    what: &str,
    w: &HashMap<String, Tensor>,
    ema: &HashMap<String, Tensor>,
    ref_w: &HashMap<String, Tensor>,
    ref_ema: &HashMap<String, Tensor>,
) {
    for (kind, got, want) in [("weight", w, ref_w), ("EMA", ema, ref_ema)] {
        assert_eq!(got.len(), want.len(), "{what}: {kind} tensor count");
        for (name, t) in want {
            let r = rel(&got[name], t);
            assert!(got[name].equal(t), "{what} {kind} {name}: differs (relative difference {r:e})");
        }
    }
}

/// The manifest of a checkpoint folder.
pub fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Bad input: exit code 2 and exactly one line on stderr, containing every `needle`,
/// with no panic or backtrace.
#[track_caller]
pub fn assert_bad_input(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from: {}", lines[0]);
    }
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

/// Bad input found after the run started (a shard's checksum, a label): exit code 2
/// and exactly one `error:` line containing every `needle`.
#[track_caller]
pub fn assert_bad_input_midway(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from: {}", lines[0]);
    }
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

/// Scalars (`{tag: [[step, value], ...]}`) and images (`"images": {tag: [[step, width,
/// height], ...]}`) of a run's event files, as TensorBoard's own reader sees them.
pub fn tensorboard(dir: &Path) -> serde_json::Value {
    let script = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
acc.Reload()
out = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
out["images"] = {t: [[e.step, e.width, e.height] for e in acc.Images(t)] for t in acc.Tags()["images"]}
print(json.dumps(out))
"#;
    let py = repo().join(".venv/bin/python");
    let out = Command::new(&py).arg("-c").arg(script).arg(dir).output().expect("run .venv python (./launch/setup.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Inception-v3: [name, shape] of every parameter, in sorted name order, from the golden's metadata.
pub fn params() -> Vec<(String, Vec<i64>)> {
    let bytes = std::fs::read(repo().join("tests/data/inception_golden.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let text = meta.metadata().as_ref().unwrap()["params"].clone();
    serde_json::from_str(&text).unwrap()
}

/// tools/golden/inception.py's `make_weights`: for tensor j, element k,
/// v = frac(sin(0.37 k + 0.11 j) * 43758.5453) in f64, scaled per kind of tensor, cast to f32.
pub fn make_weights() -> Vec<(String, Tensor)> {
    params()
        .into_iter()
        .enumerate()
        .map(|(j, (name, shape))| {
            let n: i64 = shape.iter().product();
            let k = Tensor::arange(n, (Kind::Double, Device::Cpu));
            let v = ((k * 0.37 + 0.11 * j as f64).sin() * 43758.5453).frac().reshape(&shape[..]);
            let t = if name.ends_with("conv.weight") {
                let fan_in: i64 = shape[1..].iter().product();
                v * (12.0 / fan_in as f64).sqrt()
            } else if name.ends_with("bn.weight") {
                v * 0.1 + 1.0
            } else if name.ends_with("bn.bias") || name.ends_with("running_mean") || name == "fc.bias" {
                v * 0.05
            } else if name.ends_with("running_var") {
                v.abs() * 0.5 + 1.0
            } else if name == "fc.weight" {
                v * (0.05 * (3.0f64 / 2048.0).sqrt())
            } else {
                panic!("unexpected parameter {name}")
            };
            (name, t.to_kind(Kind::Float))
        })
        .collect()
}
