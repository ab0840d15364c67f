//! Data-parallel plumbing: where this process stands (rank, world, local rank), one
//! `Comm` interface over tensors with MPI (CPU) and NCCL (GPU) backends, and a
//! watchdog that ends a rank whose peers stopped answering.

pub mod mpi_comm;
pub mod nccl_comm;
pub mod watchdog;

use anyhow::Result;
use tch::{Device, Tensor};

/// What the launcher (mpirun, srun) tells us through the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchInfo {
    pub rank: i64,
    pub world: i64,
    pub local_rank: i64,
}

fn env_i64(names: &[&str]) -> Option<i64> {
    names.iter().find_map(|n| std::env::var(n).ok()?.parse().ok())
}

impl LaunchInfo {
    /// Reads Open MPI, PMI/PMIx (MPICH, srun) and SLURM variables; a process started
    /// without a launcher is rank 0 of 1.
    pub fn from_env() -> Self {
        let world = env_i64(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"]).unwrap_or(1);
        let rank = env_i64(&["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"]).unwrap_or(0);
        let local_rank = env_i64(&["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]).unwrap_or(0);
        LaunchInfo { rank, world, local_rank }
    }

    /// Under a launcher, this process's GPU when `device` is CUDA (`cuda:{local_rank}`,
    /// wrapping around the visible devices); otherwise `device` itself.
    pub fn local_device(&self, device: Device) -> Device {
        match device {
            Device::Cuda(_) if self.world > 1 => Device::Cuda((self.local_rank % tch::Cuda::device_count().max(1)) as usize),
            d => d,
        }
    }

    /// The device named `name` (`auto`, `cpu`, `cuda`, `cuda:N`) as this process uses it.
    pub fn device(&self, name: &str) -> Result<Device> {
        Ok(self.local_device(resolve_device(name)?))
    }
}

/// The device a name stands for (`auto`: the first GPU when there is one).
fn resolve_device(name: &str) -> Result<Device> {
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

/// Where collectives run: on the compute device (NCCL between GPUs: training moves
/// gigabytes a step), or through host memory (MPI: sample, eval and prepare exchange
/// a few results).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collectives {
    OnDevice,
    OnHost,
}

/// What every subcommand sets up first: the device this process computes on (its own
/// GPU under a launcher) and its communicator.
pub struct Launch {
    pub device: Device,
    pub comm: Box<dyn Comm>,
}

impl Launch {
    /// Resolves `device` (`auto`, `cpu`, `cuda`, `cuda:N`) for this process and joins the
    /// other ranks, if a launcher started any.
    pub fn start(device: &str, collectives: Collectives) -> Result<Launch> {
        let info = LaunchInfo::from_env();
        let device = info.device(device)?;
        let comm = communicator(
            &info,
            match collectives {
                Collectives::OnDevice => device,
                Collectives::OnHost => Device::Cpu,
            },
        )?;
        Ok(Launch { device, comm })
    }
}

/// Collectives over tensors. Buffers are contiguous and live on the device the
/// backend serves (CPU for MPI, this rank's GPU for NCCL). Sums only: averaging is
/// the caller's division, so every backend rounds the same way.
pub trait Comm {
    fn rank(&self) -> i64;
    fn world(&self) -> i64;
    /// `t` becomes the element-wise sum of every rank's `t`.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()>;
    /// `input` is `[world * n]`; `output` (`[n]`) becomes the sum over ranks of chunk
    /// `rank`. The MPI backend adds in `PairwiseSum` order over ranks, so a sum split
    /// over 1, 2 or 4 ranks rounds the same; NCCL uses its ring order.
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()>;
    /// As `reduce_scatter_sum`, but free to run beside the compute queued after it
    /// (NCCL: on a side stream, after the work queued so far); `wait_async` orders it
    /// before what follows. Backends that block (MPI) finish it here.
    fn reduce_scatter_sum_async(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        self.reduce_scatter_sum(input, output)
    }
    /// As `all_gather`, but free to run beside the compute queued after it, as
    /// `reduce_scatter_sum_async`.
    fn all_gather_async(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        self.all_gather(input, output)
    }
    /// Work queued from now on runs after every `*_async` collective queued so far.
    fn wait_async(&self) -> Result<()> {
        Ok(())
    }
    /// `output` (`[world * n]`) becomes the concatenation of every rank's `input` (`[n]`).
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()>;
    /// `t` becomes root's `t`.
    fn broadcast(&self, t: &Tensor, root: i64) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// The device whose tensors this backend moves.
    fn device(&self) -> Device;
    /// A handle the watchdog polls and aborts from its own thread; `None` for backends
    /// whose failures surface as errors of the calls themselves (MPI).
    fn guard(&self) -> Option<std::sync::Arc<dyn watchdog::CommGuard>> {
        None
    }
}

/// World size 1: every collective is the identity.
pub struct SingleComm {
    pub device: Device,
}

impl Comm for SingleComm {
    fn rank(&self) -> i64 {
        0
    }
    fn world(&self) -> i64 {
        1
    }
    fn all_reduce_sum(&self, _t: &Tensor) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        output.shallow_clone().copy_(input);
        Ok(())
    }
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        output.shallow_clone().copy_(input);
        Ok(())
    }
    fn broadcast(&self, _t: &Tensor, _root: i64) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn device(&self) -> Device {
        self.device
    }
}

/// A sum of tensors that arrive one by one (micro-batch gradients, then the ranks'
/// partial sums), added as a balanced binary tree over their arrival order. When the
/// leaves are split into consecutive groups of a power-of-two size (micro-batches per
/// rank) and the groups are summed the same way (ranks), the result is the same tree,
/// so the float sum does not depend on how the leaves were split. Holds at most
/// log2(n) + 1 partial sums.
#[derive(Default)]
pub struct PairwiseSum {
    /// (tree level, partial sum of 2^level consecutive leaves), levels decreasing.
    stack: Vec<(u32, Tensor)>,
}

impl PairwiseSum {
    pub fn push(&mut self, leaf: Tensor) {
        push_onto(&mut self.stack, leaf);
    }

