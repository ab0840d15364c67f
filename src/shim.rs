//! Safe wrappers over `csrc/shim.cpp` and `csrc/shim_cuda.cpp`: the libtorch calls that
//! tch does not expose. Every entry point reports C++ exceptions as an error string.

use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn reg_set_grad(param: *mut C_tensor, grad: *mut C_tensor) -> *mut c_char;
    fn reg_fused_adamw(
        p: *mut C_tensor,
        g: *mut C_tensor,
        m: *mut C_tensor,
        v: *mut C_tensor,
        step: *mut C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: *mut C_tensor,
    ) -> *mut c_char;
    fn reg_on_grad_ready(param: *mut C_tensor, f: Option<GradReadyFn>, ctx: *mut c_void, index: i64) -> *mut c_char;
    fn reg_free_error(e: *mut c_char);
}

/// What libtorch calls after it has accumulated a parameter's gradient: (context, index).
pub type GradReadyFn = unsafe extern "C" fn(ctx: *mut c_void, index: i64);

fn check(err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string allocated by the shim.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    // SAFETY: `err` came from the shim's malloc and is freed exactly once, here.
    unsafe { reg_free_error(err) };
    bail!("libtorch: {msg}")
}

/// Makes `grad` the `.grad` of `param`, so backward accumulates into it in place.
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    // SAFETY: both pointers are live tensors owned by the caller for this call.
    check(unsafe { reg_set_grad(param.as_ptr() as *mut C_tensor, grad.as_ptr() as *mut C_tensor) })
}

/// After every backward that accumulates into `param`'s gradient, libtorch calls
/// `f(ctx, index)` (on the thread running backward); `None` removes the hook.
///
/// # Safety
/// `ctx` must stay valid for `f` until the hook is removed or the parameter dropped,
/// and `f` must not unwind.
pub unsafe fn on_grad_ready(param: &Tensor, f: Option<GradReadyFn>, ctx: *mut c_void, index: i64) -> Result<()> {
    check(reg_on_grad_ready(ptr(param), f, ctx, index))
}

fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// Hyper-parameters of one AdamW update.
pub struct AdamWArgs {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// `at::_fused_adamw_` on single tensors: `step` must already hold the new step
/// count; a non-zero `found_inf` turns the update into a no-op.
pub fn fused_adamw(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, step: &Tensor, a: &AdamWArgs, found_inf: Option<&Tensor>) -> Result<()> {
    let inf = found_inf.map(ptr).unwrap_or(std::ptr::null_mut());
    // SAFETY: all tensors are live for the call; the shim catches C++ exceptions.
    check(unsafe { reg_fused_adamw(ptr(p), ptr(g), ptr(m), ptr(v), ptr(step), a.lr, a.beta1, a.beta2, a.weight_decay, a.eps, inf) })
}

extern "C" {
    fn reg_cuda_current_stream(device: c_int, out: *mut *mut c_void) -> *mut c_char;
    fn reg_cuda_set_device(device: c_int) -> *mut c_char;
    fn reg_cuda_stream_sync(device: c_int) -> *mut c_char;
    fn reg_cuda_peak_allocated(device: c_int, out: *mut i64) -> *mut c_char;
    fn reg_cuda_reset_peak(device: c_int) -> *mut c_char;
    fn reg_cuda_side_stream(device: c_int, out: *mut *mut c_void) -> *mut c_char;
    fn reg_cuda_stream_wait(device: c_int, waiting: *mut c_void, on: *mut c_void) -> *mut c_char;
}

/// A pooled, high-priority `cudaStream_t` of GPU `device` for collectives that overlap
/// with compute (owned by libtorch, lives as long as the process).
pub fn cuda_side_stream(device: usize) -> Result<*mut c_void> {
    let mut out = std::ptr::null_mut();
    // SAFETY: `out` is a valid pointer slot for the call to write.
    check(unsafe { reg_cuda_side_stream(device as c_int, &mut out) })?;
    Ok(out)
}

/// Work queued on stream `waiting` from now on runs after the work queued so far on
/// stream `on` (both streams of GPU `device`; the host does not wait).
///
/// # Safety
/// Both must be live streams of `device` (libtorch's current or pooled streams).
pub unsafe fn cuda_stream_wait(device: usize, waiting: *mut c_void, on: *mut c_void) -> Result<()> {
    check(reg_cuda_stream_wait(device as c_int, waiting, on))
}

/// The `cudaStream_t` libtorch currently computes on for GPU `device` (owned by libtorch).
pub fn cuda_current_stream(device: usize) -> Result<*mut c_void> {
    let mut out = std::ptr::null_mut();
    // SAFETY: `out` is a valid pointer slot for the call to write.
    check(unsafe { reg_cuda_current_stream(device as c_int, &mut out) })?;
    Ok(out)
}

/// Makes GPU `device` current on this thread.
pub fn cuda_set_device(device: usize) -> Result<()> {
    // SAFETY: takes a plain integer; errors come back as a string.
    check(unsafe { reg_cuda_set_device(device as c_int) })
}

/// Waits for the work queued on libtorch's current stream of GPU `device`.
pub fn cuda_stream_sync(device: usize) -> Result<()> {
    // SAFETY: takes a plain integer; errors come back as a string.
    check(unsafe { reg_cuda_stream_sync(device as c_int) })
}

/// Peak bytes held by tensors on GPU `device` since the last reset (libtorch's caching allocator).
pub fn cuda_peak_allocated(device: usize) -> Result<i64> {
    let mut out = 0i64;
    // SAFETY: `out` is a valid i64 for the call to write; a bad device index comes back
    // as an error string, not as undefined behaviour.
    check(unsafe { reg_cuda_peak_allocated(device as c_int, &mut out) })?;
    Ok(out)
}

/// Starts a new peak for `cuda_peak_allocated`.
pub fn cuda_reset_peak(device: usize) -> Result<()> {
    // SAFETY: takes a plain integer; errors come back as a string.
    check(unsafe { reg_cuda_reset_peak(device as c_int) })
}

extern "C" {
    fn reg_cuda_copy_to_host(
        device: c_int,
        src: *const *mut C_tensor,
        dst: *const *mut C_tensor,
        n: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn reg_cuda_copy_order(device: c_int, copy: *mut c_void) -> *mut c_char;
    fn reg_cuda_copy_wait(copy: *mut c_void) -> *mut c_char;
    fn reg_cuda_copy_free(copy: *mut c_void);
}

/// A copy of GPU tensors into pinned host tensors running on a side stream of GPU
/// `device` (checkpoint saves overlap with the next step).
pub struct HostCopy {
    handle: *mut c_void,
    device: usize,
}

// SAFETY: the handle is a CUDA event owned by this value; recording happened before it
// was handed out, and waiting on or blocking a stream behind an event is thread-safe.
unsafe impl Send for HostCopy {}
// SAFETY: as for Send; `&self` methods only wait on the event.
unsafe impl Sync for HostCopy {}

impl HostCopy {
    /// Queues `dst[i].copy_(src[i])` after the work queued so far on the current stream.
    /// `src` must not be modified until `order_before_current`; `dst` not read before `wait`.
    pub fn start(device: usize, src: &[Tensor], dst: &[Tensor]) -> Result<HostCopy> {
        if src.len() != dst.len() {
            bail!("host copy: {} sources for {} destinations", src.len(), dst.len());
        }
        let (s, d): (Vec<_>, Vec<_>) = src.iter().zip(dst).map(|(a, b)| (ptr(a), ptr(b))).unzip();
        let mut handle = std::ptr::null_mut();
        // SAFETY: the pointer arrays hold `len` live tensors for the call; `handle` is a
        // valid slot for the shim to write.
        check(unsafe { reg_cuda_copy_to_host(device as c_int, s.as_ptr(), d.as_ptr(), s.len() as c_int, &mut handle) })?;
        Ok(HostCopy { handle, device })
    }

    /// Work queued on the current stream from now on runs after the copy.
    pub fn order_before_current(&self) -> Result<()> {
        // SAFETY: `handle` is live until drop.
        check(unsafe { reg_cuda_copy_order(self.device as c_int, self.handle) })
    }

    /// Blocks this thread until the copy is done.
    pub fn wait(&self) -> Result<()> {
        // SAFETY: `handle` is live until drop.
        check(unsafe { reg_cuda_copy_wait(self.handle) })
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        // SAFETY: the handle came from `reg_cuda_copy_to_host` and is freed once, here.
        unsafe { reg_cuda_copy_free(self.handle) };
    }
}
