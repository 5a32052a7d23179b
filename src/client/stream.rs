//! A streaming HTTP/1.1 POST, for bodies too large to hold in memory.
//!
//! minreq only sends bodies it holds whole in memory; artifact tarballs can be
//! gigabytes on a controller with 512 MB of RAM. This writes the request head
//! and then lets the caller write the body straight into the socket (plain TCP
//! or rustls, the same TLS stack minreq uses), with a known Content-Length:
//! the Testflinger server (Flask behind gunicorn) and its proxies are happiest
//! with a plain length rather than chunked uploads.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
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

/// Connects without blocking, running `idle` every [`IDLE_TICK`] until
/// the connection is up or `timeout` passes: a server whose packets are
/// dropped must not hold the phase's pipe for the whole connect timeout.
fn connect_idling(addr: &SocketAddr, timeout: Duration, idle: &mut Idle) -> io::Result<TcpStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) just returned this descriptor, owned by no one else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: storage holds a sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len as libc::socklen_t) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let deadline = Instant::now() + timeout;
        loop {
            idle();
            let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, IDLE_TICK.as_millis() as i32) };
            if n > 0 {
                let mut err: libc::c_int = 0;
                let mut err_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: SO_ERROR into an int of the stated size.
                let r = unsafe {
                    libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut libc::c_int).cast(), &mut err_len)
                };
                if r != 0 {
                    return Err(io::Error::last_os_error());
                }
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(err));
                }
                break;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr}: no answer in {timeout:?}")));
            }
        }
    }
    let tcp = TcpStream::from(sock);
    // Back to blocking: the socket timeouts set next bound each call.
    tcp.set_nonblocking(false)?;
    Ok(tcp)
}

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
    let extra = format!("Content-Type: {content_type}\r\nContent-Length: {len}\r\n");
    exchange("POST", url, headers, &extra, Some(body), None, timeout, idle).map(|(status, _)| status)
}

/// A GET whose answer (at most `cap` bytes of body) is read whole, with
/// `idle` run while it waits: for the calls made while a phase runs.
/// A body over `cap` is an error of kind `FileTooLarge`.
pub fn get(url: &str, headers: &[(String, String)], cap: usize, timeout: Duration, idle: Option<&mut Idle>) -> io::Result<(u16, Vec<u8>)> {
    exchange("GET", url, headers, "", None, Some(cap), timeout, idle)
}

