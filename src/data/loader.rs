//! Feeds training from shards: each epoch a permutation of all records seeded by
//! (seed, epoch); step `s` takes the next `global_batch` records of it and each rank
//! its own rows, so the data order does not depend on the world size. In a captioned
//! dataset each row reads one of its record's captions, keyed by (seed, step, row of the
//! global batch) (`caption_pick`), so that too is the same for any rank layout. A background
//! thread assembles batches into a bounded queue (pinned memory on CUDA). The
//! position is the step itself: restoring it is exact.

use super::shards::Dataset;
use super::{Batch, BatchSource};
use crate::bail_input;
use crate::rng::{step_seed, stream, SplitMix};
use anyhow::Result;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The record order of `epoch`: a Fisher-Yates shuffle of `0..n`.
pub fn permutation(n: i64, seed: u64, epoch: i64) -> Vec<i64> {
    let mut rng = SplitMix(step_seed(seed, epoch as u64, stream::EPOCH_PERMUTATION) as u64);
    let mut p: Vec<i64> = (0..n).collect();
    for i in (1..p.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// Where step `step` reads: (epoch, first position in that epoch's permutation).
pub fn position(step: i64, records: i64, global_batch: i64) -> (i64, i64) {
    let per_epoch = (records / global_batch).max(1);
    (step / per_epoch, (step % per_epoch) * global_batch)
}

/// Which of a record's `count` captions row `row` of the global batch of `step` reads:
///
/// `SplitMix(step_seed(seed, step, CAPTION_PICK) ^ (row * 0xD6E8_FEB8_6659_FD93)).below(count)`
///
/// The row is mixed by an odd multiplier (a bijection on u64) before SplitMix's finaliser,
/// so neighbouring rows get unrelated draws. It depends only on (seed, step, row): not on
/// the rank or the world size; and as the step changes from epoch to epoch, the same
/// image is seen with its different captions.
pub fn caption_pick(seed: u64, step: u64, row: u64, count: u64) -> u64 {
    let key = step_seed(seed, step, stream::CAPTION_PICK) as u64 ^ row.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    SplitMix(key).below(count)
}

/// What keys a batch's random choices (the caption pick): the run seed and the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub seed: u64,
    pub step: u64,
}

/// Threads that copy the records of one batch (besides the prefetching thread, which
/// waits for them).
pub const COPY_THREADS: usize = 2;

/// Assembles rows `[lo, lo + n)` of the global batch of `key.step` (on the CPU), whose
/// records start at position `start` of the epoch's permutation `perm`; with
/// `latents_only`, features, images and captions are not read.
pub fn assemble(ds: &Dataset, perm: &[i64], start: i64, lo: i64, n: i64, latents_only: bool, key: Key) -> Result<Batch> {
    let idx = &perm[(start + lo) as usize..(start + lo + n) as usize];
    let ix = &ds.index;
    let k = ix.num_classes();
    // Records are copied once, straight from the mapped shards into the batch tensor,
    // by `COPY_THREADS` threads, each filling a contiguous part of the rows.
    let gather = |name: &str, shape: &[i64], kind: Kind| -> Result<Tensor> {
        let t = Tensor::empty(shape, (kind, Device::Cpu));
        let bytes = t.numel() * kind.elt_size_in_bytes();
        // SAFETY: a fresh contiguous CPU tensor of exactly `bytes` bytes, written only here.
        let dst = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, bytes) };
        let per = bytes / idx.len().max(1);
        let copy = |rows: &[i64], out: &mut [u8]| -> Result<()> {
            for (r, &i) in rows.iter().enumerate() {
                let (s, row) = ds.locate(i);
                let src = ds.record_bytes(s, name, row)?;
                if src.len() != per {
                    bail_input!("{}: tensor {name}: record size differs from index.json", ds.shards[s].path.display());
                }
                out[r * per..(r + 1) * per].copy_from_slice(src);
            }
            Ok(())
        };
        if idx.is_empty() {
            return Ok(t);
        }
        for &i in idx {
            let (s, row) = ds.locate(i);
            ds.will_need(s, name, row);
        }
        let rows_each = idx.len().div_ceil(COPY_THREADS);
        std::thread::scope(|sc| {
            let parts: Vec<_> =
                idx.chunks(rows_each).zip(dst.chunks_mut(rows_each * per)).map(|(rows, out)| sc.spawn(move || copy(rows, out))).collect();
            parts.into_iter().try_for_each(|p| p.join().unwrap_or_else(|_| Err(anyhow::anyhow!("loader copy thread panicked"))))
        })?;
        Ok(t)
    };
    let l = &ix.latent_shape;
    let lkind = if ix.latent_dtype == "bf16" { Kind::BFloat16 } else { Kind::Float };
    let moments = gather("latents", &[n, l[0], l[1], l[2]], lkind)?.to_kind(Kind::Float);
    let labels: Vec<i64> = Vec::<i64>::try_from(gather("labels", &[n], Kind::Int64)?)?;
    for (&y, &i) in labels.iter().zip(idx) {
        if !(0..k).contains(&y) {
            let (s, row) = ds.locate(i);
            bail_input!("{}: labels[{row}] = {y} is outside [0, {k})", ds.shards[s].path.display());
        }
    }
    let feat = match &ix.encoder {
        Some(e) if ix.features && !latents_only => gather("features", &[n, e.tokens, e.z_dim], Kind::BFloat16)?,
        _ => Tensor::zeros([0], (Kind::Float, Device::Cpu)),
    };
    let images = if ix.images && !latents_only {
        let r = ix.resolution;
        Some(gather("images", &[n, 3, r, r], Kind::Uint8)?)
    } else {
        None
    };
    let (captions, text) = match &ix.text {
        Some(t) if !latents_only => {
            let (captions, text) = gather_captions(ds, idx, lo, t.precomputed, key)?;
            (Some(captions), text)
        }
        _ => (None, None),
    };
    Ok(Batch { moments, feat, y: Tensor::from_slice(&labels), images, captions, text })
}

