//! The metrics against reference implementations: scipy's `sqrtm` and the ADM FID
//! formula, numpy versions of the ADM precision/recall and Inception Score.

use reg::eval::{frechet_distance, inception_score, precision_recall, sqrtm_psd, Stats};
use std::path::PathBuf;
use std::process::Command;
use tch::{Kind, Tensor};

/// Runs the reference script; it writes random inputs as raw f64 files into `dir` and
/// prints the expected values as JSON.
fn reference(dir: &std::path::Path) -> serde_json::Value {
    let script = r#"
import json, sys, numpy as np
from scipy import linalg
d = sys.argv[1]
rng = np.random.default_rng(0)
A = rng.normal(size=(48, 48)); M = A @ A.T / 48
a = rng.normal(size=(400, 32)); b = rng.normal(size=(400, 32)) * 1.3 + 0.2
for name, x in [("M", M), ("a", a), ("b", b)]:
    x.astype(np.float64).tofile(f"{d}/{name}.bin")
def stats(x): return x.mean(0), np.cov(x, rowvar=False)
def fid(s1, s2):
    (m1, c1), (m2, c2) = s1, s2
    cm, _ = linalg.sqrtm(c1.dot(c2), disp=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(cm.real))
def radii(x, k=3):
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]
def pr(ref, sam):
    rr, rs = radii(ref), radii(sam)
    d = ((sam[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    precision = (d <= rr[None, :]).any(1).mean()
    recall = (d.T <= rs[None, :]).any(1).mean()
    return float(precision), float(recall)
logits = rng.normal(size=(1000, 10)) * 2
p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
p.tofile(f"{d}/p.bin")
scores = []
for part in np.split(p, 10):
    kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
    scores.append(np.exp(kl))
print(json.dumps({"sqrtm": linalg.sqrtm(M).real.tolist(), "fid": fid(stats(a), stats(b)),
    "pr": pr(a, b), "is": [float(np.mean(scores)), float(np.std(scores))]}))
"#;
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let o = Command::new(py).arg("-c").arg(script).arg(dir).output().expect(".venv python (./launch/setup.sh installs numpy and scipy)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn load(dir: &std::path::Path, name: &str, shape: &[i64]) -> Tensor {
    let bytes = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
    Tensor::f_from_data_size(&bytes, shape, Kind::Double).unwrap()
}

/// Relative error of the scalar `a` against `b`: |a - b| / |b|.
fn scalar_rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

#[test]
fn metrics_match_the_reference_implementations() {
    let dir = tempfile::tempdir().unwrap();
    let r = reference(dir.path());
    // Matrix square root of a PSD matrix.
    let m = load(dir.path(), "M", &[48, 48]);
    let want: Vec<f64> =
        r["sqrtm"].as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect();
    let want = Tensor::from_slice(&want).view([48, 48]);
    let got = sqrtm_psd(&m);
    let err = (&got - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
    assert!(err <= 1e-6, "sqrtm: relative error {err:e}");
    // FID of random statistics.
    let (a, b) = (load(dir.path(), "a", &[400, 32]), load(dir.path(), "b", &[400, 32]));
    let fid = frechet_distance(&Stats::of(&a), &Stats::of(&b));
    let want = r["fid"].as_f64().unwrap();
    assert!(scalar_rel(fid, want) <= 1e-6, "FID {fid} vs scipy {want}");
    // Precision / recall (k = 3) and the Inception Score.
    let (p, rc) = precision_recall(&a, &b, 3);
    assert_eq!((p, rc), (r["pr"][0].as_f64().unwrap(), r["pr"][1].as_f64().unwrap()));
    let (is, sd) = inception_score(&load(dir.path(), "p", &[1000, 10]), 10);
    assert!(
        scalar_rel(is, r["is"][0].as_f64().unwrap()) <= 1e-9 && scalar_rel(sd, r["is"][1].as_f64().unwrap()) <= 1e-6,
        "IS {is} +- {sd} vs {}",
        r["is"]
    );
}

#[test]
fn fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift() {
    tch::manual_seed(1);
    let x = Tensor::randn([600, 64], (Kind::Double, tch::Device::Cpu));
    let s = Stats::of(&x);
    assert!(frechet_distance(&s, &s).abs() <= 1e-6);
    let near = frechet_distance(&s, &Stats::of(&(&x + 0.05)));
    let far = frechet_distance(&s, &Stats::of(&(&x + 0.1)));
    assert!(near > 1e-3 && far > near * 3.0, "{near} {far}");
}
