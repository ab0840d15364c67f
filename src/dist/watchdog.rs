//! Ends this rank when the job stops making progress: a peer that died or hangs
//! otherwise leaves every other rank blocked in a collective forever. Heartbeat files
//! let the rank that gives up name the ones that stopped; a backend that can fail
//! asynchronously (NCCL) is polled for its errors and aborted before the rank exits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the watchdog's thread may do with a communicator while the main thread is
/// blocked in it: read an asynchronous error (NCCL reports a dead peer or a broken
/// socket this way, not as a return value), and abort it, so that GPU work waiting on
/// a peer ends instead of keeping the process alive at exit.
pub trait CommGuard: Send + Sync {
    fn async_error(&self) -> Option<String>;
    fn abort(&self);
}

/// Call `beat` after each unit of progress (a training step); if none comes within
/// `timeout`, or the communicator reports an asynchronous error, the process prints
/// one line naming its rank and the ranks whose heartbeat stopped, aborts the
/// communicator, and exits with code 3.
pub struct Watchdog {
    last_ms: Arc<AtomicU64>,
    step: Arc<AtomicI64>,
    start: Instant,
}

/// Wall-clock milliseconds (heartbeats are compared across processes).
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn heartbeat_file(dir: &Path, rank: i64) -> PathBuf {
    dir.join(format!("rank-{rank:05}"))
}

/// Every second, the watchdog thread writes `step wall_ms` to its rank's file: a rank
/// that is alive but waiting in a collective keeps beating, one that died or was
/// stopped does not.
fn write_heartbeat(dir: &Path, rank: i64, step: i64) {
    let path = heartbeat_file(dir, rank);
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, format!("{step} {}", now_ms())).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// What the heartbeats say about the other ranks: those silent for `stale` (dead or
/// stopped), and those alive at an older step than ours (waiting or slow).
fn peers(dir: &Path, rank: i64, world: i64, step: i64, stale: Duration) -> String {
    let (mut silent, mut behind, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
    for r in (0..world).filter(|r| *r != rank) {
        let beat = std::fs::read_to_string(heartbeat_file(dir, r)).ok().and_then(|s| {
            let (st, ms) = s.trim().split_once(' ')?;
            Some((st.parse::<i64>().ok()?, ms.parse::<u64>().ok()?))
        });
        match beat {
            None => unknown.push(r),
            Some((_, ms)) if now_ms().saturating_sub(ms) >= stale.as_millis() as u64 => silent.push(r),
            Some((st, _)) if st < step => behind.push(format!("{r} (step {st})")),
            Some(_) => {}
        }
    }
    let mut parts = Vec::new();
    if !silent.is_empty() {
        parts.push(format!("no heartbeat for {} s from rank(s) {silent:?}: dead or stopped", stale.as_secs_f64()));
    }
    if !behind.is_empty() {
        parts.push(format!("behind but alive: rank(s) {}", behind.join(", ")));
    }
    if !unknown.is_empty() {
        parts.push(format!("no heartbeat file from rank(s) {unknown:?} (another node's folder?)"));
    }
    if parts.is_empty() {
        "every other rank is alive at this step (a collective hangs)".into()
    } else {
        parts.join("; ")
    }
}

impl Watchdog {
    /// Starts the thread. With `heartbeats` (a folder every rank can see, such as the
    /// run folder), ranks publish their progress there for the message.
    pub fn start(rank: i64, world: i64, timeout: Duration, heartbeats: Option<PathBuf>, guard: Option<Arc<dyn CommGuard>>) -> Self {
        let start = Instant::now();
        let last_ms = Arc::new(AtomicU64::new(0));
        let step = Arc::new(AtomicI64::new(-1));
        let (l, s) = (last_ms.clone(), step.clone());
        if let Some(dir) = &heartbeats {
            let _ = std::fs::create_dir_all(dir);
        }
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut last_beat = None::<Instant>;
                loop {
                    std::thread::sleep(Duration::from_millis(200).min(timeout));
                    let current = s.load(Ordering::Relaxed);
                    if let Some(dir) = &heartbeats {
                        if last_beat.is_none_or(|b| b.elapsed() >= Duration::from_secs(1)) {
                            write_heartbeat(dir, rank, current);
                            last_beat = Some(Instant::now());
                        }
                    }
                    let idle = start.elapsed().saturating_sub(Duration::from_millis(l.load(Ordering::Relaxed)));
                    let failed = guard.as_ref().and_then(|g| g.async_error());
                    if idle >= timeout || failed.is_some() {
                        // NCCL reports a dead peer within a second or so, long before the
                        // timeout: wait out a few heartbeats, then call silent whoever
                        // missed them.
                        let stale = if failed.is_some() {
                            std::thread::sleep(Duration::from_millis(2500));
                            Duration::from_secs(2)
                        } else {
                            timeout
                        };
                        let others = match &heartbeats {
                            Some(dir) => peers(dir, rank, world, current, stale),
                            None => "another rank died or hangs".into(),
                        };
                        let why = match &failed {
                            Some(e) => format!("the communicator failed after step {current} ({e})"),
                            None => format!("no progress for {} s after step {current}", timeout.as_secs_f64()),
                        };
                        crate::error::print_line(&format!("error: rank {rank}: {why}; {others}; aborting"));
                        if let Some(g) = &guard {
                            g.abort();
                        }
                        // _exit: no atexit handlers (MPI's could block on the dead peer).
                        // SAFETY: terminates the process.
                        unsafe { libc::_exit(3) };
                    }
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
