//! The metrics endpoint's sockets: a non-blocking listener and at most a
//! few connections, each with a small request buffer and deadlines.
//!
//! A slow client (silent, or trickling its request a byte at a time) holds
//! a place for `HEAD_DEADLINE` at most, and a newcomer takes the place of
//! the oldest such client when all are taken; a new connection is read the
//! moment it is accepted, so a scraper whose request is already there is
//! answered before any other newcomer could push it out.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A client gets this long, from connect, to send its request head (a
/// scraper sends ~200 bytes at once).
const HEAD_DEADLINE: Duration = Duration::from_secs(1);
/// And this long from connect to the last byte of the answer.
const CONN_DEADLINE: Duration = Duration::from_secs(2);
/// A request head larger than this is refused (a scrape needs ~200 bytes).
pub(super) const MAX_HEAD: usize = 4096;
/// Open connections beyond this evict one, so a flood of idle sockets
/// costs a bounded amount of memory and work per wake.
pub(super) const MAX_CONNS: usize = 16;
/// New connections taken per wake; the rest wait in the kernel's backlog.
const ACCEPTS_PER_WAKE: usize = 16;

pub(super) struct Endpoint {
    pub(super) listener: TcpListener,
    pub(super) conns: Vec<Conn>,
}

impl Endpoint {
    /// Moves every exchange on, then takes newcomers; never waits.
    pub(super) fn service(&mut self, now: Instant, body: &mut dyn FnMut() -> Vec<u8>) {
        // Those already open first: one accepted at the last wake is
        // answered before newcomers can take its place.
        self.conns.retain_mut(|c| c.progress(now, &mut *body));
        for _ in 0..ACCEPTS_PER_WAKE {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let mut conn = Conn { stream, head: Vec::new(), out: None, accepted: now };
                    if !conn.progress(now, &mut *body) {
                        continue; // answered at once, or gone
                    }
                    if self.conns.len() >= MAX_CONNS {
                        self.evict();
                    }
                    self.conns.push(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ECONNABORTED, EMFILE...: logged, retried at the next wake.
                Err(e) => {
                    log::debug!("metrics: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Drops the oldest connection still sending its request (the slowest
    /// of them, as all had the same deadline), else the oldest of all.
    fn evict(&mut self) {
        let at = self.conns.iter().position(|c| c.out.is_none()).unwrap_or(0);
        self.conns.remove(at);
    }
}

pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) head: Vec<u8>,
    /// The answer and how much of it was written.
    pub(super) out: Option<(Vec<u8>, usize)>,
    accepted: Instant,
}

impl Conn {
    /// When the connection is dropped, ready or not.
    pub(super) fn deadline(&self) -> Instant {
        crate::deadline::after(self.accepted, if self.out.is_none() { HEAD_DEADLINE } else { CONN_DEADLINE })
    }

    /// Moves the exchange on without blocking; false when it is over.
    pub(super) fn progress(&mut self, now: Instant, body: &mut dyn FnMut() -> Vec<u8>) -> bool {
        if now >= self.deadline() {
            return false;
        }
        if self.out.is_none() {
            let mut buf = [0u8; 512];
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => {
                        self.head.extend_from_slice(&buf[..n]);
                        if let Some(answer) = self.answer(body) {
                            self.out = Some((answer, 0));
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
            }
        }
        let Some((data, sent)) = &mut self.out else { return true };
        while *sent < data.len() {
            match self.stream.write(&data[*sent..]) {
                Ok(0) => return false,
                Ok(n) => *sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        false
    }

    /// The answer once the request head is complete (or too big).
    fn answer(&self, body: &mut dyn FnMut() -> Vec<u8>) -> Option<Vec<u8>> {
        let complete = find(&self.head, b"\r\n\r\n").or_else(|| find(&self.head, b"\n\n"));
        if complete.is_none() && self.head.len() < MAX_HEAD {
            return None;
        }
        if complete.is_none() {
            return Some(response("431 Request Header Fields Too Large", b"request head too large\n", true));
        }
        let method = self.head.split(|b| *b == b' ').next().unwrap_or_default();
        Some(match method {
            b"GET" => response("200 OK", &body(), true),
            b"HEAD" => response("200 OK", &body(), false),
            _ => response("405 Method Not Allowed", b"only GET and HEAD\n", true),
        })
    }
}

fn response(status: &str, body: &[u8], with_body: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        r.extend_from_slice(body);
    }
    r
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
