//! The one HTTP/1.1 transport every request goes through: plain calls,
//! capped answers, bodies streamed from disk to the socket, downloads
//! streamed to disk, and the calls made while a phase runs (the caller's
//! [`Idle`] work is done while the socket waits). Through a proxy when the
//! environment names one (CONNECT for https), over TLS for https. Every
//! wait of a call is cut into ticks that look at the agent's stop and the
//! call's deadline (`budget.rs`); names are looked up within them
//! (`resolve.rs`).
//!
//! One connection is kept alive between calls (`keep.rs`: when it is kept,
//! reused, and when a request that failed on it is sent again).
//!
//! Redirects are not followed here: the answer's `Location` goes back to
//! the client, which alone knows whether the new URL may see its token.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::budget::{Budget, Cut, TICK, is_stop, stop_error};
use super::proxy::{Proxies, Proxy};
use super::resolve;
use super::wire::{self, BodyReader, Framing, Url};

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

fn timed_out(budget: &Budget, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what}: timed out after {} (the call's deadline)", crate::human::duration(budget.elapsed())),
    )
}

/// Ends the wait when the call must end (stop or deadline).
fn check(budget: &Budget, what: &str) -> io::Result<()> {
    match budget.check() {
        Some(Cut::Stop) => Err(stop_error(what)),
        Some(Cut::Deadline) => Err(timed_out(budget, what)),
        None => Ok(()),
    }
}

/// Connects without blocking, waiting in ticks (the caller's idle work,
/// the stop and the call's deadline looked at between them) until the
/// connection is up or `budget.timeout` passes.
#[allow(clippy::cast_possible_truncation)] // address families (2, 10) and sockaddr sizes (16, 28 bytes) fit their C types
fn connect_addr(addr: &SocketAddr, budget: &Budget, tick: Duration, idle: &mut dyn FnMut()) -> io::Result<TcpStream> {
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
        let started = Instant::now();
        loop {
            idle();
            check(budget, &format!("connecting to {addr}"))?;
            let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            let wait = i32::try_from(budget.tick(tick).as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, wait) };
            if n > 0 {
                let mut err: libc::c_int = 0;
                let mut err_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: SO_ERROR into an int of the stated size.
                let r = unsafe {
                    libc::getsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&mut err as *mut libc::c_int).cast(),
                        &mut err_len,
                    )
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
            if started.elapsed() >= budget.timeout {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {addr}: no answer within {}", crate::human::duration(budget.timeout)),
                ));
            }
        }
    }
    let tcp = TcpStream::from(sock);
    // Back to blocking: the socket timeouts set for each call bound it.
    tcp.set_nonblocking(false)?;
    Ok(tcp)
}

