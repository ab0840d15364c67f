//! Shard checksums: `reg-ddp verify` checks a dataset offline; the loader checks a shard
//! once per machine (a marker in the cache), and a changed file is checked again.

mod common;

use common::{assert_bad_input, bin};
use std::path::Path;
use std::process::Output;

fn reg(cache: &Path, args: &[&str]) -> Output {
    bin().args(args).env("REG_DDP_CACHE", cache).output().unwrap()
}

#[test]
fn verify_and_the_loader_catch_a_changed_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cache) = (dir.path().join("data"), dir.path().join("cache"));
    let d = data.to_str().unwrap();
    let o = reg(&cache, &["bench-data", "--data", d, "--make", "20", "--batch", "4", "--steps", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let markers = std::fs::read_dir(cache.join("verified")).unwrap().flatten().filter(|e| e.path().extension().is_none()).count();
    assert_eq!(markers, 1, "the loader recorded its check of the one shard");
    let o = reg(&cache, &["verify", d]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((j["shards"].as_i64(), j["records"].as_i64()), (Some(1), Some(20)));

    let shard = data.join("shard-00000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    assert_bad_input(&reg(&cache, &["verify", d]), &["1 of 1 shards failed", "shard-00000.safetensors", "SHA-256 mismatch"]);
    // The marker names the old file (size, time, inode): the loader hashes again.
    let o = reg(&cache, &["bench-data", "--data", d, "--batch", "4", "--steps", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("shard-00000.safetensors: SHA-256 mismatch"));
}
