//! For the hostile-input tests (each includes it beside `mod common`): a counting allocator (the most a reader held at once) and the binary under a limited address space.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::process::CommandExt;
use std::process::Command;

// Memory: every allocation of this test binary is counted per thread (readers run on the calling thread), so a
// case can assert the most it held at once. libtorch's own allocations are not counted; they copy what a reader
// already read.

struct Counting;

/// One request above this is refused (null: the binary aborts naming the size) rather than granted on a
/// shared machine: no reader may ask for it from a test file of a few KB.
const REFUSED: usize = 4 << 30;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: forwards to the system allocator; the counters are const-initialised thread locals without
// destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > REFUSED {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > REFUSED {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        count(-(l.size() as isize));
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > REFUSED {
            return std::ptr::null_mut();
        }
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            count(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `f`'s result and the most bytes it held at once beyond what this thread held before.
pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base).max(0) as usize)
}

/// What reading a file of `len` bytes may hold at once: a constant for the reader's tables and a generous
/// multiple of the file (the pickle machine's objects, the converted values), but never what a forged
/// count claims.
pub fn memory_bound(len: usize) -> usize {
    (32 << 20) + 256 * len
}

/// Address space of the binary in these tests: libtorch maps about 3 GiB; a forged size would need more.
pub const BINARY_ADDRESS_SPACE: u64 = 6 << 30;

/// The binary (`common::bin`: alone, no launcher variables) under `BINARY_ADDRESS_SPACE`: an allocation of a
/// forged size fails there (an abort, not exit 2) instead of being tried on the machine.
pub fn limited_bin() -> Command {
    let mut c = crate::common::bin();
    // SAFETY: between fork and exec only setrlimit runs, which is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            let l = libc::rlimit { rlim_cur: BINARY_ADDRESS_SPACE, rlim_max: BINARY_ADDRESS_SPACE };
            if libc::setrlimit(libc::RLIMIT_AS, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}
