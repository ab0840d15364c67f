//! Failure paths a cluster user meets, provoked for real: SIGKILL at several points of
//! a real checkpoint write, a full disk, an output folder that cannot be written,
//! checkpoints of another run or model, a second signal, and runs of non-finite steps.

mod common;

use common::{assert_bad_input_midway, bin, json_lines, losses, manifest, mpirun, ok, train_args};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn args(out: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    train_args(&out.display().to_string(), name, extra)
}

/// `train` of the run `name` on `np` ranks.
fn train(np: usize, out: &Path, name: &str, extra: &[&str]) -> Command {
    let a = args(out, name, extra);
    mpirun(np, &a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Complete checkpoints of a run (with a manifest), oldest first.
fn complete(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("manifest.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Temporary files anywhere under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            found.extend(temporaries(&e.path()));
        } else if e.file_name().to_string_lossy().contains(".tmp-") {
            found.push(e.path());
        }
    }
    found
}

fn shard_shas(step: &Path) -> Vec<String> {
    manifest(step)["shards"].as_array().unwrap().iter().map(|s| s["sha256"].as_str().unwrap().to_string()).collect()
}

/// SiT-B/2 (130M parameters, a 2.1 GB checkpoint) on 8x8 latents at batch 2: cheap
/// steps, a write that takes seconds.
const SIT_B: [&str; 10] = [
    "--set",
    "model.depth=12",
    "--set",
    "model.hidden_size=768",
    "--set",
    "model.num_heads=12",
    "--set",
    "model.encoder_depth=4",
    "--set",
    "train.global_batch=2",
];

/// Kills the run while it writes the step-4 checkpoint, at 5%, 50% and 95% of the
/// shard file and between the file's rename and the manifest; after every kill,
/// `--resume auto` takes step 2, and the run finally ends where an uninterrupted run
/// does, bit for bit.
#[test]
fn a_kill_at_any_point_of_a_real_write_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common = [&SIT_B[..], &["--set", "train.steps=6", "--set", "train.log_every=1", "--set", "train.keep_checkpoints=2"]].concat();
    let straight = ok(&mut train(1, d, "straight", &[&common[..], &["--set", "train.checkpoint_every=1000"]].concat()));
    let reference = losses(&straight.stdout);
    let crash: Vec<&str> = [&common[..], &["--set", "train.checkpoint_every=2", "--resume", "auto"]].concat();
    let run = d.join("crash");
    let step4 = run.join("step-0000004");
    let shard = step4.join("rank-00000-of-00001.safetensors");
    let mut shard_len = None;
    for point in ["5%", "50%", "95%", "renamed"] {
        let a = args(d, "crash", &crash);
        let mut child = bin().args(&a).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // Only a guard against a hang: how soon the write reaches the point is not what is tested.
        let deadline = Duration::from_secs(300);
        let start = Instant::now();
        loop {
            if start.elapsed() > deadline {
                let _ = child.kill();
                panic!("hung: {point}: the step-4 write did not reach its point within {deadline:?}");
            }
            assert!(child.try_wait().unwrap().is_none(), "{point}: the run ended before the kill");
            if let Some(len) = shard_len {
                let growing = std::fs::read_dir(&step4)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .find(|e| e.file_name().to_string_lossy().ends_with(&format!(".tmp-{}", child.id())))
                    .and_then(|e| e.metadata().ok())
                    .map(|m| m.len() as f64 / len as f64);
                let reached = match point {
                    "renamed" => shard.exists() && !step4.join("manifest.json").exists(),
                    p => growing.is_some_and(|f| f >= p.trim_end_matches('%').parse::<f64>().unwrap() / 100.0),
                };
                if reached {
                    break;
                }
            } else if run.join("step-0000002/manifest.json").exists() {
                shard_len = Some(std::fs::metadata(run.join("step-0000002/rank-00000-of-00001.safetensors")).unwrap().len());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(complete(&run), ["step-0000002"], "{point}: only step 2 is complete");
    }
    let last = ok(&mut train(1, d, "crash", &crash));
    let start = json_lines(&last.stdout).into_iter().find(|j| j.get("shard").is_some()).unwrap();
    assert_eq!(start["step"], 2, "resumed from the last complete checkpoint");
    let l = losses(&last.stdout);
    assert_eq!(l.len(), 4);
    for (i, (x, y)) in reference[2..].iter().zip(&l).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "step {}: {x} vs {y}", i + 3);
    }
    assert_eq!(shard_shas(&run.join("step-0000006")), shard_shas(&d.join("straight/step-0000006")));
    assert_eq!(temporaries(&run), Vec::<PathBuf>::new(), "killed writes leave nothing behind once resumed");
}

