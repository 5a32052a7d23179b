//! HTTP/1.1 as bytes: URLs (`url.rs`), the request head we write, and the answer we
//! read (status line, headers, a body framed by Content-Length, chunks or
//! the end of the connection).
//!
//! Everything here reads from a server that may be broken or hostile (plain
//! HTTP lets anyone on the path answer). So every length that comes from
//! the network is parsed strictly and used only through checked arithmetic,
//! no buffer is ever sized from it, and lines and heads are capped. A bad
//! answer is an `io::Error`, never a panic. Pure over `Read`/`BufRead`, so
//! the fuzz target (`fuzz/fuzz_targets/answer.rs`) drives it on bytes.

use std::io::{self, BufRead, BufReader, Read};

/// Cap on the status line plus headers of one answer.
pub const MAX_HEAD: u64 = 64 * 1024;
/// Cap on the number of header lines of one answer.
const MAX_HEADERS: usize = 200;
/// Cap on a chunk-size line (with extensions).
const MAX_CHUNK_LINE: u64 = 1024;
/// Interim answers (100 Continue...) skipped before giving up.
const MAX_INTERIM: usize = 8;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The request head: `target` is the path (or the absolute URL through a
/// proxy). Every header value must be visible ASCII (spaces and tabs
/// inside allowed), every name visible ASCII without a colon: a line
/// break would let a value inject headers of its own, and any other
/// control or non-ASCII byte is something a server may read differently
/// from us. Checked here, where every request is written.
pub fn request_head(method: &str, target: &str, host: &str, headers: &[(String, String)]) -> io::Result<Vec<u8>> {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: testflinger-agent-rs/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in headers {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("header name {:?} is not visible ASCII", cut(k)),
            ));
        }
        if !is_header_value(v) {
            // The value is not quoted: it may be a token.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the {k} header holds a byte that is not visible ASCII"),
            ));
        }
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Ok(head.into_bytes())
}

/// Visible ASCII with spaces or tabs inside, none at either end (a value
/// is trimmed when read, so those would not be the value sent).
fn is_header_value(v: &str) -> bool {
    v.bytes().all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t') && v.trim_matches([' ', '\t']).len() == v.len()
}

/// How the answer's body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (204, 304, or the answer to HEAD/CONNECT).
    Empty,
    Length(u64),
    Chunked,
    /// Until the server closes (the connection cannot be kept).
    UntilClose,
}

/// The answer's status line and the headers the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    pub location: Option<String>,
    /// The server ends the connection after this answer: `Connection:
    /// close`, or HTTP/1.0 (whose keep-alive we never ask for).
    pub close: bool,
    /// `Keep-Alive: timeout=N`: how long the server keeps an idle connection.
    pub keep_alive: Option<u64>,
}

/// One line of at most `cap` bytes, with its line break; an error when the
/// stream ends first or the line is longer.
fn read_line<R: BufRead>(r: &mut R, cap: u64, what: &str) -> io::Result<String> {
    let mut buf = Vec::new();
    r.take(cap).read_until(b'\n', &mut buf)?;
    if buf.last() != Some(&b'\n') {
        return Err(if (buf.len() as u64) < cap {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("answer cut off inside its {what}"))
        } else {
            io::Error::new(io::ErrorKind::InvalidData, LineTooLong(format!("{what} longer than {cap} bytes")))
        });
    }
    // Header values are ASCII in practice; a stray byte must not fail the answer.
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Reads the head of an answer, skipping interim 1xx answers. `no_body`:
/// the request was HEAD or CONNECT, whose answers have no body.
pub fn read_head<R: BufRead>(r: &mut R, no_body: bool) -> io::Result<Head> {
    let mut budget = MAX_HEAD;
    for _ in 0..MAX_INTERIM {
        let head = read_one_head(r, &mut budget, no_body)?;
        // 101 would switch protocols, which we never ask for: an error below.
        if (100..200).contains(&head.status) && head.status != 101 {
            continue;
        }
        if head.status == 101 {
            return Err(invalid("unasked-for protocol switch (HTTP 101)"));
        }
        return Ok(head);
    }
    Err(invalid("too many interim (1xx) answers"))
}

