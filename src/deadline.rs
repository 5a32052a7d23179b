//! Instants some time after another that cannot overflow: `Instant +
//! Duration` panics past the clock's range, and a duration from a job, the
//! config or the server must never stop the agent that way. A sum out of
//! range is as good as never: a century on.

use std::time::{Duration, Instant};

/// Far enough to mean never, near enough to fit any clock.
const NEVER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `t + d`, or a century after `t` when that is out of range (or `t` itself
/// when even that is, which no real clock reaches).
pub(crate) fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).or_else(|| t.checked_add(NEVER)).unwrap_or(t)
}

/// `d` from now, as [`after`].
pub(crate) fn from_now(d: Duration) -> Instant {
    after(Instant::now(), d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_out_of_range_mean_never() {
        let t = Instant::now();
        assert_eq!(after(t, Duration::from_secs(5)), t + Duration::from_secs(5));
        assert_eq!(after(t, Duration::MAX), t + NEVER);
        assert_eq!(after(t, Duration::from_secs(u64::MAX / 2)), t + NEVER);
        assert!(from_now(Duration::MAX) > t);
    }
}
