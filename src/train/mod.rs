//! Training: the step (data, forward, REG loss, backward, gradient reduce-scatter,
//! clip, AdamW and EMA on this rank's shard (ZeRO-1), weight all-gather, metrics), the
//! run loop around it, checkpoints and FID. It talks to other ranks only through the
//! `Comm` trait.

pub mod checkpoint;
pub mod faults;
pub mod fid;
pub mod overlap;
pub mod run;
mod run_folder;
pub mod zero;

use crate::config::{Condition, Config, DataSource, EncoderMode, SitDims, TextEncoderMode};
use crate::data::Batch;
use crate::data::{loader::ShardLoader, shards::Dataset, synthetic::Synthetic, BatchSource};
use crate::diffusion::generate::{Labels, SampleSpec};
use crate::diffusion::loss::{reg_loss, sample_posterior, LossInputs, StepDraws};
use crate::diffusion::sampler::Sampler;
use crate::dist::{Comm, Launch, PairwiseSum};
use crate::encoders::dinov2::Dinov2;
use crate::encoders::text::TextEncoder;
use crate::model::{build_sit_padded, Caption, Cond, Params, SiT};
use crate::optim::{clip_factor, sq_sum, AdamW, Ema};
use anyhow::Result;
use faults::Faults;
use overlap::BucketWatch;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use zero::ShardLayout;

/// A dataset must hold what the model expects: latent shape, encoder tokens and
/// width, class count. Input errors name `index.json` and the field.
pub fn check_dataset(ds: &Dataset, d: &SitDims, online: Option<&Dinov2>) -> Result<()> {
    let file = ds.dir.join("index.json");
    let file = file.display();
    let ix = &ds.index;
    let want = vec![2 * d.in_channels, d.input_size, d.input_size];
    if ix.latent_shape != want {
        crate::bail_input!("{file}: latent_shape: {:?}, the model expects {want:?}", ix.latent_shape);
    }
    let (tokens, z_dim, what) = match (online, ix.encoder.as_ref().filter(|_| ix.features)) {
        (Some(enc), _) if ix.images => (enc.num_tokens(), enc.hidden_size(), "data.encoder_path"),
        (Some(_), _) => crate::bail_input!("{file}: images: false; model.encoder: online needs `prepare --store-images`"),
        (None, Some(e)) => (e.tokens, e.z_dim, "encoder"),
        (None, None) => crate::bail_input!("{file}: features: false; this dataset needs model.encoder: online"),
    };
    if tokens != d.num_patches() + 1 {
        crate::bail_input!("{file}: {what}: {tokens} encoder tokens, the model has {} (patches + REG token)", d.num_patches() + 1);
    }
    if z_dim != d.z_dim {
        crate::bail_input!("{file}: {what}: encoder z_dim {z_dim}, model.z_dim is {}", d.z_dim);
    }
    // A text model reads no labels.
    if d.text_dim == 0 && ix.num_classes() != d.num_classes {
        crate::bail_input!("{file}: class_names: {} classes, model.num_classes is {}", ix.num_classes(), d.num_classes);
    }
    Ok(())
}

/// A text model's dataset must hold captions the model can read: token ids made by the
/// tokenizer of `data.text_encoder_path` (online), or precomputed states (precomputed),
/// of the model's length and width.
fn check_text_dataset(ds: &Dataset, cfg: &Config, text: Option<&TextEncoder>) -> Result<()> {
    let d = cfg.dims();
    let file = ds.dir.join("index.json");
    let file = file.display();
    let Some(info) = &ds.index.text else {
        crate::bail_input!("{file}: text: missing; model.condition: text needs a captioned dataset (prepare --captions / --caption-files)");
    };
    if info.max_length != d.text_len || info.hidden_size != d.text_dim {
        crate::bail_input!(
            "{file}: text: {} tokens of width {}, the model takes {} of width {} (model.text_len / model.text_dim)",
            info.max_length,
            info.hidden_size,
            d.text_len,
            d.text_dim
        );
    }
    match (cfg.model.text_encoder, text) {
        (TextEncoderMode::Precomputed, _) if !info.precomputed => {
            crate::bail_input!("{file}: text.precomputed: false; model.text_encoder: precomputed needs `prepare --text-precomputed`")
        }
        (TextEncoderMode::Online, Some(_)) => {
            let dir = cfg.data.text_encoder_path.as_deref().expect("loaded from it");
            let sha = crate::data::captions::tokenizer_sha256(std::path::Path::new(dir))?;
            if sha != info.tokenizer_sha256 {
                crate::bail_input!(
                    "{file}: text.tokenizer_sha256: the captions were tokenized by {}, not by the tokenizer of data.text_encoder_path {dir}",
                    info.tokenizer
                );
            }
        }
        _ => {}
    }
    Ok(())
}

