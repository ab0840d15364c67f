//! What a step costs: host time blocked in collectives and bytes sent (metrics), the
//! wall time of each phase (`bench --profile`), and each collective timed alone
//! (`bench --comm`).

use super::Trainer;
use anyhow::Result;
use tch::{Device, Kind};

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

/// The collectives of one step: host time blocked in them and bytes sent.
pub(super) struct CommMeter {
    world: i64,
    host_blocking: bool,
    ms: std::cell::Cell<f64>,
    bytes: std::cell::Cell<f64>,
}

impl CommMeter {
    pub(super) fn new(world: i64, device: Device) -> Self {
        CommMeter { world, host_blocking: device == Device::Cpu, ms: Default::default(), bytes: Default::default() }
    }

    /// Runs one collective over a buffer of `bytes` (the whole buffer, before sharding).
    pub(super) fn time<R>(&self, bytes: i64, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let start = std::time::Instant::now();
        let r = f();
        self.ms.set(self.ms.get() + start.elapsed().as_secs_f64() * 1e3);
        self.bytes.set(self.bytes.get() + bytes as f64 * (self.world - 1) as f64 / self.world as f64);
        r
    }

    pub(super) fn read(&self) -> (Option<f64>, f64) {
        (self.host_blocking.then_some(self.ms.get()), self.bytes.get() / 1e9)
    }
}

/// Wall time of each phase of the training step, for `bench --profile`. The device is
/// synchronised at every boundary, so the phases add up to the step but lose their
/// overlap; off (no synchronisation) unless enabled.
#[derive(Debug, Default)]
pub(super) struct Phases {
    pub(super) enabled: bool,
    last: Option<std::time::Instant>,
    /// (phase, total ms, times timed) in step order.
    pub(super) ms: Vec<(&'static str, f64, u32)>,
}

impl Phases {
    /// Ends the phase `name` (started at the previous mark) after the device's queued work.
    pub(super) fn mark(&mut self, device: Device, name: &'static str) {
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

impl Trainer {
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
}