/// A file-size limit stands in for a full disk (mounting a small filesystem needs
/// privileges): both ranks fail to write step 15's shards, stop with a message that
/// names the last complete checkpoint, leave no temporary file or half checkpoint,
/// and the run resumes from step 10.
#[test]
fn a_full_disk_stops_every_rank_and_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common = ["--set", "train.checkpoint_every=5", "--set", "train.log_every=1"];
    ok(&mut train(2, d, "full", &[&common[..], &["--set", "train.steps=10"]].concat()));
    let shard = std::fs::metadata(d.join("full/step-0000010/rank-00000-of-00002.safetensors")).unwrap().len();
    let a = args(d, "full", &[&common[..], &["--set", "train.steps=20", "--resume", "auto"]].concat());
    // The limit applies to the ranks only (`prlimit` execs them), not to mpirun; TCP
    // between the ranks, as Open MPI's shared-memory segments are files too.
    let limit = format!("--fsize={}", shard / 2);
    let mut c = Command::new("mpirun");
    c.args(["-np", "2", "prlimit", &limit, "--", env!("CARGO_BIN_EXE_reg-ddp")]).args(&a);
    for (k, v) in common::MPI_ENV {
        c.env(k, v);
    }
    c.env("OMPI_MCA_btl", "self,tcp");
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for rank in ["error: checkpoint", "error: rank 1: checkpoint"] {
        let line = err.lines().find(|l| l.starts_with(rank)).unwrap_or_else(|| panic!("no line from {rank:?}: {err}"));
        assert!(line.contains("step-0000015 not written") && line.contains("step-0000010"), "{line}");
        assert!(line.contains("File too large"), "{line}");
    }
    // The write fails in the background; the run stops at the step boundary that learns it.
    assert!(losses(&o.stdout).len() < 10, "stopped before step 20");
    let run = d.join("full");
    assert_eq!(complete(&run), ["step-0000005", "step-0000010"]);
    assert!(!run.join("step-0000015").exists(), "the failed checkpoint's folder is removed");
    assert_eq!(temporaries(&run), Vec::<PathBuf>::new());
    let resumed = ok(&mut train(2, d, "full", &[&common[..], &["--set", "train.steps=12", "--resume", "auto"]].concat()));
    let start = json_lines(&resumed.stdout).into_iter().find(|j| j.get("shard").is_some()).unwrap();
    assert_eq!(start["step"], 10);
}

/// Every rank checks that it can write the run folder before the first step.
#[test]
fn an_unwritable_output_folder_is_refused_before_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let o = train(2, &file.join("out"), "x", &["--set", "train.steps=5"]).output().unwrap();
    assert_bad_input_midway(&o, &["train.output_dir", "a-file", "rank(s) [0, 1] of 2", "not a folder"]);
    assert!(losses(&o.stdout).is_empty(), "no step ran");
}