/// The text encoder's states must have the width and length the model was built for.
fn check_text_width(cfg: &Config, null: &Caption) -> Result<()> {
    let d = cfg.dims();
    let (l, w) = (null.hidden.size()[1], null.hidden.size()[2]);
    let file = cfg.data.text_encoder_path.as_deref().unwrap_or("the synthetic captions");
    if w != d.text_dim {
        crate::bail_input!("{file}: text hidden size {w}, model.text_dim is {}", d.text_dim);
    }
    if l != d.text_len {
        crate::bail_input!("{file}: {l} tokens per caption, model.text_len is {}", d.text_len);
    }
    Ok(())
}

/// The cost of a step's collectives, measured (`Trainer::time_collectives`). Sizes are
/// whole buffers (all ranks' pieces), as NCCL's tests count them.
#[derive(Debug, Clone)]
pub struct CommProfile {
    pub world: i64,
    /// Elements of each reduce-scatter bucket (f32), and its median time.
    pub bucket_elements: Vec<i64>,
    pub reduce_scatter_ms: Vec<f64>,
    /// Elements of the weight all-gather, and its median time in fp32 and in bf16.
    pub gather_elements: i64,
    pub all_gather_f32_ms: f64,
    pub all_gather_bf16_ms: f64,
}

/// Metrics of one step, averaged over ranks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub loss: f64,
    pub denoise: f64,
    pub proj: f64,
    pub cls: f64,
    pub grad_norm: f64,
    /// The update was skipped (non-finite loss or gradients on some rank).
    pub skipped: bool,
    /// Milliseconds this rank spent blocked in the step's collectives: all of it is
    /// exposed, as MPI blocks the host even inside backward (`dist.overlap` changes
    /// when, not how long). Measured where collectives block the host (MPI on the CPU);
    /// `None` on a GPU, where they are queued on streams (`bench --profile` times
    /// them there).
    pub comm_ms: Option<f64>,
    /// Gigabytes this rank sent in the step's collectives (a ring moves (w - 1) / w of
    /// each buffer per rank).
    pub comm_gb: f64,
    /// Share of the gradient buckets handed to their reduce-scatter while backward was
    /// still running (`dist.overlap`; 0 without it, or with one rank).
    pub overlapped: f64,
}

/// The collectives of one step: host time blocked in them and bytes sent.
struct CommMeter {
    world: i64,
    host_blocking: bool,
    ms: std::cell::Cell<f64>,
    bytes: std::cell::Cell<f64>,
}

impl CommMeter {
    fn new(world: i64, device: Device) -> Self {
        CommMeter { world, host_blocking: device == Device::Cpu, ms: Default::default(), bytes: Default::default() }
    }

    /// Runs one collective over a buffer of `bytes` (the whole buffer, before sharding).
    fn time<R>(&self, bytes: i64, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let start = std::time::Instant::now();
        let r = f();
        self.ms.set(self.ms.get() + start.elapsed().as_secs_f64() * 1e3);
        self.bytes.set(self.bytes.get() + bytes as f64 * (self.world - 1) as f64 / self.world as f64);
        r
    }

    fn read(&self) -> (Option<f64>, f64) {
        (self.host_blocking.then_some(self.ms.get()), self.bytes.get() / 1e9)
    }
}

