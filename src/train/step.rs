//! One optimisation step of one rank: draws for the global batch, this rank's rows in
//! micro-batches (forward, REG loss, backward), the gradient reduce-scatter bucket by
//! bucket (during backward with `dist.overlap`), the agreed skip of a non-finite step,
//! clipping, AdamW and EMA on this rank's shard, and the weight all-gather.

use super::meter::CommMeter;
use super::Trainer;
use crate::data::Batch;
use crate::diffusion::loss::{reg_loss, sample_posterior, LossInputs, StepDraws};
use crate::dist::PairwiseSum;
use crate::model::{Caption, Cond};
use crate::optim::{clip_factor, sq_sum};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

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

impl Trainer {
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
}
