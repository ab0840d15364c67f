//! The run folder: the identity its checkpoints carry (`run.json`), the check that a
//! resumed checkpoint continues the same run and model, and whether every rank can
//! write into it.

use super::checkpoint;
use super::Trainer;
use crate::config::Config;
use crate::error::bad_input;
use anyhow::{Context, Result};
use std::path::Path;

/// The identity in a run folder's `run.json`, if it has one.
pub(super) fn run_id_of(run: &Path) -> Result<Option<String>> {
    let path = run.join("run.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: not JSON: {e}", path.display())))?;
    match j["run_id"].as_str() {
        Some(id) if !id.is_empty() => Ok(Some(id.to_string())),
        _ => crate::bail_input!("{}: run_id: missing", path.display()),
    }
}

/// A fresh identity: the start time and 64 random bits.
pub(super) fn new_run_id() -> Result<String> {
    use std::io::Read;
    let mut bits = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bits)?;
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    Ok(format!("{secs:x}-{}", crate::formats::weights::hex(&bits)))
}

/// Resuming continues the same model of the same run: a checkpoint of another model,
/// or one whose run id is not this run folder's, is refused (`--init` starts from
/// foreign weights). A run folder without `run.json` adopts the checkpoint's run.
pub(super) fn check_same_run(run: &Path, dir: &Path, m: &checkpoint::Manifest, cfg: &Config) -> Result<()> {
    let manifest = dir.join("manifest.json");
    // The fields of the two `SitDims`, as `name: value` pairs in the same order.
    let fields = |d: crate::config::SitDims| format!("{d:?}").split_once('{').map(|(_, f)| f.trim_end_matches('}').trim().to_string());
    let (theirs, ours) = (fields(m.config.dims()).unwrap_or_default(), fields(cfg.dims()).unwrap_or_default());
    if theirs != ours {
        let differ = theirs.split(", ").zip(ours.split(", ")).find(|(a, b)| a != b).map(|(a, b)| format!("{a} there, {b} here"));
        crate::bail_input!(
            "{}: config.model: another model ({}); to start from its weights use --init",
            manifest.display(),
            differ.unwrap_or_default()
        );
    }
    if let Some(here) = run_id_of(run)? {
        if !m.run_id.is_empty() && m.run_id != here {
            crate::bail_input!(
                "{}: run_id {} is another run's (this run folder is {here}); to start from its weights use --init",
                manifest.display(),
                m.run_id
            );
        }
    }
    Ok(())
}

/// Every rank can write into the run folder (a node may mount it read-only, or not
/// at all): checked before the first step; rank 0 reports which ranks cannot.
pub(super) fn check_writable(run: &Path, t: &Trainer) -> Result<()> {
    let local = probe_writable(run);
    let failed = ranks_where(t, local.is_err())?;
    if failed.is_empty() {
        return Ok(());
    }
    let why = match local {
        Err(e) => format!("{e:#}"),
        Ok(()) => "rank 0 can; see those nodes".into(),
    };
    crate::bail_input!("train.output_dir: {} cannot be written by rank(s) {failed:?} of {}: {why}", run.display(), t.world())
}

/// Creates and removes a file in the run folder, or in its nearest existing parent
/// when the folder is yet to be made (it is only made once everything is validated).
fn probe_writable(run: &Path) -> Result<()> {
    let mut dir = run;
    while !dir.exists() {
        dir = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
    }
    if !dir.is_dir() {
        anyhow::bail!("{} is not a folder", dir.display());
    }
    let probe = dir.join(format!(".reg-ddp-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("{}: cannot create a file", dir.display()))?;
    std::fs::remove_file(&probe).with_context(|| format!("{}: cannot remove {}", dir.display(), probe.display()))
}

/// Every rank takes its lock of the run folder before reading or writing anything in it;
/// if another job holds any of them, every rank stops (exit 2) and rank 0 names that job.
pub(super) fn lock_run_folder(run: &Path, t: &Trainer) -> Result<super::run_lock::RunLock> {
    let local = super::run_lock::try_acquire(run, t.rank())?;
    let held = ranks_where(t, local.is_none())?;
    match (local, held.first()) {
        (Some(lock), None) => Ok(lock),
        // This rank's own lock missing puts it among the ranks named.
        (_, r) => {
            let r = *r.expect("a rank without its lock is named") as i64;
            crate::bail_input!(
                "train.output_dir: {} is in use by another job ({} holds its rank {r} lock); let it end, or give this run another train.name",
                run.display(),
                super::run_lock::holder(run, r)
            )
        }
    }
}

/// The ranks for which `local` holds, agreed by all (every rank must call it).
fn ranks_where(t: &Trainer, local: bool) -> Result<Vec<usize>> {
    let mut flags = vec![0.0; t.world() as usize];
    flags[t.rank() as usize] = local as i64 as f64;
    Ok(t.agree(&flags)?.iter().enumerate().filter(|(_, f)| **f > 0.0).map(|(r, _)| r).collect())
}
