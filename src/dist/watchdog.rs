//! Ends this rank when the job stops making progress: a peer that died or hangs
//! otherwise leaves every other rank blocked in a collective forever.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Call `beat` after each unit of progress (a training step); if none comes within
/// `timeout`, the process prints one line naming its rank and exits with code 3.
pub struct Watchdog {
    last_ms: Arc<AtomicU64>,
    step: Arc<AtomicI64>,
    start: Instant,
}

impl Watchdog {
    pub fn start(rank: i64, timeout: Duration) -> Self {
        let start = Instant::now();
        let last_ms = Arc::new(AtomicU64::new(0));
        let step = Arc::new(AtomicI64::new(-1));
        let (l, s) = (last_ms.clone(), step.clone());
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200).min(timeout));
                let idle = start.elapsed().saturating_sub(Duration::from_millis(l.load(Ordering::Relaxed)));
                if idle >= timeout {
                    eprintln!(
                        "error: rank {rank}: no progress for {} s after step {}: another rank died or hangs; aborting",
                        timeout.as_secs_f64(),
                        s.load(Ordering::Relaxed)
                    );
                    // _exit: no atexit handlers (MPI's could block on the dead peer).
                    // SAFETY: terminates the process.
                    unsafe { libc::_exit(3) };
                }
            })
            .expect("spawn watchdog thread");
        Watchdog { last_ms, step, start }
    }

    pub fn beat(&self, step: i64) {
        self.step.store(step, Ordering::Relaxed);
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