/// The socket of one call: every blocking call is cut into ticks, between
/// which the caller's [`Idle`] work is done and the stop and the call's
/// deadline are looked at; `budget.timeout` bounds each wait for progress.
struct Socket<'a, 'b> {
    tcp: TcpStream,
    /// Bytes the kernel took from us and gave us on this call: a failure
    /// with none written, or none received, says how far the request got.
    written: u64,
    received: u64,
    idle: Option<&'a mut Idle<'b>>,
    budget: Budget,
    tick: Duration,
    /// The socket timeout set now, to set it only when it changes.
    wait: Option<Duration>,
    /// Plain HTTP: the socket turning readable while the request still
    /// goes out means the server answers early (a 413 before the body).
    watch_early: bool,
    /// The whole request went out: the server may have acted on it.
    sent: bool,
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
trait Conn: Read + Write {
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

/// What goes after the request head.
pub(crate) enum Payload<'a, 'b> {
    None,
    Bytes {
        content_type: &'a str,
        bytes: &'a [u8],
    },
    /// Written by `write` straight into the socket: exactly `len` bytes.
    Stream {
        content_type: &'a str,
        len: u64,
        write: &'a mut BodyWriter<'b>,
    },
}

impl Payload<'_, '_> {
    pub(crate) fn reborrow(&mut self) -> Payload<'_, '_> {
        match self {
            Payload::None => Payload::None,
            Payload::Bytes { content_type, bytes } => Payload::Bytes { content_type, bytes },
            Payload::Stream { content_type, len, write } => {
                Payload::Stream { content_type, len: *len, write: &mut **write }
            }
        }
    }
}

/// What becomes of the answer's body.
#[derive(Clone, Copy)]
pub(crate) enum Keep<'a> {
    /// Read to its end and dropped (uploads, whose answers say nothing
    /// more), at most this many bytes: a body that breaks its framing
    /// means the answer may not be the server's, so it fails the call.
    Drop(usize),
    /// Read into memory, at most this many bytes.
    Memory(usize),
    /// A 200's body written to this file (created only then), at most
    /// `cap` bytes; other answers' bodies read into memory like `Memory`.
    File { path: &'a Path, cap: u64, other: usize },
}

/// The answer: status, redirect target, and the body when kept in memory.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    pub location: Option<String>,
    pub body: Vec<u8>,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// The network or the server: no usable answer.
    Net(io::Error),
    /// The body was over the cap.
    TooLarge(u64),
    /// The local file for a download.
    Local(PathBuf, io::Error),
    /// Abandoned because the agent is stopping; `request_sent`: the whole
    /// request had gone out, so the server may have acted on it.
    Stopped { request_sent: bool },
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Net(e)
    }
}

/// The parts of the client's setup every connection needs.
pub(super) struct Net {
    proxies: Proxies,
    ca_file: Option<PathBuf>,
    #[cfg(feature = "tls")]
    tls: std::cell::OnceCell<Result<super::tls::Tls, String>>,
    kept: keep::Slot,
}

impl Net {
    pub(super) fn new() -> Net {
        Net {
            proxies: Proxies::from_env(),
            ca_file: None,
            #[cfg(feature = "tls")]
            tls: std::cell::OnceCell::new(),
            kept: keep::Slot::default(),
        }
    }

    /// The agent is about to make no call for `wait`: a kept connection
    /// that would idle past its limit meanwhile is closed now.
    pub(super) fn before_wait(&self, wait: Duration) {
        self.kept.close_if_idle_within(wait);
    }

    /// A CA file trusted on top of the store (config `server_ca_file`).
    pub(super) fn set_ca_file(&mut self, path: Option<PathBuf>) {
        self.ca_file = path;
        #[cfg(feature = "tls")]
        {
            self.tls = std::cell::OnceCell::new();
        }
    }

    /// What the agent trusts for https, built on first use; logged once.
    #[cfg(feature = "tls")]
    fn tls(&self) -> io::Result<std::sync::Arc<rustls::ClientConfig>> {
        let built = self.tls.get_or_init(|| {
            let t = super::tls::build(self.ca_file.as_deref());
            match &t {
                Ok(t) => log::info!("https: trusting {}", t.trusts),
                Err(e) => log::error!("https: cannot set up the trust store: {e}"),
            }
            t
        });
        match built {
            Ok(t) => Ok(t.config.clone()),
            Err(e) => Err(io::Error::other(format!("trust store: {e}"))),
        }
    }
}

impl Default for Net {
    fn default() -> Net {
        Net::new()
    }
}

/// One request: what [`exchange`] sends and how it treats the answer.
pub(super) struct Request<'a> {
    pub method: &'a str,
    pub url: &'a Url,
    pub headers: &'a [(String, String)],
    pub payload: Payload<'a, 'a>,
    pub keep: Keep<'a>,
    /// Each wait for progress; the whole call gets twice this plus its
    /// transfer allowance (see `budget`).
    pub timeout: Duration,
    pub idle: Option<&'a mut Idle<'a>>,
}