/// Wall time of each phase of the training step, for `bench --profile`. The device is
/// synchronised at every boundary, so the phases add up to the step but lose their
/// overlap; off (no synchronisation) unless enabled.
#[derive(Debug, Default)]
struct Phases {
    enabled: bool,
    last: Option<std::time::Instant>,
    /// (phase, total ms, times timed) in step order.
    ms: Vec<(&'static str, f64, u32)>,
}

impl Phases {
    /// Ends the phase `name` (started at the previous mark) after the device's queued work.
    fn mark(&mut self, device: Device, name: &'static str) {
        if !self.enabled {
            return;
        }
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let now = std::time::Instant::now();
        if let Some(prev) = self.last {
            let ms = (now - prev).as_secs_f64() * 1e3;
            match self.ms.iter_mut().find(|(n, _, _)| *n == name) {
                Some(slot) => {
                    slot.1 += ms;
                    slot.2 += 1;
                }
                None => self.ms.push((name, ms, 1)),
            }
        }
        self.last = Some(now);
    }
}

/// Every shard starts and ends on a multiple of this many elements (512 bytes): the
/// vectorised element-wise kernels (AdamW, EMA, clipping) then cut any shard into the
/// same lanes as one whole buffer, with no scalar tail inside the weights, so the
/// update of an element does not depend on the rank count.
const SHARD_ALIGN: i64 = 128;

/// Model, optimiser shard and data of one rank of a run.
pub struct Trainer {
    cfg: Config,
    dims: SitDims,
    device: Device,
    kind: Kind,
    model: SiT,
    /// Full working weights and gradients (every rank holds all of them).
    params: Params,
    /// AdamW moments of this rank's shard only.
    opt: AdamW,
    /// EMA of this rank's shard only.
    ema: Ema,
    comm: Box<dyn Comm>,
    source: Box<dyn BatchSource>,
    /// DINOv2 for `model.encoder: online`.
    online: Option<Dinov2>,
    /// A text model's CLIP text tower and tokenizer (`data.text_encoder_path`).
    text: Option<TextEncoder>,
    /// A text model's null condition: the empty caption's encoding. [1, L, Dt], [1, Dt]
    null_text: Option<Caption>,
    /// Steps completed.
    step: i64,
    /// The run's identity (`run.json`), recorded in the manifests rank 0 writes.
    run_id: String,
    /// Non-finite steps skipped so far, and how many in a row just now.
    skipped: i64,
    consecutive_skips: i64,
    faults: Faults,
    /// This rank's rows of the global batch: `[row_lo, row_lo + rows)`.
    row_lo: i64,
    rows: i64,
    /// Rows per forward/backward pass (`train.micro_batch`).
    micro: i64,
    /// Which pieces of the flat buffers this rank owns: one slice of every bucket.
    layout: ShardLayout,
    /// Hooks that report buckets backward has finished (`dist.overlap`, several ranks).
    watch: Option<BucketWatch>,
    /// The fp32 master weights of those pieces, contiguous (with one rank: the flat
    /// weights themselves).
    master: Tensor,
    /// Reduced (averaged) gradients of the shard.
    shard_grad: Tensor,
    phases: Phases,
    /// A checkpoint copy in flight on a side stream (`train.async_checkpoint_copy`):
    /// the next update waits for it on the GPU.
    save_fence: Option<Arc<crate::shim::HostCopy>>,
    /// Pinned host buffers of that copy, one per state tensor, reused by every save.
    staging: Vec<Tensor>,
}

impl Trainer {
    /// A fresh run (weights from the seed) on the launch's device. The caller has
    /// checked that the global batch splits over the ranks (`Config::local_batch`).
    pub fn new(cfg: Config, launch: Launch, faults: Faults) -> Result<Self> {
        let Launch { device, comm } = launch;
        let (rank, world) = (comm.rank(), comm.world());
        let dims = cfg.dims();
        let kind = cfg.train.precision.kind_on(device);
        let rows = cfg.train.global_batch / world;
        let micro = cfg.micro_batch(world);
        debug_assert_eq!(rows * world, cfg.train.global_batch, "Config::local_batch was not checked");
        // The encoder sees the image at the resolution that gives one token per patch
        // (its own patch size: 14 for DINOv2, 4 for the shapes set's `train-encoder` model).
        let online = match (cfg.model.encoder, &cfg.data.encoder_path) {
            (EncoderMode::Online, Some(p)) => Some(Dinov2::load_grid(std::path::Path::new(p), device, dims.input_size / dims.patch_size)?),
            _ => None,
        };
        let text = match (cfg.model.condition, &cfg.data.text_encoder_path) {
            (Condition::Text, Some(p)) => Some(TextEncoder::load(std::path::Path::new(p), device)?),
            _ => None,
        };
        let (model, params) = build_sit_padded(&dims, device, cfg.train.seed, world * SHARD_ALIGN)?;
        let per_rank = (cfg.dist.bucket_mb * 1e6 / 4.0) as i64 / world;
        let layout = ShardLayout::new(params.padded_len(), world, rank, per_rank, SHARD_ALIGN);
        // With one rank the shard is the flat buffers themselves: no copies.
        let (master, shard_grad) = if world == 1 {
            (params.flat.shallow_clone(), params.grad.shallow_clone())
        } else {
            let master = params.flat.new_zeros([layout.shard_len()], (Kind::Float, device));
            layout.copy_out(&params.flat, &master);
            let grad = master.zeros_like();
            (master, grad)
        };
        let watch = match world > 1 && cfg.dist.overlap_on(device) {
            true => Some(BucketWatch::new(params.handles(), &params.entries, layout.buckets())?),
            false => None,
        };
        let opt = AdamW::new(&cfg.optim, &master);
        let ema = Ema::new(cfg.optim.ema_decay, &master);
        // A precomputed dataset holds its own empty caption's states.
        let mut stored_null = None;
        let source: Box<dyn BatchSource> = match cfg.data.resolved_source() {
            DataSource::Shards => {
                let path = std::path::Path::new(cfg.data.path.as_deref().expect("validated"));
                let ds = Dataset::open(path, cfg.data.verify_checksums)?;
                check_dataset(&ds, &dims, online.as_ref())?;
                if dims.text_dim > 0 {
                    check_text_dataset(&ds, &cfg, text.as_ref())?;
                    if cfg.model.text_encoder == TextEncoderMode::Precomputed {
                        stored_null = ds.null_caption()?;
                    }
                }
                Box::new(ShardLoader::new(Arc::new(ds), cfg.train.seed, cfg.train.global_batch, cfg.data.prefetch, device)?)
            }
            DataSource::Synthetic => {
                let s = Synthetic::new(
                    cfg.train.seed,
                    cfg.train.global_batch,
                    dims.num_classes,
                    [dims.in_channels, dims.input_size, dims.input_size],
                    dims.num_patches() + 1,
                    dims.z_dim,
                    device,
                );
                Box::new(if dims.text_dim > 0 { s.with_text(dims.text_len, dims.text_dim) } else { s })
            }
        };
        let null_text = match (stored_null, &text, cfg.model.condition) {
            (Some((hidden, pooled)), _, _) => Some(Caption { hidden: hidden.to_device(device), pooled: pooled.to_device(device) }),
            (None, Some(enc), _) => {
                let n = enc.null(kind)?;
                Some(Caption { hidden: n.last_hidden_state, pooled: n.pooled })
            }
            // Synthetic captions have no encoder: zeros stand for the empty caption.
            (None, None, Condition::Text) => Some(Caption {
                hidden: Tensor::zeros([1, dims.text_len, dims.text_dim], (Kind::Float, device)),
                pooled: Tensor::zeros([1, dims.text_dim], (Kind::Float, device)),
            }),
            (None, None, Condition::Class) => None,
        };
        if let Some(n) = &null_text {
            check_text_width(&cfg, n)?;
        }
        Ok(Trainer {
            cfg,
            dims,
            device,
            kind,
            model,
            params,
            opt,
            ema,
            comm,
            source,
            online,
            text,
            null_text,
            step: 0,
            run_id: String::new(),
            skipped: 0,
            consecutive_skips: 0,
            faults,
            row_lo: rank * rows,
            rows,
            micro,
            layout,
            watch,
            master,
            shard_grad,
            phases: Phases::default(),
            save_fence: None,
            staging: Vec::new(),
        })
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// The compute dtype (bf16 or f32).
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Parameters, the fixed position table included.
    pub fn num_params(&self) -> i64 {
        self.params.numel() + self.params.buffer_numel()
    }

    /// Times every phase of the following steps (synchronising the device at each boundary).
    pub fn profile_phases(&mut self) {
        self.phases.enabled = true;
    }

    /// Mean wall milliseconds per step of each phase timed since `profile_phases`, in step order.
    pub fn phase_ms(&self) -> Vec<(&'static str, f64)> {
        self.phases.ms.iter().map(|(n, ms, count)| (*n, ms / *count as f64)).collect()
    }

    /// How the model generates images with this run's path and precision. A text model
    /// draws its captions from `sample.prompts` instead of `labels`.
    pub fn sample_spec(&self, sampler: Sampler, seed: u64, labels: Labels) -> SampleSpec {
        let labels = if self.dims.text_dim > 0 { Labels::Captions(self.cfg.sample.prompts.clone()) } else { labels };
        SampleSpec { sampler, param: self.cfg.loss.parameterization(), seed, labels, kind: self.kind }
    }

    pub fn rank(&self) -> i64 {
        self.comm.rank()
    }

    /// The communicator's handle for the watchdog (see `dist::watchdog::CommGuard`).
    pub fn comm_guard(&self) -> Option<std::sync::Arc<dyn crate::dist::watchdog::CommGuard>> {
        self.comm.guard()
    }

    pub fn world(&self) -> i64 {
        self.comm.world()
    }

    /// Where the collectives run (this rank's GPU for NCCL, the CPU for MPI).
    pub fn comm_device(&self) -> Device {
        self.comm.device()
    }

    /// This rank's fp32 master weights (with one rank, the flat weights).
    fn shard(&self) -> Tensor {
        self.master.shallow_clone()
    }

    /// One optimisation step; returns its metrics averaged over ranks.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let device = self.device;
        self.phases.mark(device, "between_steps");
        let d = &self.dims;
        let step = self.step as u64;
        // Draws for the whole global batch, then each pass takes its rows: independent of
        // the world size.
        let draws = StepDraws::generate(
            self.cfg.train.seed,
            step,
            self.cfg.train.global_batch,
            [d.in_channels, d.input_size, d.input_size],
            d.z_dim,
            &self.cfg.loss,
            self.cfg.model.class_dropout_prob,
        );
        self.phases.mark(device, "draws");
        let batch = self.source.batch(step, self.row_lo, self.rows)?;
        self.phases.mark(device, "data");

        let passes = self.rows / self.micro;
        let comm = CommMeter::new(self.world(), self.comm.device());
        // The earlier passes' gradients, summed as a tree (see `PairwiseSum`).
        let mut grads = PairwiseSum::default();
        let mut finished = vec![false; self.layout.buckets().len()];
        let (mut metrics, mut local_bad) = (Vec::new(), Vec::new());
        self.params.zero_grad();
        for pass in 0..passes {
            let lo = pass * self.micro;
            let rows = |x: &Tensor| x.narrow(0, lo, self.micro).to_device(device);
            let draws = draws.rows(self.row_lo + lo, self.micro, device);
            let feat = match (&self.online, &batch.images) {
                (Some(enc), Some(images)) => enc.features(&rows(images), self.kind),
                _ => rows(&batch.feat).to_kind(Kind::Float),
            };
            let x0 = sample_posterior(&rows(&batch.moments), &draws.eps, self.cfg.loss.latent_scale);
            let y = self.condition(&batch, lo, self.micro)?;
            let y = y.drop_to(&draws.drop, &y.null_like(d.num_classes, self.null_text.as_ref()));
            let cls0 = feat.select(1, 0);
            let inputs =
                LossInputs { x0: &x0, feat: &feat, cls0: &cls0, y: &y, t: &draws.t, noise: &draws.noise, noise_cls: &draws.noise_cls };
            let mut terms = reg_loss(&self.model, &inputs, &self.cfg.loss, self.kind);
            if self.faults.nan_at(self.step, self.rank()) {
                terms.total = &terms.total * f64::NAN;
            }
            self.phases.mark(device, "forward");
            let last = pass + 1 == passes;
            match &self.watch {
                // The last pass: each bucket is reduce-scattered as soon as backward
                // has written it.
                Some(watch) if last => {
                    let mut ready = |k: usize| self.finish_bucket(k, &grads, passes, &comm);
                    finished = watch.during(&mut ready, || Ok(terms.total.f_backward()?))?;
                }
                _ => terms.total.backward(),
            }
            if !last {
                grads.push(self.params.grad.copy());
                self.params.zero_grad();
            }
            self.phases.mark(device, "backward");
            let _g = tch::no_grad_guard();
            local_bad.push(terms.total.isfinite().logical_not().to_kind(Kind::Float));
            metrics.push(Tensor::stack(
                &[terms.total.detach(), terms.denoise.mean(Kind::Float), terms.proj.detach(), terms.cls.mean(Kind::Float)],
                0,
            ));
        }

        let _g = tch::no_grad_guard();
        let overlapped = finished.iter().filter(|&&f| f).count() as f64 / finished.len() as f64;
        // Buckets backward did not hand over (no overlap, or parameters it did not
        // reach), last first.
        for k in (0..finished.len()).rev().filter(|&k| !finished[k]) {
            self.finish_bucket(k, &grads, passes, &comm)?;
        }
        if self.world() > 1 {
            self.comm.wait_async()?;
            let _ = self.shard_grad.g_div_scalar_(self.world() as f64);
        }
        self.phases.mark(device, "reduce_scatter");
        // One all-reduce carries the gradient's sum of squares and "my loss is not
        // finite": every rank then agrees, on the device, whether to skip this update.
        let local_bad = Tensor::stack(&local_bad, 0).max();
        let control = Tensor::stack(&[sq_sum(&self.shard_grad), local_bad.to_kind(Kind::Double)], 0);
        comm.time(16, || self.comm.all_reduce_sum(&control))?;
        let (norm, factor) = clip_factor(&control.get(0), self.cfg.optim.max_grad_norm);
        let skip = control.get(1).gt(0.0).logical_or(&norm.isfinite().logical_not()).to_kind(Kind::Float);
        let _ = self.shard_grad.g_mul_(&factor);
        let shard = self.shard();
        if let Some(copy) = self.save_fence.take() {
            // The checkpoint's copy reads the state this update overwrites.
            copy.order_before_current()?;
        }
        // The weights are all-gathered in the compute precision: every layer casts its
        // weights to it anyway.
        if self.watch.is_some() {
            // Overlapped: each bucket's gather starts as soon as AdamW has updated its
            // slice, beside the update of the next.
            let parts: Vec<(i64, i64)> = self.layout.buckets().iter().map(|b| (b.shard_lo, b.slice)).collect();
            let mut gathers = Vec::with_capacity(parts.len());
            let (layout, comm_, flat, kind) = (&self.layout, self.comm.as_ref(), &self.params.flat, self.kind);
            self.opt.update_parts_unless(&shard, &self.shard_grad, Some(&skip), &parts, |k| {
                let bytes = layout.buckets()[k].len * kind.elt_size_in_bytes() as i64;
                gathers.push(comm.time(bytes, || layout.start_gather(comm_, k, &shard, flat, kind, true))?);
                Ok(())
            })?;
            self.ema.update_unless(&shard, &skip);
            self.layout.finish_gathers(self.comm.as_ref(), gathers)?;
            self.phases.mark(device, "clip_adamw_ema_all_gather");
        } else {
            self.opt.update_unless(&shard, &self.shard_grad, Some(&skip))?;
            self.ema.update_unless(&shard, &skip);
            self.phases.mark(device, "clip_adamw_ema");
            if self.world() > 1 {
                let bytes = self.params.padded_len() * self.kind.elt_size_in_bytes() as i64;
                comm.time(bytes, || self.layout.all_gather_as(self.comm.as_ref(), &shard, &self.params.flat, self.kind))?;
            }
            self.phases.mark(device, "all_gather");
        }
        self.step += 1;

        let metrics = Tensor::stack(&metrics, 0).mean_dim(0, false, Kind::Float);
        comm.time(16, || self.comm.all_reduce_sum(&metrics))?;
        let m: Vec<f64> = Vec::<f64>::try_from((metrics / self.world() as f64).to_kind(Kind::Double).to_device(Device::Cpu))?;
        let skipped = skip.double_value(&[]) != 0.0;
        if skipped {
            self.opt.undo_step();
            self.skipped += 1;
            self.consecutive_skips += 1;
        } else {
            self.consecutive_skips = 0;
        }
        let grad_norm = norm.double_value(&[]);
        self.phases.mark(device, "metrics");
        let (comm_ms, comm_gb) = comm.read();
        Ok(StepStats { loss: m[0], denoise: m[1], proj: m[2], cls: m[3], grad_norm, skipped, comm_ms, comm_gb, overlapped })
    }

