//! The live-output budget of one log: a token bucket. Each fragment sent
//! while the phase runs takes a token; a token comes back every
//! `output_interval`, up to [`CAPACITY`]. Output whose rate fits the
//! budget (a line now and then, a start line followed by the first real
//! line) goes at once; a chatty phase is held to one fragment per
//! interval in the long run, plus the burst.
//!
//! The clock is passed in, so the rule is tested without waiting.

use std::time::{Duration, Instant};

/// Fragments that may go back to back after a quiet spell: the agent's
/// banner or a connector's start line, then the phase's first lines, each
/// at once. Over any span of N intervals a log costs at most N + CAPACITY
/// fragments, against N + 1 for the fixed spacing this replaces.
pub(crate) const CAPACITY: u32 = 3;

pub(crate) struct Bucket {
    interval: Duration,
    tokens: u32,
    /// When `tokens` was counted; the next token comes one interval after
    /// it (meaningless while the bucket is full).
    counted: Instant,
}

impl Bucket {
    /// A full bucket: a phase's first output goes at once.
    pub(crate) fn new(interval: Duration, now: Instant) -> Bucket {
        Bucket { interval, tokens: CAPACITY, counted: now }
    }

    /// Tokens at `now`, and the instant they were counted at.
    fn at(&self, now: Instant) -> (u32, Instant) {
        if self.tokens >= CAPACITY || self.interval.is_zero() {
            return (CAPACITY, now);
        }
        let elapsed = now.saturating_duration_since(self.counted);
        // A whole number of intervals, capped: the count never overflows,
        // however long the quiet spell (the interval is at least 1 ns here).
        let refills =
            u32::try_from(elapsed.as_nanos() / self.interval.as_nanos()).map_or(CAPACITY, |n| n.min(CAPACITY));
        let tokens = (self.tokens + refills).min(CAPACITY);
        if tokens >= CAPACITY {
            return (CAPACITY, now);
        }
        // Partial progress towards the next token is kept.
        (tokens, crate::deadline::after(self.counted, self.interval * refills))
    }

    /// The earliest instant a fragment may go: in the past while a token
    /// is there, else when the next one comes.
    pub(crate) fn ready(&self) -> Instant {
        if self.tokens > 0 || self.interval.is_zero() {
            self.counted
        } else {
            crate::deadline::after(self.counted, self.interval)
        }
    }

    /// Takes a token for a fragment going at `now`; false (and nothing
    /// taken) when there is none.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let (tokens, counted) = self.at(now);
        if tokens == 0 {
            return false;
        }
        // Counting from a full bucket starts now: a token refills one
        // interval after the first one is spent.
        self.counted = counted;
        self.tokens = tokens - 1;
        true
    }
}

#[cfg(test)]
mod tests;