fn connect(host: &str, port: u16, budget: &Budget, tick: Duration, idle: &mut dyn FnMut()) -> io::Result<TcpStream> {
    let addrs = resolve::resolve(host, port, budget, tick, idle)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"));
    for addr in addrs {
        match connect_addr(&addr, budget, tick, idle) {
            Ok(s) => return Ok(s),
            Err(e) if is_stop(&e) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// One request, on the kept connection when there is a usable one (see
/// `keep`), else on a new one; within the call's deadline and abandoned
/// when the agent stops (see `budget`).
pub(super) fn exchange(net: &Net, req: Request) -> Result<Reply, Failure> {
    let Request { method, url, headers, mut payload, keep, timeout, idle } = req;
    let mut budget = Budget::new(timeout);
    let proxy = net.proxies.for_url(url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut idle = idle;
    let tick = if idle.is_some() { IDLE_TICK } else { TICK };

    let mut all = headers.to_vec();
    if let Some(p) = proxy.as_ref().filter(|_| !url.https) {
        // Plain http through a proxy: the proxy reads the request itself.
        if let Some(auth) = &p.authorization {
            all.push(("Proxy-Authorization".into(), auth.clone()));
        }
    }
    match &payload {
        Payload::None if method == "POST" => all.push(("Content-Length".into(), "0".into())),
        Payload::None => {}
        Payload::Bytes { content_type, bytes } => {
            all.push(("Content-Type".into(), content_type.to_string()));
            all.push(("Content-Length".into(), bytes.len().to_string()));
        }
        Payload::Stream { content_type, len, .. } => {
            all.push(("Content-Type".into(), content_type.to_string()));
            all.push(("Content-Length".into(), len.to_string()));
        }
    }
    let target = if proxy.is_some() && !url.https { url.to_string() } else { url.path.clone() };
    let head = wire::request_head(method, &target, &url.host_header(), &all)?;

    let key = keep::key(url, proxy.as_ref());
    let mut kept = net.kept.take(&key);
    loop {
        let reused = kept.is_some();
        let (tcp, link) = match kept.take() {
            Some(k) => (k.tcp, Some(k.link)),
            None => {
                let connected = {
                    let mut no_idle = || {};
                    let work: &mut dyn FnMut() = match idle.as_deref_mut() {
                        Some(f) => f,
                        None => &mut no_idle,
                    };
                    match &proxy {
                        Some(p) => connect(&p.host, p.port, &budget, tick, work).map_err(|e| {
                            if is_stop(&e) {
                                e
                            } else {
                                io::Error::new(e.kind(), format!("proxy {}:{}: {e}", p.host, p.port))
                            }
                        }),
                        None => connect(&url.host, url.port, &budget, tick, work),
                    }
                };
                let tcp = connected.map_err(|e| stopped(e, false))?;
                tcp.set_nodelay(true)?;
                (tcp, None)
            }
        };
        let mut socket = Socket {
            tcp,
            written: 0,
            received: 0,
            idle,
            budget,
            tick,
            wait: None,
            watch_early: !url.https,
            sent: false,
        };
        let result = attempt(net, &mut socket, link, url, proxy.as_ref(), &head, payload.reborrow(), keep);
        let Socket { tcp, written, received, idle: idle_back, budget: budget_back, .. } = socket;
        idle = idle_back;
        budget = budget_back;
        match result {
            Ok((reply, Some((link, answer)))) => {
                net.kept.put(key, tcp, link, &answer);
                return Ok(reply);
            }
            Ok((reply, None)) => return Ok(reply),
            Err(f) if reused && keep::may_resend(&f, method, written, received) => {
                log::debug!(
                    "{method} {url}: the kept connection failed before the server could have the request ({}); sending it on a new one",
                    describe(&f)
                );
            }
            Err(f) => return Err(f),
        }
    }
}

fn describe(f: &Failure) -> String {
    match f {
        Failure::Net(e) => crate::human::without_os_error(&e.to_string()),
        other => format!("{other:?}"),
    }
}

/// What a connection carries once the call is over: the link to keep
/// and the answer's head (which says how long it may be kept), or
/// nothing when it must be closed.
type Keepable = Option<(keep::Link, wire::Head)>;

/// One try of the request on `socket`: a new connection is set up first
/// (`link` is `None`: the proxy's tunnel, the TLS handshake).
#[allow(clippy::too_many_arguments)]
fn attempt(
    net: &Net,
    socket: &mut Socket,
    link: Option<keep::Link>,
    url: &Url,
    proxy: Option<&Proxy>,
    head: &[u8],
    payload: Payload,
    keep: Keep,
) -> Result<(Reply, Keepable), Failure> {
    let link = match link {
        Some(link) => link,
        None => {
            if url.https {
                if let Some(p) = proxy {
                    tunnel(socket, p, url).map_err(|e| stopped(e, false))?;
                }
            }
            new_link(net, socket, url)?
        }
    };
    match link {
        keep::Link::Plain => {
            let (reply, answer) = exchange_on(socket, head, payload, keep)?;
            Ok((reply, answer.map(|h| (keep::Link::Plain, h))))
        }
        #[cfg(feature = "tls")]
        keep::Link::Tls(mut conn) => {
            let (reply, answer) = exchange_on(&mut rustls::Stream::new(&mut *conn, socket), head, payload, keep)?;
            // Anything the server sent past the answer (data, an alert)
            // would be read as the next answer: such a connection goes.
            let mut probe = [0u8; 1];
            let clean = matches!(io::Read::read(&mut conn.reader(), &mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            Ok((reply, answer.filter(|_| clean && !conn.wants_write()).map(|h| (keep::Link::Tls(conn), h))))
        }
    }
}

/// Sets up what runs over a new connection: nothing for http, the TLS
/// handshake for https (resumed when the config holds a session).
fn new_link(net: &Net, socket: &mut Socket, url: &Url) -> Result<keep::Link, Failure> {
    if !url.https {
        return Ok(keep::Link::Plain);
    }
    #[cfg(feature = "tls")]
    {
        let config = net.tls()?;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a TLS server name: {e}", url.host))
        })?;
        let mut conn = rustls::ClientConnection::new(config, name).map_err(|e| io::Error::other(e.to_string()))?;
        // The handshake first, so that a certificate problem reads as one and
        // not as a failed write of the request.
        super::tls::handshake(&mut conn, socket, &url.authority()).map_err(|e| stopped(e, false))?;
        Ok(keep::Link::Tls(Box::new(conn)))
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = (net, socket);
        Err(Failure::Net(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("https to {}: this build has no TLS (built without the `tls` feature)", url.host),
        )))
    }
}

/// A stop error becomes [`Failure::Stopped`]; others stay network errors.
fn stopped(e: io::Error, request_sent: bool) -> Failure {
    if is_stop(&e) { Failure::Stopped { request_sent } } else { Failure::Net(e) }
}

/// Opens a CONNECT tunnel to `url` through the proxy.
fn tunnel(socket: &mut Socket, proxy: &Proxy, url: &Url) -> io::Result<()> {
    let mut headers = Vec::new();
    if let Some(auth) = &proxy.authorization {
        headers.push(("Proxy-Authorization".to_string(), auth.clone()));
    }
    let head = wire::request_head("CONNECT", &url.authority(), &url.authority(), &headers)?;
    socket.write_all(&head)?;
    socket.flush()?;
    // Byte by byte: what follows the proxy's answer is the server's TLS,
    // which must not be swallowed by a read-ahead buffer.
    let mut r = BufReader::with_capacity(1, &mut *socket);
    let answer = wire::read_head(&mut r, true)?;
    if !(200..300).contains(&answer.status) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "proxy {}:{} refused CONNECT to {}: HTTP {}",
                proxy.host,
                proxy.port,
                url.authority(),
                answer.status
            ),
        ));
    }
    Ok(())
}