/// `--resume DIR` with a missing shard, a changed byte, another run's checkpoint or
/// another model's: exit 2 with one line naming the file. A new run folder adopts the
/// identity of the run it continues.
#[test]
fn resume_refuses_broken_and_foreign_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&mut train(1, d, "a", &["--set", "train.steps=4", "--set", "train.checkpoint_every=2"]));
    ok(&mut train(1, d, "b", &["--set", "train.steps=2"]));
    let id = |run: &str| -> String {
        let j: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join(run).join("run.json")).unwrap()).unwrap();
        j["run_id"].as_str().unwrap().to_string()
    };
    assert_ne!(id("a"), id("b"));
    let a4 = d.join("a/step-0000004");
    assert_eq!(manifest(&a4)["run_id"], id("a").as_str());
    let copy = |name: &str| -> PathBuf {
        let to = d.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&a4).unwrap().flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        to
    };
    let resume = |name: &str, from: &Path, extra: &[&str]| train(1, d, name, &[extra, &["--resume", from.to_str().unwrap()]].concat());

    let missing = copy("missing");
    std::fs::remove_file(missing.join("rank-00000-of-00001.safetensors")).unwrap();
    assert_bad_input_midway(&resume("a", &missing, &[]).output().unwrap(), &["missing/rank-00000-of-00001.safetensors", "cannot read"]);

    let flipped = copy("flipped");
    let f = flipped.join("rank-00000-of-00001.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    assert_bad_input_midway(
        &resume("a", &flipped, &[]).output().unwrap(),
        &["flipped/rank-00000-of-00001.safetensors", "SHA-256 mismatch"],
    );

    let o = resume("b", &a4, &[]).output().unwrap();
    assert_bad_input_midway(&o, &["a/step-0000004/manifest.json", &id("a"), "another run", &id("b"), "--init"]);

    let o = resume("c", &a4, &["--set", "model.depth=2"]).output().unwrap();
    assert_bad_input_midway(&o, &["a/step-0000004/manifest.json", "config.model", "depth: 4 there, depth: 2 here", "--init"]);
    assert!(!d.join("c").exists(), "a refused resume makes no run folder");

    // A new folder continues run a.
    ok(&mut resume("moved", &a4, &["--set", "train.steps=5"]));
    assert_eq!(id("moved"), id("a"));
    assert_eq!(manifest(&d.join("moved/step-0000005"))["run_id"], id("a").as_str());
}

/// SIGTERM asks for a checkpoint at the next step boundary; a second one while the
/// step is still running exits at once (the step never finishes), with status 1 and no
/// new checkpoint.
#[test]
fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Slow steps (batch 1024 on 1 thread), so that both signals land inside one.
    let a = args(d, "sig", &["--set", "train.steps=1000", "--set", "train.global_batch=1024", "--set", "train.log_every=1"]);
    let mut child = bin().args(&a).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("\"loss\"") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "the run ended");
    }
    let pid = child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(20));
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
    // At once: the step the signals landed in was not finished (every step logs its loss).
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(!rest.contains("\"loss\""), "a step finished after the second signal: {rest}");
    assert!(complete(&d.join("sig")).is_empty(), "no checkpoint was written");
}

/// More than `train.max_consecutive_skips` non-finite steps in a row stop the run with
/// a line naming the last good checkpoint.
#[test]
fn too_many_non_finite_steps_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = args(
        d,
        "nan",
        &[
            "--set",
            "train.steps=100",
            "--set",
            "train.checkpoint_every=5",
            "--set",
            "train.max_consecutive_skips=3",
            "--set",
            "train.log_every=1",
        ],
    );
    // Every step from index 6 (the 7th) on, on rank 1.
    let o = mpirun(2, &a.iter().map(String::as_str).collect::<Vec<_>>()).env("REG_DDP_TEST_NAN_AT", "6-1000:1").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = err.lines().find(|l| l.starts_with("error: 4 consecutive non-finite steps")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("last at step 10") && line.contains("last good checkpoint") && line.contains("nan/step-0000005"), "{line}");
    let skipped = json_lines(&o.stdout).into_iter().filter_map(|j| j.get("skipped")?.as_i64()).max();
    assert_eq!(skipped, Some(4));
}
