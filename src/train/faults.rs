//! The fault-injection seam: faults the tests provoke on purpose, in one place. The
//! library never reads them from the environment; only the command layer does, so a
//! run started any other way has none.

/// Faults to inject into a run; `Faults::default()` is none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Make the loss non-finite at this (step, rank).
    pub nan_at: Option<(i64, i64)>,
    /// Before each checkpoint shard is written: leave half of it on disk as
    /// `*.partial` for this long (a kill then lands mid-write).
    pub slow_write_ms: u64,
}

impl Faults {
    /// `REG_DDP_TEST_NAN_AT=step:rank`, `REG_DDP_TEST_SLOW_WRITE_MS=ms`.
    pub fn from_env() -> Faults {
        Faults {
            nan_at: std::env::var("REG_DDP_TEST_NAN_AT").ok().and_then(|v| {
                let (s, r) = v.split_once(':')?;
                Some((s.parse().ok()?, r.parse().ok()?))
            }),
            slow_write_ms: std::env::var("REG_DDP_TEST_SLOW_WRITE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0),
        }
    }
}