fn read_one_head<R: BufRead>(r: &mut R, budget: &mut u64, no_body: bool) -> io::Result<Head> {
    let mut take_line = |r: &mut R, what: &str| -> io::Result<String> {
        // The cap on the whole head, not what was left of it for this line.
        let line = read_line(r, *budget, what).map_err(|e| over_cap(e, "status line and headers"))?;
        *budget = budget.saturating_sub(line.len() as u64);
        Ok(line)
    };
    let line = take_line(r, "status line")?;
    let status_line = line.trim_end_matches(['\r', '\n']);
    let status = parse_status_line(status_line)?;
    let mut close = status_line.starts_with("HTTP/1.0");
    let mut keep_alive = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut location = None;
    for _ in 0..=MAX_HEADERS {
        let line = take_line(r, "headers")?;
        let text = line.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            let framing = if no_body || status == 204 || status == 304 || (100..200).contains(&status) {
                Framing::Empty
            } else if chunked {
                // Chunked wins over a Content-Length sent along with it (RFC 9112 6.3).
                Framing::Chunked
            } else if encoded {
                Framing::UntilClose
            } else {
                length.map_or(Framing::UntilClose, Framing::Length)
            };
            return Ok(Head { status, framing, location, close, keep_alive });
        }
        let Some((name, value)) = text.split_once(':') else {
            return Err(invalid(format!("bad header line {:?}", cut(text))));
        };
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(value)?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("two different Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            // Chunked counts only as the last coding applied.
            chunked = value.rsplit(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("location") {
            location = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("connection") {
            close |= value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        } else if name.eq_ignore_ascii_case("keep-alive") {
            keep_alive = value.split(',').find_map(|p| {
                let (k, v) = p.split_once('=')?;
                if k.trim().eq_ignore_ascii_case("timeout") { v.trim().parse().ok() } else { None }
            });
        }
    }
    Err(invalid(format!("more than {MAX_HEADERS} header lines")))
}

/// A line over its cap (told apart from the stream's own errors, which
/// may be of the same kind).
#[derive(Debug)]
struct LineTooLong(String);

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LineTooLong {}

/// A line over what was left of the [`MAX_HEAD`] budget, said as over
/// the cap itself.
fn over_cap(e: io::Error, what: &str) -> io::Error {
    if e.get_ref().is_some_and(|inner| inner.is::<LineTooLong>()) {
        invalid(format!("answer's {what} longer than {MAX_HEAD} bytes in all"))
    } else {
        e
    }
}

/// At most 80 characters of a bad line, for an error message.
fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

fn parse_status_line(line: &str) -> io::Result<u16> {
    let bad = || invalid(format!("bad status line {:?}", cut(line)));
    let rest = line.strip_prefix("HTTP/1.").ok_or_else(bad)?;
    let mut parts = rest.splitn(3, ' ');
    let _minor = parts.next().filter(|m| m.len() == 1 && m.bytes().all(|b| b.is_ascii_digit())).ok_or_else(bad)?;
    let code = parts.next().filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit())).ok_or_else(bad)?;
    let status: u16 = code.parse().map_err(|_| bad())?;
    if (100..=599).contains(&status) { Ok(status) } else { Err(bad()) }
}

/// Digits only (no sign, no spaces inside), within u64.
fn parse_length(value: &str) -> io::Result<u64> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("bad Content-Length {:?}", cut(value))));
    }
    value.parse().map_err(|_| invalid(format!("bad Content-Length {:?}", cut(value))))
}

/// A chunk-size line: hex digits (at most 16: within u64), then optional
/// extensions after `;`.
fn parse_chunk_size(line: &str) -> io::Result<u64> {
    let size = line.trim_end_matches(['\r', '\n']).split(';').next().unwrap_or("").trim_matches([' ', '\t']);
    if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!("bad chunk size {:?}", cut(line.trim()))));
    }
    u64::from_str_radix(size, 16).map_err(|_| invalid(format!("bad chunk size {:?}", cut(size))))
}