    /// The sum (`None` when nothing was pushed). With a count that is not a power of
    /// two, the unequal subtrees are added from the right.
    pub fn finish(self) -> Option<Tensor> {
        fold(self.stack)
    }

    /// The sum with one more leaf, `last`, over a part of the leaves (`part` cuts the
    /// same piece out of each earlier one): element-wise, the same floats as pushing
    /// `last` and finishing, cut afterwards.
    pub fn finish_with(&self, last: Tensor, part: impl Fn(&Tensor) -> Tensor) -> Tensor {
        let mut stack: Vec<(u32, Tensor)> = self.stack.iter().map(|(level, t)| (*level, part(t))).collect();
        push_onto(&mut stack, last);
        fold(stack).expect("one leaf at least")
    }
}

fn push_onto(stack: &mut Vec<(u32, Tensor)>, leaf: Tensor) {
    let mut node = (0, leaf);
    while let Some((level, _)) = stack.last() {
        if *level != node.0 {
            break;
        }
        let (level, left) = stack.pop().expect("checked");
        node = (level + 1, left + node.1);
    }
    stack.push(node);
}

fn fold(mut stack: Vec<(u32, Tensor)>) -> Option<Tensor> {
    let mut acc = stack.pop()?.1;
    while let Some((_, left)) = stack.pop() {
        acc = left + acc;
    }
    Some(acc)
}

/// Sums a few numbers over all ranks (votes, flags, metrics); every rank gets the sums.
pub fn agree(comm: &dyn Comm, values: &[f64]) -> Result<Vec<f64>> {
    let t = Tensor::from_slice(values).to_device(comm.device());
    comm.all_reduce_sum(&t)?;
    Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu))?)
}

/// Before a collective: every rank learns whether any rank failed on its own, so that
/// none is left waiting in the collective. Gives this rank's value or error, or an error
/// saying how many other ranks failed (they print their own).
pub fn all_ok<T>(local: Result<T>, comm: &dyn Comm) -> Result<T> {
    let failed = agree(comm, &[local.is_err() as i64 as f64])?[0];
    let value = local?;
    if failed > 0.0 {
        anyhow::bail!("{failed} other rank(s) failed; see their messages");
    }
    Ok(value)
}

/// The process's communicator. Without a launcher (world size 1) this never touches
/// MPI and computes on `device`. Under one, it initialises MPI and, when `device` is
/// this rank's GPU, uses NCCL on it; otherwise the CPU with MPI.
fn communicator(info: &LaunchInfo, device: Device) -> Result<Box<dyn Comm>> {
    if info.world <= 1 {
        return Ok(Box::new(SingleComm { device }));
    }
    let mpi = mpi_comm::MpiComm::init()?;
    if mpi.world() != info.world {
        anyhow::bail!("the launcher says {} ranks but MPI has {}", info.world, mpi.world());
    }
    if device.is_cuda() {
        let nccl = nccl_comm::NcclComm::init(mpi, device)?;
        return Ok(Box::new(nccl));
    }
    Ok(Box::new(mpi))
}

#[cfg(test)]
mod tests {
    use super::PairwiseSum;
    use tch::{Kind, Tensor};

    fn sum(leaves: &[Tensor]) -> Tensor {
        let mut s = PairwiseSum::default();
        leaves.iter().for_each(|t| s.push(t.shallow_clone()));
        s.finish().unwrap()
    }

    /// Eight leaves summed at once, as 2 x 4 and as 4 x 2 (ranks of micro-batches)
    /// give the same bits; a plain left-to-right sum of the same floats does not.
    #[test]
    fn the_split_does_not_change_the_sum() {
        tch::manual_seed(0);
        let leaves: Vec<Tensor> = (0..8).map(|i| Tensor::randn([4096], (Kind::Float, tch::Device::Cpu)) * (1 << (3 * i)) as f64).collect();
        let whole = sum(&leaves);
        for per_rank in [1, 2, 4] {
            let ranks: Vec<Tensor> = leaves.chunks(per_rank).map(sum).collect();
            assert!(sum(&ranks).equal(&whole), "{per_rank} leaves per rank");
        }
        let sequential = leaves[1..].iter().fold(leaves[0].copy(), |acc, t| acc + t);
        assert!(!sequential.equal(&whole), "the data cannot tell the orders apart");
        assert!(PairwiseSum::default().finish().is_none());
        let three = sum(&leaves[..3]);
        assert!(three.equal(&(&leaves[0] + &leaves[1] + &leaves[2])));
        // The last leaf added to a part of the earlier ones: the same floats, cut.
        for n in 1..8 {
            let mut s = PairwiseSum::default();
            leaves[..n - 1].iter().for_each(|t| s.push(t.shallow_clone()));
            let part = s.finish_with(leaves[n - 1].narrow(0, 100, 300), |t| t.narrow(0, 100, 300));
            assert!(part.equal(&sum(&leaves[..n]).narrow(0, 100, 300)), "{n} leaves");
        }
    }
}
