//! The run loop: resume, the steps with TensorBoard metrics and a progress bar, EMA
//! sample grids, FID, background sharded checkpoints, preemption by signal and a
//! limit on skipped (non-finite) steps, and the final status for launch scripts.

use super::checkpoint::{self, PendingSave};
use super::faults::Faults;
use super::fid::FidProbe;
use super::run_folder::{check_same_run, check_writable, lock_run_folder, new_run_id, run_id_of};
use super::{StepStats, Trainer};
use crate::config::Config;
use crate::diffusion::generate::{grid, latents, to_images, Labels};
use crate::dist::{watchdog::Watchdog, Launch};
use crate::encoders::decoder::Decoder;
use crate::formats::tboard::EventWriter;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How a run starts and reports, besides its config.
pub struct RunOptions {
    /// Start from these weights (safetensors under the REG parameter names).
    pub init: Option<PathBuf>,
    /// `auto` (the newest complete checkpoint of the run, or a fresh start) or a
    /// `step-NNNNNNN` folder.
    pub resume: Option<String>,
    /// One JSON line of metrics per logged step instead of a progress bar.
    pub json: bool,
    /// Set by `preemption_flag`: checkpoint at the next step boundary and stop.
    pub stop: Arc<AtomicBool>,
    pub faults: Faults,
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
        self.sum.comm_ms = s.comm_ms.map(|ms| self.sum.comm_ms.unwrap_or(0.0) + ms);
        self.sum.comm_gb += s.comm_gb;
        self.sum.overlapped += s.overlapped;
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
            skipped: false,
            comm_ms: self.sum.comm_ms.map(|ms| ms / n),
            comm_gb: self.sum.comm_gb / n,
            overlapped: self.sum.overlapped / n,
        }
    }
}