/// One request on a fresh connection; the answer's body is read when `cap`
/// is given.
#[allow(clippy::too_many_arguments)]
fn exchange(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    extra_headers: &str,
    body: Option<&mut BodyWriter>,
    cap: Option<usize>,
    timeout: Duration,
    idle: Option<&mut Idle>,
) -> io::Result<(u16, Vec<u8>)> {
    let t = parse_url(url)?;
    let addrs = (t.host.as_str(), t.port).to_socket_addrs()?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{} resolves to no address", t.host));
    let mut idle = idle;
    let mut tcp = None;
    for addr in addrs {
        let attempt = match idle.as_deref_mut() {
            Some(idle) => connect_idling(&addr, timeout, idle),
            None => TcpStream::connect_timeout(&addr, timeout),
        };
        match attempt {
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
        "{method} {} HTTP/1.1\r\nHost: {host_header}\r\n{extra_headers}Connection: close\r\nUser-Agent: testflinger-agent-rs/{}\r\n",
        t.path,
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");

    if t.tls {
        exchange_tls(socket, &t.host, head.as_bytes(), body, cap)
    } else {
        exchange_on(socket, head.as_bytes(), body, cap)
    }
}

fn exchange_on<S: Read + Write>(stream: S, head: &[u8], body: Option<&mut BodyWriter>, cap: Option<usize>) -> io::Result<(u16, Vec<u8>)> {
    // 64 KiB chunks keep syscalls few and memory flat.
    let mut w = io::BufWriter::with_capacity(64 * 1024, stream);
    w.write_all(head)?;
    if let Some(body) = body {
        body(&mut w)?;
    }
    w.flush()?;
    let stream = w.into_inner().map_err(|e| e.into_error())?;
    read_answer(stream, cap)
}

/// What the head of an answer says about its body.
struct Head {
    status: u16,
    length: Option<u64>,
    chunked: bool,
}

/// The answer's status, and its body when `cap` is given. The status counts
/// only once the whole head (status line and headers, up to the empty line)
/// has arrived: a head cut off by a reset says nothing about whether the
/// server took the request, so it is an error, not a status. Likewise a
/// body shorter than announced.
fn read_answer<S: Read>(stream: S, cap: Option<usize>) -> io::Result<(u16, Vec<u8>)> {
    let mut r = BufReader::new(stream);
    let head = read_head(&mut r)?;
    let Some(cap) = cap else { return Ok((head.status, Vec::new())) };
    if head.status == 204 || head.status == 304 || (100..200).contains(&head.status) {
        return Ok((head.status, Vec::new()));
    }
    let too_large = || io::Error::new(io::ErrorKind::FileTooLarge, format!("answer larger than {cap} bytes"));
    let mut body = Vec::new();
    if head.chunked {
        loop {
            let mut line = String::new();
            (&mut r).take(1024).read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {:?}", line.trim())))?;
            if size == 0 {
                return Ok((head.status, body));
            }
            if body.len() + size > cap {
                return Err(too_large());
            }
            let at = body.len();
            body.resize(at + size, 0);
            r.read_exact(&mut body[at..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    }
    match head.length {
        Some(len) if len > cap as u64 => Err(too_large()),
        Some(len) => {
            body.resize(len as usize, 0);
            r.read_exact(&mut body).map_err(|e| io::Error::new(e.kind(), format!("answer cut off: {e}")))?;
            Ok((head.status, body))
        }
        // We asked for `Connection: close`: the body ends with the stream.
        None => {
            if r.take(cap as u64 + 1).read_to_end(&mut body)? > cap {
                return Err(too_large());
            }
            Ok((head.status, body))
        }
    }
}

fn read_head<R: BufRead>(r: &mut R) -> io::Result<Head> {
    let mut limited = r.take(64 * 1024);
    let mut line = String::new();
    limited.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {:?}", line.trim())))?;
    let mut head = Head { status, length: None, chunked: false };
    let mut header = String::new();
    loop {
        header.clear();
        if limited.read_line(&mut header)? == 0 || !header.ends_with('\n') {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "answer cut off inside its headers"));
        }
        let text = header.trim_end();
        if text.is_empty() {
            return Ok(head);
        }
        if let Some((name, value)) = text.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                head.length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
    }
}

#[cfg(feature = "tls")]
fn exchange_tls(tcp: Socket, host: &str, head: &[u8], body: Option<&mut BodyWriter>, cap: Option<usize>) -> io::Result<(u16, Vec<u8>)> {
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
    exchange_on(rustls::StreamOwned::new(conn, tcp), head, body, cap)
}

#[cfg(not(feature = "tls"))]
fn exchange_tls(_: Socket, host: &str, _: &[u8], _: Option<&mut BodyWriter>, _: Option<usize>) -> io::Result<(u16, Vec<u8>)> {
    Err(io::Error::new(io::ErrorKind::Unsupported, format!("https to {host}: this build has no TLS (feature `tls`)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_cut_off_is_an_error_not_a_status() {
        assert_eq!(read_answer(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"[..], None).unwrap().0, 200);
        for cut in [&b"HTTP/1.1 200 OK\r\nContent-Le"[..], b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 2", b""] {
            assert!(read_answer(cut, None).is_err(), "{:?}", String::from_utf8_lossy(cut));
        }
    }

    #[test]
    fn reads_bodies_by_length_chunks_or_close_within_the_cap() {
        let read = |raw: &[u8], cap| read_answer(raw, Some(cap)).map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()));
        assert_eq!(read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 10).unwrap(), (200, "hello".into()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n";
        assert_eq!(read(chunked, 10).unwrap(), (200, "hello".into()));
        assert_eq!(read(b"HTTP/1.0 200 OK\r\n\r\nuntil close", 20).unwrap(), (200, "until close".into()));
        assert_eq!(read(b"HTTP/1.1 204 No Content\r\n\r\n", 10).unwrap(), (204, String::new()));
        assert!(read(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello", 10).is_err(), "short body");
        for big in [&b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"[..], chunked, b"HTTP/1.0 200 OK\r\n\r\nhello world"] {
            assert_eq!(read(big, 4).unwrap_err().kind(), io::ErrorKind::FileTooLarge);
        }
    }

    /// A listener that never accepts, its backlog full: further connects
    /// get no answer, like a server whose packets are dropped.
    fn blackhole() -> (std::os::fd::OwnedFd, TcpStream, u16) {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket/bind/listen on loopback with checked results.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), len), 0);
            assert_eq!(libc::listen(fd, 0), 0);
            let mut bound: libc::sockaddr_in = std::mem::zeroed();
            let mut blen = len;
            assert_eq!(libc::getsockname(fd, (&mut bound as *mut libc::sockaddr_in).cast(), &mut blen), 0);
            let port = u16::from_be(bound.sin_port);
            // Fills the one-entry accept queue.
            let first = TcpStream::connect(("127.0.0.1", port)).expect("first connect");
            (owned, first, port)
        }
    }

    #[test]
    fn a_connect_that_gets_no_answer_keeps_the_caller_working() {
        let (_listener, _first, port) = blackhole();
        let url = format!("http://127.0.0.1:{port}/v1/result/x");
        let mut calls = 0;
        let mut idle = || calls += 1;
        let t = Instant::now();
        let r = get(&url, &[], 1024, Duration::from_millis(400), Some(&mut idle));
        let waited = t.elapsed();
        // Either the connect or the answer waits; the caller worked throughout.
        assert!(r.is_err(), "no answer expected: {r:?}");
        assert!(waited >= Duration::from_millis(300), "it waited {waited:?}");
        assert!(calls >= 20, "idle ran {calls} times in {waited:?}");
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
