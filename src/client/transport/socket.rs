//! The socket of one call, its waits cut into ticks.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::super::budget::{Budget, Cut, stop_error};
use super::Idle;

fn timed_out(budget: &Budget, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what}: timed out after {} (the call's deadline)", crate::human::duration(budget.elapsed())),
    )
}

/// Ends the wait when the call must end (stop or deadline).
pub(super) fn check(budget: &Budget, what: &str) -> io::Result<()> {
    match budget.check() {
        Some(Cut::Stop) => Err(stop_error(what)),
        Some(Cut::Deadline) => Err(timed_out(budget, what)),
        None => Ok(()),
    }
}

/// The socket of one call: every blocking call is cut into ticks, between
/// which the caller's [`Idle`] work is done and the stop and the call's
/// deadline are looked at; `budget.timeout` bounds each wait for progress.
pub(super) struct Socket<'a, 'b> {
    pub(super) tcp: TcpStream,
    /// Bytes the kernel took from us and gave us on this call: a failure
    /// with none written, or none received, says how far the request got.
    pub(super) written: u64,
    pub(super) received: u64,
    pub(super) idle: Option<&'a mut Idle<'b>>,
    pub(super) budget: Budget,
    pub(super) tick: Duration,
    /// The socket timeout set now, to set it only when it changes.
    pub(super) wait: Option<Duration>,
    /// Plain HTTP: the socket turning readable while the request still
    /// goes out means the server answers early (a 413 before the body).
    pub(super) watch_early: bool,
    /// The whole request went out: the server may have acted on it.
    pub(super) sent: bool,
}

impl Socket<'_, '_> {
    fn io(&mut self, what: &str, mut op: impl FnMut(&mut TcpStream) -> io::Result<usize>) -> io::Result<usize> {
        loop {
            if let Some(idle) = self.idle.as_deref_mut() {
                idle();
            }
            check(&self.budget, what)?;
            let wait = self.budget.tick(self.tick);
            if self.wait != Some(wait) {
                self.tcp.set_read_timeout(Some(wait))?;
                self.tcp.set_write_timeout(Some(wait))?;
                self.wait = Some(wait);
            }
            match op(&mut self.tcp) {
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if self.budget.stalled() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("{what}: no answer within {}", crate::human::duration(self.budget.timeout)),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(n) => {
                    self.budget.progress(n);
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the server has sent something (an answer, or its close).
    fn readable(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd { fd: self.tcp.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }
}

impl Socket<'_, '_> {
    /// Whether what the server sent so far is (the start of) an interim
    /// answer (`HTTP/1.1 100 Continue`, unasked for): not an early final
    /// answer, so the body goes on; the head reader skips it after.
    fn interim_waiting(&self) -> bool {
        let mut b = [0u8; 10];
        let n = self.tcp.peek(&mut b).unwrap_or(0);
        n > 0
            && b[..n]
                .iter()
                .zip(b"HTTP/1.x 1")
                .all(|(got, want)| got == want || (*want == b'x' && got.is_ascii_digit()))
    }
}

impl Read for Socket<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.io("reading the answer", |t| t.read(buf))?;
        self.received += n as u64;
        Ok(n)
    }
}

impl Write for Socket<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.watch_early && !self.sent && self.readable() && !self.interim_waiting() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server answered or closed before the request was sent",
            ));
        }
        let n = self.io("sending the request", |t| t.write(buf))?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// A connection, plain or TLS, that can note the request went out.
pub(super) trait Conn: Read + Write {
    fn mark_sent(&mut self);
}

impl Conn for Socket<'_, '_> {
    fn mark_sent(&mut self) {
        self.sent = true;
    }
}

#[cfg(feature = "tls")]
impl Conn for rustls::Stream<'_, rustls::ClientConnection, Socket<'_, '_>> {
    fn mark_sent(&mut self) {
        self.sock.sent = true;
    }
}
