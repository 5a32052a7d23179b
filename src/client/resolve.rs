//! Host names to addresses, within a call's deadline.
//!
//! `getaddrinfo(3)` blocks and takes no timeout (resolv.conf's own can add
//! up to minutes, and NSS modules may hang), so a name is looked up on a
//! helper thread that does nothing else; the call waits for its answer in
//! ticks, checking the stop and its deadline. A lookup given up on is left
//! to finish on its own (its answer is dropped); while [`MAX_HANGING`] of
//! them still hang, no new one is started. IP literals and `localhost`
//! need no lookup and get no thread.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::budget::{Budget, Cut, stop_error};

/// Lookups still running on their threads, given up on or not.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// Lookups that may hang at once before names fail without a new thread.
const MAX_HANGING: usize = 4;

/// Addresses that need no lookup: an IP literal, or `localhost`.
pub(crate) fn literal(host: &str, port: u16) -> Option<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(vec![SocketAddr::new(ip, port)]);
    }
    host.eq_ignore_ascii_case("localhost").then(|| {
        vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port), SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)]
    })
}

/// The addresses of `host`, looked up within the call's budget; `idle`
/// runs every `tick` meanwhile.
pub(crate) fn resolve(
    host: &str,
    port: u16,
    budget: &Budget,
    tick: Duration,
    idle: &mut dyn FnMut(),
) -> io::Result<Vec<SocketAddr>> {
    if let Some(addrs) = literal(host, port) {
        return Ok(addrs);
    }
    if RUNNING.load(Ordering::SeqCst) >= MAX_HANGING {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("looking up {host}: {MAX_HANGING} earlier lookups still hang"),
        ));
    }
    let (tx, rx) = mpsc::channel();
    let name = host.to_string();
    RUNNING.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new().name("resolve".into()).spawn(move || {
        block_signals();
        test_delay();
        let r = (name.as_str(), port).to_socket_addrs().map(Iterator::collect::<Vec<_>>);
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        // The caller may have given up and gone: nobody to tell.
        let _ = tx.send(r);
    });
    if let Err(e) = spawned {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        return Err(io::Error::new(e.kind(), format!("looking up {host}: no thread for the lookup: {e}")));
    }
    loop {
        idle();
        match budget.check() {
            Some(Cut::Stop) => return Err(stop_error(&format!("looking up {host}"))),
            Some(Cut::Deadline) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "looking up {host}: timed out after {} (the call's deadline)",
                        crate::human::duration(budget.elapsed())
                    ),
                ));
            }
            None => {}
        }
        match rx.recv_timeout(budget.tick(tick)) {
            Ok(r) => return r.map_err(|e| io::Error::new(e.kind(), format!("looking up {host}: {e}"))),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other(format!("looking up {host}: the lookup thread ended without an answer")));
            }
        }
    }
}

/// The agent's signals go to its main thread, whose blocking calls they
/// interrupt (the rest of the agent is written for one thread).
fn block_signals() {
    // SAFETY: a sigset built with sigemptyset/sigaddset, applied to this
    // thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Tests only (debug builds): `TESTFLINGER_AGENT_TEST_LOOKUP_DELAY=SECONDS`
/// makes every lookup hang that long first, as a dead name server does.
fn test_delay() {
    if cfg!(debug_assertions) {
        if let Some(s) = std::env::var("TESTFLINGER_AGENT_TEST_LOOKUP_DELAY").ok().and_then(|s| s.parse::<f64>().ok()) {
            if s.is_finite() && s > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(s.min(3600.0)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_localhost_need_no_lookup() {
        assert_eq!(literal("10.1.2.3", 80), Some(vec!["10.1.2.3:80".parse().unwrap()]));
        assert_eq!(literal("::1", 8), Some(vec!["[::1]:8".parse().unwrap()]));
        assert_eq!(literal("LocalHost", 1).map(|a| a.len()), Some(2));
        assert_eq!(literal("tf.example", 1), None);
    }
}
