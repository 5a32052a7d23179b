use super::*;

const I: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn a_full_bucket_sends_the_burst_at_once_then_waits_an_interval() {
    let t0 = Instant::now();
    let mut b = Bucket::new(I, t0);
    for _ in 0..CAPACITY {
        assert!(b.ready() <= t0);
        assert!(b.take(t0));
    }
    assert!(!b.take(t0), "no fourth fragment at once");
    assert_eq!(b.ready(), t0 + I, "the next token one interval after the first was spent");
    assert!(!b.take(t0 + ms(999)));
    assert!(b.take(t0 + I));
    assert_eq!(b.ready(), t0 + 2 * I);
}

#[test]
fn a_start_line_then_the_first_real_line_both_go_at_once() {
    let t0 = Instant::now();
    let mut b = Bucket::new(I, t0);
    assert!(b.take(t0), "the banner");
    assert!(b.ready() <= t0 + ms(5), "the connector's first line, 5 ms later");
    assert!(b.take(t0 + ms(5)));
}

#[test]
fn a_line_every_interval_or_slower_never_waits() {
    for period in [I, 3 * I, ms(1500)] {
        let t0 = Instant::now();
        let mut b = Bucket::new(I, t0);
        for k in 0..200u32 {
            let t = t0 + period * k;
            assert!(b.ready() <= t, "line {k} every {period:?}");
            assert!(b.take(t));
        }
    }
}

/// A line every 0.9 s gains 0.1 s a line on the budget: the burst covers
/// the first lines, after which lines written while no token is there go
/// together, the oldest having waited at most an interval.
#[test]
fn lines_slightly_faster_than_the_interval_wait_only_once_the_burst_is_spent() {
    let t0 = Instant::now();
    let mut b = Bucket::new(I, t0);
    let (mut t, mut next_line, mut lines) = (t0, t0, 0u32);
    // The oldest line not yet sent, and its number.
    let mut oldest: Option<(Instant, u32)> = None;
    let mut first_wait = None;
    let mut max_wait = Duration::ZERO;
    while t <= t0 + Duration::from_secs(100) {
        if t == next_line {
            oldest.get_or_insert((t, lines));
            lines += 1;
            next_line += ms(900);
        }
        if let Some((at, k)) = oldest {
            if b.ready() <= t {
                assert!(b.take(t));
                if t > at {
                    first_wait.get_or_insert(k);
                }
                max_wait = max_wait.max(t - at);
                oldest = None;
            }
        }
        t = match oldest {
            Some(_) => b.ready().min(next_line),
            None => next_line,
        };
    }
    assert!(max_wait <= I, "a line waited {max_wait:?}");
    let first_wait = first_wait.expect("a rate over the budget is held back");
    assert!(first_wait >= 10, "line {first_wait} waited: the burst is spent later than that");
}

/// Greedy sending (a fragment whenever a token is there) over N intervals
/// sends at most N + CAPACITY fragments, and at least N.
#[test]
fn chatty_output_is_held_to_one_fragment_per_interval_plus_the_burst() {
    let t0 = Instant::now();
    let mut b = Bucket::new(I, t0);
    let step = ms(10);
    for n in [1u32, 10, 60, 600] {
        let mut b2 = Bucket::new(I, t0);
        let mut sent = 0;
        let mut t = t0;
        while t <= t0 + I * n {
            if b2.take(t) {
                sent += 1;
            }
            t += step;
        }
        assert!(sent <= n + CAPACITY && sent >= n, "{sent} fragments over {n} intervals");
    }
    // A wake at `ready` always finds a token.
    let mut t = t0;
    for _ in 0..50 {
        t = b.ready().max(t);
        assert!(b.take(t));
    }
    assert_eq!(t, t0 + I * (50 - CAPACITY));
}

#[test]
fn tokens_come_back_one_per_interval_up_to_the_capacity() {
    let t0 = Instant::now();
    let mut b = Bucket::new(I, t0);
    for _ in 0..CAPACITY {
        assert!(b.take(t0));
    }
    // 2.5 intervals later: two tokens, the half interval kept towards the third.
    let t = t0 + ms(2500);
    assert!(b.take(t) && b.take(t));
    assert!(!b.take(t));
    assert_eq!(b.ready(), t0 + 3 * I);
    // A long quiet spell refills no more than the capacity.
    let later = t0 + Duration::from_secs(86400 * 365);
    for _ in 0..CAPACITY {
        assert!(b.take(later));
    }
    assert!(!b.take(later));
}

#[test]
fn a_zero_interval_never_holds_output() {
    let t0 = Instant::now();
    let mut b = Bucket::new(Duration::ZERO, t0);
    for _ in 0..1000 {
        assert!(b.take(t0));
    }
    assert!(b.ready() <= t0);
}
