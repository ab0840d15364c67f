//! `reg-ddp bench-data`: how fast the loader feeds the ranks of one node from a dataset
//! folder, and how much memory it holds while doing so.

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
    /// Ranks of one node to run at once, each with its own loader reading its own rows
    /// (ranks 0 .. N-1 of `--world`), as the ranks of a node share its disk and cores.
    #[arg(long, default_value_t = 1)]
    pub ranks: i64,
    #[arg(long, default_value_t = 50)]
    pub steps: u64,
    /// The data order's seed: another seed reads other records, not the ones a
    /// previous run left in the page cache.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    /// Skip the SHA-256 check on first read (measures reading alone).
    #[arg(long)]
    pub no_verify: bool,
    /// Drop the dataset's pages from the page cache after every rank's first (untimed)
    /// batch, which maps and checks the shards (`posix_fadvise(DONTNEED)`), so that the
    /// timed records come from the disk.
    #[arg(long)]
    pub cold: bool,
    /// Read latents and labels only.
    #[arg(long)]
    pub latents_only: bool,
    /// First write a random dataset of this many records to --data, with ImageNet
    /// 256 px shapes (latents [8, 32, 32] f32, DINOv2-B features [257, 768] bf16):
    /// 426 KB a record, so 94,000 records are 40 GB.
    #[arg(long)]
    pub make: Option<i64>,
}

/// A random dataset with the real record sizes, in shards of 4096.
fn make_dataset(dir: &std::path::Path, records: i64) -> Result<()> {
    use reg::data::shards::{write_index, write_shard, EncoderInfo, Index};
    use tch::{Device, Kind, Tensor};
    std::fs::create_dir_all(dir)?;
    let mut shards = Vec::new();
    let mut i = 0;
    while i * 4096 < records {
        let n = (records - i * 4096).min(4096);
        let opts = (Kind::Float, Device::Cpu);
        let tensors = vec![
            ("latents".to_string(), Tensor::randn([n, 8, 32, 32], opts)),
            ("labels".to_string(), Tensor::randint(1000, [n], (Kind::Int64, Device::Cpu))),
            ("features".to_string(), Tensor::randn([n, 257, 768], opts).to_kind(Kind::BFloat16)),
        ];
        shards.push(write_shard(dir, i as usize, &tensors)?);
        i += 1;
    }
    let index = Index {
        format_version: reg::data::shards::FORMAT_VERSION,
        resolution: 256,
        latent_shape: vec![8, 32, 32],
        latent_dtype: "f32".into(),
        vae: "random".into(),
        encoder: Some(EncoderInfo { name: "random".into(), tokens: 257, z_dim: 768 }),
        features: true,
        images: false,
        class_names: (0..1000).map(|c| format!("{c:04}")).collect(),
        shards,
        bad_images: 0,
        bad_images_report: None,
        text: None,
    };
    write_index(dir, &index)
}

/// Drops a file's clean pages from the page cache.
fn evict(path: &std::path::Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // Dirty pages (a set `--make` just wrote) are not dropped: write them out first.
    f.sync_all()?;
    // SAFETY: advice on a file descriptor that stays open for the call.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        anyhow::bail!("{}: posix_fadvise: error {rc}", path.display());
    }
    Ok(())
}

/// One simulated rank's reading: `steps` batches of its rows after a first, untimed one.
/// With `--cold`, rank 0 evicts the dataset between the two, while the others wait.
fn read_rank(ds: &Arc<Dataset>, a: &Args, rank: i64, rows: i64, ready: &std::sync::Barrier) -> Result<f64> {
    let mut loader = ShardLoader::new(ds.clone(), a.seed, a.batch, a.prefetch, tch::Device::Cpu)?;
    if a.latents_only {
        loader = loader.latents_only();
    }
    let lo = rank * rows;
    // First batch outside the timing: thread start, first-touch checksums.
    let first = loader.batch(0, lo, rows).map(|_| ());
    // Every rank reaches the barriers, even after an error, so none waits forever.
    ready.wait();
    let evicted = if a.cold && rank == 0 { ds.shards.iter().try_for_each(|s| evict(&s.path)) } else { Ok(()) };
    ready.wait();
    first?;
    evicted?;
    // The loader thread read up to `prefetch` + 1 batches ahead before the eviction:
    // those come from memory, so they stay out of the timing too.
    let skip = if a.cold { a.prefetch as u64 + 1 } else { 0 };
    for step in 1..=skip {
        loader.batch(step, lo, rows)?;
    }
    let start = Instant::now();
    for step in skip + 1..=skip + a.steps {
        let b = loader.batch(step, lo, rows)?;
        std::hint::black_box(&b);
    }
    Ok((rows * a.steps as i64) as f64 / start.elapsed().as_secs_f64())
}

pub fn run(a: Args) -> Result<()> {
    // Both divide the batch: zero would end in a division by zero inside the loader thread.
    if a.batch <= 0 || a.world <= 0 || a.batch < a.world {
        reg::bail_input!("--batch {} / --world {}: need 1 <= world <= batch", a.batch, a.world);
    }
    if a.ranks < 1 || a.ranks > a.world {
        reg::bail_input!("--ranks {}: need 1 <= ranks <= world ({})", a.ranks, a.world);
    }
    if let Some(n) = a.make {
        make_dataset(&a.data, n)?;
    }
    let ds = Arc::new(Dataset::open(&a.data, !a.no_verify)?);
    let (features, images) = (ds.index.features, ds.index.images);
    let rows = a.batch / a.world.max(1);
    let anon_before = super::proc_status_bytes("RssAnon");
    let start = Instant::now();
    let ready = std::sync::Barrier::new(a.ranks as usize);
    let rates: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..a.ranks)
            .map(|r| {
                let (ds, a, ready) = (&ds, &a, &ready);
                s.spawn(move || read_rank(ds, a, r, rows, ready))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank's reader panicked")).collect::<Result<Vec<_>>>()
    })?;
    let secs = start.elapsed().as_secs_f64();
    let mb = |b: Option<u64>| b.map(|b| (b as f64 / 1e6).round());
    let bytes: u64 = ds.shards.iter().filter_map(|s| std::fs::metadata(&s.path).ok()).map(|m| m.len()).sum();
    let line = serde_json::json!({
        "data": a.data.display().to_string(),
        "records": ds.len(),
        "dataset_gb": (bytes as f64 / 1e9 * 10.0).round() / 10.0,
        "features": features && !a.latents_only,
        "images": images,
        "rows_per_rank": rows,
        "ranks": a.ranks,
        // Rank 0's rate alone: what one loader delivers while the node's others run.
        "samples_per_s_per_rank": rates[0],
        "samples_per_s_per_rank_min": rates.iter().cloned().fold(f64::INFINITY, f64::min),
        "samples_per_s_all_ranks": rates.iter().sum::<f64>(),
        "seconds": secs,
        "copy_threads": reg::data::loader::COPY_THREADS,
        "cold": a.cold,
        // Private memory is what must not grow with the dataset; mapped file pages are
        // the page cache's, dropped under pressure.
        "rss_anon_mb_before": mb(anon_before),
        "rss_anon_mb_after": mb(super::proc_status_bytes("RssAnon")),
        "rss_file_mb_after": mb(super::proc_status_bytes("RssFile")),
        "peak_rss_mb": mb(super::proc_status_bytes("VmHWM")),
    });
    println!("{line}");
    Ok(())
}
