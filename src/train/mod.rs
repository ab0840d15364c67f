//! Training: what one rank holds (`Trainer`: model, optimiser shard (ZeRO-1), data,
//! communicator), built here; its step (`step`), the run loop around it (`run`),
//! checkpoints and FID. It talks to other ranks only through the `Comm` trait.

pub mod checkpoint;
pub mod faults;
pub mod fid;
mod meter;
pub mod overlap;
pub mod run;
mod run_folder;
mod run_lock;
mod step;
pub mod zero;

pub use meter::CommProfile;
pub use step::StepStats;

use crate::config::{Condition, Config, DataSource, EncoderMode, SitDims, TextEncoderMode};
use crate::data::checks::{check_dataset, check_text_dataset, TextInput};
use crate::data::{loader::ShardLoader, shards::Dataset, synthetic::Synthetic, BatchSource};
use crate::diffusion::generate::{Labels, SampleSpec};
use crate::diffusion::sampler::Sampler;
use crate::dist::{Comm, Launch};
use crate::encoders::dinov2::Dinov2;
use crate::encoders::text::TextEncoder;
use crate::model::{build_sit_padded, Caption, Params, SiT};
use crate::optim::{AdamW, Ema};
use anyhow::Result;
use faults::Faults;
use meter::Phases;
use overlap::BucketWatch;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use zero::ShardLayout;

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
                    let input = match (cfg.model.text_encoder, cfg.data.text_encoder_path.as_deref()) {
                        (TextEncoderMode::Online, Some(dir)) => TextInput::Online(std::path::Path::new(dir)),
                        (TextEncoderMode::Online, None) => unreachable!("validated: online text needs data.text_encoder_path"),
                        (TextEncoderMode::Precomputed, _) => TextInput::Precomputed,
                    };
                    check_text_dataset(&ds, &dims, input)?;
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
