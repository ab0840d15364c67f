//! `reg-ddp verify`: checks every shard of a dataset against its index, in parallel.

use anyhow::Result;
use rayon::prelude::*;
use reg::data::shards::Dataset;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset folder (with index.json).
    pub data: PathBuf,
    /// Shards hashed at once (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn run(a: Args) -> Result<()> {
    // Opening checks the index and every shard's header; hashing then reads each file.
    let ds = Dataset::open(&a.data, false)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(a.threads).build()?;
    let start = Instant::now();
    let results: Vec<Result<u64, String>> =
        pool.install(|| ds.shards.par_iter().map(|s| reg::data::verify::check_file(&s.path, s.sha256())).collect());
    let secs = start.elapsed().as_secs_f64();
    let bad: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(first) = bad.first() {
        reg::bail_input!("{} of {} shards failed; first: {first}", bad.len(), results.len());
    }
    let bytes: u64 = results.iter().filter_map(|r| r.as_ref().ok()).sum();
    let line = serde_json::json!({"data": a.data.display().to_string(), "shards": results.len(), "records": ds.len(),
        "bytes": bytes, "seconds": secs, "gb_per_s": bytes as f64 / 1e9 / secs.max(1e-9), "threads": pool.current_num_threads()});
    println!("{line}");
    Ok(())
}
