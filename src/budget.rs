//! The agent's request budget towards the server while a phase runs: how
//! often live output and cancel checks may go. Set once from the config at
//! start-up; read where the requests are made (the live streams of output
//! and serial logs, the phase watcher), which are built in several modules
//! that have no config at hand.
//!
//! A fleet of hundreds of agents shares one server: what one agent sends
//! per minute is multiplied by the fleet. See docs/operations.md, "Request budget".

use std::sync::OnceLock;
use std::time::Duration;

/// Today's defaults, also used when `set` was never called (unit tests,
/// the library used without `main`).
pub const DEFAULT_OUTPUT_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_CANCEL_INTERVAL: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// One live fragment per log this often in the long run; a burst of
    /// up to three goes at once (output/bucket.rs).
    pub output_interval: Duration,
    /// At most one job-state request per this while a phase runs.
    pub cancel_interval: Duration,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget { output_interval: DEFAULT_OUTPUT_INTERVAL, cancel_interval: DEFAULT_CANCEL_INTERVAL }
    }
}

static BUDGET: OnceLock<Budget> = OnceLock::new();

/// Sets the budget for the process; only the first call counts.
pub fn set(b: Budget) {
    let _ = BUDGET.set(b);
}

pub fn get() -> Budget {
    BUDGET.get().copied().unwrap_or_default()
}
