//! Sharded checkpoints: exact resume, resharding across world sizes, a corrupted
//! shard, preemption by signal, and skipped non-finite steps (kills mid-write and full
//! disks: tests/faults.rs).

mod common;

use common::{assert_identical_model, export, json_lines, losses, manifest, mpirun, train_args};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

fn run(np: usize, out: &Path, name: &str, extra: &[&str]) -> Output {
    let out = out.display().to_string();
    let args = train_args(&out, name, extra);
    let o = mpirun(np, &args.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn state_sha(dir: &Path) -> Vec<String> {
    manifest(dir)["shards"].as_array().unwrap().iter().map(|s| s["sha256"].as_str().unwrap().to_string()).collect()
}

#[test]
fn stop_and_resume_continues_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common = ["--set", "train.log_every=1", "--set", "train.checkpoint_every=1000"];
    let straight = run(2, d, "straight", &[&common[..], &["--set", "train.steps=20"]].concat());
    run(2, d, "split", &[&common[..], &["--set", "train.steps=10"]].concat());
    let resumed = run(2, d, "split", &[&common[..], &["--set", "train.steps=20", "--resume", "auto"]].concat());
    let (a, b) = (losses(&straight.stdout), losses(&resumed.stdout));
    assert_eq!(a.len(), 20);
    assert_eq!(b.len(), 10, "the resumed run does steps 11..20");
    for (i, (x, y)) in a[10..].iter().zip(&b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "step {}: {x} vs {y}", i + 11);
    }
    // Weights, moments and EMA of every rank: identical bytes.
    assert_eq!(state_sha(&d.join("straight/step-0000020")), state_sha(&d.join("split/step-0000020")));
}

#[test]
fn four_rank_checkpoint_resumes_on_two_and_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A fixed micro-batch makes the runs bit-identical (see tests/dist.rs).
    let common =
        ["--set", "train.log_every=1", "--set", "train.checkpoint_every=10", "--set", "train.steps=20", "--set", "train.micro_batch=4"];
    let four = run(4, d, "four", &common);
    let at10 = d.join("four/step-0000010");
    assert_eq!(manifest(&at10)["world"], 4);
    let reference = losses(&four.stdout);
    let (ref_w, ref_ema) = (export(&d.join("four/step-0000020"), false), export(&d.join("four/step-0000020"), true));
    for np in [2usize, 1] {
        let name = format!("from4on{np}");
        let o = run(np, d, &name, &[&common[..], &["--resume", at10.to_str().unwrap()]].concat());
        let l = losses(&o.stdout);
        assert_eq!(l.len(), 10);
        for (i, (x, y)) in reference[10..].iter().zip(&l).enumerate() {
            assert!(((x - y) / x).abs() <= 1e-5, "np={np} step {}: {x} vs {y}", i + 11);
        }
        let ckpt = d.join(&name).join("step-0000020");
        assert_eq!(manifest(&ckpt)["world"], np as i64);
        assert_identical_model(&format!("4 -> {np} ranks"), &export(&ckpt, false), &export(&ckpt, true), &ref_w, &ref_ema);
    }
}

#[test]
fn a_checksum_failure_falls_back_to_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(1, d, "sum", &["--set", "train.steps=10", "--set", "train.checkpoint_every=5"]);
    let f = d.join("sum/step-0000010/rank-00000-of-00001.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    let o = run(1, d, "sum", &["--set", "train.steps=11", "--resume", "auto"]);
    let start_line = json_lines(&o.stdout).into_iter().find(|j| j.get("shard").is_some()).unwrap();
    assert_eq!(start_line["step"], 5);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("warning") && err.contains("SHA-256 mismatch"), "{err}");
}

#[test]
fn sigusr1_on_one_rank_checkpoints_all_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.display().to_string();
    let common = ["--set", "train.log_every=1", "--set", "train.checkpoint_every=100000", "--set", "train.steps=400"];
    let straight = run(2, d, "straight", &common);
    let args = train_args(&out, "pre", &common);
    let mut child =
        mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Rank 1: the process of this run whose environment names rank 1; signal it once it has trained a few steps.
    let pid = {
        // Only a guard against a hang: how soon rank 1 starts is not what is tested.
        let deadline = Duration::from_secs(120);
        let start = Instant::now();
        loop {
            let found = std::process::Command::new("pgrep").args(["-f", "train.name=pre"]).output().unwrap();
            let pids: Vec<i32> = String::from_utf8_lossy(&found.stdout).lines().filter_map(|l| l.parse().ok()).collect();
            let ranks: Vec<i32> = pids
                .into_iter()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/environ")).map(|e| e.contains("OMPI_COMM_WORLD_RANK=1")).unwrap_or(false)
                })
                .collect();
            if let Some(p) = ranks.first() {
                break *p;
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                panic!("hung: rank 1 did not start within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "both ranks exit 0: {}", String::from_utf8_lossy(&o.stderr));
    let done = losses(&o.stdout).len();
    assert!(done > 0 && done < 400, "stopped early, at step {done}");
    let ckpt = d.join(format!("pre/step-{done:07}"));
    assert_eq!(manifest(&ckpt)["step"], done as i64, "a complete checkpoint at the stop");
    let resumed = run(2, d, "pre", &[&common[..], &["--resume", "auto"]].concat());
    let (a, b) = (losses(&straight.stdout), losses(&resumed.stdout));
    assert_eq!(b.len(), 400 - done);
    for (i, (x, y)) in a[done..].iter().zip(&b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "step {}", done + i + 1);
    }
    assert_eq!(state_sha(&d.join("straight/step-0000400")), state_sha(&d.join("pre/step-0000400")));
}

#[test]
fn a_non_finite_loss_on_one_rank_skips_the_update_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.display().to_string();
    let args = train_args(
        &out,
        "nan",
        &[
            "--set",
            "train.steps=4",
            "--set",
            "train.checkpoint_every=1",
            "--set",
            "train.keep_checkpoints=10",
            "--set",
            "train.log_every=1",
        ],
    );
    // Step index 2 (the third step) on rank 1 only.
    let o = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>()).env("REG_DDP_TEST_NAN_AT", "2:1").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = d.join("nan/step-0000002");
    let after = d.join("nan/step-0000003");
    assert_eq!(manifest(&after)["skipped"], 1);
    assert_eq!(manifest(&before)["skipped"], 0);
    assert_eq!(manifest(&after)["adam_step"], 2, "the skipped step does not advance AdamW");
    for rank in 0..2 {
        let f = format!("rank-{rank:05}-of-00002.safetensors");
        let a = reg::formats::weights::read_map(&before.join(&f)).unwrap();
        let b = reg::formats::weights::read_map(&after.join(&f)).unwrap();
        for name in ["weights", "ema", "exp_avg", "exp_avg_sq"] {
            assert!(a[name].equal(&b[name]), "rank {rank}: {name} changed on the skipped step");
        }
    }
    // The step after it updates again.
    let next = reg::formats::weights::read_map(&d.join("nan/step-0000004/rank-00000-of-00002.safetensors")).unwrap();
    let a = reg::formats::weights::read_map(&after.join("rank-00000-of-00002.safetensors")).unwrap();
    assert!(!a["weights"].equal(&next["weights"]));
    let last = json_lines(&o.stdout).into_iter().rfind(|j| j.get("loss").is_some()).unwrap();
    assert_eq!(last["skipped"], 1);
}
