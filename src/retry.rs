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
    Full {
        floor: Duration,
    },
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
        self.jittered(self.nominal(failures))
    }

    /// `d` varied as this schedule varies its waits.
    pub fn jittered(&self, d: Duration) -> Duration {
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

/// The server seen failing across calls (no answer, or 500/502/503/504)
/// for [`OUTAGE_AFTER`]: an outage. Calls are then held back, failing at
/// once without a request, until a random moment of the hold (full
/// jitter over the longer of the doubling wait and the outage so far); the
/// first call after it probes. The probe that gets an answer ends the
/// outage and holds back, once more, the calls whose caller tries again
/// later anyway (polls, kept outcomes, live output, cancel checks,
/// heartbeats: [`Retry::later`]) for a random part of the outage's length;
/// the calls nobody would make again (a job's state posts, the agent's
/// state after a job) go at once. A fleet that lost the server together
/// thus comes back spread over about twice the outage instead of in the
/// second the server returns, and the jobs and phases it then starts do
/// not end (and post) in the same second either. A job does not wait on
/// the server meanwhile: what a held call carried is kept and retried as
/// after any failure.
#[derive(Clone, Debug)]
pub struct Outage {
    /// The first failed attempt since the last answer.
    failing_since: Option<Instant>,
    schedule: Schedule,
    /// Failed probes (calls that gave up) since the outage began.
    failures: u32,
    held_until: Option<Instant>,
    /// After the answer that ended an outage: until when the calls that
    /// are tried again later anyway still wait.
    returning_until: Option<Instant>,
}

/// Failing this long, over several attempts, is an outage: one patient
/// call's own retries (about 1.75 s) are not enough to make one.
pub const OUTAGE_AFTER: Duration = Duration::from_secs(3);
/// Holds after an outage began: a random part of 2 s doubling per failed
/// probe, or of the outage so far when longer, up to a minute. Sized by the
/// outage's age, agents that lost the server together come back spread over
/// about as long as it was gone, however few probes each made.
pub const OUTAGE_HOLD: Schedule =
    Schedule::new(Duration::from_secs(2), Duration::from_secs(60), Jitter::Full { floor: Duration::from_millis(500) });

impl Outage {
    pub fn new(hold: Schedule) -> Outage {
        Outage { failing_since: None, schedule: hold, failures: 0, held_until: None, returning_until: None }
    }

    /// How long calls are still held back at `now`; `None`: a call may go.
    pub fn held(&self, now: Instant) -> Option<Duration> {
        self.held_until.filter(|t| *t > now).map(|t| t - now)
    }

    /// How long the calls tried again later anyway ([`Retry::later`]) are
    /// still held back at `now`: during an outage's holds, and after the
    /// answer that ended it.
    pub fn held_later(&self, now: Instant) -> Option<Duration> {
        self.held(now).max(self.returning(now))
    }

    /// How long the hold after an outage's end still lasts at `now`.
    pub fn returning(&self, now: Instant) -> Option<Duration> {
        self.returning_until.filter(|t| *t > now).map(|t| t - now)
    }

    /// An attempt got an answer the server meant (any but 500/502/503/504)
    /// at `now`: no outage. When that ends one, the calls tried again later
    /// anyway stay held back for a random part of the outage's length (at
    /// most the hold's cap), which is returned: the first answer after an
    /// outage comes at much the same time for a whole fleet (each agent's
    /// probe when its hold ran out), and what they kept (outcomes, output, a
    /// first poll and its job) would follow it together.
    pub fn answered(&mut self, now: Instant) -> Option<Duration> {
        let ended = self.failures > 0;
        let age = self.failing_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        self.failing_since = None;
        self.failures = 0;
        self.held_until = None;
        if !ended {
            return None;
        }
        let hold = jitter::within(age.min(self.schedule.max));
        self.returning_until = Some(crate::deadline::after(now, hold));
        Some(hold)
    }

    /// An attempt got no answer, or a 500/502/503/504, at `now`.
    pub fn attempt_failed(&mut self, now: Instant) {
        self.failing_since.get_or_insert(now);
    }

    /// A call gave up at `now` after failed attempts. When the server has
    /// been failing for [`OUTAGE_AFTER`], returns the hold that begins, and
    /// whether it is the outage's first.
    pub fn call_failed(&mut self, now: Instant) -> Option<(Duration, bool)> {
        let since = self.failing_since?;
        let age = now.duration_since(since);
        if age < OUTAGE_AFTER {
            return None;
        }
        self.failures = self.failures.saturating_add(1);
        let nominal = self.schedule.nominal(self.failures).max(age).min(self.schedule.max);
        let hold = self.schedule.jittered(nominal);
        self.held_until = Some(crate::deadline::after(now, hold));
        Some((hold, self.failures == 1))
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
    /// The caller tries again later on its own schedule if this call
    /// fails (live output, cancel checks, heartbeats, events held back):
    /// such a call also waits out the hold after an outage's end (see
    /// [`Outage`]). A call nobody would make again is not held by it.
    pub later: bool,
}

/// Between attempts of one call: short, spread.
const BETWEEN: Schedule = Schedule::new(Duration::from_millis(250), Duration::from_secs(5), Jitter::Spread);

impl Retry {
    /// The default: a few attempts over a few seconds, for calls whose
    /// caller can wait (between jobs, at the end of a phase).
    pub const fn patient(timeout: Duration) -> Retry {
        Retry { attempts: 4, timeout, between: BETWEEN, later: false }
    }

    /// One attempt: for calls made while a phase runs (the caller has its
    /// own schedule and must get back to the child's output) and for calls
    /// already held back by a [`Backoff`].
    pub const fn once(timeout: Duration) -> Retry {
        Retry { attempts: 1, timeout, between: BETWEEN, later: true }
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

    #[test]
    fn an_outage_holds_calls_back_for_a_random_part_of_a_doubling_hold() {
        let schedule = Schedule::new(Duration::from_secs(2), Duration::from_secs(60), Jitter::None);
        let t = Instant::now();
        let mut o = Outage::new(schedule);
        // Failures shorter than OUTAGE_AFTER are no outage.
        o.attempt_failed(t);
        assert_eq!(o.call_failed(t + Duration::from_secs(2)), None);
        assert_eq!(o.held(t + Duration::from_secs(2)), None);
        // An answer forgets them (no outage ended: none had begun, so no
        // hold either).
        assert_eq!(o.answered(t + Duration::from_secs(2)), None);
        assert_eq!(o.held(t + Duration::from_secs(2)), None);
        o.attempt_failed(t + Duration::from_secs(2));
        assert_eq!(o.call_failed(t + Duration::from_secs(4)), None);
        // Failing for 3 s (since t + 2): the first hold is the outage so
        // far, longer than the schedule's first 2 s.
        let at = t + Duration::from_secs(5);
        assert_eq!(o.call_failed(at), Some((Duration::from_secs(3), true)));
        assert_eq!(o.held(at + Duration::from_secs(1)), Some(Duration::from_secs(2)));
        assert_eq!(o.held(at + Duration::from_secs(3)), None);
        // The probe failed, 6 s into the outage: 6 s beats the doubled 4 s;
        // at the next, the doubled 8 s beats the outage. Not the first.
        assert_eq!(o.call_failed(at + Duration::from_secs(3)), Some((Duration::from_secs(6), false)));
        assert_eq!(o.call_failed(at + Duration::from_secs(3)), Some((Duration::from_secs(8), false)));
        // Never longer than the cap, however long the outage.
        assert_eq!(o.call_failed(at + Duration::from_secs(600)), Some((Duration::from_secs(60), false)));
        // The answer that ends it holds calls back once more, for at most
        // the cap (the outage is 603 s old).
        let back = o.answered(at + Duration::from_secs(600)).expect("an outage ended");
        assert!(back > Duration::ZERO && back <= Duration::from_secs(60), "{back:?}");
        // Only for the calls tried again later anyway.
        assert_eq!(o.held(at + Duration::from_secs(600)), None);
        assert_eq!(o.held_later(at + Duration::from_secs(600)), Some(back));
        assert_eq!(o.held_later(at + Duration::from_secs(600) + back), None);
        // Then the outage is over: the next answer holds nothing back.
        assert_eq!(o.answered(at + Duration::from_secs(700)), None);

        // With the real schedule each hold is anywhere in [0.5 s, nominal]:
        // after 30 s of outage, in [0.5 s, 30 s] at the first probe.
        let mut lo = Duration::MAX;
        let mut hi = Duration::ZERO;
        for _ in 0..1000 {
            let mut o = Outage::new(OUTAGE_HOLD);
            o.attempt_failed(t);
            let last = o.call_failed(t + Duration::from_secs(30)).map(|(h, _)| h).unwrap_or_default();
            assert!(last >= Duration::from_millis(500) && last <= Duration::from_secs(30), "{last:?}");
            lo = lo.min(last);
            hi = hi.max(last);
        }
        assert!(lo < Duration::from_secs(5) && hi > Duration::from_secs(25), "holds not spread: {lo:?}..{hi:?}");
    }

    /// The first answer after an outage does not let every call go: the
    /// rest wait a random point of a window as long as the outage (capped),
    /// so that a fleet whose probes came back together does not deliver
    /// and poll together.
    #[test]
    fn the_return_from_an_outage_is_spread_over_its_length() {
        let t = Instant::now();
        let ended_after = |outage: Duration| {
            let mut o = Outage::new(OUTAGE_HOLD);
            o.attempt_failed(t);
            o.call_failed(t + outage).expect("an outage");
            let back = o.answered(t + outage).expect("the outage ended");
            assert_eq!(o.held_later(t + outage), Some(back), "calls are held back after the answer");
            assert_eq!(o.held(t + outage), None, "a call nobody makes again is not held back");
            assert_eq!(o.held_later(t + outage + back), None);
            back
        };
        let window = Duration::from_secs(30);
        let backs: Vec<Duration> = (0..1000).map(|_| ended_after(window)).collect();
        assert!(backs.iter().all(|b| *b > Duration::ZERO && *b <= window), "outside (0, 30 s]");
        // Spread over the whole window, not bunched at either end.
        for tenth in 0..10 {
            let (lo, hi) = (window * tenth / 10, window * (tenth + 1) / 10);
            assert!(backs.iter().any(|b| *b > lo && *b <= hi), "nothing in ({lo:?}, {hi:?}]");
        }
        // A long outage: at most the cap.
        assert!((0..100).all(|_| ended_after(Duration::from_secs(3600)) <= OUTAGE_HOLD.max));
    }
}
