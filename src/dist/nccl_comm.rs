//! The NCCL backend: collectives over this rank's GPU tensors, queued on the stream
//! libtorch computes on. NCCL is loaded at run time (cudarc, dynamic loading); its
//! unique id travels over MPI.

use super::mpi_comm::MpiComm;
use super::watchdog::CommGuard;
use super::Comm;
use crate::shim;
use anyhow::{bail, Context, Result};
use cudarc::nccl::{result as nccl, sys};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

pub struct NcclComm {
    mpi: MpiComm,
    comm: sys::ncclComm_t,
    index: usize,
    handle: Arc<Handle>,
    /// The side stream of `reduce_scatter_sum_async` (a `cudaStream_t`), once made.
    side: std::sync::OnceLock<usize>,
}

/// The communicator as the watchdog's thread sees it. NCCL allows
/// `ncclCommGetAsyncError` and `ncclCommAbort` from another thread while a call is
/// blocked. The lock (held only around those calls and the final destroy, never during
/// a collective) keeps a poll from touching a communicator that is being destroyed,
/// and an aborted one from being destroyed again.
struct Handle {
    comm: usize,
    live: Mutex<bool>,
}

impl Handle {
    /// Ends the communicator once, by `end` (abort or destroy); later calls do nothing.
    fn end(&self, end: impl FnOnce(sys::ncclComm_t)) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::replace(&mut *live, false) {
            end(self.comm as sys::ncclComm_t);
        }
    }
}

impl CommGuard for Handle {
    fn async_error(&self) -> Option<String> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if !*live {
            return None;
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is live (checked under the lock that ending it takes);
        // `state` is an out-pointer.
        let called = unsafe { sys::ncclCommGetAsyncError(self.comm as sys::ncclComm_t, &mut state) };
        match (called, state) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) => None,
            (sys::ncclResult_t::ncclSuccess, e) => Some(format!("NCCL asynchronous error {e:?}")),
            (e, _) => Some(format!("ncclCommGetAsyncError: {e:?}")),
        }
    }

    fn abort(&self) {
        // SAFETY: a live communicator, ended once.
        self.end(|c| drop(unsafe { nccl::comm_abort(c) }));
    }
}

fn dtype(k: Kind) -> Result<sys::ncclDataType_t> {
    Ok(match k {
        Kind::Float => sys::ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
        Kind::Half => sys::ncclDataType_t::ncclFloat16,
        Kind::Double => sys::ncclDataType_t::ncclFloat64,
        Kind::Int64 => sys::ncclDataType_t::ncclInt64,
        Kind::Uint8 => sys::ncclDataType_t::ncclUint8,
        k => bail!("NCCL: unsupported dtype {k:?}"),
    })
}

