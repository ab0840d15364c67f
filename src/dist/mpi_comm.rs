//! The MPI backend: collectives over CPU tensors, straight from their memory.

use super::Comm;
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

pub struct MpiComm {
    // Dropping the universe finalises MPI; it lives as long as the communicator.
    _universe: mpi::environment::Universe,
    pub world_comm: SimpleCommunicator,
    /// Read once: MPI runs without thread support, and the NCCL backend answers
    /// `rank`/`world` from autograd's thread during an overlapped backward.
    rank: i64,
    world: i64,
}

impl MpiComm {
    pub fn init() -> Result<Self> {
        let Some(universe) = mpi::initialize() else { bail!("MPI was already initialised") };
        let world_comm = universe.world();
        let (rank, world) = (world_comm.rank() as i64, world_comm.size() as i64);
        Ok(MpiComm { _universe: universe, world_comm, rank, world })
    }
}

fn check_cpu(t: &Tensor, what: &str) -> Result<()> {
    if t.device() != Device::Cpu || !t.is_contiguous() {
        bail!("MPI {what}: needs a contiguous CPU tensor, got {:?}", t.device());
    }
    Ok(())
}

/// Runs `$body` with `$s` bound to a typed slice over the memory of `$t`, a tensor
/// the caller has checked to be a contiguous CPU tensor that nothing else touches
/// while `$body` runs.
macro_rules! typed {
    ($t:expr, |$s:ident: $ty:ident| $body:expr) => {{
        match $t.kind() {
            Kind::Float => {
                type $ty = f32;
                // SAFETY: the arm's type is `$t`'s element type; contiguity, the CPU and
                // exclusive use are the caller's checks (see the macro's doc).
                let $s: &mut [$ty] = unsafe { view(&$t) };
                $body
            }
            Kind::Double => {
                type $ty = f64;
                // SAFETY: as in the f32 arm.
                let $s: &mut [$ty] = unsafe { view(&$t) };
                $body
            }
            Kind::Int64 => {
                type $ty = i64;
                // SAFETY: as in the f32 arm.
                let $s: &mut [$ty] = unsafe { view(&$t) };
                $body
            }
            Kind::Uint8 => {
                type $ty = u8;
                // SAFETY: as in the f32 arm.
                let $s: &mut [$ty] = unsafe { view(&$t) };
                $body
            }
            k => bail!("MPI: unsupported dtype {k:?}"),
        }
    }};
}

/// A typed view of a tensor's memory (MPI writes into it).
///
/// # Safety
/// `t` is a contiguous CPU tensor of element type `T` that outlives the slice, and
/// nothing else reads or writes it meanwhile.
unsafe fn view<'a, T>(t: &Tensor) -> &'a mut [T] {
    // SAFETY: the function's contract: `numel` elements of `T` at `data_ptr`.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel()) }
}

impl Comm for MpiComm {
    fn rank(&self) -> i64 {
        self.rank
    }
    fn world(&self) -> i64 {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        check_cpu(t, "all-reduce")?;
        let send = t.copy();
        typed!(send, |s: T| {
            // SAFETY: checked CPU + contiguous above; the kind matches `send`'s (a copy of `t`).
            let r: &mut [T] = unsafe { view(t) };
            self.world_comm.all_reduce_into(&s[..], r, SystemOperation::sum());
        });
        Ok(())
    }
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        check_cpu(input, "reduce-scatter")?;
        check_cpu(output, "reduce-scatter")?;
        if input.kind() != output.kind() || input.numel() != output.numel() * self.world() as usize {
            bail!("MPI reduce-scatter: input must be world x output of the same dtype");
        }
        // Every rank's chunk `rank` comes here (an all-to-all moves the same bytes as a
        // ring reduce-scatter), then they are added in rank order as a balanced tree:
        // MPI's own reduction order is unspecified and may change with the rank count.
        let world = self.world();
        let received = input.empty_like();
        typed!(input, |s: T| {
            // SAFETY: `received` is a fresh contiguous CPU tensor of `input`'s kind.
            let r: &mut [T] = unsafe { view(&received) };
            self.world_comm.all_to_all_into(&s[..], r);
        });
        let mut sum = super::PairwiseSum::default();
        for chunk in received.view([world, -1]).unbind(0) {
            sum.push(chunk);
        }
        output.shallow_clone().copy_(&sum.finish().expect("world >= 1"));
        Ok(())
    }
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        check_cpu(input, "all-gather")?;
        check_cpu(output, "all-gather")?;
        if input.kind() != output.kind() || output.numel() != input.numel() * self.world() as usize {
            bail!("MPI all-gather: output must be world x input of the same dtype");
        }
        // The input may alias a slice of the output (the weights' own shard): send a copy.
        let send = input.copy();
        if matches!(input.kind(), Kind::BFloat16 | Kind::Half) {
            // Gathering moves bytes and adds nothing: 2-byte floats (bf16 working weights)
            // travel as u16.
            // SAFETY: contiguous CPU tensors of a 2-byte kind (checked above), viewed as u16
            // of their own length; `send` is a private copy, `output` is not aliased by it.
            let (s, r) = unsafe {
                (
                    std::slice::from_raw_parts(send.data_ptr() as *const u16, send.numel()),
                    std::slice::from_raw_parts_mut(output.data_ptr() as *mut u16, output.numel()),
                )
            };
            self.world_comm.all_gather_into(s, r);
            return Ok(());
        }
        typed!(send, |s: T| {
            // SAFETY: checked CPU + contiguous + same kind above.
            let r: &mut [T] = unsafe { view(output) };
            self.world_comm.all_gather_into(&s[..], r);
        });
        Ok(())
    }
    fn broadcast(&self, t: &Tensor, root: i64) -> Result<()> {
        check_cpu(t, "broadcast")?;
        typed!(t, |s: T| {
            self.world_comm.process_at_rank(root as i32).broadcast_into(s);
        });
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world_comm.barrier();
        Ok(())
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}
