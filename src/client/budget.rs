//! How long one call to the server may take, and the agent's stop.
//!
//! A call (name resolution, connect, proxy CONNECT, TLS handshake, request,
//! answer) has a whole-call deadline: twice its `timeout` (the caller's,
//! `server_timeout` by default), plus one second per [`BYTES_PER_SECOND`]
//! of body moved, so a large artifact on a slow link still goes while a
//! server that drips bytes is given up on. `timeout` alone still bounds
//! each wait for progress.
//!
//! Every wait inside a call is cut into ticks; between ticks the call
//! checks the agent's stop, its deadline, ticks the systemd watchdog and
//! does the caller's idle work. After a stop (SIGTERM/SIGINT) a call may
//! go on for [`STOP_GRACE`] from the stop or from its own start, whichever
//! is later, so that a healthy server still gets the outcome; once one call
//! has been abandoned for the stop, no further call is made.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{notify, signals};

/// The transfer rate a call is always allowed: 64 KiB/s (512 kbit/s).
pub(crate) const BYTES_PER_SECOND: u64 = 64 * 1024;
/// How long a call may go on once the agent is stopping.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(1);
/// The longest a call waits between two looks at the stop and its deadline.
pub(crate) const TICK: Duration = Duration::from_millis(200);

/// When this process first saw the stop; set by the first look after it.
static STOP_SEEN: OnceLock<Instant> = OnceLock::new();
/// A call was abandoned for the stop: the server is slow, make no more.
static ABANDONED: AtomicBool = AtomicBool::new(false);

/// When the stop was first seen, if the agent is stopping.
fn stop_seen() -> Option<Instant> {
    signals::interrupted().then(|| *STOP_SEEN.get_or_init(Instant::now))
}

/// Why a call ends before its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// The whole-call deadline passed.
    Deadline,
    /// The agent is stopping and the call's grace is over.
    Stop,
}

/// The clock of one call.
pub(crate) struct Budget {
    start: Instant,
    /// The caller's timeout: each wait for progress, and half the call.
    pub(crate) timeout: Duration,
    moved: u64,
    last_progress: Instant,
}

impl Budget {
    pub(crate) fn new(timeout: Duration) -> Budget {
        let now = Instant::now();
        Budget { start: now, timeout, moved: 0, last_progress: now }
    }

    /// The whole-call deadline as it stands (it grows with bytes moved).
    pub(crate) fn deadline(&self) -> Instant {
        let allowance = Duration::from_secs(self.moved / BYTES_PER_SECOND);
        crate::deadline::after(self.start, self.timeout.saturating_mul(2).saturating_add(allowance))
    }

    /// Bytes went one way or the other.
    pub(crate) fn progress(&mut self, n: usize) {
        if n > 0 {
            self.moved = self.moved.saturating_add(n as u64);
            self.last_progress = Instant::now();
        }
    }

    /// Whether the call must end now, and why. Ticks the watchdog.
    pub(crate) fn check(&self) -> Option<Cut> {
        notify::tick();
        let now = Instant::now();
        if let Some(stop) = stop_seen() {
            if ABANDONED.load(Ordering::SeqCst) || now >= crate::deadline::after(stop.max(self.start), STOP_GRACE) {
                ABANDONED.store(true, Ordering::SeqCst);
                return Some(Cut::Stop);
            }
        }
        (now >= self.deadline()).then_some(Cut::Deadline)
    }

    /// Whether no byte has moved for `timeout`.
    pub(crate) fn stalled(&self) -> bool {
        self.last_progress.elapsed() >= self.timeout
    }

    /// How long the next wait may be: a tick, less near the deadline.
    pub(crate) fn tick(&self, tick: Duration) -> Duration {
        let left = self.deadline().saturating_duration_since(Instant::now());
        tick.min(left).max(Duration::from_millis(1))
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// The error a call ends with when the agent's stop cut it (see [`is_stop`]).
#[derive(Debug)]
struct Stopping(String);

impl std::fmt::Display for Stopping {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stopping {}

/// Not `Interrupted`: `write_all` and `read_exact` would try again.
pub(crate) fn stop_error(what: &str) -> std::io::Error {
    std::io::Error::other(Stopping(format!("{what}: not waited for, the agent is stopping")))
}

pub(crate) fn is_stop(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Stopping>())
}