/// One caption per record of `idx` (rows `lo..` of the global batch), picked by
/// `caption_pick`: its token ids [n, L] i64 and, when precomputed, its (hidden [n, L, D],
/// pooled [n, D]) bf16.
fn gather_captions(ds: &Dataset, idx: &[i64], lo: i64, precomputed: bool, key: Key) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let t = ds.index.text.as_ref().expect("called for captioned datasets");
    let (l, d, n) = (t.max_length, t.hidden_size, idx.len() as i64);
    let (mut ids, mut hidden, mut pooled) = (Vec::with_capacity((n * l) as usize), Vec::new(), Vec::new());
    for (r, &i) in idx.iter().enumerate() {
        let (s, row) = ds.locate(i);
        let (a, b) = ds.caption_range(s, row)?;
        let j = a + caption_pick(key.seed, key.step, (lo + r as i64) as u64, (b - a) as u64) as i64;
        let bytes = ds.rows_bytes(s, "caption_ids", j, 1)?;
        ids.extend(bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64));
        if precomputed {
            hidden.extend_from_slice(ds.rows_bytes(s, "caption_hidden", j, 1)?);
            pooled.extend_from_slice(ds.rows_bytes(s, "caption_pooled", j, 1)?);
        }
    }
    let ids = Tensor::from_slice(&ids).reshape([n, l]);
    let text = if precomputed {
        let bf16 = |bytes: &[u8], shape: &[i64]| Tensor::f_from_data_size(bytes, shape, Kind::BFloat16);
        Some((bf16(&hidden, &[n, l, d])?, bf16(&pooled, &[n, d])?))
    } else {
        None
    };
    Ok((ids, text))
}

/// A batch source over a dataset with a prefetching thread.
pub struct ShardLoader {
    ds: Arc<Dataset>,
    seed: u64,
    global_batch: i64,
    prefetch: usize,
    pin: Option<Device>,
    latents_only: bool,
    worker: Option<(i64, i64, i64, Receiver<Result<Batch>>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ShardLoader {
    pub fn new(ds: Arc<Dataset>, seed: u64, global_batch: i64, prefetch: usize, device: Device) -> Result<Self> {
        if ds.len() < global_batch {
            bail_input!("{}: {} records, fewer than one global batch ({global_batch})", ds.dir.display(), ds.len());
        }
        let pin = device.is_cuda().then_some(device);
        Ok(ShardLoader { ds, seed, global_batch, prefetch: prefetch.max(1), pin, latents_only: false, worker: None, thread: None })
    }

    /// Read only latents and labels (a benchmark of the lightest record).
    pub fn latents_only(mut self) -> Self {
        self.latents_only = true;
        self
    }

    /// (Re)starts the thread at `step` for rows `[lo, lo + n)`.
    fn start(&mut self, step: i64, lo: i64, n: i64) {
        let (tx, rx) = sync_channel(self.prefetch);
        let (ds, seed, b, pin, lean) = (self.ds.clone(), self.seed, self.global_batch, self.pin, self.latents_only);
        self.stop();
        let handle = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                let mut epoch = -1;
                let mut perm = Vec::new();
                for s in step.. {
                    let (e, start) = position(s, ds.len(), b);
                    if e != epoch {
                        perm = permutation(ds.len(), seed, e);
                        epoch = e;
                    }
                    let key = Key { seed, step: s as u64 };
                    let batch = assemble(&ds, &perm, start, lo, n, lean, key).map(|mut bt| {
                        if let Some(d) = pin {
                            bt.moments = bt.moments.pin_memory(d);
                            bt.feat = bt.feat.pin_memory(d);
                        }
                        bt
                    });
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return; // the trainer went away, or the error is delivered
                    }
                }
            })
            .expect("spawn loader thread");
        self.worker = Some((step, lo, n, rx));
        self.thread = Some(handle);
    }

    /// Ends the thread: dropping the receiver fails its next send; then wait for it,
    /// so it never runs libtorch code while the process is shutting down.
    fn stop(&mut self) {
        self.worker = None;
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ShardLoader {
    fn drop(&mut self) {
        self.stop();
    }
}

impl BatchSource for ShardLoader {
    fn batch(&mut self, step: u64, lo: i64, n: i64) -> Result<Batch> {
        let step = step as i64;
        match &self.worker {
            Some((next, l, m, _)) if *next == step && *l == lo && *m == n => {}
            _ => self.start(step, lo, n),
        }
        let (next, _, _, rx) = self.worker.as_mut().expect("started above");
        *next += 1;
        rx.recv().map_err(|_| anyhow::anyhow!("data loader thread ended"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_seeded_shuffle() {
        let a = permutation(1000, 7, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, permutation(1000, 7, 0));
        assert_ne!(a, permutation(1000, 7, 1));
        assert_ne!(a, permutation(1000, 8, 0));
    }

    #[test]
    fn positions_walk_epochs_dropping_the_remainder() {
        // 10 records, batch 4: two steps per epoch, records 8 and 9 of each order unused.
        assert_eq!(position(0, 10, 4), (0, 0));
        assert_eq!(position(1, 10, 4), (0, 4));
        assert_eq!(position(2, 10, 4), (1, 0));
        assert_eq!(position(5, 10, 4), (2, 4));
    }
}
