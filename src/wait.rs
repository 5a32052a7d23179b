//! The agent's one waiting place: a deadline and the things that may end
//! or interrupt it, in one `poll(2)`.
//!
//! Wake sources: the signals' self-pipe (a stop or restart request), a
//! [`Source`] that has its own descriptors to serve while the agent waits
//! (the metrics endpoint), and one descriptor the caller waits for (the
//! running phase's output pipe). The agent loop, the runner and the
//! allocation hold all wait here; none of them sleeps on its own.
//!
//! Every wake-up also ticks the systemd watchdog, and the wait never
//! outlasts the watchdog's next due time.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::{notify, signals};

/// Something served while the agent waits: its descriptors join the
/// poll, and it is given a turn after every wake-up. Never blocks.
pub trait Source {
    /// Descriptors to watch, with the events wanted.
    fn fds(&self, out: &mut Vec<libc::pollfd>);
    /// When it must have a turn even if none of its descriptors is ready.
    fn due(&self) -> Option<Instant>;
    /// Does whatever its ready descriptors allow, without waiting.
    fn service(&mut self, now: Instant);
}

/// Which signals end a wait.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Ends {
    /// Any signal's arrival: the caller re-checks its own conditions (the
    /// runner decides what a stop means for the running phase).
    AnySignal,
    /// A stop request (SIGTERM/SIGINT), even one that came earlier.
    Stop,
    /// A stop or a restart request (SIGUSR1): the idle agent can restart.
    StopOrRestart,
}

impl Ends {
    fn now(self) -> bool {
        match self {
            Ends::AnySignal => false,
            Ends::Stop => signals::interrupted(),
            Ends::StopOrRestart => signals::interrupted() || signals::restart_requested(),
        }
    }
}

/// Why a wait ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Woke {
    Deadline,
    Signal,
    /// The caller's descriptor is readable (or closed).
    Ready,
}

/// Waits until `deadline`, serving `source` meanwhile; returns early when
/// `fd` is readable or a signal of `ends` arrives.
pub(crate) fn until(deadline: Instant, mut source: Option<&mut dyn Source>, fd: Option<RawFd>, ends: Ends) -> Woke {
    let mut fds = Vec::new();
    loop {
        let now = Instant::now();
        // Read before the tick, so that the tick has seen any stop it ends on.
        let ended = ends.now();
        notify::tick();
        if let Some(s) = source.as_deref_mut() {
            s.service(now);
        }
        if ended {
            return Woke::Signal;
        }
        if now >= deadline {
            return Woke::Deadline;
        }
        let mut until = deadline;
        if let Some(t) = notify::next_due() {
            until = until.min(t);
        }
        fds.clear();
        let signal_at = signals::wake_fd().map(|s| push(&mut fds, s, libc::POLLIN));
        let fd_at = fd.map(|f| push(&mut fds, f, libc::POLLIN));
        if let Some(s) = source.as_deref() {
            s.fds(&mut fds);
            if let Some(t) = s.due() {
                until = until.min(t);
            }
        }
        // Without the self-pipe (signals not installed) a signal still
        // interrupts poll (no SA_RESTART); the slice bounds the rest.
        if signal_at.is_none() {
            until = until.min(crate::deadline::after(now, Duration::from_millis(100)));
        }
        // Rounded up: a timeout truncated to 0 ms would spin until the deadline.
        let timeout =
            i32::try_from(until.saturating_duration_since(now).as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 {
            // Timeout or EINTR: the checks at the top decide.
            if n < 0 && ends == Ends::AnySignal && signal_at.is_none() {
                return Woke::Signal;
            }
            continue;
        }
        let ready = |at: Option<usize>| at.is_some_and(|i| fds[i].revents != 0);
        if ready(signal_at) {
            signals::drain_wake();
            if ends == Ends::AnySignal {
                return Woke::Signal;
            }
        }
        if ready(fd_at) {
            if let Some(s) = source.as_deref_mut() {
                s.service(Instant::now());
            }
            return Woke::Ready;
        }
    }
}

/// Waits `d`, serving `source`, ending early on a stop request.
pub(crate) fn sleep(d: Duration, source: Option<&mut dyn Source>) {
    until(crate::deadline::from_now(d), source, None, Ends::Stop);
}

fn push(fds: &mut Vec<libc::pollfd>, fd: RawFd, events: libc::c_short) -> usize {
    fds.push(libc::pollfd { fd, events, revents: 0 });
    fds.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    struct Count(u32);

    impl Source for Count {
        fn fds(&self, _: &mut Vec<libc::pollfd>) {}
        fn due(&self) -> Option<Instant> {
            None
        }
        fn service(&mut self, _: Instant) {
            self.0 += 1;
        }
    }

    #[test]
    fn ends_at_the_deadline_serving_the_source() {
        let mut c = Count(0);
        let t = Instant::now();
        assert_eq!(until(t + Duration::from_millis(30), Some(&mut c), None, Ends::Stop), Woke::Deadline);
        assert!(t.elapsed() >= Duration::from_millis(30));
        // Served on waking, not in a spin before the deadline (a timeout
        // truncated to whole milliseconds used to give hundreds of turns).
        assert!((1..10).contains(&c.0), "{} turns", c.0);
    }

    #[test]
    fn a_readable_descriptor_ends_the_wait() {
        let (r, mut w) = std::os::unix::net::UnixStream::pair().expect("pair");
        std::io::Write::write_all(&mut w, b"x").expect("write");
        let t = Instant::now();
        let woke = until(t + Duration::from_secs(10), None, Some(r.as_raw_fd()), Ends::Stop);
        assert_eq!(woke, Woke::Ready);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_signal_that_came_just_before_the_wait_still_ends_it() {
        // The self-pipe is process-wide: a wait in a test running beside
        // this one may drain the byte first (CI saw it). So the check runs
        // alone, in a fresh run of this test binary.
        const ALONE: &str = "TFA_WAIT_SIGNAL_TEST_ALONE";
        const NAME: &str = "wait::tests::a_signal_that_came_just_before_the_wait_still_ends_it";
        if std::env::var_os(ALONE).is_none() {
            // A phase ending in another test reaps every child of this process.
            let _serial = crate::runner::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            let exe = std::env::current_exe().expect("test binary path");
            let out = std::process::Command::new(exe)
                .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
                .env(ALONE, "1")
                .output()
                .expect("run the test binary");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
            // The child really ran it (an unknown name would pass with 0 tests).
            assert!(text.contains("1 passed"), "{text}");
            return;
        }
        // SIGUSR1 (a restart request) marks only a flag no other unit test reads.
        signals::install();
        // SAFETY: raise(3) with a signal whose handler was just installed.
        unsafe { libc::raise(libc::SIGUSR1) };
        let t = Instant::now();
        assert_eq!(until(t + Duration::from_secs(10), None, None, Ends::AnySignal), Woke::Signal);
        assert!(t.elapsed() < Duration::from_secs(5));
        // The flag stays: a wait that ends on restarts ends at once, again.
        assert_eq!(until(Instant::now() + Duration::from_secs(10), None, None, Ends::StopOrRestart), Woke::Signal);
    }
}
