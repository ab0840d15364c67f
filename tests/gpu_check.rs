//! The card's check script (tools/gpu_check.sh) runs end to end on CPU ranks with tiny
//! settings (DEVICE=cpu), so its first run on a lent GPU is not its first run: every
//! check exits 0 and the one JSON holds each figure. REG's own PyTorch step is skipped
//! here (it needs a checkout of REG's repository, which the project does not carry).

mod common;

use common::repo;
use std::process::Command;

#[test]
fn the_gpu_check_runs_end_to_end_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(repo().join("tools/gpu_check.sh"))
        .current_dir(repo())
        .env("DEVICE", "cpu")
        .env("OUT", dir.path())
        .env("BIN", env!("CARGO_BIN_EXE_reg-ddp"))
        .env("PY", repo().join(".venv/bin/python"))
        .env_remove("REG_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("gpu_check.json")).unwrap()).unwrap();
    println!("{}", std::fs::read_to_string(dir.path().join("gpu_check.txt")).unwrap());
    assert_eq!(j["failed"], serde_json::json!([]), "{j}");
    for name in ["bench-class-4", "bench-class-8", "bench-text-4", "bench-text-8", "bench-profile"] {
        let r = &j["checks"][name]["result"];
        assert!(r["ms_per_step"].as_f64().is_some_and(|ms| ms > 0.0), "{name}: {r}");
    }
    assert!(j["checks"]["bench-profile"]["result"]["phases_ms"].is_object(), "{j}");
    assert!(j["checks"]["sample"]["result"]["images_per_s"].as_f64().is_some_and(|x| x > 0.0), "{j}");
    assert!(j["prepare_images_per_s"].as_f64().is_some_and(|x| x > 0.0), "{j}");
    let equivalence = j["gpu_nccl"]["equivalence"]["demo"].as_object().unwrap_or_else(|| panic!("{j}"));
    assert!(equivalence.values().all(|r| r["pass"] == true), "{j}");
    assert_eq!(j["gpu_checkpoint"]["skipped"], "no GPU");
    assert!(j["card"]["torch"].as_str().is_some_and(|v| v.starts_with("2.11.0")), "{j}");
}
