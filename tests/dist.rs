//! Data parallelism under a real `mpirun`: results independent of the world size,
//! optimiser state really sharded, and a dead or hung rank ends the job.

mod common;

use common::{assert_identical_model, export, json_lines, mpirun, train_args};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// With the micro-batch fixed (4 samples per pass: 4 passes on 1 rank, 2 on each of
/// 2, 1 on each of 4), the gradient sums form the same tree and training is bit for
/// bit the same. Without it each rank sums its whole batch in one pass, the float sums
/// round differently, and gradients at Adam's eps scale (zero-initialised gates) turn
/// that into differences of up to ~4e-5 within those tensors.
#[test]
fn one_two_and_four_ranks_train_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let mut runs = Vec::new();
    for np in [1usize, 2, 4] {
        let name = format!("np{np}");
        let args = train_args(&out, &name, &["--set", "train.steps=20", "--set", "train.log_every=1", "--set", "train.micro_batch=4"]);
        let o = mpirun(np, &args.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
        assert!(o.status.success(), "np={np}: {}", String::from_utf8_lossy(&o.stderr));
        let lines = json_lines(&o.stdout);
        // Each rank holds exactly 1/np of the moments and the EMA.
        let shards: Vec<&serde_json::Value> = lines.iter().filter(|j| j.get("shard").is_some()).collect();
        assert_eq!(shards.len(), np);
        for s in &shards {
            let flat = s["flat"].as_i64().unwrap();
            assert_eq!(s["world"].as_i64().unwrap(), np as i64);
            for key in ["shard", "exp_avg", "exp_avg_sq", "ema"] {
                assert_eq!(s[key].as_i64().unwrap() * np as i64, flat, "np={np} {key}");
            }
        }
        // Communication per step: a reduce-scatter and an all-gather of the flat buffer
        // (plus two 16-byte all-reduces), (w - 1) / w of each sent per rank; timed on MPI.
        let flat = shards[0]["flat"].as_f64().unwrap();
        let want_gb = (2.0 * flat * 4.0 + 32.0) * (np as f64 - 1.0) / np as f64 / 1e9;
        for j in lines.iter().filter(|j| j.get("loss").is_some()) {
            let gb = j["comm_gb"].as_f64().unwrap();
            assert!((gb - want_gb).abs() <= 1e-12 * want_gb.max(1.0), "np={np}: comm_gb {gb} vs {want_gb}");
            assert!(j["comm_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "np={np}: comm_ms {}", j["comm_ms"]);
        }
        let losses: Vec<f64> = lines.iter().filter_map(|j| j.get("loss").and_then(|l| l.as_f64())).collect();
        assert_eq!(losses.len(), 20, "np={np}: one loss line per step");
        let ckpt = dir.path().join(&name).join("step-0000020");
        runs.push((np, losses, export(&ckpt, false), export(&ckpt, true)));
    }
    let (_, ref_losses, ref_w, ref_ema) = &runs[0];
    for (np, losses, w, ema) in &runs[1..] {
        for (step, (a, b)) in losses.iter().zip(ref_losses).enumerate() {
            assert!(((a - b) / b).abs() <= 1e-5, "np={np} step {}: loss {a} vs {b}", step + 1);
        }
        assert_identical_model(&format!("np={np}"), w, ema, ref_w, ref_ema);
    }
    // The weights did move (the comparison is not between two copies of the init).
    assert!(ref_losses[19] < ref_losses[0]);
}

/// The ZeRO layout with many small buckets (parameters straddling their edges), each
/// handed to its reduce-scatter during backward (`dist.overlap`) or after it, with
/// several passes per rank: the same model bit for bit as one rank. A checkpoint of that
/// layout resumes on other world and bucket sizes, and so does one in format 1 (one
/// contiguous range per rank, before buckets were sliced).
#[test]
fn buckets_reduced_during_backward_train_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.display().to_string();
    let run = |np: usize, name: &str, extra: &[&str]| {
        let mut set = vec!["--set", "train.steps=12", "--set", "train.log_every=1", "--set", "train.micro_batch=4"];
        set.extend_from_slice(&["--set", "train.checkpoint_every=6"]);
        set.extend_from_slice(extra);
        let args = train_args(&out, name, &set);
        let o = mpirun(np, &args.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        json_lines(&o.stdout)
    };
    let model = |name: &str| {
        let ckpt = d.join(name).join("step-0000012");
        (export(&ckpt, false), export(&ckpt, true))
    };
    let overlapped = |lines: &[serde_json::Value]| -> Vec<f64> {
        lines.iter().filter_map(|j| j.get("loss").map(|_| j["overlapped"].as_f64().unwrap())).collect()
    };
    run(1, "one", &[]);
    let (ref_w, ref_ema) = model("one");

    let small = ["--set", "dist.bucket_mb=0.05"];
    let during = run(2, "during", &[&small[..], &["--set", "dist.overlap=true"]].concat());
    let buckets = during.iter().find_map(|j| j.get("buckets")?.as_i64()).unwrap();
    assert!(buckets >= 8, "{buckets} buckets: too few to test their edges");
    // Every bucket but those holding only padding or unused parameters goes early.
    assert!(overlapped(&during).iter().all(|&f| f >= 0.75), "{:?}", overlapped(&during));
    let (w, ema) = model("during");
    assert_identical_model("2 ranks, buckets during backward", &w, &ema, &ref_w, &ref_ema);

    let after = run(4, "after", &[&small[..], &["--set", "dist.overlap=false"]].concat());
    assert!(overlapped(&after).iter().all(|&f| f == 0.0));
    let (w, ema) = model("after");
    assert_identical_model("4 ranks, buckets after backward", &w, &ema, &ref_w, &ref_ema);

    // Resharded: 2 ranks' buckets of 0.05 MB read by 4 ranks of 0.03 MB and by 1 rank.
    let at6 = d.join("during/step-0000006");
    let m = common::manifest(&at6);
    assert_eq!(m["format_version"], 2);
    assert_eq!(m["shards"][0]["ranges"].as_array().unwrap().len() as i64, buckets);
    for (np, bucket) in [(4usize, "dist.bucket_mb=0.03"), (1, "dist.bucket_mb=0.05")] {
        let name = format!("resumed{np}");
        run(np, &name, &["--set", bucket, "--resume", at6.to_str().unwrap()]);
        let (w, ema) = model(&name);
        assert_identical_model(&format!("resumed on {np} ranks"), &w, &ema, &ref_w, &ref_ema);
    }

    // Format 1: one bucket per rank is one contiguous range; without `ranges` it reads the same.
    run(2, "whole", &[]);
    let at6 = d.join("whole/step-0000006");
    let mut m = common::manifest(&at6);
    m["format_version"] = 1.into();
    for s in m["shards"].as_array_mut().unwrap() {
        let r = s.as_object_mut().unwrap().remove("ranges").unwrap();
        assert_eq!((r[0][0].clone(), r[0][1].clone()), (s["lo"].clone(), s["len"].clone()));
    }
    std::fs::write(at6.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    run(4, "from_v1", &["--set", "dist.bucket_mb=0.05", "--resume", at6.to_str().unwrap()]);
    let (w, ema) = model("from_v1");
    assert_identical_model("format 1 resumed on 4 ranks", &w, &ema, &ref_w, &ref_ema);

    // Ranges that leave a gap are refused before anything is read: exit 2, one line.
    let at6 = d.join("during/step-0000006");
    let mut m = common::manifest(&at6);
    let first = &mut m["shards"][1]["ranges"][0][0];
    *first = (first.as_i64().unwrap() + 128).into();
    std::fs::write(at6.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let args = train_args(&out, "gap", &["--set", "train.steps=12", "--resume", at6.to_str().unwrap()]);
    common::assert_bad_input(&common::bin().args(&args).output().unwrap(), &["manifest.json", "ranges"]);
}

/// Computing in bf16, the ranks all-gather their weights in bf16 (half the bytes):
/// exact, because every layer casts its weights to bf16 before using them, so 2 and 4
/// ranks still train the same model bit for bit as 1 rank (fp32 masters on each).
#[test]
fn weights_gathered_in_bf16_train_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let mut models = Vec::new();
    for np in [1usize, 2, 4] {
        let name = format!("bf16np{np}");
        let set = ["--set", "train.steps=8", "--set", "train.log_every=1", "--set", "train.micro_batch=4", "--set", "train.precision=bf16"];
        let args = train_args(&out, &name, &set);
        let o = mpirun(np, &args.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let lines = json_lines(&o.stdout);
        let flat = lines.iter().find_map(|j| j.get("flat")?.as_f64()).unwrap();
        // fp32 gradients reduce-scattered, bf16 weights gathered, two 16-byte all-reduces.
        let want_gb = (flat * 4.0 + flat * 2.0 + 32.0) * (np as f64 - 1.0) / np as f64 / 1e9;
        for j in lines.iter().filter(|j| j.get("loss").is_some()) {
            let gb = j["comm_gb"].as_f64().unwrap();
            assert!((gb - want_gb).abs() <= 1e-12 * want_gb.max(1.0), "np={np}: comm_gb {gb} vs {want_gb}");
        }
        let ckpt = dir.path().join(&name).join("step-0000008");
        models.push((np, export(&ckpt, false), export(&ckpt, true)));
    }
    let (_, ref_w, ref_ema) = &models[0];
    for (np, w, ema) in &models[1..] {
        assert_identical_model(&format!("bf16, {np} ranks"), w, ema, ref_w, ref_ema);
    }
}

/// Starts a long 2-rank run with a short watchdog; returns the child and rank 1's pid.
/// `recovery`: mpirun keeps the job running when a rank dies (by default it kills the
/// others at once, with its own message), so that our watchdog has to end it.
fn start_two_ranks(out: &str, name: &str, recovery: bool) -> (std::process::Child, i32, std::sync::mpsc::Receiver<String>) {
    let args = train_args(out, name, &["--set", "train.steps=1000000", "--set", "train.log_every=1000", "--set", "dist.timeout_s=5"]);
    let mut c = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>());
    if recovery {
        c.env("OMPI_MCA_orte_enable_recovery", "1");
    }
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut pid = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Ok(j) = serde_json::from_str::<serde_json::Value>(&line) {
            if j["rank"].as_i64() == Some(1) {
                pid = Some(j["pid"].as_i64().unwrap() as i32);
                break;
            }
        }
    }
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    (child, pid.expect("rank 1 reported its pid"), rx)
}

/// Waits for the job to end. The deadline only guards against a hang (the watchdog's timeout is
/// 5 s): how long the job took is not what is tested.
fn wait_or_hung(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Duration::from_secs(120);
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("hung: the job did not end within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rank 1 is killed; mpirun is told to keep the job going, so rank 0 waits in a
/// collective until its watchdog ends it with a line that names rank 1 from the
/// heartbeats. (mpirun's exit status is 0 in this mode: it is not what is tested.)
#[test]
fn a_killed_rank_ends_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, pid, rx) = start_two_ranks(&dir.path().display().to_string(), "kill", true);
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_or_hung(&mut child);
    let err: Vec<String> = rx.try_iter().collect();
    let line = err.iter().find(|l| l.starts_with("error: rank 0: no progress for 5 s")).unwrap_or_else(|| panic!("{err:?}"));
    assert!(line.contains("no heartbeat for 5 s from rank(s) [1]: dead or stopped"), "{line}");
}

/// Rank 1 is stopped (SIGSTOP): the job fails, ended by rank 0's watchdog (`dist.timeout_s`),
/// with a line that names rank 1.
#[test]
fn a_hung_rank_ends_the_job_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, pid, rx) = start_two_ranks(&dir.path().display().to_string(), "hang", false);
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let status = wait_or_hung(&mut child);
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(!status.success());
    let err: Vec<String> = rx.try_iter().collect();
    let line = err.iter().find(|l| l.contains("rank 0: no progress for 5 s")).unwrap_or_else(|| panic!("{err:?}"));
    assert!(line.contains("rank(s) [1]: dead or stopped"), "{line}");
}