impl NcclComm {
    pub fn init(mpi: MpiComm, device: Device) -> Result<Self> {
        let Device::Cuda(index) = device else { bail!("NCCL needs a CUDA device") };
        // cudarc panics when the library is missing; ask first.
        // SAFETY: only probes dlopen.
        if !unsafe { sys::is_culib_present() } {
            bail!("NCCL library not found: libnccl.so must be on the loader path (launch/setup.sh links it next to libnccl.so.2)");
        }
        shim::cuda_set_device(index)?;
        let mut id = [0u8; 128];
        if mpi.rank() == 0 {
            let uid = nccl::get_uniqueid().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
            for (d, s) in id.iter_mut().zip(uid.internal.iter()) {
                *d = *s as u8;
            }
        }
        let t = Tensor::from_slice(&id);
        mpi.broadcast(&t, 0)?;
        let mut bytes = [0u8; 128];
        t.copy_data(&mut bytes, 128);
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(bytes.iter()) {
            *d = *s as std::ffi::c_char;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: comm is an out-pointer; the id is the same on every rank.
        unsafe { nccl::comm_init_rank(&mut comm, mpi.world() as i32, uid, mpi.rank() as i32) }
            .map_err(|e| anyhow::anyhow!("ncclCommInitRank: {e:?}"))
            .context("NCCL communicator (one GPU per rank)")?;
        let handle = Arc::new(Handle { comm: comm as usize, live: Mutex::new(true) });
        Ok(NcclComm { mpi, comm, index, handle, side: std::sync::OnceLock::new() })
    }

    fn stream(&self) -> Result<sys::cudaStream_t> {
        Ok(shim::cuda_current_stream(self.index)? as sys::cudaStream_t)
    }

    /// The stream overlapped collectives run on (made on first use).
    fn side_stream(&self) -> Result<sys::cudaStream_t> {
        if let Some(&s) = self.side.get() {
            return Ok(s as sys::cudaStream_t);
        }
        let s = shim::cuda_side_stream(self.index)? as usize;
        Ok(*self.side.get_or_init(|| s) as sys::cudaStream_t)
    }

    /// The side stream, ordered after the work queued so far on the compute stream
    /// (which wrote the buffers the next collective reads).
    fn side_after_current(&self) -> Result<sys::cudaStream_t> {
        let (current, side) = (self.stream()?, self.side_stream()?);
        // SAFETY: libtorch's current stream and a pooled one, both of this rank's GPU.
        unsafe { shim::cuda_stream_wait(self.index, side as _, current as _)? };
        Ok(side)
    }

    /// Reduce-scatter (sum) queued on `stream`.
    fn reduce_scatter_on(&self, input: &Tensor, output: &Tensor, stream: sys::cudaStream_t) -> Result<()> {
        self.check_pair(output, input, "reduce-scatter")?;
        let dt = dtype(input.kind())?;
        // SAFETY: NCCL reads world x `output.numel()` elements of `input` and writes
        // `output.numel()` of `output`; both are live, contiguous, on this GPU and of
        // that size and dtype (checked above).
        unsafe {
            nccl::reduce_scatter(input.data_ptr(), output.data_ptr(), output.numel(), dt, sys::ncclRedOp_t::ncclSum, self.comm, stream)
        }
        .map_err(nccl_err("reduce-scatter"))?;
        Ok(())
    }

    /// All-gather queued on `stream`.
    fn all_gather_on(&self, input: &Tensor, output: &Tensor, stream: sys::cudaStream_t) -> Result<()> {
        self.check_pair(input, output, "all-gather")?;
        let dt = dtype(input.kind())?;
        // SAFETY: NCCL reads `input.numel()` elements of `input` and writes world x that
        // many of `output`, both live, contiguous, on this GPU and of that size and dtype
        // (checked above). The send buffer may be this rank's own slice of the output:
        // NCCL allows exactly that aliasing.
        unsafe { nccl::all_gather(input.data_ptr(), output.data_ptr(), input.numel(), dt, self.comm, stream) }
            .map_err(nccl_err("all-gather"))?;
        Ok(())
    }

    /// What every call's safety rests on: NCCL reads and writes `count` elements of
    /// the dtype at the raw pointers we hand it, so each buffer must be a live,
    /// contiguous tensor on this rank's GPU.
    fn check(&self, t: &Tensor, what: &str) -> Result<()> {
        if t.device() != Device::Cuda(self.index) || !t.is_contiguous() {
            bail!("NCCL {what}: needs a contiguous tensor on cuda:{}, got {:?}", self.index, t.device());
        }
        Ok(())
    }

    /// As the MPI backend: `big` holds `world` x `small` elements of the same dtype,
    /// so a wrong call is an error here rather than an out-of-bounds GPU write.
    fn check_pair(&self, small: &Tensor, big: &Tensor, what: &str) -> Result<()> {
        self.check(small, what)?;
        self.check(big, what)?;
        if small.kind() != big.kind() || small.numel().checked_mul(self.world() as usize) != Some(big.numel()) {
            bail!(
                "NCCL {what}: needs [world x n] and [n] tensors of one dtype, got {} {:?} and {} {:?} elements with {} ranks",
                big.numel(),
                big.kind(),
                small.numel(),
                small.kind(),
                self.world()
            );
        }
        Ok(())
    }
}

fn nccl_err(what: &'static str) -> impl Fn(cudarc::nccl::result::NcclError) -> anyhow::Error {
    move |e| anyhow::anyhow!("NCCL {what}: {e:?}")
}

impl Comm for NcclComm {
    fn rank(&self) -> i64 {
        self.mpi.rank()
    }
    fn world(&self) -> i64 {
        self.mpi.world()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        self.check(t, "all-reduce")?;
        let (p, dt, stream) = (t.data_ptr(), dtype(t.kind())?, self.stream()?);
        // SAFETY: in place over `t.numel()` elements of `t`'s dtype: `t` is live,
        // contiguous and on this rank's GPU (checked above).
        unsafe { nccl::all_reduce(p, p, t.numel(), dt, sys::ncclRedOp_t::ncclSum, self.comm, stream) }.map_err(nccl_err("all-reduce"))?;
        Ok(())
    }
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        self.reduce_scatter_on(input, output, self.stream()?)
    }
    fn reduce_scatter_sum_async(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        // The buffers are persistent (the flat gradients and the shard's), and
        // `wait_async` orders their next use after this.
        self.reduce_scatter_on(input, output, self.side_after_current()?)
    }
    fn all_gather_async(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        // The caller keeps both buffers alive and uses the output only after `wait_async`.
        self.all_gather_on(input, output, self.side_after_current()?)
    }
    fn wait_async(&self) -> Result<()> {
        if let Some(&side) = self.side.get() {
            // SAFETY: libtorch's current stream and the pooled side stream of this GPU.
            unsafe { shim::cuda_stream_wait(self.index, self.stream()? as _, side as _)? };
        }
        Ok(())
    }
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        self.all_gather_on(input, output, self.stream()?)
    }
    fn broadcast(&self, t: &Tensor, root: i64) -> Result<()> {
        self.check(t, "broadcast")?;
        if !(0..self.world()).contains(&root) {
            bail!("NCCL broadcast: root {root} is not a rank of {}", self.world());
        }
        let (p, dt, stream) = (t.data_ptr(), dtype(t.kind())?, self.stream()?);
        // SAFETY: in place over `t.numel()` elements of `t`, live, contiguous and on this
        // GPU (checked above); every rank passes a buffer of the same size.
        unsafe { nccl::broadcast(p, p, t.numel(), dt, root as i32, self.comm, stream) }.map_err(nccl_err("broadcast"))?;
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        shim::cuda_stream_sync(self.index)?;
        self.mpi.barrier()
    }
    fn device(&self) -> Device {
        Device::Cuda(self.index)
    }
    fn guard(&self) -> Option<Arc<dyn CommGuard>> {
        Some(self.handle.clone())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by comm_init_rank, is ended once, and is
        // not used after.
        self.handle.end(|c| drop(unsafe { nccl::comm_destroy(c) }));
    }
}
