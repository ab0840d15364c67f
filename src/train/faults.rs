//! The fault-injection seam: faults the tests provoke on purpose, in one place. The
//! library never reads them from the environment; only the command layer does, so a
//! run started any other way has none.

/// Faults to inject into a run; `Faults::default()` is none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Make the loss non-finite on one rank for a range of steps.
    pub nan: Option<NanSteps>,
}

/// Steps `first..=last` (counted from 0, before the update) on `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NanSteps {
    pub first: i64,
    pub last: i64,
    pub rank: i64,
}

impl Faults {
    /// `REG_DDP_TEST_NAN_AT=step:rank` or `first-last:rank`.
    pub fn from_env() -> Faults {
        let nan = std::env::var("REG_DDP_TEST_NAN_AT").ok().and_then(|v| {
            let (steps, rank) = v.split_once(':')?;
            let (first, last) = steps.split_once('-').unwrap_or((steps, steps));
            Some(NanSteps { first: first.parse().ok()?, last: last.parse().ok()?, rank: rank.parse().ok()? })
        });
        Faults { nan }
    }

    /// Whether the loss of `step` on `rank` is to be made non-finite.
    pub fn nan_at(&self, step: i64, rank: i64) -> bool {
        self.nan.is_some_and(|n| n.rank == rank && (n.first..=n.last).contains(&step))
    }
}
