//! The run folder's lock: every rank of a job holds an exclusive `flock` on its own file
//! under `<run>/.lock/`, taken before anything in the folder is read or written. The
//! kernel drops it with the process, so a killed job leaves nothing held (no marker file
//! to clean up); a second job started on a folder in use is refused at once and names
//! the job that holds it.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Held for as long as the job runs; dropping it (or the process ending) releases it.
pub struct RunLock {
    _file: File,
}

fn lock_path(run: &Path, rank: i64) -> PathBuf {
    run.join(".lock").join(format!("rank-{rank:05}"))
}

/// Takes this rank's lock of `run`: `Ok(None)` when another process holds it.
pub fn try_acquire(run: &Path, rank: i64) -> Result<Option<RunLock>> {
    let path = lock_path(run, rank);
    let dir = path.parent().expect("a lock has a folder");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the lock folder", dir.display()))?;
    // Not truncated on open: the holder's description stays readable until the lock is ours.
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("{}: cannot lock", path.display())),
    }
    let me = serde_json::json!({
        "host": hostname(),
        "pid": std::process::id(),
        "slurm_job": std::env::var("SLURM_JOB_ID").ok(),
        "since_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    });
    file.set_len(0)?;
    file.write_all(me.to_string().as_bytes())?;
    Ok(Some(RunLock { _file: file }))
}

/// Who holds `rank`'s lock of `run`, in words, from what the holder wrote.
pub fn holder(run: &Path, rank: i64) -> String {
    let text = std::fs::read_to_string(lock_path(run, rank)).unwrap_or_default();
    let Ok(j) = serde_json::from_str::<serde_json::Value>(&text) else {
        return "a job that is starting".into();
    };
    let mut s = format!("pid {} on {}", j["pid"], j["host"].as_str().unwrap_or("?"));
    if let Some(job) = j["slurm_job"].as_str() {
        s += &format!(", SLURM job {job}");
    }
    s
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "?".into())
}
