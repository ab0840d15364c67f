//! The ZeRO-1 shard layout: the flat buffers cut into buckets in flat order, every rank
//! owning one equal slice of every bucket, so a bucket's gradients reduce-scatter in
//! place as soon as backward has written them, and its weights all-gather in place.

use crate::dist::Comm;
use anyhow::Result;
use tch::Tensor;

/// One bucket: `[lo, lo + len)` of the flat buffers; rank `r` owns
/// `[lo + r * slice, lo + (r + 1) * slice)` of it, at `shard_lo` of its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub lo: i64,
    pub len: i64,
    pub slice: i64,
    pub shard_lo: i64,
}

impl Bucket {
    /// Where rank `rank`'s slice of this bucket starts in the flat buffers.
    pub fn piece(&self, rank: i64) -> i64 {
        self.lo + rank * self.slice
    }
}

/// A bucket's all-gather in flight: for a lower precision, the slice sent, the buffer
/// received and where it goes in the flat weights.
pub struct Gathering {
    low: Option<(Tensor, Tensor, Tensor)>,
}

/// Which elements of the flat buffers each rank owns, bucket by bucket.
#[derive(Debug, Clone)]
pub struct ShardLayout {
    world: i64,
    rank: i64,
    buckets: Vec<Bucket>,
}

impl ShardLayout {
    /// `padded` is a multiple of `world * align`; each rank's slice of a bucket is
    /// `per_rank` elements rounded down to `align` (at least `align`), the last bucket
    /// takes what is left. One rank has one bucket: the whole buffer.
    pub fn new(padded: i64, world: i64, rank: i64, per_rank: i64, align: i64) -> Self {
        assert_eq!(padded % (world * align), 0, "flat buffers padded to the ranks' alignment");
        let slice = if world == 1 { padded } else { (per_rank / align * align).max(align) };
        let mut buckets = Vec::new();
        let mut lo = 0;
        while lo < padded {
            let len = (slice * world).min(padded - lo);
            buckets.push(Bucket { lo, len, slice: len / world, shard_lo: lo / world });
            lo += len;
        }
        ShardLayout { world, rank, buckets }
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Elements each rank owns.
    pub fn shard_len(&self) -> i64 {
        self.buckets.iter().map(|b| b.slice).sum()
    }

    /// Rank `rank`'s pieces of the flat buffers as (flat start, length), in shard order.
    pub fn ranges(&self, rank: i64) -> Vec<(i64, i64)> {
        self.buckets.iter().map(|b| (b.piece(rank), b.slice)).collect()
    }

    /// Copies this rank's pieces of `flat` into `shard` (`[shard_len]`).
    pub fn copy_out(&self, flat: &Tensor, shard: &Tensor) {
        for b in &self.buckets {
            shard.narrow(0, b.shard_lo, b.slice).copy_(&flat.narrow(0, b.piece(self.rank), b.slice));
        }
    }

    /// Bucket `b` of every rank's `grad`, summed into this rank's slice of `out`;
    /// `beside`: beside the compute queued after it (`Comm::reduce_scatter_sum_async`,
    /// `Comm::wait_async` orders it before the next use of `grad` and `out`).
    pub fn reduce_scatter(&self, comm: &dyn Comm, b: &Bucket, grad: &Tensor, out: &Tensor, beside: bool) -> Result<()> {
        let (input, output) = (grad.narrow(0, b.lo, b.len), out.narrow(0, b.shard_lo, b.slice));
        match beside {
            true => comm.reduce_scatter_sum_async(&input, &output),
            false => comm.reduce_scatter_sum(&input, &output),
        }
    }

    /// `flat` becomes every rank's `shard`, bucket by bucket.
    pub fn all_gather(&self, comm: &dyn Comm, shard: &Tensor, flat: &Tensor) -> Result<()> {
        self.all_gather_as(comm, shard, flat, flat.kind())
    }

    /// As `all_gather` into the fp32 `flat`, but sending the weights as `kind` (bf16:
    /// half the bytes), each bucket through a temporary. The working weights are then
    /// rounded to `kind`: exact for a model that casts every weight to `kind` before
    /// using it, as SiT does when it computes in `kind`; the masters stay fp32.
    pub fn all_gather_as(&self, comm: &dyn Comm, shard: &Tensor, flat: &Tensor, kind: tch::Kind) -> Result<()> {
        let gathers = (0..self.buckets.len()).map(|k| self.start_gather(comm, k, shard, flat, kind, false)).collect::<Result<Vec<_>>>()?;
        self.finish_gathers(comm, gathers)
    }

    /// Starts bucket `k`'s all-gather of `shard` (fp32) into `flat`, sent as `kind`;
    /// `beside`: beside the compute queued after it (`Comm::all_gather_async`). Returns
    /// the buffers the collective still uses: keep them until `finish_gathers`.
    pub fn start_gather(
        &self,
        comm: &dyn Comm,
        k: usize,
        shard: &Tensor,
        flat: &Tensor,
        kind: tch::Kind,
        beside: bool,
    ) -> Result<Gathering> {
        let b = &self.buckets[k];
        let gather = |input: &Tensor, output: &Tensor| match beside {
            true => comm.all_gather_async(input, output),
            false => comm.all_gather(input, output),
        };
        let mine = shard.narrow(0, b.shard_lo, b.slice);
        let whole = flat.narrow(0, b.lo, b.len);
        if kind == flat.kind() {
            gather(&mine, &whole)?;
            return Ok(Gathering { low: None });
        }
        let (mine, into) = (mine.to_kind(kind), Tensor::empty([b.len], (kind, flat.device())));
        gather(&mine, &into)?;
        Ok(Gathering { low: Some((mine, into, whole)) })
    }

    /// After `start_gather` of every bucket: waits for them (on the device) and widens
    /// what came in as a lower precision into `flat`.
    pub fn finish_gathers(&self, comm: &dyn Comm, gathers: Vec<Gathering>) -> Result<()> {
        comm.wait_async()?;
        for (_, into, whole) in gathers.into_iter().filter_map(|g| g.low) {
            whole.shallow_clone().copy_(&into);
        }
        Ok(())
    }

    /// The rank count this layout was cut for.
    pub fn world(&self) -> i64 {
        self.world
    }
}

#[cfg(test)]
mod tests {
    use super::ShardLayout;

    /// Every element belongs to exactly one rank, in bucket-sized runs, and a rank's
    /// pieces fill its shard in order.
    #[test]
    fn the_ranks_partition_the_buffer() {
        for (padded, world, per_rank) in [(4 * 128 * 7, 4, 256), (2 * 128 * 5, 2, 128), (128 * 3, 1, 128), (4 * 128, 4, 1000)] {
            let mut owner = vec![-1i64; padded as usize];
            for r in 0..world {
                let l = ShardLayout::new(padded, world, r, per_rank, 128);
                assert_eq!(l.shard_len() * world, padded);
                let mut at = 0;
                for (b, (lo, len)) in l.buckets().iter().zip(l.ranges(r)) {
                    assert_eq!(b.shard_lo, at);
                    assert_eq!(len % 128, 0);
                    at += len;
                    for e in lo..lo + len {
                        assert_eq!(owner[e as usize], -1, "element {e} owned twice");
                        owner[e as usize] = r;
                    }
                }
            }
            assert!(owner.iter().all(|&o| o >= 0));
        }
    }
}
