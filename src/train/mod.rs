//! The training loop: data, forward, REG loss, backward, clip, AdamW, EMA, metrics.

pub mod checkpoint;
pub mod tboard;

use crate::config::{Config, DataSource, Precision, SitDims};
use crate::data::{synthetic::Synthetic, BatchSource};
use crate::diffusion::loss::{drop_labels, reg_loss, sample_posterior, LossInputs, StepDraws};
use crate::model::{build_sit, Params, SiT};
use crate::optim::{clip_factor, sq_sum, AdamW, Ema};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// Picks the device named in the config (`auto`: the first GPU when there is one).
pub fn resolve_device(name: &str) -> Result<Device> {
    Ok(match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => Device::Cuda(i),
            None => crate::bail_input!("train.device: unknown device {s:?} (auto, cpu, cuda, cuda:N)"),
        },
    })
}

/// bf16 compute on CUDA, fp32 on the CPU, unless the config says otherwise.
pub fn resolve_kind(p: Precision, device: Device) -> Kind {
    match p {
        Precision::Bf16 => Kind::BFloat16,
        Precision::Fp32 => Kind::Float,
        Precision::Auto if device.is_cuda() => Kind::BFloat16,
        Precision::Auto => Kind::Float,
    }
}

/// Metrics of one step (this rank's view).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub loss: f64,
    pub denoise: f64,
    pub proj: f64,
    pub cls: f64,
    pub grad_norm: f64,
}

/// Model, optimiser state and data of one run.
pub struct Trainer {
    pub cfg: Config,
    pub dims: SitDims,
    pub device: Device,
    pub kind: Kind,
    pub model: SiT,
    pub params: Params,
    pub opt: AdamW,
    pub ema: Ema,
    source: Box<dyn BatchSource>,
    /// Steps completed.
    pub step: i64,
    /// This rank's rows of the global batch: `[lo, lo + n)`.
    lo: i64,
    n: i64,
}

impl Trainer {
    /// A fresh run (weights from the seed) on `device`, single rank.
    pub fn new(cfg: Config, file: &str, device: Device) -> Result<Self> {
        let world = crate::dist::LaunchInfo::from_env().world;
        let dims = cfg.model.dims(file)?;
        let kind = resolve_kind(cfg.train.precision, device);
        let n = cfg.local_batch(world, file)?;
        if world > 1 {
            anyhow::bail!("this build trains on a single rank only (world size {world} from the launcher)");
        }
        let (model, params) = build_sit(&dims, device, cfg.train.seed)?;
        let opt = AdamW::new(&cfg.optim, &params.flat);
        let ema = Ema::new(cfg.optim.ema_decay, &params.flat);
        let tokens = dims.num_patches() + 1;
        let source: Box<dyn BatchSource> = match cfg.data.source {
            DataSource::Synthetic => Box::new(Synthetic::new(
                cfg.train.seed,
                cfg.train.global_batch,
                dims.num_classes,
                [dims.in_channels, dims.input_size, dims.input_size],
                tokens,
                dims.z_dim,
            )),
        };
        Ok(Trainer { cfg, dims, device, kind, model, params, opt, ema, source, step: 0, lo: 0, n })
    }

    /// One optimisation step; returns its metrics.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let d = &self.dims;
        let step = self.step as u64;
        let draws = StepDraws::generate(
            self.cfg.train.seed,
            step,
            self.cfg.train.global_batch,
            [d.in_channels, d.input_size, d.input_size],
            d.z_dim,
            &self.cfg.loss,
            self.cfg.model.class_dropout_prob,
        )
        .rows(self.lo, self.n, self.device);
        let batch = self.source.batch(step, self.lo, self.n)?;
        let moments = batch.moments.to_device(self.device);
        let feat = batch.feat.to_device(self.device);
        let x0 = sample_posterior(&moments, &draws.eps, self.cfg.loss.latent_scale);
        let y = drop_labels(&batch.y.to_device(self.device), &draws.drop, d.num_classes);

        self.params.zero_grad();
        let cls0 = feat.select(1, 0);
        let inputs = LossInputs { x0: &x0, feat: &feat, cls0: &cls0, y: &y, t: &draws.t, noise: &draws.noise, noise_cls: &draws.noise_cls };
        let terms = reg_loss(&self.model, &inputs, &self.cfg.loss, self.kind);
        terms.total.backward();

        let (norm, factor) = clip_factor(&sq_sum(&self.params.grad), self.cfg.optim.max_grad_norm);
        {
            let _g = tch::no_grad_guard();
            let _ = self.params.grad.shallow_clone().g_mul_(&factor);
        }
        self.opt.update(&self.params.flat, &self.params.grad);
        self.ema.update(&self.params.flat);
        self.step += 1;
        Ok(StepStats {
            loss: terms.total.double_value(&[]),
            denoise: terms.denoise.mean(Kind::Float).double_value(&[]),
            proj: terms.proj.double_value(&[]),
            cls: terms.cls.mean(Kind::Float).double_value(&[]),
            grad_norm: norm.double_value(&[]),
        })
    }

    /// Starts from weights saved under the REG names (EMA restarts as a copy).
    pub fn init_from(&mut self, path: &std::path::Path) -> Result<()> {
        self.params.load_file(path)?;
        let _g = tch::no_grad_guard();
        self.ema.shadow.copy_(&self.params.flat);
        Ok(())
    }

    /// Waits for queued GPU work (timing).
    pub fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// A snapshot of the trainable weights (for tests and comparisons).
    pub fn weights(&self) -> Tensor {
        self.params.flat.detach().copy()
    }
}
