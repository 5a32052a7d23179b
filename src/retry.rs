//! How the agent tries again: one schedule type for every doubling wait,
//! and the policy one HTTP call is made with.
//!
//! Who decides: the caller of each call passes its [`Retry`] (the client
//! has a default for the calls that do not). Things retried across calls
//! (a log fragment, kept outcomes, the token refresh, reaching the server)
//! each keep a [`Backoff`] of their own, built on the same [`Schedule`].

use std::time::{Duration, Instant};

use crate::jitter;

/// How a wait of the schedule is varied, so that a fleet failing together
/// does not retry together.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    None,
    /// ± 20 % (`jitter::spread`): waits that should stay close to nominal.
    Spread,
    /// Anywhere between the floor and the nominal wait (`jitter::full`).
    Full { floor: Duration },
}

/// A wait of `first` after the first failure, doubling with each further
/// failure in a row, never above `max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub first: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Schedule {
    pub const fn new(first: Duration, max: Duration, jitter: Jitter) -> Schedule {
        Schedule { first, max, jitter }
    }

    /// The nominal wait after `failures` failures in a row (at least one).
    pub fn nominal(&self, failures: u32) -> Duration {
        let mut d = self.first;
        for _ in 1..failures.min(64) {
            if d >= self.max {
                break;
            }
            d = d.saturating_mul(2);
        }
        d.min(self.max)
    }

    /// The wait after `failures` failures in a row, jittered.
    pub fn wait(&self, failures: u32) -> Duration {
        let d = self.nominal(failures);
        match self.jitter {
            Jitter::None => d,
            Jitter::Spread => jitter::spread(d),
            Jitter::Full { floor } => jitter::full(d, floor),
        }
    }
}

/// One thing retried later, across calls: failures in a row and when the
/// next attempt is due.
#[derive(Clone, Debug)]
pub struct Backoff {
    schedule: Schedule,
    failures: u32,
    next: Option<Instant>,
}

impl Backoff {
    pub fn new(schedule: Schedule) -> Backoff {
        Backoff { schedule, failures: 0, next: None }
    }

    /// No attempt is being held back at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }

    /// When the next attempt is due; `None` after a success.
    pub fn next(&self) -> Option<Instant> {
        self.next
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure at `now`; returns the wait before the next attempt.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = self.schedule.wait(self.failures);
        self.next = Some(crate::deadline::after(now, wait));
        wait
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.next = None;
    }
}

/// How hard one call tries before giving the failure back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Retry {
    pub attempts: u32,
    /// Per request.
    pub timeout: Duration,
    /// Between attempts of the call.
    pub between: Schedule,
}

/// Between attempts of one call: short, spread.
const BETWEEN: Schedule = Schedule::new(Duration::from_millis(250), Duration::from_secs(5), Jitter::Spread);

impl Retry {
    /// The default: a few attempts over a few seconds, for calls whose
    /// caller can wait (between jobs, at the end of a phase).
    pub const fn patient(timeout: Duration) -> Retry {
        Retry { attempts: 4, timeout, between: BETWEEN }
    }

    /// One attempt: for calls made while a phase runs (the caller has its
    /// own schedule and must get back to the child's output) and for calls
    /// already held back by a [`Backoff`].
    pub const fn once(timeout: Duration) -> Retry {
        Retry { attempts: 1, timeout, between: BETWEEN }
    }
}

impl Default for Retry {
    fn default() -> Retry {
        Retry::patient(Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_doubles_up_to_its_cap() {
        let s = Schedule::new(Duration::from_secs(1), Duration::from_secs(300), Jitter::None);
        assert_eq!(s.nominal(1), Duration::from_secs(1));
        assert_eq!(s.nominal(2), Duration::from_secs(2));
        assert_eq!(s.nominal(4), Duration::from_secs(8));
        assert_eq!(s.nominal(20), Duration::from_secs(300));
        assert_eq!(s.nominal(u32::MAX), Duration::from_secs(300));
        // A first wait above the cap is the cap (a long polling interval).
        let long = Schedule::new(Duration::from_secs(600), Duration::from_secs(180), Jitter::None);
        assert_eq!(long.nominal(1), Duration::from_secs(180));
    }

    #[test]
    fn backoff_holds_until_due_and_resets_on_success() {
        let mut b = Backoff::new(Schedule::new(Duration::from_secs(1), Duration::from_secs(4), Jitter::None));
        let t = Instant::now();
        assert!(b.ready(t));
        assert_eq!(b.failed(t), Duration::from_secs(1));
        assert!(!b.ready(t));
        assert_eq!(b.failed(t), Duration::from_secs(2));
        assert!(b.ready(t + Duration::from_secs(2)));
        b.succeeded();
        assert_eq!((b.failures(), b.next()), (0, None));
        let spread = Schedule::new(Duration::from_secs(10), Duration::from_secs(10), Jitter::Spread).wait(1);
        assert!(spread >= Duration::from_secs(8) && spread <= Duration::from_secs(12), "{spread:?}");
    }
}
