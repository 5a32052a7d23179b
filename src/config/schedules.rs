//! Every timed thing the config drives, derived in this one place: which
//! key sets each schedule, and why `polling_interval` sets more than the
//! polls.
//!
//! The request budget is here too: a fleet of hundreds of agents shares
//! one server, so what one agent sends per minute (live output, cancel
//! checks, polls) is multiplied by the fleet. See docs/operations.md,
//! "Request budget".

use std::time::Duration;

use crate::retry::{Jitter, Schedule};

/// Longest wait between two attempts to reach the server, and between two
/// tries of kept outcomes.
const MAX_BACKOFF: Duration = Duration::from_secs(180);
/// The server forgets agents it has not heard from in 7 days; an idle
/// agent (offline, say) re-posts its state at least this often.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedules {
    /// `polling_interval`: between two polls of an idle agent, ±20 % at
    /// each wait so that agents started together drift apart (agent.rs).
    pub(crate) poll: Duration,
    /// `polling_interval` clamped to 0.1-5 s, doubling up to 3 min with
    /// full jitter: the waits for an unreachable server. Clamped because a
    /// slow-polling agent should still notice the server's return soon,
    /// and a test's fast one should not spin; jittered so a fleet that
    /// lost the server together does not come back together.
    pub(crate) server_wait: Schedule,
    /// `polling_interval`, at least 1 s, doubling up to 3 min with full
    /// jitter: retries of kept outcomes. A fleet whose deliveries failed
    /// together (an outage) delivers them spread over the last wait.
    pub(crate) kept: Schedule,
    /// `polling_interval` clamped to 0.1-10 s: how often an allocated
    /// device asks whether its job (or its parent) is over. The clamp
    /// keeps a multi-device job from waiting a slow poll to release.
    pub(crate) allocation_poll: Duration,
    /// No key: a day, shortened by a random part drawn once per agent so
    /// that a fleet started together does not heartbeat together. Looked
    /// at once per poll, so it may come one `polling_interval` late.
    pub(crate) heartbeat: Duration,
    /// `output_interval`: one live fragment per log this often in the long
    /// run; a burst of up to three goes at once (output/bucket.rs).
    pub(crate) output_interval: Duration,
    /// `cancel_check_interval`: at most one job-state request per this
    /// while a phase runs (the first one a random part of it in).
    pub(crate) cancel_check: Duration,
}

impl Schedules {
    /// From the checked keys (seconds, within their ranges).
    pub(super) fn new(polling_interval: Duration, output_interval: Duration, cancel_check: Duration) -> Schedules {
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        Schedules {
            poll: polling_interval,
            server_wait: Schedule::new(
                polling_interval.clamp(ms(100), secs(5)),
                MAX_BACKOFF,
                Jitter::Full { floor: ms(100) },
            ),
            kept: Schedule::new(polling_interval.max(secs(1)), MAX_BACKOFF, Jitter::Full { floor: secs(1) }),
            allocation_poll: polling_interval.clamp(ms(100), secs(10)),
            heartbeat: crate::jitter::early(HEARTBEAT),
            output_interval,
            cancel_check,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(polling: f64) -> Schedules {
        Schedules::new(Duration::from_secs_f64(polling), Duration::from_secs(1), Duration::from_secs(3))
    }

    #[test]
    fn polling_interval_drives_these_schedules_within_their_clamps() {
        let s = of(10.0);
        assert_eq!(s.poll, Duration::from_secs(10));
        assert_eq!(s.server_wait.first, Duration::from_secs(5));
        assert_eq!(s.kept.first, Duration::from_secs(10));
        assert_eq!(s.allocation_poll, Duration::from_secs(10));
        let s = of(0.0);
        assert_eq!(s.poll, Duration::ZERO);
        assert_eq!(s.server_wait.first, Duration::from_millis(100));
        assert_eq!(s.kept.first, Duration::from_secs(1));
        assert_eq!(s.allocation_poll, Duration::from_millis(100));
        let s = of(3600.0);
        assert_eq!((s.server_wait.first, s.allocation_poll), (Duration::from_secs(5), Duration::from_secs(10)));
        assert_eq!((s.server_wait.max, s.kept.max), (MAX_BACKOFF, MAX_BACKOFF));
    }

    #[test]
    fn kept_retries_and_heartbeats_are_spread() {
        let s = of(10.0).kept;
        let waits: Vec<Duration> = (0..1000).map(|_| s.wait(3)).collect();
        assert!(waits.iter().all(|w| *w >= Duration::from_secs(1) && *w <= Duration::from_secs(40)));
        assert!(
            waits.iter().any(|w| *w < Duration::from_secs(5)) && waits.iter().any(|w| *w > Duration::from_secs(35))
        );
        let beats: Vec<Duration> = (0..1000).map(|_| of(10.0).heartbeat).collect();
        assert!(beats.iter().all(|b| *b >= HEARTBEAT.mul_f64(0.8) && *b <= HEARTBEAT));
        assert!(
            beats.iter().any(|b| *b < HEARTBEAT.mul_f64(0.85)) && beats.iter().any(|b| *b > HEARTBEAT.mul_f64(0.95))
        );
    }
}
