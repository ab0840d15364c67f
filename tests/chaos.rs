//! Faults survived at random: the chaos run's miniature (tools/chaos.py, 8 faults, one of
//! each kind, seed 1) on 2 MPI ranks kills, preempts, hangs, starves a run of disk, rots a
//! checkpoint and starts a second job on its folder, and the run still ends on the bytes
//! of a run that never failed, leaving no temporary file.

mod common;

use common::repo;
use std::process::Command;

/// Runs tools/chaos.py with `args`; its report, after checking that every fault was
/// survived, nothing was left behind and the final state matched.
fn chaos(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tools/chaos.py"))
        .args(args)
        .args(["--binary", env!("CARGO_BIN_EXE_reg-ddp"), "--limit-s", "900", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| panic!("no report: {}", String::from_utf8_lossy(&out.stderr)));
    let j: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    println!("{j}");
    assert!(out.status.success(), "{j}");
    assert_eq!(j["survived"], j["faults"], "{j}");
    assert_eq!(j["temporary_bytes_left"], 0, "{j}");
    assert_eq!(j["final_state_matched"], true, "{j}");
    assert!(j["failures"].as_array().unwrap().is_empty(), "{j}");
    j
}

#[test]
fn a_run_survives_one_fault_of_each_kind_and_ends_bit_identical() {
    let j = chaos(&["--faults", "8", "--seed", "1"]);
    let kinds = j["by_kind"].as_object().unwrap();
    assert_eq!(kinds.len(), 8, "{j}");
    assert!(kinds.values().all(|n| n.as_u64() == Some(1)), "one fault of each kind: {j}");
    assert_eq!(j["faults"], 8);
    assert!(j["restarts"].as_u64().unwrap() >= 7, "every fault but the second job ends a job: {j}");
}

/// The defect the chaos run's seed 7 found: a checkpoint that failed its checksum stayed
/// in place, still "complete", so the next fallback skipped it again and a good one
/// behind it, and pruning counted it among the kept (with a few, it deleted the good
/// ones). Rotted checkpoints in a row, off-cadence ones a preemption wrote among them:
/// each falls back to the one before (this plan and seed fail without the fix).
#[test]
fn checkpoints_rotting_in_a_row_each_fall_back_to_the_one_before() {
    let j = chaos(&["--plan", "preempt,bitrot,bitrot,bitrot,bitrot", "--seed", "2"]);
    assert_eq!(j["by_kind"]["bitrot"], 4, "{j}");
}
