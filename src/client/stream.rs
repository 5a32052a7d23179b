//! A streaming HTTP/1.1 POST, for bodies too large to hold in memory.
//!
//! minreq only sends bodies it holds whole in memory; artifact tarballs can be
//! gigabytes on a controller with 512 MB of RAM. This writes the request head
//! and then lets the caller write the body straight into the socket (plain TCP
//! or rustls, the same TLS stack minreq uses), with a known Content-Length:
//! the Testflinger server (Flask behind gunicorn) and its proxies are happiest
//! with a plain length rather than chunked uploads.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Writes exactly the announced number of body bytes.
pub type BodyWriter<'a> = dyn FnMut(&mut dyn Write) -> io::Result<()> + 'a;

/// Work the caller must keep doing while the request is in progress: the
/// phase runner drains its child's pipe here, so a fragment sent to a slow
/// server does not hold the child on a full pipe. Called before every
/// socket read and write, and every [`IDLE_TICK`] while the socket waits.
pub type Idle<'a> = dyn FnMut() + 'a;

/// How often [`Idle`] runs while the socket is blocked: a 1 MiB pipe fills
/// in about a millisecond under heavy output, so the child may wait this
/// long at most.
const IDLE_TICK: Duration = Duration::from_millis(5);

/// The socket, with the caller's [`Idle`] work done between and during its
/// blocking calls. `timeout` still bounds each call's wait for progress.
struct Socket<'a, 'b> {
    tcp: TcpStream,
    idle: Option<&'a mut Idle<'b>>,
    timeout: Duration,
}

impl Socket<'_, '_> {
    fn io<T>(&mut self, mut op: impl FnMut(&mut TcpStream) -> io::Result<T>) -> io::Result<T> {
        let Some(idle) = self.idle.as_deref_mut() else { return op(&mut self.tcp) };
        let deadline = Instant::now() + self.timeout;
        loop {
            idle();
            match op(&mut self.tcp) {
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no progress in {:?}", self.timeout)));
                    }
                }
                r => return r,
            }
        }
    }
}

impl Read for Socket<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.io(|t| t.read(buf))
    }
}

impl Write for Socket<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.io(|t| t.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.io(|t| t.flush())
    }
}

struct Target {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> io::Result<Target> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad URL {url}"));
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, p.parse().map_err(|_| bad())?),
        _ => (authority, if tls { 443 } else { 80 }),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Target { tls, host: host.trim_matches(['[', ']']).to_string(), port, path: path.to_string() })
}

/// Sends the POST and returns the answer's status code. The answer's body
/// is not read beyond its status line and headers. `idle`, when given, runs
/// while the request waits on the socket.
pub fn post(
    url: &str,
    headers: &[(String, String)],
    content_type: &str,
    len: u64,
    body: &mut BodyWriter,
    timeout: Duration,
    idle: Option<&mut Idle>,
) -> io::Result<u16> {
    let t = parse_url(url)?;
    let addrs = (t.host.as_str(), t.port).to_socket_addrs()?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{} resolves to no address", t.host));
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let tcp = tcp.ok_or(last)?;
    let wait = if idle.is_some() { IDLE_TICK } else { timeout };
    tcp.set_read_timeout(Some(wait))?;
    tcp.set_write_timeout(Some(wait))?;
    tcp.set_nodelay(true)?;
    let socket = Socket { tcp, idle, timeout };

    let host_header = if (t.tls && t.port == 443) || (!t.tls && t.port == 80) { t.host.clone() } else { format!("{}:{}", t.host, t.port) };
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: close\r\nUser-Agent: testflinger-agent-rs/{}\r\n",
        t.path,
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");

    if t.tls {
        send_tls(socket, &t.host, head.as_bytes(), body)
    } else {
        send_on(socket, head.as_bytes(), body)
    }
}

fn send_on<S: Read + Write>(stream: S, head: &[u8], body: &mut BodyWriter) -> io::Result<u16> {
    // 64 KiB chunks keep syscalls few and memory flat.
    let mut w = io::BufWriter::with_capacity(64 * 1024, stream);
    w.write_all(head)?;
    body(&mut w)?;
    w.flush()?;
    let stream = w.into_inner().map_err(|e| e.into_error())?;
    read_status(stream)
}

/// The answer's status, once its whole head (status line and headers, up to
/// the empty line) has arrived: a head cut off by a reset says nothing about
/// whether the server took the body, so it is an error, not a status.
fn read_status<S: Read>(stream: S) -> io::Result<u16> {
    let mut r = BufReader::new(stream.take(64 * 1024));
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {:?}", line.trim())))?;
    let mut header = String::new();
    loop {
        header.clear();
        if r.read_line(&mut header)? == 0 || !header.ends_with('\n') {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "answer cut off inside its headers"));
        }
        if header.trim_end().is_empty() {
            return Ok(status);
        }
    }
}

#[cfg(feature = "tls")]
fn send_tls(tcp: Socket, host: &str, head: &[u8], body: &mut BodyWriter) -> io::Result<u16> {
    use std::sync::{Arc, OnceLock};
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().map(|ta| {
                rustls::OwnedTrustAnchor::from_subject_spki_name_constraints(ta.subject, ta.spki, ta.name_constraints)
            }));
            Arc::new(rustls::ClientConfig::builder().with_safe_defaults().with_root_certificates(roots).with_no_client_auth())
        })
        .clone();
    let name = rustls::ServerName::try_from(host).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| io::Error::other(e.to_string()))?;
    send_on(rustls::StreamOwned::new(conn, tcp), head, body)
}

#[cfg(not(feature = "tls"))]
fn send_tls(_: Socket, host: &str, _: &[u8], _: &mut BodyWriter) -> io::Result<u16> {
    Err(io::Error::new(io::ErrorKind::Unsupported, format!("https to {host}: this build has no TLS (feature `tls`)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_cut_off_is_an_error_not_a_status() {
        assert_eq!(read_status(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"[..]).unwrap(), 200);
        for cut in [&b"HTTP/1.1 200 OK\r\nContent-Le"[..], b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 2", b""] {
            assert!(read_status(cut).is_err(), "{:?}", String::from_utf8_lossy(cut));
        }
    }

    #[test]
    fn parses_urls() {
        let t = parse_url("http://127.0.0.1:8000/v1/result/x/artifact").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port, t.path.as_str()), (false, "127.0.0.1", 8000, "/v1/result/x/artifact"));
        let t = parse_url("https://tf.example.com/v1").unwrap();
        assert_eq!((t.tls, t.port), (true, 443));
        assert!(parse_url("ftp://x").is_err());
    }
}
