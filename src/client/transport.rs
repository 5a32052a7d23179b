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
//! Here: what a call asks for and gets ([`Request`], [`Reply`]) and the
//! loop of tries; the steps of one try are beside it: `connect.rs`,
//! `socket.rs`, `link.rs` (proxy tunnel, TLS), `send.rs`, `answer.rs`.
//!
//! Redirects are not followed here: the answer's `Location` goes back to
//! the client, which alone knows whether the new URL may see its token.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::budget::{Budget, TICK, is_stop};
use super::proxy::{Proxies, Proxy};
use super::wire::{self, Url};
use connect::connect;
use link::{new_link, tunnel};
use send::exchange_on;
use socket::Socket;

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
// Eight: the request's parts as `exchange` already took them apart (the
// head is written once for every try); a struct would only rename them.
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

/// A stop error becomes [`Failure::Stopped`]; others stay network errors.
fn stopped(e: io::Error, request_sent: bool) -> Failure {
    if is_stop(&e) { Failure::Stopped { request_sent } } else { Failure::Net(e) }
}

mod answer;
mod connect;
mod keep;
mod link;
mod send;
mod socket;

#[cfg(test)]
mod tests;
