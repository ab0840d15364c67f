//! Shard checksums verified once per machine, not once per rank and run: a marker in a
//! node-local cache records that a file of this size, modification time and inode
//! hashed to the index's SHA-256, and a lock makes the ranks of a node hash a shard
//! once between them. A replaced or rewritten file no longer matches its marker.

use crate::formats::weights::sha256_hex;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Where the markers live: `$REG_DDP_CACHE`, else `$XDG_CACHE_HOME/reg-ddp`, else
/// `~/.cache/reg-ddp` (each node has its own).
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("REG_DDP_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("reg-ddp")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/reg-ddp")))?;
    Some(base.join("verified"))
}

/// What a marker says about the file: the expected hash and the file's identity.
fn key(path: &Path, sha256: &str) -> std::io::Result<String> {
    let m = std::fs::metadata(path)?;
    Ok(format!("{sha256} {} {} {} {}", m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
}

/// This machine's marker file for the shard at `path` (named by its absolute path).
fn marker_for(path: &Path) -> Option<PathBuf> {
    let dir = cache_dir().filter(|d| std::fs::create_dir_all(d).is_ok())?;
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    Some(dir.join(sha256_hex(canonical.to_string_lossy().as_bytes())))
}

/// SHA-256 of `bytes` against `expected`; the error names the file.
pub fn check(path: &Path, bytes: &[u8], expected: &str) -> Result<(), String> {
    let got = sha256_hex(bytes);
    if got != expected {
        return Err(format!("{}: SHA-256 mismatch (index {expected}, file {got})", path.display()));
    }
    Ok(())
}

/// Checks `bytes` (the mapped file at `path`) against `expected` unless this machine's
/// cache says the same file already passed; records a pass. Without a usable cache it
/// hashes every time.
pub fn check_once(path: &Path, bytes: &[u8], expected: &str) -> Result<(), String> {
    let (Some(marker), Ok(key)) = (marker_for(path), key(path, expected)) else {
        return check(path, bytes, expected);
    };
    // One hashing rank per node: the others wait on the lock, then find the marker.
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(marker.with_extension("lock"));
    if let Ok(f) = &lock {
        // SAFETY: flock on a file descriptor this function owns; released when it closes.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    }
    if std::fs::read_to_string(&marker).is_ok_and(|k| k == key) {
        return Ok(());
    }
    check(path, bytes, expected)?;
    record(&marker, &key);
    Ok(())
}

/// Writes a marker (best effort: a read-only cache only costs a hash next time).
fn record(marker: &Path, key: &str) {
    let tmp = marker.with_extension(format!("tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| f.write_all(key.as_bytes()));
    if written.is_err() || std::fs::rename(&tmp, marker).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Hashes the shard at `path` (streamed, whatever the cache says) and records a pass:
/// `reg-ddp verify`.
pub fn check_file(path: &Path, expected: &str) -> Result<u64, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
    // SAFETY: read-only map of a shard, which is never modified in place.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| format!("{}: cannot map: {e}", path.display()))?;
    check(path, &map, expected)?;
    if let (Some(marker), Ok(key)) = (marker_for(path), key(path, expected)) {
        record(&marker, &key);
    }
    Ok(map.len() as u64)
}