/// `bench --comm` on 2 CPU ranks: every reduce-scatter bucket of the step is timed
/// (their sizes add up to the flat buffer at `dist.bucket_mb`), and both all-gathers;
/// one rank alone is refused with one line.
#[test]
fn bench_comm_times_every_bucket_on_the_ranks() {
    let config = common::repo().join("configs/demo.yaml").display().to_string();
    let args = ["bench", "--config", &config, "--comm", "--steps", "2", "--threads", "1", "--set", "dist.bucket_mb=0.5"];
    let out = mpirun(2, &args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 1, "rank 0 alone reports");
    let j = &lines[0];
    assert_eq!(j["world"], 2);
    let buckets = j["reduce_scatter"]["buckets"].as_array().unwrap();
    let total_mb: f64 = buckets.iter().map(|b| b["mb"].as_f64().unwrap()).sum();
    assert!((total_mb - j["all_gather_f32"]["gb"].as_f64().unwrap() * 1e3).abs() < 1e-6, "{j}");
    // 0.5 MB buckets: more than one for the demo model, none bigger.
    assert!(buckets.len() >= 2 && buckets.iter().all(|b| b["mb"].as_f64().unwrap() <= 0.5 + 1e-9), "{j}");
    for b in buckets {
        assert!(b["ms"].as_f64().unwrap() > 0.0 && b["busbw_gb_s"].as_f64().unwrap() > 0.0, "{b}");
    }
    assert!(j["all_gather_bf16"]["gb"].as_f64().unwrap() * 2.0 == j["all_gather_f32"]["gb"].as_f64().unwrap());
    let one = common::bin().args(args).output().unwrap();
    assert_eq!(one.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&one.stderr).contains("--comm: times collectives between ranks"));
}