    /// The condition of rows `[lo, lo + n)` of this rank's batch, on the device: labels,
    /// or captions (precomputed states, or token ids through the text tower).
    fn condition(&self, batch: &Batch, lo: i64, n: i64) -> Result<Cond> {
        let device = self.device;
        let rows = |x: &Tensor| x.narrow(0, lo, n).to_device(device);
        if self.dims.text_dim == 0 {
            return Ok(Cond::Class(rows(&batch.y)));
        }
        let caption = match (&batch.text, &batch.captions, &self.text) {
            (Some((hidden, pooled)), _, _) => {
                Caption { hidden: rows(hidden).to_kind(Kind::Float), pooled: rows(pooled).to_kind(Kind::Float) }
            }
            (None, Some(ids), Some(enc)) => {
                let out = enc.encode_ids(&rows(ids), self.kind)?;
                Caption { hidden: out.last_hidden_state, pooled: out.pooled }
            }
            _ => anyhow::bail!("a text model's batch holds no captions"),
        };
        Ok(Cond::Text(caption))
    }

    /// A text model's encoder, for prompts.
    pub fn text_encoder(&self) -> Option<&TextEncoder> {
        self.text.as_ref()
    }

    /// Global samples consumed so far (the data position a checkpoint records).
    fn samples_seen(&self) -> i64 {
        self.step * self.cfg.train.global_batch
    }

