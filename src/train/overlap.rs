//! Buckets whose gradients backward has finished: a post-accumulate hook on every
//! parameter counts down the buckets its gradient lies in, and the training step hands
//! each bucket to its reduce-scatter as soon as the count reaches zero, while backward
//! goes on with the layers before it.

use super::zero::Bucket;
use crate::model::params::Entry;
use anyhow::Result;
use std::ffi::c_void;
use std::sync::Mutex;
use tch::Tensor;

/// What the step does with a bucket whose gradients are all written.
type OnReady<'a> = dyn FnMut(usize) -> Result<()> + 'a;

struct Watch {
    /// Buckets each parameter's gradient lies in (a parameter may straddle several).
    touches: Vec<Vec<usize>>,
    /// Parameters in each bucket, and how many have not been accumulated yet.
    count: Vec<usize>,
    remaining: Vec<usize>,
    /// Set only while an armed backward runs; erased lifetime, see `BucketWatch::during`.
    on_ready: Option<*mut OnReady<'static>>,
    done: Vec<bool>,
    error: Option<anyhow::Error>,
}

// SAFETY: the raw callback is only set while `during` runs, and the thread that set it
// is blocked in backward until the hooks (possibly on autograd's device thread) are done.
unsafe impl Send for Watch {}

/// Post-accumulate hooks on every parameter, reporting completed buckets. Buckets are
/// handed over in the order backward completes them: every rank runs the same graph
/// (the same model and code path, whatever its data), so that order, and with it the
/// order of the collectives, is the same on every rank.
pub struct BucketWatch {
    /// Boxed: its address is the hooks' context.
    watch: Box<Mutex<Watch>>,
    handles: Vec<Tensor>,
}

unsafe extern "C" fn grad_ready(ctx: *mut c_void, index: i64) {
    // SAFETY: `ctx` is the boxed mutex of a live BucketWatch (its Drop removes the hooks).
    let watch = unsafe { &*(ctx as *const Mutex<Watch>) };
    let Ok(mut w) = watch.lock() else { return };
    let Some(on_ready) = w.on_ready else { return };
    if w.error.is_some() {
        return;
    }
    for k in w.touches[index as usize].clone() {
        w.remaining[k] -= 1;
        if w.remaining[k] > 0 {
            continue;
        }
        // SAFETY: set by `during` from a live `&mut` for exactly the span of backward.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*on_ready)(k) }));
        match r {
            Ok(Ok(())) => w.done[k] = true,
            Ok(Err(e)) => w.error = Some(e),
            Err(_) => w.error = Some(anyhow::anyhow!("bucket {k}: the reduce-scatter panicked during backward")),
        }
        if w.error.is_some() {
            return;
        }
    }
}

impl BucketWatch {
    /// Hooks every parameter (`handles`, laid out as `entries` in the flat buffers).
    pub fn new(handles: &[Tensor], entries: &[Entry], buckets: &[Bucket]) -> Result<Self> {
        let touches: Vec<Vec<usize>> = entries
            .iter()
            .map(|e| {
                buckets.iter().enumerate().filter(|(_, b)| e.offset < b.lo + b.len && b.lo < e.offset + e.numel).map(|(k, _)| k).collect()
            })
            .collect();
        let mut count = vec![0; buckets.len()];
        touches.iter().flatten().for_each(|&k| count[k] += 1);
        let watch = Box::new(Mutex::new(Watch {
            touches,
            remaining: count.clone(),
            count,
            on_ready: None,
            done: vec![false; buckets.len()],
            error: None,
        }));
        let ctx = &*watch as *const Mutex<Watch> as *mut c_void;
        // Each handle is recorded as soon as it is hooked: if a later one fails, Drop
        // still removes the hooks already set.
        let mut this = BucketWatch { watch, handles: Vec::with_capacity(handles.len()) };
        for (i, h) in handles.iter().enumerate() {
            // SAFETY: `ctx` outlives the hook: Drop removes every hook before the box goes.
            unsafe { crate::shim::on_grad_ready(h, Some(grad_ready), ctx, i as i64)? };
            this.handles.push(h.shallow_clone());
        }
        Ok(this)
    }

    /// Runs `backward` with `on_ready` called for each bucket as its last gradient is
    /// accumulated (on the thread running backward). Returns which buckets were handed
    /// over; the caller finishes the others (parameters backward did not reach). The
    /// first error of `on_ready` stops the hand-overs and is returned.
    pub fn during(&self, on_ready: &mut OnReady<'_>, backward: impl FnOnce() -> Result<()>) -> Result<Vec<bool>> {
        {
            let mut w = self.watch.lock().expect("bucket watch poisoned");
            w.remaining = w.count.clone();
            w.done.iter_mut().for_each(|d| *d = false);
            w.error = None;
            // SAFETY: only the lifetime is erased; `Disarm` clears the pointer before
            // `on_ready` goes out of scope, also when backward fails or panics.
            w.on_ready = Some(unsafe { std::mem::transmute::<*mut OnReady<'_>, *mut OnReady<'static>>(on_ready) });
        }
        let disarm = Disarm(&self.watch);
        let ran = backward();
        drop(disarm);
        ran?;
        let mut w = self.watch.lock().expect("bucket watch poisoned");
        match w.error.take() {
            Some(e) => Err(e),
            None => Ok(w.done.clone()),
        }
    }
}

/// Clears the hooks' callback when dropped, however `during` is left.
struct Disarm<'a>(&'a Mutex<Watch>);

impl Drop for Disarm<'_> {
    fn drop(&mut self) {
        // A poisoned lock still holds the pointer: clear it all the same.
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        w.on_ready = None;
    }
}

impl Drop for BucketWatch {
    fn drop(&mut self) {
        for h in &self.handles {
            // SAFETY: removing a hook needs no context.
            let _ = unsafe { crate::shim::on_grad_ready(h, None, std::ptr::null_mut(), 0) };
        }
    }
}