/// SIGTERM / SIGUSR1 set the flag (checkpoint at the next step boundary, exit 0);
/// a second one exits at once.
pub fn preemption_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
        // Registered first: runs before the flag is set, so it fires only on a repeat.
        signal_hook::flag::register_conditional_shutdown(sig, 1, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

/// A grid of EMA samples with fixed noise and labels (the same images every time, so
/// the grids of a run show its progress): PNG bytes, height, width.
fn sample_grid(t: &Trainer, vae: Option<&Decoder>) -> Result<(Vec<u8>, i32, i32)> {
    let c = &t.cfg.sample;
    let spec = t.sample_spec(c.sampler(), t.cfg.train.seed, Labels::Balanced);
    let indices: Vec<u64> = (0..c.num as u64).collect();
    let imgs = to_images(&latents(&t.model, &indices, &spec, t.text_encoder(), t.device)?, vae, t.kind);
    let cols = (c.num as f64).sqrt().ceil() as i64;
    let g = grid(&imgs, cols);
    let (h, w) = (g.height() as i32, g.width() as i32);
    let mut png = Vec::new();
    g.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok((png, h, w))
}

/// Rank 0 picks (and checksums) the checkpoint and checks that it continues this run;
/// every rank learns which by broadcast. Returns the folder and the manifest's run id.
fn resume_from(run: &Path, spec: &str, t: &mut Trainer) -> Result<Option<(PathBuf, String)>> {
    let chosen = if t.rank() == 0 { checkpoint::choose(run, spec)? } else { None };
    if let Some((dir, m)) = &chosen {
        check_same_run(run, dir, m, &t.cfg)?;
    }
    let step = t.agree(&[chosen.as_ref().map(|(_, m)| m.step as f64 + 1.0).unwrap_or(0.0)])?[0] as i64 - 1;
    if step < 0 {
        return Ok(None);
    }
    let (dir, manifest) = match chosen {
        Some(c) => c,
        None => {
            let dir = if spec == "auto" { checkpoint::step_dir(run, step) } else { PathBuf::from(spec) };
            let text = std::fs::read_to_string(dir.join("manifest.json")).context("manifest chosen by rank 0")?;
            (dir, serde_json::from_str(&text)?)
        }
    };
    checkpoint::load(&dir, &manifest, t)?;
    Ok(Some((dir, manifest.run_id)))
}

/// Trains `cfg` on this process's part of the launch until `train.steps` or a stop signal.
pub fn run(cfg: Config, launch: Launch, opts: RunOptions) -> Result<()> {
    let mut t = Trainer::new(cfg, launch, opts.faults)?;
    let (rank, world) = (t.rank(), t.world());
    let run_dir = PathBuf::from(&t.cfg.train.output_dir).join(&t.cfg.train.name);
    check_writable(&run_dir, &t)?;
    // A folder that exists may hold checkpoints another job is writing: locked before
    // anything in it is read. A new one is made (and locked) only once everything has
    // been validated, so a bad input leaves no half-made run folder.
    let exists = t.agree(&[(rank == 0 && run_dir.exists()) as i64 as f64])?[0] > 0.0;
    let mut lock = if exists { Some(lock_run_folder(&run_dir, &t)?) } else { None };
    if let Some(init) = &opts.init {
        t.init_from(init)?;
    }
    let mut resumed_run = None;
    if let Some(spec) = &opts.resume {
        match resume_from(&run_dir, spec, &mut t)? {
            Some((dir, id)) if rank == 0 => {
                eprintln!("reg-ddp: resumed from {} (step {})", dir.display(), t.step);
                resumed_run = Some(id).filter(|id| !id.is_empty());
            }
            None if rank == 0 => eprintln!("reg-ddp: no complete checkpoint in {}: starting fresh", run_dir.display()),
            _ => {}
        }
    }
    let vae = match (&t.cfg.sample.vae, rank) {
        (Some(v), 0) if t.cfg.sample.every > 0 => Some(Decoder::load(v, t.device)?),
        _ => None,
    };
    let fid = FidProbe::new(&t)?;
    let timeout = std::time::Duration::from_secs_f64(t.cfg.dist.timeout_s);
    let watchdog = (world > 1).then(|| Watchdog::start(rank, world, timeout, Some(run_dir.join(".heartbeat")), t.comm_guard()));
    if opts.json {
        // Every rank reports what it holds: the optimiser state is only its shard.
        println!(
            "{}",
            serde_json::json!({"rank": rank, "world": world, "pid": std::process::id(), "flat": t.params.padded_len(),
                "shard": t.layout.shard_len(), "exp_avg": t.opt.exp_avg.numel(), "exp_avg_sq": t.opt.exp_avg_sq.numel(),
                "ema": t.ema.shadow.numel(), "buckets": t.layout.buckets().len(), "step": t.step})
        );
    }
    // Only once everything validated: a bad input leaves no half-made run folder.
    if lock.is_none() {
        lock = Some(lock_run_folder(&run_dir, &t)?);
    }
    let _lock = lock;
    let mut tb = None;
    if rank == 0 {
        std::fs::create_dir_all(&run_dir).with_context(|| format!("{}: cannot create run folder", run_dir.display()))?;
        t.run_id = match run_id_of(&run_dir)? {
            Some(id) => id,
            None => {
                let id = resumed_run.map(Ok).unwrap_or_else(new_run_id)?;
                let text = serde_json::to_string_pretty(&serde_json::json!({"run_id": id}))?;
                crate::formats::weights::write_atomic(&run_dir.join("run.json"), text.as_bytes())?;
                id
            }
        };
        std::fs::write(run_dir.join("config.yaml"), serde_yaml::to_string(&t.cfg)?)
            .with_context(|| format!("{}: cannot write config.yaml", run_dir.display()))?;
        tb = Some(EventWriter::create(&run_dir.join("tb"))?);
        eprintln!(
            "reg-ddp: {} ranks, {} parameters ({} trainable) on {:?}, {:?} compute, global batch {}, steps {}..{} -> {}",
            world,
            t.params.numel() + t.params.buffer_numel(),
            t.params.numel(),
            t.device,
            t.kind,
            t.cfg.train.global_batch,
            t.step,
            t.cfg.train.steps,
            run_dir.display()
        );
    }
    t.comm.barrier()?;
    let (steps, log_every, ckpt_every) = (t.cfg.train.steps, t.cfg.train.log_every, t.cfg.train.checkpoint_every);
    let bar = if opts.json || rank != 0 { ProgressBar::hidden() } else { ProgressBar::new(steps as u64) };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]").expect("static template"),
    );
    bar.set_position(t.step as u64);
    let mut window = Window::default();
    let mut tick = Instant::now();
    let mut pending: Option<PendingSave> = None;
    let mut preempted = false;
    while t.step < steps {
        let s = t.train_step()?;
        window.add(&s);
        bar.inc(1);
        if let Some(w) = &watchdog {
            w.beat(t.step);
        }
        if s.skipped {
            let msg = format!("step {}: non-finite loss or gradient on some rank; update skipped ({} so far)", t.step, t.skipped);
            if rank == 0 {
                bar.println(format!("warning: {msg}"));
            }
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
                    ("train/skipped_steps", t.skipped as f64),
                    ("perf/images_per_s", ips),
                    ("perf/step_ms", step_ms),
                    ("perf/comm_gb", m.comm_gb),
                    ("perf/comm_overlapped", m.overlapped),
                ],
            )?;
            if let Some(ms) = m.comm_ms {
                tb.scalars(t.step, &[("perf/comm_ms", ms)])?;
            }
            tb.flush()?;
            bar.set_message(format!("loss {:.4} proj {:.4} {:.1} img/s", m.loss, m.proj, ips));
            if opts.json {
                println!(
                    "{}",
                    serde_json::json!({"step": t.step, "loss": m.loss, "denoise": m.denoise, "proj": m.proj,
                        "cls": m.cls, "grad_norm": m.grad_norm, "skipped": t.skipped, "images_per_s": ips, "step_ms": step_ms,
                        "comm_ms": m.comm_ms, "comm_gb": m.comm_gb, "overlapped": m.overlapped})
                );
            }
            window = Window::default();
            tick = Instant::now();
        }
        // After the log line, so that the metrics show the step it stopped at.
        if t.consecutive_skips > t.cfg.train.max_consecutive_skips {
            let last = checkpoint::complete_steps(&run_dir).first().map(|(_, d)| d.display().to_string());
            anyhow::bail!(
                "{} consecutive non-finite steps (last at step {}): stopping; last good checkpoint: {}",
                t.consecutive_skips,
                t.step,
                last.unwrap_or_else(|| "none".into())
            );
        }
        if t.cfg.sample.every > 0 && t.step % t.cfg.sample.every == 0 {
            let started = Instant::now();
            if let Some(grid) = t.with_ema_weights(|t| (t.rank() == 0).then(|| sample_grid(t, vae.as_ref())))? {
                let (png, h, w) = grid?;
                std::fs::create_dir_all(run_dir.join("samples"))?;
                std::fs::write(run_dir.join(format!("samples/step-{:07}.png", t.step)), &png)?;
                if let Some(tb) = tb.as_mut() {
                    tb.image_png(t.step, "samples/ema", png, h, w, 3)?;
                    tb.flush()?;
                }
            }
            // Not training time: keep it out of the throughput of this log window.
            tick += started.elapsed();
        }
        if let Some(probe) = &fid {
            if t.step % t.cfg.eval.fid_every == 0 {
                let started = Instant::now();
                let step = t.step;
                let alive = || {
                    if let Some(w) = &watchdog {
                        w.beat(step);
                    }
                };
                let score = t.with_ema_weights(|t| probe.score(t, &alive))??;
                let secs = started.elapsed().as_secs_f64();
                tick += started.elapsed();
                if let (Some(s), Some(tb)) = (score, tb.as_mut()) {
                    tb.scalars(
                        t.step,
                        &[("eval/fid", s.fid), ("eval/sfid", s.sfid), ("eval/inception_score", s.inception_score), ("eval/seconds", secs)],
                    )?;
                    tb.flush()?;
                    bar.println(format!(
                        "step {}: FID {:.3} IS {:.3} ({} images, {secs:.1} s)",
                        t.step, s.fid, s.inception_score, t.cfg.eval.fid_num
                    ));
                    if opts.json {
                        println!(
                            "{}",
                            serde_json::json!({"step": t.step, "fid": s.fid, "sfid": s.sfid, "inception_score": s.inception_score, "eval_seconds": secs})
                        );
                    }
                }
            }
        }
        // Step boundary: do all ranks agree to stop (a signal on any rank), and has
        // every rank finished writing the checkpoint in flight?
        let written = pending.as_ref().map(|p| p.is_written()).unwrap_or(false);
        let votes = t.agree(&[opts.stop.load(Ordering::Relaxed) as i64 as f64, written as i64 as f64])?;
        if votes[1] as i64 == world {
            let p = pending.take().expect("a save is in flight");
            let (step, started, blocking) = (p.step, p.started, p.blocking);
            let dir = checkpoint::finish(p, &t)?;
            if rank == 0 {
                bar.println(format!("checkpoint {}", dir.display()));
                if opts.json {
                    // How long the save held the step loop, and until it was committed.
                    println!(
                        "{}",
                        serde_json::json!({"checkpoint_step": step, "blocking_ms": blocking.as_secs_f64() * 1e3,
                            "committed_s": started.elapsed().as_secs_f64()})
                    );
                }
            }
        }
        if votes[0] > 0.0 {
            preempted = true;
            break;
        }
        if t.step % ckpt_every == 0 && t.step < steps {
            if let Some(p) = pending.take() {
                checkpoint::finish(p, &t)?;
            }
            pending = Some(checkpoint::start(&run_dir, &mut t)?);
        }
    }
    // A save in flight is always of an earlier step: complete it, then save this one.
    if let Some(p) = pending.take() {
        checkpoint::finish(p, &t)?;
    }
    // A resumed run that had nothing left to do already has this checkpoint.
    let done = t.agree(&[checkpoint::step_dir(&run_dir, t.step).join("manifest.json").exists() as i64 as f64])?[0] > 0.0;
    let dir = if done { checkpoint::step_dir(&run_dir, t.step) } else { checkpoint::finish(checkpoint::start(&run_dir, &mut t)?, &t)? };
    bar.finish();
    if rank == 0 {
        // The heartbeats only matter while the ranks wait on each other.
        let _ = std::fs::remove_dir_all(run_dir.join(".heartbeat"));
        // Launch scripts read this to decide whether to requeue.
        let status = serde_json::json!({"state": if preempted { "preempted" } else { "done" }, "step": t.step,
            "steps": steps, "checkpoint": dir.display().to_string()});
        let text = serde_json::to_string(&status)?;
        std::fs::write(run_dir.join("status.json"), &text)?;
        if let Ok(extra) = std::env::var("REG_DDP_STATUS_FILE") {
            std::fs::write(&extra, &text).with_context(|| format!("{extra}: cannot write status"))?;
        }
        let why = if preempted { "preempted by signal" } else { "done" };
        eprintln!("reg-ddp: {why} at step {}; checkpoint {}", t.step, dir.display());
    }
    Ok(())
}
