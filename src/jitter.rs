//! Random spread for the agent's waits, so that a fleet started together
//! (a lab power cut, a server outage) does not poll, retry and heartbeat in
//! step. Statistical quality hardly matters here; independence between
//! agents does, hence the seed from the pid and the clock. No crate needed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static STATE: AtomicU64 = AtomicU64::new(0);

fn seed() -> u64 {
    #[allow(clippy::cast_possible_truncation)] // a seed: the low 64 bits are the ones that vary
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let s = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    if s == 0 { 1 } else { s }
}

/// A number in [0, 1): xorshift64*, one shared state (the agent has one
/// thread; the atomic only keeps this sound if that changes).
pub(crate) fn unit() -> f64 {
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = seed();
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    STATE.store(x, Ordering::Relaxed);
    (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
}

/// `d` ± 20 %: for waits that should stay close to what was configured
/// (the polling interval, heartbeats, short retries).
pub(crate) fn spread(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * unit())
}

/// "Full jitter" for a backoff: anywhere between `floor` and `d`. After an
/// outage the agents' retries are spread over the whole backoff instead of
/// arriving together at each doubling.
pub(crate) fn full(d: Duration, floor: Duration) -> Duration {
    floor.max(d.mul_f64(unit()))
}

/// A random part of `d`, never zero: the first wait of a periodic request
/// (a phase's cancel checks), so that agents that start it in the same
/// second (after an outage, say) are out of step from the first one on.
pub(crate) fn within(d: Duration) -> Duration {
    d.mul_f64(1.0 - unit())
}

/// `d` shortened by up to 20 %: for deadlines that must not be passed
/// (a heartbeat owed within a day).
pub(crate) fn early(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.2 * unit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_stays_in_bounds_and_varies() {
        let d = Duration::from_secs(10);
        let samples: Vec<Duration> = (0..1000).map(|_| spread(d)).collect();
        assert!(samples.iter().all(|s| *s >= Duration::from_secs(8) && *s <= Duration::from_secs(12)));
        let lo = samples.iter().min().unwrap();
        let hi = samples.iter().max().unwrap();
        assert!(*hi - *lo > Duration::from_secs(3), "{lo:?}..{hi:?}");
        let f: Vec<Duration> = (0..1000).map(|_| full(d, Duration::from_millis(100))).collect();
        assert!(f.iter().all(|s| *s >= Duration::from_millis(100) && *s <= d));
        assert!(f.iter().any(|s| *s < Duration::from_secs(2)) && f.iter().any(|s| *s > Duration::from_secs(8)));
        assert!((0..1000).map(|_| early(d)).all(|s| s >= Duration::from_secs(8) && s <= d));
        let w: Vec<Duration> = (0..1000).map(|_| within(d)).collect();
        assert!(w.iter().all(|s| *s > Duration::ZERO && *s <= d));
        // Spread over the whole period: every tenth of it is drawn.
        for tenth in 0..10 {
            let (lo, hi) = (d * tenth / 10, d * (tenth + 1) / 10);
            assert!(w.iter().any(|s| *s > lo && *s <= hi), "nothing in ({lo:?}, {hi:?}]");
        }
    }
}