/// The request and its answer; the answer's head comes back when the
/// connection may carry another request.
fn exchange_on<S: Conn>(
    conn: &mut S,
    head: &[u8],
    payload: Payload,
    keep: Keep,
) -> Result<(Reply, Option<wire::Head>), Failure> {
    let written = (|| {
        // 64 KiB chunks keep syscalls few and memory flat.
        let mut w = io::BufWriter::with_capacity(64 * 1024, &mut *conn);
        w.write_all(head)?;
        match payload {
            Payload::None => {}
            Payload::Bytes { bytes, .. } => w.write_all(bytes)?,
            Payload::Stream { write, .. } => write(&mut w)?,
        }
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.flush()
    })();
    if let Err(e) = written {
        if is_stop(&e) || e.kind() == io::ErrorKind::TimedOut {
            return Err(stopped(e, false));
        }
        // A server may answer before it has the whole request and close
        // (nginx's 413 for a body over client_max_body_size): that answer
        // says more than the reset our write then gets.
        return match read_reply(&mut *conn, keep) {
            Ok((reply, _)) => {
                log::debug!("the server answered HTTP {} before the request was sent ({e})", reply.status);
                // Half a request went out: the connection cannot be reused.
                Ok((reply, None))
            }
            Err(_) => Err(Failure::Net(e)),
        };
    }
    conn.mark_sent();
    read_reply(&mut *conn, keep).map_err(|f| match f {
        Failure::Net(e) => stopped(e, true),
        other => other,
    })
}

