//! Safe wrappers over `csrc/shim.cpp`: the libtorch calls that tch does not expose.

use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, CStr};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn reg_set_grad(param: *mut C_tensor, grad: *mut C_tensor) -> *mut c_char;
    fn reg_backward(outputs: *const *mut C_tensor, grads: *const *mut C_tensor, n: c_int) -> *mut c_char;
    fn reg_allow_tf32(on: c_int);
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
    fn reg_free_error(e: *mut c_char);
}

fn check(err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string allocated by the shim.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { reg_free_error(err) };
    bail!("libtorch: {msg}")
}

/// Makes `grad` the `.grad` of `param`, so backward accumulates into it in place.
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    // SAFETY: both pointers are live tensors owned by the caller for this call.
    check(unsafe { reg_set_grad(param.as_ptr() as *mut C_tensor, grad.as_ptr() as *mut C_tensor) })
}

/// `torch::autograd::backward(outputs, grads)`: backward with explicit output gradients.
pub fn backward_with_grads(outputs: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
    assert_eq!(outputs.len(), grads.len());
    let o: Vec<*mut C_tensor> = outputs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    let g: Vec<*mut C_tensor> = grads.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    // SAFETY: the pointer arrays live for the call; the shim copies the handles.
    check(unsafe { reg_backward(o.as_ptr(), g.as_ptr(), o.len() as c_int) })
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

/// Allows TF32 in cuBLAS and cuDNN (no effect on CPU).
pub fn allow_tf32(on: bool) {
    // SAFETY: sets two global flags; cannot fail.
    unsafe { reg_allow_tf32(on as c_int) }
}
