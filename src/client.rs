//! The Testflinger server API, one method per endpoint: the only module
//! (with its submodules) that speaks HTTP to the server; the metrics
//! endpoint (`metrics/endpoint.rs`) answers scrapers on its own.
//!
//! Every request carries the `agent_name` cookie and, when a token file is
//! configured, a bearer token (refreshed once and replayed once on a 401).
//! Connection errors and 500/502/503/504 are retried as the call's
//! [`Retry`] says (the caller's choice; the client's default otherwise);
//! what still fails is returned to the caller, which keeps the data and tries
//! again later: the client never drops anything on its own.
//! Every answer read into memory is capped, so a broken or hostile server
//! cannot make the agent allocate without bound.
//!
//! Redirects are followed only within the server's origin (scheme, host,
//! port): the token, the cookie and the body never go anywhere else, and
//! https is never given up for http. Such a redirect is refused and logged.
//!
//! Here: the client and its setup. A call goes through `call.rs` (token,
//! retries, outage hold) and `exchange.rs` (redirects) to `transport.rs`;
//! the endpoints are `endpoints.rs` and `files.rs`.

mod auth;
mod budget;
mod call;
mod endpoints;
mod error;
mod exchange;
mod files;
mod proxy;
mod resolve;
#[cfg(feature = "tls")]
mod tls;
mod transport;
pub mod wire;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::retry::{Backoff, Outage, Retry};

use call::outage_hold;
pub use error::{Answer, ClientError, unreachable_kind, unreachable_text};
use transport::Net;
pub use transport::{BodyWriter, Idle};

/// Cap on ordinary answers (agent data, results, token).
pub(super) const SMALL_ANSWER: usize = 1 << 20;
/// Cap on the attachments archive on disk.
pub const ATTACHMENTS_MAX: u64 = 4 << 30;

pub struct Client {
    base: String,
    agent_id: String,
    token_file: Option<PathBuf>,
    access_token: Option<String>,
    /// Refused refreshes: a server that refuses our refresh token is not
    /// asked again on every call (no 401 storm of our own).
    refresh_hold: Backoff,
    /// The server answered 401 and the refresh was held off or failed:
    /// the token stays refused until `refresh_hold` lets a refresh be
    /// tried. An idle agent waits that out rather than polling into 401s
    /// (see [`Client::held_for`]).
    token_refused: bool,
    /// What was last said about the token file, so that a broken file is
    /// reported once per change rather than on every request.
    token_status: Option<String>,
    /// The token file was named by the operator, not upstream's default.
    token_file_named: bool,
    /// For the calls whose caller does not pass a [`Retry`] of its own.
    retry: Retry,
    /// Proxies and TLS trust.
    net: Net,
    /// The server failing across calls: calls held back for a while.
    outage: Outage,
    /// Every call of the current round is tried again later by its
    /// caller, whatever its [`Retry`] says (see [`Client::all_later`]).
    all_later: bool,
}

impl Client {
    /// `server_address` may lack a scheme: `host:port` means `http://host:port`.
    pub fn new(server_address: &str, agent_id: &str, token_file: Option<PathBuf>) -> Client {
        Client {
            base: wire::server_base(server_address),
            agent_id: agent_id.to_string(),
            token_file,
            access_token: None,
            refresh_hold: Backoff::new(auth::REFRESH_HOLD_OFF),
            token_refused: false,
            token_status: None,
            token_file_named: false,
            retry: Retry::default(),
            net: Net::new(),
            outage: Outage::new(outage_hold()),
            all_later: false,
        }
    }

    /// How long the hold after an outage's end still lasts, while no new
    /// outage holds calls back: calls cut short then were not tried, the
    /// server did not fail them.
    pub fn returning_for(&self) -> Option<Duration> {
        let now = Instant::now();
        self.outage.held(now).is_none().then(|| self.outage.returning(now)).flatten()
    }

    /// Runs `round` with every call counted as tried again later
    /// ([`Retry::later`], held back after an outage's end): for what the
    /// caller repeats on its own schedule as a whole, the kept outcomes.
    pub fn all_later<T>(&mut self, round: impl FnOnce(&mut Client) -> T) -> T {
        let was = std::mem::replace(&mut self.all_later, true);
        let out = round(self);
        self.all_later = was;
        out
    }

    /// How long calls are still held back by an outage or after its end
    /// (see [`Outage`]), or would be refused for a token whose refresh is
    /// held off: a caller with nothing else to do (the idle agent: its
    /// polls and kept outcomes are tried again later) waits that long
    /// rather than making calls that fail at once.
    pub fn held_for(&self) -> Option<Duration> {
        let now = Instant::now();
        let refused = self
            .refresh_hold
            .next()
            .filter(|_| self.token_refused)
            .map(|t| t.saturating_duration_since(now))
            .filter(|d| !d.is_zero());
        self.outage.held_later(now).max(refused)
    }

    /// The retry policy of calls made without one (set once, at start).
    pub fn with_retry(mut self, retry: Retry) -> Client {
        self.retry = retry;
        self
    }

    /// The default retry policy, for callers that pass it on.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// A CA file (PEM) trusted for https on top of the system store: the
    /// config's `server_ca_file`.
    pub fn set_ca_file(&mut self, path: Option<PathBuf>) {
        self.net.set_ca_file(path);
    }

    /// The agent makes no call for `wait`: the kept connection is closed
    /// now if it would idle past its limit meanwhile (see `transport`).
    pub fn before_wait(&self, wait: Duration) {
        self.net.before_wait(wait);
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

/// Job ids name directories on disk: allow only what a UUID needs.
pub fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && id != "."
        && id != ".."
}

fn url_encode(s: &str) -> String {
    percent_encode(s, |b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
}

/// `s` with every byte `keep` refuses written as `%XX`.
fn percent_encode(s: &str, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_less_address_means_http() {
        assert_eq!(Client::new("10.0.0.5:8000", "a", None).base_url(), "http://10.0.0.5:8000");
        assert_eq!(Client::new("https://tf.example.com/", "a", None).base_url(), "https://tf.example.com");
    }

    /// Upstream builds every request URL with `urljoin(server, "/v1/...")`:
    /// an absolute path replaces whatever path `server_address` holds. An
    /// upstream config whose address has one (`http://tf:8000/v1`,
    /// `http://tf/testflinger`) reaches `/v1/...` there.
    #[test]
    fn a_path_in_the_address_is_dropped_as_upstream_urljoin_does() {
        assert_eq!(Client::new("http://tf:8000/testflinger/", "a", None).url("/v1/job"), "http://tf:8000/v1/job");
        assert_eq!(Client::new("http://tf:8000/v1", "a", None).url("/v1/job"), "http://tf:8000/v1/job");
        assert_eq!(Client::new("tf:8000/x", "a", None).url("/v1/job"), "http://tf:8000/v1/job");
        assert_eq!(wire::server_path("http://tf:8000/v1"), Some("/v1".to_string()));
        assert_eq!(wire::server_path("https://tf.example.com/"), None);
        assert_eq!(wire::server_path("tf"), None);
    }

    #[test]
    fn job_ids_that_could_escape_the_run_dir_are_refused() {
        assert!(is_safe_id("0d3a59a2-7e7b-4a3e-9f7d-3f1c2b9e8a11"));
        for bad in ["", "..", "../x", "a/b", "a b"] {
            assert!(!is_safe_id(bad), "{bad}");
        }
    }

    #[test]
    fn queue_names_are_encoded() {
        assert_eq!(url_encode("my queue&x"), "my%20queue%26x");
    }
}
