//! The connection kept alive between calls, and the rule for sending a
//! request again on a new connection after the kept one failed.
//!
//! One connection is kept, for the origin (scheme, host, port, and the
//! proxy it goes through) of the last call: an agent talks to one server,
//! so one slot is all it needs; a call to another origin closes it. It is
//! kept only after an answer read to the end its framing announced, on
//! HTTP/1.1 without `Connection: close`, and with nothing more from the
//! server waiting behind the answer. It is not reused after [`IDLE`]
//! without a call (nor after the server's own `Keep-Alive: timeout`, less
//! a second), nor when the server has closed it or sent something
//! unasked while it idled (looked at without waiting, before any byte of
//! the next request is written).
//!
//! A request that failed on a reused connection is sent again on a new
//! one, within the same call and its deadline, only when it cannot be
//! stored twice: no byte of it had been written (the server cannot have
//! it), or it is a GET (idempotent) and no byte of an answer had come.
//! A POST that had gone out is never sent again here, whatever its kind:
//! the server stores a repeated log fragment as a second fragment (its
//! `fragment_number` is not a unique key), so a fragment number does not
//! make a replay harmless. Such a failure is the caller's, as any call
//! without an answer (README, *Delivery guarantees*).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::super::budget::is_stop;
use super::super::proxy::Proxy;
use super::super::wire::{Head, Url};
use super::Failure;

/// How long a kept connection may idle: below the keep-alive timeouts of
/// the servers and front ends a Testflinger server sits behind (nginx and
/// the Kubernetes nginx ingress 75 s, AWS load balancers 60 s, Traefik
/// 180 s), so that the server never closes it under a request on its way,
/// and above the 10 s polling interval, so that an idle agent keeps one
/// connection. The upstream server itself (gunicorn's default sync
/// workers) closes every connection after its answer: each call then
/// opens one, as before. Servers with shorter timeouts (gunicorn's async
/// workers 2 s, Apache 5 s) close it first: the close is seen before the
/// next request and a new connection is opened.
pub(super) const IDLE: Duration = Duration::from_secs(30);

/// What runs over the kept TCP connection.
pub(super) enum Link {
    Plain,
    #[cfg(feature = "tls")]
    Tls(Box<rustls::ClientConnection>),
}

pub(super) struct Kept {
    key: String,
    pub(super) tcp: TcpStream,
    pub(super) link: Link,
    last_used: Instant,
    idle_limit: Duration,
}

/// The one slot (see the module's comment).
#[derive(Default)]
pub(super) struct Slot {
    kept: std::cell::RefCell<Option<Kept>>,
}

/// Which requests may share a connection.
pub(super) fn key(url: &Url, proxy: Option<&Proxy>) -> String {
    match proxy {
        Some(p) => format!("{}://{} via {}:{}", url.scheme(), url.authority(), p.host, p.port),
        None => format!("{}://{}", url.scheme(), url.authority()),
    }
}

impl Slot {
    /// The kept connection for `key`, if it may carry the next request.
    pub(super) fn take(&self, key: &str) -> Option<Kept> {
        let kept = self.kept.borrow_mut().take()?;
        let idle = kept.last_used.elapsed();
        if kept.key != key {
            log::debug!("closing the kept connection to {}: the next call goes to {key}", kept.key);
            return None;
        }
        if idle >= kept.idle_limit {
            log::debug!("closing the connection to {key}: idle for {}", crate::human::duration(idle));
            return None;
        }
        if !still_open(&kept.tcp) {
            log::debug!(
                "the server closed the kept connection to {key} after {} idle; opening a new one",
                crate::human::duration(idle)
            );
            return None;
        }
        Some(kept)
    }

    /// Keeps the connection after an answer that allows it.
    pub(super) fn put(&self, key: String, tcp: TcpStream, link: Link, head: &Head) {
        let Some(idle_limit) = idle_limit(head.keep_alive) else { return };
        *self.kept.borrow_mut() = Some(Kept { key, tcp, link, last_used: Instant::now(), idle_limit });
    }

    /// Closes the kept connection if it would idle past its limit within
    /// `wait` (the agent is about to wait that long without a call), so
    /// that the close is ours, at a moment no request is on its way.
    pub(super) fn close_if_idle_within(&self, wait: Duration) {
        let mut slot = self.kept.borrow_mut();
        if slot.as_ref().is_some_and(|k| k.last_used.elapsed().saturating_add(wait) >= k.idle_limit) {
            slot.take();
        }
    }
}

/// Our idle limit, shortened to a second less than the server's own
/// (`Keep-Alive: timeout=N`, when it says one); `None`: not worth keeping.
fn idle_limit(server: Option<u64>) -> Option<Duration> {
    let limit = match server {
        Some(secs) => Duration::from_secs(secs).saturating_sub(Duration::from_secs(1)).min(IDLE),
        None => IDLE,
    };
    (!limit.is_zero()).then_some(limit)
}

/// Whether the peer has neither closed the connection nor sent anything:
/// `poll` without waiting, then a peek of one byte when it is readable (a
/// zero-byte read is the server's close; a byte is an answer nobody asked
/// for, which would be taken for the next one).
fn still_open(tcp: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n == 0 {
        return true;
    }
    if n < 0 || pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        return false;
    }
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer that lives across the call.
    let r = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

/// Whether a request that failed on a reused connection may go again on a
/// new one (the rule in the module's comment). A timeout or the agent's
/// stop ends the call as on any connection.
pub(super) fn may_resend(failure: &Failure, method: &str, written: u64, received: u64) -> bool {
    let Failure::Net(e) = failure else { return false };
    if is_stop(e) || e.kind() == std::io::ErrorKind::TimedOut {
        return false;
    }
    written == 0 || (matches!(method, "GET" | "HEAD") && received == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_limit_stays_below_the_servers() {
        assert_eq!(idle_limit(None), Some(IDLE));
        assert_eq!(idle_limit(Some(5)), Some(Duration::from_secs(4)));
        assert_eq!(idle_limit(Some(600)), Some(IDLE));
        assert_eq!(idle_limit(Some(1)), None);
    }

    #[test]
    fn only_a_request_that_cannot_be_stored_twice_is_sent_again() {
        let reset = || Failure::Net(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        // Nothing written: the server cannot have it, whatever the method.
        assert!(may_resend(&reset(), "POST", 0, 0));
        // A POST that went out: never, even without a byte of answer.
        assert!(!may_resend(&reset(), "POST", 120, 0));
        // A GET that went out and got nothing back: idempotent.
        assert!(may_resend(&reset(), "GET", 120, 0));
        // Part of an answer came: the server had it; the caller decides.
        assert!(!may_resend(&reset(), "GET", 120, 10));
        let timeout = Failure::Net(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(!may_resend(&timeout, "GET", 0, 0));
        assert!(!may_resend(&Failure::Stopped { request_sent: false }, "GET", 0, 0));
    }

    #[test]
    fn a_closed_or_chatty_peer_is_not_reused() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let quiet = TcpStream::connect(addr).unwrap();
        let (_quiet_server, _) = listener.accept().unwrap();
        assert!(still_open(&quiet));
        let closed = TcpStream::connect(addr).unwrap();
        drop(listener.accept().unwrap());
        let chatty = TcpStream::connect(addr).unwrap();
        let (mut chatty_server, _) = listener.accept().unwrap();
        chatty_server.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        // The close and the byte arrive without our asking: poll until seen.
        let deadline = Instant::now() + Duration::from_secs(10);
        while (still_open(&closed) || still_open(&chatty)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!still_open(&closed));
        assert!(!still_open(&chatty));
        assert!(still_open(&quiet));
    }
}
