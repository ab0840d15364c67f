//! `reg-ddp bench-data`: how fast the loader feeds one rank from a dataset folder.

use anyhow::Result;
use reg::data::loader::ShardLoader;
use reg::data::shards::Dataset;
use reg::data::BatchSource;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset folder (with index.json).
    #[arg(long)]
    pub data: PathBuf,
    /// Global batch; one rank reads `batch / world` rows of it.
    #[arg(long, default_value_t = 256)]
    pub batch: i64,
    /// Ranks to divide the batch among (this process measures rank 0's share).
    #[arg(long, default_value_t = 1)]
    pub world: i64,
    #[arg(long, default_value_t = 50)]
    pub steps: u64,
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    /// Skip the SHA-256 check on first read (measures reading alone).
    #[arg(long)]
    pub no_verify: bool,
}

pub fn run(a: Args) -> Result<()> {
    let ds = Arc::new(Dataset::open(&a.data, !a.no_verify)?);
    let (features, images) = (ds.index.features, ds.index.images);
    let rows = a.batch / a.world.max(1);
    let mut loader = ShardLoader::new(ds.clone(), 0, a.batch, a.prefetch, tch::Device::Cpu)?;
    // First batch outside the timing: thread start, first-touch checksums.
    loader.batch(0, 0, rows)?;
    let start = Instant::now();
    for step in 1..=a.steps {
        let b = loader.batch(step, 0, rows)?;
        std::hint::black_box(&b);
    }
    let secs = start.elapsed().as_secs_f64();
    let line = serde_json::json!({
        "data": a.data.display().to_string(),
        "records": ds.len(),
        "features": features,
        "images": images,
        "rows_per_rank": rows,
        "samples_per_s_per_rank": (rows * a.steps as i64) as f64 / secs,
        "threads": 2,
    });
    println!("{line}");
    Ok(())
}
