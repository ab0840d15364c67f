//! `reg-ddp train`: runs the loop with TensorBoard metrics, a progress bar and checkpoints.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use reg::dist::{self, watchdog::Watchdog, LaunchInfo};
use reg::train::{checkpoint, resolve_device, tboard::EventWriter, StepStats, Trainer};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// YAML config (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Start from these weights (safetensors under the REG parameter names).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// CPU threads for libtorch (0: its default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON line of metrics per logged step instead of a progress bar.
    #[arg(long)]
    pub json: bool,
}

/// Running means over the steps since the last log line.
#[derive(Default)]
struct Window {
    sum: StepStats,
    n: f64,
}

impl Window {
    fn add(&mut self, s: &StepStats) {
        self.sum.loss += s.loss;
        self.sum.denoise += s.denoise;
        self.sum.proj += s.proj;
        self.sum.cls += s.cls;
        self.sum.grad_norm += s.grad_norm;
        self.n += 1.0;
    }
    fn mean(&self) -> StepStats {
        let n = self.n.max(1.0);
        StepStats {
            loss: self.sum.loss / n,
            denoise: self.sum.denoise / n,
            proj: self.sum.proj / n,
            cls: self.sum.cls / n,
            grad_norm: self.sum.grad_norm / n,
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    super::set_threads(a.threads);
    let file = a.config.display().to_string();
    let cfg = super::load_config(&a.config, &a.sets)?;
    let device = resolve_device(&cfg.train.device)?;
    // Check the batch split before starting MPI: bad input fails fast on every rank.
    cfg.local_batch(LaunchInfo::from_env().world, &file)?;
    let comm = dist::init(device)?;
    let mut t = Trainer::new(cfg, &file, comm)?;
    let (rank, world) = (t.rank(), t.world());
    let watchdog = (world > 1).then(|| Watchdog::start(rank, std::time::Duration::from_secs_f64(t.cfg.dist.timeout_s)));
    if a.json {
        // Every rank reports what it holds: the optimiser state is only its shard.
        println!(
            "{}",
            serde_json::json!({"rank": rank, "world": world, "pid": std::process::id(), "flat": t.params.padded_len(), "shard": t.shard_len,
                "exp_avg": t.opt.exp_avg.numel(), "exp_avg_sq": t.opt.exp_avg_sq.numel(), "ema": t.ema.shadow.numel()})
        );
    }
    if let Some(init) = &a.init {
        t.init_from(init)?;
    }
    // Only once everything validated: a bad input leaves no half-made run folder.
    let run_dir = PathBuf::from(&t.cfg.train.output_dir).join(&t.cfg.train.name);
    let mut tb = None;
    if rank == 0 {
        std::fs::create_dir_all(&run_dir).with_context(|| format!("{}: cannot create run folder", run_dir.display()))?;
        std::fs::write(run_dir.join("config.yaml"), serde_yaml::to_string(&t.cfg)?)
            .with_context(|| format!("{}: cannot write config.yaml", run_dir.display()))?;
        tb = Some(EventWriter::create(&run_dir.join("tb"))?);
    }
    let (steps, log_every, ckpt_every) = (t.cfg.train.steps, t.cfg.train.log_every, t.cfg.train.checkpoint_every);
    if rank == 0 {
        eprintln!(
        "reg-ddp: {} ranks, {} parameters ({} trainable) on {:?}, {:?} compute, global batch {}, {} steps -> {}",
        world,
        t.params.numel() + t.params.buffer_numel(),
        t.params.numel(),
        t.device,
        t.kind,
        t.cfg.train.global_batch,
        steps,
        run_dir.display()
    );
    }
    let bar = if a.json || rank != 0 { ProgressBar::hidden() } else { ProgressBar::new(steps as u64) };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .expect("static template"),
    );
    let mut window = Window::default();
    let mut tick = Instant::now();
    while t.step < steps {
        let s = t.train_step()?;
        window.add(&s);
        bar.inc(1);
        if let Some(w) = &watchdog {
            w.beat(t.step);
        }
        if rank == 0 && (t.step % log_every == 0 || t.step == steps) {
            t.sync();
            let secs = tick.elapsed().as_secs_f64();
            let m = window.mean();
            let ips = window.n * t.cfg.train.global_batch as f64 / secs;
            let step_ms = 1000.0 * secs / window.n;
            let tb = tb.as_mut().expect("rank 0 has the writer");
            tb.scalars(
                t.step,
                &[
                    ("loss/total", m.loss),
                    ("loss/denoise", m.denoise),
                    ("loss/proj", m.proj),
                    ("loss/cls", m.cls),
                    ("train/grad_norm", m.grad_norm),
                    ("train/lr", t.opt.lr),
                    ("perf/images_per_s", ips),
                    ("perf/step_ms", step_ms),
                ],
            )?;
            tb.flush()?;
            bar.set_message(format!("loss {:.4} proj {:.4} {:.1} img/s", m.loss, m.proj, ips));
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"step": t.step, "loss": m.loss, "denoise": m.denoise, "proj": m.proj,
                        "cls": m.cls, "grad_norm": m.grad_norm, "images_per_s": ips, "step_ms": step_ms})
                );
            }
            window = Window::default();
            tick = Instant::now();
        }
        if t.step % ckpt_every == 0 && t.step < steps {
            checkpoint::save(&run_dir, &t)?;
        }
    }
    let dir = checkpoint::save(&run_dir, &t)?;
    bar.finish();
    if rank == 0 {
        eprintln!("reg-ddp: done; checkpoint {}", dir.display());
    }
    Ok(())
}