    /// Element-wise sum over ranks of a few host values (agreement at step boundaries).
    fn agree(&self, values: &[f64]) -> Result<Vec<f64>> {
        crate::dist::agree(self.comm.as_ref(), values)
    }

    /// Makes bucket `k`'s gradients final: the mean over this rank's passes (the
    /// earlier ones summed in `earlier`, the last in `params.grad`), then every rank's
    /// sum in this rank's slice of `shard_grad` (not yet divided by the rank count).
    fn finish_bucket(&self, k: usize, earlier: &PairwiseSum, passes: i64, comm: &CommMeter) -> Result<()> {
        let _g = tch::no_grad_guard();
        let b = self.layout.buckets()[k];
        if passes > 1 {
            let grad = self.params.grad.narrow(0, b.lo, b.len);
            let sum = earlier.finish_with(grad.copy(), |t| t.narrow(0, b.lo, b.len));
            // A power-of-two count divides exactly: the mean rounds as the sum did.
            grad.shallow_clone().copy_(&(sum / passes as f64));
        }
        if self.world() > 1 {
            // With overlap, beside backward (NCCL: on its side stream).
            let beside = self.watch.is_some();
            comm.time(b.len * 4, || self.layout.reduce_scatter(self.comm.as_ref(), &b, &self.params.grad, &self.shard_grad, beside))?;
        }
        Ok(())
    }

