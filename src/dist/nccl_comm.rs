//! The NCCL backend: collectives over this rank's GPU tensors, queued on the stream
//! libtorch computes on. NCCL is loaded at run time (cudarc, dynamic loading); its
//! unique id travels over MPI.

use super::mpi_comm::MpiComm;
use super::Comm;
use anyhow::{bail, Context, Result};
use cudarc::nccl::{result as nccl, sys};
use std::ffi::c_void;
use tch::{Device, Kind, Tensor};

extern "C" {
    fn reg_cuda_current_stream(device: i32) -> *mut c_void;
    fn reg_cuda_set_device(device: i32);
    fn reg_cuda_stream_sync(device: i32);
    fn reg_cuda_peak_allocated(device: i32) -> i64;
    fn reg_cuda_reset_peak(device: i32);
}

/// Peak bytes held by tensors on a GPU since the last reset.
pub fn cuda_peak_allocated(device: usize) -> i64 {
    // SAFETY: only called with a valid CUDA device index.
    unsafe { reg_cuda_peak_allocated(device as i32) }
}

pub fn cuda_reset_peak(device: usize) {
    // SAFETY: as above.
    unsafe { reg_cuda_reset_peak(device as i32) }
}

pub struct NcclComm {
    mpi: MpiComm,
    comm: sys::ncclComm_t,
    index: usize,
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
        // SAFETY: a valid device index of this machine.
        unsafe { reg_cuda_set_device(index as i32) };
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
        Ok(NcclComm { mpi, comm, index })
    }

    fn stream(&self) -> sys::cudaStream_t {
        // SAFETY: valid device index; the stream handle is owned by libtorch.
        unsafe { reg_cuda_current_stream(self.index as i32) as sys::cudaStream_t }
    }

    fn check(&self, t: &Tensor, what: &str) -> Result<()> {
        if t.device() != Device::Cuda(self.index) || !t.is_contiguous() {
            bail!("NCCL {what}: needs a contiguous tensor on cuda:{}, got {:?}", self.index, t.device());
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
        let p = t.data_ptr();
        // SAFETY: in-place all-reduce over a live contiguous device buffer.
        unsafe { nccl::all_reduce(p, p, t.numel(), dtype(t.kind())?, sys::ncclRedOp_t::ncclSum, self.comm, self.stream()) }
            .map_err(nccl_err("all-reduce"))?;
        Ok(())
    }
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        self.check(input, "reduce-scatter")?;
        self.check(output, "reduce-scatter")?;
        // SAFETY: input holds world x output elements (checked by the caller's layout).
        unsafe {
            nccl::reduce_scatter(
                input.data_ptr(),
                output.data_ptr(),
                output.numel(),
                dtype(input.kind())?,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream(),
            )
        }
        .map_err(nccl_err("reduce-scatter"))?;
        Ok(())
    }
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        self.check(input, "all-gather")?;
        self.check(output, "all-gather")?;
        // SAFETY: NCCL allows the send buffer to be the rank's own slice of the output.
        unsafe { nccl::all_gather(input.data_ptr(), output.data_ptr(), input.numel(), dtype(input.kind())?, self.comm, self.stream()) }
            .map_err(nccl_err("all-gather"))?;
        Ok(())
    }
    fn broadcast(&self, t: &Tensor, root: i64) -> Result<()> {
        self.check(t, "broadcast")?;
        let p = t.data_ptr();
        // SAFETY: in-place broadcast.
        unsafe { nccl::broadcast(p, p, t.numel(), dtype(t.kind())?, root as i32, self.comm, self.stream()) }
            .map_err(nccl_err("broadcast"))?;
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        // SAFETY: valid device index.
        unsafe { reg_cuda_stream_sync(self.index as i32) };
        self.mpi.barrier()
    }
    fn device(&self) -> Device {
        Device::Cuda(self.index)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by comm_init_rank and is not used after.
        let _ = unsafe { nccl::comm_destroy(self.comm) };
    }
}
