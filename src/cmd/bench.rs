//! `reg-ddp bench`: times training steps on synthetic data of the configured shapes, or
//! (`--sample`) the paper's sampler on the configured model.

use anyhow::Result;
use reg::config::Config;
use reg::diffusion::generate::{latents, Labels, SampleSpec};
use reg::diffusion::sampler::Sampler;
use reg::dist::{Collectives, LaunchInfo};
use reg::model::build_sit;
use reg::train::{faults::Faults, Trainer};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub run: super::ConfigArgs,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Batch to time (defaults to the config's global batch).
    #[arg(long)]
    pub batch: Option<i64>,
    /// Also time each phase of the step (synchronising the device at every phase
    /// boundary, in a second pass of `--steps` steps after the plain timing).
    #[arg(long)]
    pub profile: bool,
    /// Time image generation instead: SDE with the paper's guidance (cfg 2.3 for the
    /// image and the REG token, interval [0, 0.85]), no VAE decoding.
    #[arg(long)]
    pub sample: bool,
    /// With --sample: sampler steps.
    #[arg(long, default_value_t = 250)]
    pub sample_steps: i64,
    /// With --sample: timed batches (after one untimed batch of 2 sampler steps).
    #[arg(long, default_value_t = 1)]
    pub sample_batches: i64,
    /// Time the step's collectives instead, on the ranks the launcher started (2 or
    /// more): each reduce-scatter bucket (`dist.bucket_mb`) and the weight all-gather
    /// in fp32 and bf16, medians of `--steps` rounds, with NCCL-tests' bus bandwidth
    /// (a reduce-scatter's time includes staging its bucket, as in the step).
    /// These are the per-bucket costs `tools/scaling_model.py` takes.
    #[arg(long)]
    pub comm: bool,
}

/// Dense bf16 peak of known GPUs, from `nvidia-smi`'s name of device 0.
fn gpu_peak_flops() -> Option<(String, f64)> {
    let out = std::process::Command::new("nvidia-smi").args(["--query-gpu=name", "--format=csv,noheader"]).output().ok()?;
    let name = String::from_utf8_lossy(&out.stdout).lines().next()?.trim().to_string();
    let peak = if name.contains("H100") && name.contains("PCIe") {
        756e12
    } else if name.contains("H100") || name.contains("H200") || name.contains("H800") {
        989e12
    } else if name.contains("A100") {
        312e12
    } else if name.contains("B200") {
        2250e12
    } else {
        return None;
    };
    Some((name, peak))
}

pub fn run(a: Args) -> Result<()> {
    let mut sets = Vec::new();
    if let Some(b) = a.batch {
        sets.push(format!("train.global_batch={b}"));
    }
    sets.push("data.source=synthetic".into());
    sets.push("data.path=null".into());
    // A text model trains on synthetic caption states: the frozen text encoder (CLIP-L's
    // text tower, small next to SiT-XL) is neither loaded nor timed.
    sets.push("data.text_encoder_path=null".into());
    if a.sample {
        if a.sample_steps < 2 || a.sample_batches < 1 {
            reg::bail_input!("--sample-steps: at least 2; --sample-batches: at least 1");
        }
        return bench_sampler(&a, &a.run.load(&sets)?);
    }
    let (cfg, launch) = a.run.launch(&sets, Collectives::OnDevice)?;
    let device = launch.device;
    let mut t = Trainer::new(cfg, launch, Faults::default())?;
    if a.comm {
        return bench_comm(&a, &mut t);
    }
    if let tch::Device::Cuda(i) = device {
        reg::shim::cuda_reset_peak(i)?;
    }
    for _ in 0..a.warmup {
        t.train_step()?;
    }
    t.sync();
    let start = Instant::now();
    let (mut comm_ms, mut comm_gb, mut overlapped) = (Some(0.0), 0.0, 0.0);
    for _ in 0..a.steps {
        let s = t.train_step()?;
        comm_ms = comm_ms.zip(s.comm_ms).map(|(a, b)| a + b);
        comm_gb += s.comm_gb;
        overlapped += s.overlapped;
    }
    t.sync();
    let per_step = |x: f64| x / a.steps.max(1) as f64;
    let secs = start.elapsed().as_secs_f64();
    let batch = t.cfg().train.global_batch as f64;
    let ms = 1000.0 * secs / a.steps.max(1) as f64;
    let ips = batch * a.steps as f64 / secs;
    let flops = t.cfg().dims().train_flops_per_image();
    let gpu = if device.is_cuda() { gpu_peak_flops() } else { None };
    let mfu = gpu.as_ref().map(|(_, peak)| flops * ips / peak);
    let peak_mem = match device {
        tch::Device::Cuda(i) => Some(reg::shim::cuda_peak_allocated(i)? as u64),
        _ => super::proc_status_bytes("VmHWM"),
    };
    let phases = if a.profile {
        t.profile_phases();
        for _ in 0..a.steps {
            t.train_step()?;
        }
        let per_step: serde_json::Map<String, serde_json::Value> =
            t.phase_ms().into_iter().map(|(n, ms)| (n.to_string(), serde_json::json!(ms))).collect();
        Some(per_step)
    } else {
        None
    };
    let line = serde_json::json!({
        "config": a.run.config.display().to_string(),
        "device": gpu.as_ref().map(|(n, _)| n.clone()).unwrap_or_else(|| format!("{device:?}")),
        "precision": format!("{:?}", t.kind()),
        "threads": tch::get_num_threads(),
        "batch": batch,
        "steps": a.steps,
        "ms_per_step": ms,
        "images_per_s": ips,
        "params": t.num_params(),
        "train_flops_per_image": flops,
        "mfu": mfu,
        "peak_mem_bytes": peak_mem,
        "comm_ms": comm_ms.map(per_step),
        "comm_gb": per_step(comm_gb),
        "overlapped": per_step(overlapped),
        "phases_ms": phases,
    });
    if t.rank() == 0 {
        println!("{line}");
    }
    Ok(())
}