/// The status counts only once the whole head (status line and headers,
/// up to the empty line) has arrived: a head cut off by a reset says
/// nothing about whether the server took the request, so it is an error,
/// not a status. Likewise a body shorter than announced.
///
/// The head comes back when the connection may be reused: HTTP/1.1
/// without `Connection: close`, a body that ends by its framing and was
/// read to that end, and nothing after it.
fn read_reply<S: Read>(stream: S, keep: Keep) -> Result<(Reply, Option<wire::Head>), Failure> {
    let mut r = BufReader::new(stream);
    let head = wire::read_head(&mut r, false)?;
    let mut reply = Reply { status: head.status, location: head.location.clone(), body: Vec::new() };
    let mut body = BodyReader::new(&mut r, head.framing);
    let memory = |body: &mut BodyReader<_>, cap: usize| match wire::read_body_capped(body, head.framing, cap) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => Err(Failure::TooLarge(cap as u64)),
        Err(e) => Err(Failure::Net(e)),
    };
    match keep {
        Keep::Drop(cap) => {
            if io::copy(&mut (&mut body).take((cap as u64).saturating_add(1)), &mut io::sink())? > cap as u64 {
                return Err(Failure::TooLarge(cap as u64));
            }
        }
        Keep::Memory(cap) => reply.body = memory(&mut body, cap)?,
        Keep::File { other, .. } if head.status != 200 => reply.body = memory(&mut body, other)?,
        Keep::File { path, cap, .. } => {
            if matches!(head.framing, Framing::Length(n) if n > cap) {
                return Err(Failure::TooLarge(cap));
            }
            let local = |e: io::Error| Failure::Local(path.to_path_buf(), e);
            // Not through a link, and only a file of this user's (see safe_fs).
            let mut file = crate::safe_fs::create_truncate(path, crate::safe_fs::PRIVATE_FILE).map_err(local)?;
            let mut limited = (&mut body).take(cap.saturating_add(1));
            let mut buf = vec![0u8; 64 * 1024];
            let mut n: u64 = 0;
            loop {
                let got = match limited.read(&mut buf) {
                    Ok(0) => break,
                    Ok(got) => got,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Failure::Net(e)),
                };
                n = n.saturating_add(got as u64);
                if n > cap {
                    return Err(Failure::TooLarge(cap));
                }
                file.write_all(&buf[..got]).map_err(local)?;
            }
            file.flush().map_err(local)?;
        }
    }
    let reusable = !head.close && head.framing != Framing::UntilClose && body.finished() && r.buffer().is_empty();
    Ok((reply, reusable.then_some(head)))
}

mod keep;

#[cfg(test)]
mod tests;
