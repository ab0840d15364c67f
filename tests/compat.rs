//! Checkpoints of format 1 still work: a demo-preset checkpoint of that format
//! (tests/data/ckpt_v0) resumes and continues exactly.

mod common;

use common::{losses, manifest, mpirun, train_args};
use std::path::Path;

fn shard_sha(step_dir: &Path) -> Vec<String> {
    manifest(step_dir)["shards"].as_array().unwrap().iter().map(|s| s["sha256"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_format_1_checkpoint_resumes_exactly() {
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read("tests/data/ckpt_v0/expected.json").unwrap()).unwrap();
    let old = common::repo().join("tests/data/ckpt_v0/step-0000002");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let run = |name: &str, extra: &[&str]| {
        let base = ["--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"];
        let args = train_args(&out, name, &[&base[..], extra].concat());
        let o = mpirun(1, &args.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        o
    };
    let resumed = run("resumed", &["--resume", old.to_str().unwrap()]);
    // The losses the old binary logged after resuming the same checkpoint (to 1e-6: the
    // float reductions of another CPU may round differently; on the machine that wrote
    // them they are bit-equal).
    let l = losses(&resumed.stdout);
    assert_eq!(l.len(), 2, "steps 3 and 4");
    for (i, step) in ["3", "4"].iter().enumerate() {
        let want = expected["losses"][step].as_f64().unwrap();
        assert!(((l[i] - want) / want).abs() <= 1e-6, "step {step}: {} vs {want} from the old binary", l[i]);
    }
    // Step 4's loss depends on the AdamW moments restored at step 2 (through the update of
    // step 3), so its match above shows they were read, not only the weights. A straight
    // run of this binary equals the resumed one byte for byte only on the CPU that wrote
    // the old checkpoint (steps 1 and 2 round differently elsewhere); what holds on any
    // machine: the state read from format 1, saved again in today's format at step 3 and
    // resumed, ends at step 4 on the same bytes as the run that never stopped after it.
    let again = run("again", &["--resume", old.to_str().unwrap(), "--set", "train.steps=3", "--set", "train.checkpoint_every=1"]);
    assert_eq!(losses(&again.stdout), l[..1]);
    let third = dir.path().join("again/step-0000003");
    let continued = run("again", &["--resume", third.to_str().unwrap()]);
    assert_eq!(losses(&continued.stdout), l[1..]);
    let (a, b) = (dir.path().join("resumed/step-0000004"), dir.path().join("again/step-0000004"));
    assert_eq!(shard_sha(&a), shard_sha(&b));
    // And the shard bytes hash as they were recorded in the manifest.
    let bytes = std::fs::read(a.join("rank-00000-of-00001.safetensors")).unwrap();
    assert_eq!(reg::formats::weights::sha256_hex(&bytes), shard_sha(&a)[0]);
}
