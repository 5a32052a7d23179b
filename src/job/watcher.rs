//! Watching one running phase: its output into the log and the live
//! stream, and the stop that needs the server (a cancel on it); the
//! runner owns the others (timeouts, the agent's stop). It calls back here
//! on every wake-up.

use std::time::{Duration, Instant};

use super::report::post_state_unless_held;
use super::{CANCEL_CHECK_TIMEOUT, next_heartbeat};
use crate::metrics::Metrics;
use crate::output::{LiveStream, PhaseLog};
use crate::phase::{LogKind, Phase};
use crate::retry::Retry;
use crate::rundir::{DeliveryState, PendingStream, RunDir};
use crate::runner::{Drain, Stop, Watcher};
use crate::serial::SerialTail;
use crate::server::Server;
use crate::states::JobState;

/// Watches one running phase: output to the log and the live stream,
/// a cancel on the server as its stop condition.
pub(super) struct PhaseWatcher<'a> {
    pub(super) log: PhaseLog,
    pub(super) live: Option<(LiveStream, &'a mut dyn Server, &'a mut u64)>,
    /// The connector's serial log, masked and streamed as it grows (only
    /// with a server, like `live`); the counter is the serial fragments'.
    pub(super) serial: Option<(SerialTail, &'a mut u64)>,
    pub(super) job_id: &'a str,
    /// The config's `cancel_check_interval`.
    pub(super) cancel_check: Duration,
    pub(super) next_cancel_check: Option<Instant>,
    /// A wake source of the runner's wait: scrapes are answered while a phase runs.
    pub(super) metrics: Option<&'a mut Metrics>,
    /// Fragment progress is saved as it happens, so that an agent killed
    /// mid-phase resumes numbering (and the log) where the server is.
    pub(super) progress: Progress<'a>,
    pub(super) next_heartbeat: Instant,
}

pub(super) struct Progress<'a> {
    rundir: &'a RunDir,
    phase: Phase,
    /// The job's state as the phase started (earlier unsent output, the
    /// cancel), which every save carries on.
    base: DeliveryState,
    saved_output_next: u64,
    /// The serial fragments' next number as last saved (at first, as the
    /// phase started).
    saved_serial_next: u64,
}

impl<'a> Progress<'a> {
    pub(super) fn new(rundir: &'a RunDir, phase: Phase, base: DeliveryState) -> Progress<'a> {
        Progress { rundir, phase, saved_output_next: u64::MAX, saved_serial_next: base.fragments.serial, base }
    }

    /// `serial`: the serial fragments' next number and how much of the
    /// masked copy was sent, once the connector's serial log exists.
    pub(super) fn save(&mut self, output_next: u64, sent: u64, serial: Option<(u64, u64)>) {
        let mut state = self.base.clone();
        state.fragments.output = output_next;
        state.pending.push(PendingStream { kind: LogKind::Output, phase: self.phase, sent, inflight_end: None });
        if let Some((next, serial_sent)) = serial {
            state.fragments.serial = next;
            state.pending.push(PendingStream {
                kind: LogKind::Serial,
                phase: self.phase,
                sent: serial_sent,
                inflight_end: None,
            });
        } else {
            state.fragments.serial = self.saved_serial_next;
        }
        if let Err(e) = self.rundir.save_state(&state) {
            log::debug!("cannot save fragment progress: {e}");
        }
        self.saved_output_next = output_next;
        self.saved_serial_next = state.fragments.serial;
    }
}

/// The first cancel check of a phase: a random part of the interval in.
/// Agents whose phases start in the same second (all those the server's
/// return let go on together) would otherwise check in step all phase
/// long, a burst of GETs every interval.
pub(super) fn first_cancel_check(now: Instant, every: Duration) -> Instant {
    crate::deadline::after(now, crate::jitter::within(every))
}

/// The checks after it: the interval ±20 %, so agents drift further apart.
fn next_cancel_check(now: Instant, every: Duration) -> Instant {
    crate::deadline::after(now, crate::jitter::spread(every))
}

impl Watcher for PhaseWatcher<'_> {
    fn output(&mut self, data: &[u8]) {
        self.log.write(data);
    }

    fn check(&mut self, now: Instant, drain: &mut Drain) -> Option<Stop> {
        if let Some((stream, client, counter)) = &mut self.live {
            // While a call waits on the server, the child's output keeps
            // going into the log (the fragment in flight is a fixed range
            // of it).
            let log = &mut self.log;
            let written = log.written();
            let mut drain = || drain(&mut |data| log.write(data));
            let drain = &mut drain;
            stream.pump(*client, counter, written, now, drain);
            let mut serial_progress = None;
            if let Some((tail, serial_counter)) = &mut self.serial {
                tail.look(now);
                if tail.started() {
                    tail.stream.pump(*client, serial_counter, tail.written(), now, drain);
                    serial_progress = Some((**serial_counter, tail.stream.sent));
                }
            }
            let serial_moved = serial_progress.is_some_and(|(next, _)| next != self.progress.saved_serial_next);
            if **counter != self.progress.saved_output_next || serial_moved {
                self.progress.save(**counter, stream.sent, serial_progress);
            }
            if now >= self.next_heartbeat {
                self.next_heartbeat = next_heartbeat(now);
                // Cleanup has no agent state of its own (upstream posts none).
                if self.progress.phase != Phase::Cleanup {
                    post_state_unless_held(*client, self.progress.phase, Retry::once(CANCEL_CHECK_TIMEOUT));
                }
            }
            if self.next_cancel_check.is_some_and(|t| now >= t) {
                self.next_cancel_check = Some(next_cancel_check(now, self.cancel_check));
                // One short attempt: a slow server must not hold the phase's output.
                if client.job_state(self.job_id, Some(drain), Retry::once(CANCEL_CHECK_TIMEOUT))
                    == Some(JobState::Cancelled)
                {
                    return Some(Stop::Cancelled);
                }
            }
        }
        None
    }

    fn source(&mut self) -> Option<&mut dyn crate::wait::Source> {
        self.metrics.as_deref_mut().map(|m| m as &mut dyn crate::wait::Source)
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = crate::deadline::after(now, Duration::from_secs(1));
        if let Some((stream, _, _)) = &self.live {
            if let Some(t) = stream.due(self.log.written()) {
                wake = wake.min(t);
            }
        }
        if let Some(t) = self.next_cancel_check {
            wake = wake.min(t);
        }
        if let Some((tail, _)) = &self.serial {
            wake = wake.min(tail.next_look());
            if let Some(t) = tail.stream.due(tail.written()) {
                wake = wake.min(t);
            }
        }
        if self.live.is_some() {
            wake = wake.min(self.next_heartbeat);
        }
        wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_checks_start_anywhere_in_the_interval_and_stay_near_it() {
        let now = Instant::now();
        let interval = Duration::from_secs(3);
        let first: Vec<Duration> = (0..1000).map(|_| first_cancel_check(now, interval) - now).collect();
        assert!(first.iter().all(|d| *d > Duration::ZERO && *d <= interval));
        // Not in step: the draws cover the interval's first and last fifth.
        assert!(first.iter().any(|d| *d < interval / 5) && first.iter().any(|d| *d > interval * 4 / 5));
        let next: Vec<Duration> = (0..1000).map(|_| next_cancel_check(now, interval) - now).collect();
        assert!(next.iter().all(|d| *d >= interval.mul_f64(0.8) && *d <= interval.mul_f64(1.2)));
        assert!(next.iter().any(|d| *d < interval.mul_f64(0.9)) && next.iter().any(|d| *d > interval.mul_f64(1.1)));
    }
}