    /// What this step's collectives cost on the ranks at hand (`bench --comm`): each
    /// bucket of the gradient reduce-scatter as `train_step` runs it, and the weight
    /// all-gather in fp32 (today's masters) and in bf16 (working weights). Every rank
    /// must call it; medians over `repeats` after one untimed round. Overwrites the
    /// gradient shard, so not in the middle of training.
    pub fn time_collectives(&mut self, repeats: usize) -> Result<CommProfile> {
        let _g = tch::no_grad_guard();
        let buckets = self.layout.buckets().to_vec();
        let shard = self.shard();
        // The bf16 gather starts from zeros but this rank's pieces, so that its result
        // (every rank's weights, which are the same) checks the gather itself.
        let want = self.params.flat.to_kind(Kind::BFloat16);
        let half_shard = shard.to_kind(Kind::BFloat16);
        let half = want.zeros_like();
        let comm = self.comm.as_ref();
        // Ranks start each collective together, and the device has finished it at the end.
        let timed = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            self.comm.barrier()?;
            let start = std::time::Instant::now();
            f()?;
            self.sync();
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        let (mut rs, mut ag32, mut ag16) = (vec![Vec::new(); buckets.len()], Vec::new(), Vec::new());
        for round in 0..=repeats {
            let add = |v: &mut Vec<f64>, ms: f64| (round > 0).then(|| v.push(ms));
            for (k, b) in buckets.iter().enumerate() {
                add(&mut rs[k], timed(&|| self.layout.reduce_scatter(comm, b, &self.params.grad, &self.shard_grad, false))?);
            }
            add(&mut ag32, timed(&|| self.layout.all_gather(comm, &shard, &self.params.flat))?);
            add(&mut ag16, timed(&|| self.layout.all_gather(comm, &half_shard, &half))?);
        }
        if !half.equal(&want) {
            anyhow::bail!("bench --comm: the bf16 all-gather did not give back the weights");
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        Ok(CommProfile {
            world: self.world(),
            bucket_elements: buckets.iter().map(|b| b.len).collect(),
            reduce_scatter_ms: rs.into_iter().map(median).collect(),
            gather_elements: self.params.padded_len(),
            all_gather_f32_ms: median(ag32),
            all_gather_bf16_ms: median(ag16),
        })
    }

    /// The full flat buffer of a per-rank shard (weights layout), on every rank.
    fn gather(&self, shard: &Tensor) -> Result<Tensor> {
        if self.world() == 1 {
            return Ok(shard.shallow_clone());
        }
        let full = self.params.flat.zeros_like();
        self.layout.all_gather(self.comm.as_ref(), shard, &full)?;
        Ok(full)
    }

    /// Runs `f` with the EMA weights in the model (gathered from all ranks; every rank
    /// must call this), then puts the live weights back.
    fn with_ema_weights<R>(&mut self, f: impl FnOnce(&Trainer) -> R) -> Result<R> {
        let ema = self.gather(&self.ema.shadow)?.copy();
        let _g = tch::no_grad_guard();
        let live = self.params.flat.copy();
        self.params.flat.shallow_clone().copy_(&ema);
        let r = f(self);
        self.params.flat.shallow_clone().copy_(&live);
        Ok(r)
    }

    /// Starts from weights saved under the REG names (EMA restarts as a copy).
    fn init_from(&mut self, path: &std::path::Path) -> Result<()> {
        self.params.load_file(path)?;
        let _g = tch::no_grad_guard();
        if self.world() > 1 {
            self.layout.copy_out(&self.params.flat, &self.master);
        }
        self.ema.shadow.copy_(&self.master);
        Ok(())
    }

    /// Waits for queued GPU work (timing).
    pub fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }
}