#[derive(Debug)]
enum State {
    Length { left: u64 },
    ChunkSize,
    ChunkData { left: u64 },
    ChunkEnd,
    UntilClose,
    Done,
}

/// The decoded body of an answer, as a `Read`. Ends with `Ok(0)` only where
/// the framing says the body ends; a connection closed before that is an
/// `UnexpectedEof` error, so a cut-off answer never passes for a whole one.
pub struct BodyReader<R> {
    inner: R,
    state: State,
}

impl<R: BufRead> BodyReader<R> {
    pub fn new(inner: R, framing: Framing) -> BodyReader<R> {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(left) => State::Length { left },
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        BodyReader { inner, state }
    }

    /// Whether the body was read to the end its framing announced (so the
    /// connection is at the start of the next answer).
    pub fn finished(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn data(&mut self, buf: &mut [u8], left: u64) -> io::Result<usize> {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("answer cut off with {left} bytes of the body missing"),
            ));
        }
        Ok(n)
    }
}

impl<R: BufRead> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::UntilClose => return self.inner.read(buf),
                State::Length { left } => {
                    let n = self.data(buf, left)?;
                    // n <= left by construction; checked all the same.
                    let left = left.checked_sub(n as u64).ok_or_else(|| invalid("read past the body"))?;
                    self.state = if left == 0 { State::Done } else { State::Length { left } };
                    return Ok(n);
                }
                State::ChunkData { left } => {
                    let n = self.data(buf, left)?;
                    let left = left.checked_sub(n as u64).ok_or_else(|| invalid("read past the chunk"))?;
                    self.state = if left == 0 { State::ChunkEnd } else { State::ChunkData { left } };
                    return Ok(n);
                }
                State::ChunkSize => {
                    let line = read_line(&mut self.inner, MAX_CHUNK_LINE, "chunk size")?;
                    let size = parse_chunk_size(&line)?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        let mut budget = MAX_HEAD;
                        loop {
                            let line =
                                read_line(&mut self.inner, budget, "trailers").map_err(|e| over_cap(e, "trailers"))?;
                            budget = budget.saturating_sub(line.len() as u64);
                            if line.trim_end_matches(['\r', '\n']).is_empty() {
                                break;
                            }
                        }
                        self.state = State::Done;
                    } else {
                        self.state = State::ChunkData { left: size };
                    }
                }
                State::ChunkEnd => {
                    let line = read_line(&mut self.inner, 2, "chunk")?;
                    if !line.trim_end_matches(['\r', '\n']).is_empty() {
                        return Err(invalid("chunk longer than its size"));
                    }
                    self.state = State::ChunkSize;
                }
            }
        }
    }
}

/// A body read whole, at most `cap` bytes: more is an error of kind
/// `FileTooLarge` (found without reading more than `cap + 1` bytes).
pub fn read_body_capped<R: Read>(body: R, framing: Framing, cap: usize) -> io::Result<Vec<u8>> {
    let too_large = || io::Error::new(io::ErrorKind::FileTooLarge, format!("answer larger than {cap} bytes"));
    if let Framing::Length(len) = framing {
        if len > cap as u64 {
            return Err(too_large());
        }
    }
    let mut out = Vec::new();
    let limit = (cap as u64).saturating_add(1);
    body.take(limit).read_to_end(&mut out)?;
    if out.len() > cap {
        return Err(too_large());
    }
    Ok(out)
}

/// A whole answer from bytes: its head and at most `cap` bytes of body.
/// The entry point for the fuzz target and the unit tests.
pub fn read_answer<R: Read>(stream: R, cap: usize) -> io::Result<(Head, Vec<u8>)> {
    let mut r = BufReader::new(stream);
    let head = read_head(&mut r, false)?;
    let body = read_body_capped(BodyReader::new(&mut r, head.framing), head.framing, cap)?;
    Ok((head, body))
}

mod url;

pub use url::{Url, server_base, server_path};

#[cfg(test)]
mod tests;