/// `bench --comm`: one JSON line (rank 0) with the cost of each collective of the step.
fn bench_comm(a: &Args, t: &mut Trainer) -> Result<()> {
    let world = t.world();
    if world < 2 {
        reg::bail_input!("--comm: times collectives between ranks; start 2 or more (mpirun -np N, or launch/mpirun.sh)");
    }
    // A rank whose collective fails returns here; the others would wait for it forever.
    let timeout = std::time::Duration::from_secs_f64(t.cfg().dist.timeout_s);
    let watchdog = reg::dist::watchdog::Watchdog::start(t.rank(), world, timeout, None, t.comm_guard());
    watchdog.beat(0);
    let p = t.time_collectives(a.steps.max(1))?;
    let share = (world - 1) as f64 / world as f64;
    // NCCL-tests' bus bandwidth of a reduce-scatter or all-gather: the bytes of the whole
    // buffer times (n - 1) / n, over the time; comparable across world sizes.
    let busbw = |bytes: f64, ms: f64| if ms > 0.0 { bytes * share / (ms * 1e6) } else { 0.0 };
    let buckets: Vec<serde_json::Value> = p
        .bucket_elements
        .iter()
        .zip(&p.reduce_scatter_ms)
        .map(|(&n, &ms)| serde_json::json!({"mb": n as f64 * 4.0 / 1e6, "ms": ms, "busbw_gb_s": busbw(n as f64 * 4.0, ms)}))
        .collect();
    let rs_ms: f64 = p.reduce_scatter_ms.iter().sum();
    let rs_bytes = p.bucket_elements.iter().sum::<i64>() as f64 * 4.0;
    let gather = p.gather_elements as f64;
    let line = serde_json::json!({
        "config": a.run.config.display().to_string(),
        "device": format!("{:?}", t.comm_device()),
        "world": world,
        "params": t.num_params(),
        "rounds": a.steps.max(1),
        "reduce_scatter": {"buckets": buckets, "ms": rs_ms, "gb": rs_bytes / 1e9, "busbw_gb_s": busbw(rs_bytes, rs_ms)},
        "all_gather_f32": {"ms": p.all_gather_f32_ms, "gb": gather * 4.0 / 1e9, "busbw_gb_s": busbw(gather * 4.0, p.all_gather_f32_ms)},
        "all_gather_bf16": {"ms": p.all_gather_bf16_ms, "gb": gather * 2.0 / 1e9, "busbw_gb_s": busbw(gather * 2.0, p.all_gather_bf16_ms)},
    });
    if t.rank() == 0 {
        println!("{line}");
    }
    Ok(())
}

/// Images per second of `reg-ddp sample`'s generation step (the transformer's share of it)
/// on one device with the configured model's shapes and random weights.
fn bench_sampler(a: &Args, cfg: &Config) -> Result<()> {
    let device = LaunchInfo::from_env().device(&cfg.train.device)?;
    let (model, _params) = build_sit(&cfg.dims(), device, cfg.train.seed)?;
    let kind = cfg.train.precision.kind_on(device);
    let batch = cfg.train.global_batch;
    let spec =
        |steps| SampleSpec { sampler: Sampler::paper(steps), param: cfg.loss.parameterization(), seed: 0, labels: Labels::Random, kind };
    let indices: Vec<u64> = (0..batch as u64).collect();
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    if cfg.dims().text_dim > 0 {
        reg::bail_input!("bench --sample: measures class models only (model.condition is text)");
    }
    let _ = latents(&model, &indices, &spec(2), None, device)?;
    sync();
    let start = Instant::now();
    for _ in 0..a.sample_batches {
        let _ = latents(&model, &indices, &spec(a.sample_steps), None, device)?;
    }
    sync();
    let secs = start.elapsed().as_secs_f64();
    let images = (batch * a.sample_batches) as f64;
    let gpu = if device.is_cuda() { gpu_peak_flops() } else { None };
    println!(
        "{}",
        serde_json::json!({
            "config": a.run.config.display().to_string(), "mode": "sample", "device": gpu.map(|(n, _)| n).unwrap_or_else(|| format!("{device:?}")),
            "precision": format!("{kind:?}"), "batch": batch, "sampler_steps": a.sample_steps, "seconds": secs,
            "images_per_s": images / secs, "hours_per_50k_images": 50_000.0 / (images / secs) / 3600.0,
        })
    );
    Ok(())
}
