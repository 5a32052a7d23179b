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

mod auth;
mod budget;
mod error;
mod files;
mod proxy;
mod resolve;
#[cfg(feature = "tls")]
mod tls;
mod transport;
pub mod wire;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::json::Json;
use crate::retry::{Backoff, OUTAGE_HOLD, Outage, Retry};
use crate::states::{AgentState, JobState};

pub use error::{Answer, ClientError, unreachable_kind, unreachable_text};
use error::{is_retryable, net_reason};
pub use transport::{BodyWriter, Idle};
use transport::{Failure, Keep, Net, Payload, Reply};
use wire::Url;

/// Same-origin redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

/// Cap on ordinary answers (agent data, results, token).
pub(super) const SMALL_ANSWER: usize = 1 << 20;
/// Cap on a job: jobs carry scripts and data, but not megabytes of it.
const JOB_ANSWER: usize = 16 << 20;
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
}

impl Client {
    /// `server_address` may lack a scheme: `host:port` means `http://host:port`.
    pub fn new(server_address: &str, agent_id: &str, token_file: Option<PathBuf>) -> Client {
        let mut base = server_address.trim().trim_end_matches('/').to_string();
        if !base.contains("://") {
            base = format!("http://{base}");
        }
        Client {
            base,
            agent_id: agent_id.to_string(),
            token_file,
            access_token: None,
            refresh_hold: Backoff::new(auth::REFRESH_HOLD_OFF),
            token_status: None,
            token_file_named: false,
            retry: Retry::default(),
            net: Net::new(),
            outage: Outage::new(outage_hold()),
        }
    }

    /// How long calls are still held back by an outage (see [`Outage`]):
    /// a caller with nothing else to do waits that long rather than making
    /// calls that fail at once.
    pub fn held_for(&self) -> Option<Duration> {
        self.outage.held(Instant::now())
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

    /// One JSON (or empty) exchange, no retries.
    fn send_once(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        cap: usize,
        auth: bool,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let payload = match body {
            Some(bytes) => Payload::Bytes { content_type: "application/json", bytes },
            None => Payload::None,
        };
        let reply = self.exchange(method, url, payload, Keep::Memory(cap), timeout, None, auth)?;
        Ok(Answer { status: reply.status, body: reply.body })
    }

    /// One exchange through the transport, following redirects that stay
    /// on the server's origin and refusing the others.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn exchange(
        &self,
        method: &str,
        url: &str,
        mut payload: Payload,
        keep: Keep,
        timeout: Duration,
        mut idle: Option<&mut Idle>,
        auth: bool,
    ) -> Result<Reply, ClientError> {
        let origin =
            Url::parse(url).map_err(|e| ClientError::Connection { url: url.to_string(), reason: e.to_string() })?;
        let headers = self.headers(auth);
        let mut target = origin.clone();
        let mut method = method;
        for hop in 0..=MAX_REDIRECTS {
            let request = transport::Request {
                method,
                url: &target,
                headers: &headers,
                payload: payload.reborrow(),
                keep,
                timeout,
                // Written out: the closure's lifetime shortens only here.
                idle: match idle.as_deref_mut() {
                    Some(f) => Some(f),
                    None => None,
                },
            };
            let reply = transport::exchange(&self.net, request).map_err(|f| match f {
                Failure::Net(e) => ClientError::Connection { url: target.to_string(), reason: net_reason(&e, timeout) },
                Failure::TooLarge(limit) => ClientError::TooLarge {
                    url: target.to_string(),
                    limit: usize::try_from(limit).unwrap_or(usize::MAX),
                },
                Failure::Local(path, e) => ClientError::Local { path, reason: net_reason(&e, timeout) },
                Failure::Stopped { request_sent } => ClientError::Stopped { url: target.to_string(), request_sent },
            })?;
            let status = reply.status;
            let location = match (&reply.location, status) {
                (Some(l), 301 | 302 | 303 | 307 | 308) => l,
                _ => return Ok(reply),
            };
            let refuse = |why: String| {
                log::error!(
                    "{method} {target}: HTTP {status} redirect refused: {why}; the token, cookie and body were not sent there"
                );
                Err(ClientError::Status { url: target.to_string(), status, body: format!("redirect refused: {why}") })
            };
            let next = match target.join(location) {
                Ok(next) => next,
                Err(e) => return refuse(e.to_string()),
            };
            if !origin.same_origin(&next) {
                let why =
                    if origin.https && !next.https { "a downgrade from https to http" } else { "on another origin" };
                return refuse(format!(
                    "{next} is {why} (the server is {}://{})",
                    origin.scheme(),
                    origin.host_header()
                ));
            }
            if hop == MAX_REDIRECTS {
                return refuse(format!("more than {MAX_REDIRECTS} redirects"));
            }
            // As browsers and requests do: 303 always, and 301/302 after a
            // POST, become a GET without the body.
            if status == 303 || (matches!(status, 301 | 302) && method == "POST") {
                if matches!(payload, Payload::Stream { .. }) {
                    return refuse(format!("HTTP {status} would drop the upload"));
                }
                method = "GET";
                payload = Payload::None;
            }
            log::info!("{method} {target}: following HTTP {status} to {next} (same server)");
            target = next;
        }
        unreachable!("the loop returns on its last hop")
    }

    /// One call with auth, the 401 refresh-and-replay, and retries.
    fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Json>,
        cap: usize,
        retry: Retry,
    ) -> Result<Answer, ClientError> {
        let url = self.url(path);
        let body_text = body.map(|b| b.to_string_compact());
        let body = body_text.as_deref().map(str::as_bytes);
        self.with_retries(method, &url, retry, &mut |c| c.send_once(method, &url, body, cap, true, retry.timeout))
    }

    /// The one retry mechanism every call goes through: a token first when
    /// there is a token file and no token yet; on a 401 one refresh and one
    /// replay; connection errors and 500/502/503/504 retried with doubling
    /// backoff up to `retry.attempts`. What `send` answers last is returned.
    /// During an outage (see [`Outage`]) a call is not tried until its hold
    /// is over: it fails at once with a connection error saying so.
    pub(super) fn with_retries(
        &mut self,
        method: &str,
        url: &str,
        retry: Retry,
        send: &mut dyn FnMut(&Client) -> Result<Answer, ClientError>,
    ) -> Result<Answer, ClientError> {
        if self.access_token.is_none() && self.token_file.is_some() {
            self.refresh();
        }
        if let Some(left) = self.outage.held(Instant::now()) {
            let reason =
                format!("not tried: held back since the server failed, next try in {:.1} s", left.as_secs_f64());
            return Err(ClientError::Connection { url: url.to_string(), reason });
        }
        let mut refreshed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Spread (±20 %) so that agents failing together retry apart.
            let backoff = retry.between.wait(attempt);
            let answer = send(self);
            let failed = match &answer {
                Ok(a) => is_retryable(a.status),
                Err(e) => matches!(e, ClientError::Connection { .. }),
            };
            if failed {
                self.outage.attempt_failed(Instant::now());
            } else if answer.is_ok() {
                self.outage_ended();
            }
            match answer {
                // Without a token file (the default path is usually absent)
                // a 401 has nothing to refresh: it is the answer.
                Ok(a) if a.status == 401 && !refreshed && self.token_file.as_ref().is_some_and(|p| p.exists()) => {
                    refreshed = true;
                    // Said once per hold-off, not on every refused call.
                    if !self.refresh_hold.ready(std::time::Instant::now()) {
                        log::debug!("{method} {url}: HTTP 401; the token refresh is held off");
                        return Ok(a);
                    }
                    log::info!("{method} {url}: HTTP 401, refreshing the access token");
                    if !self.refresh() {
                        return Ok(a);
                    }
                    continue;
                }
                Ok(a) if is_retryable(a.status) && attempt < retry.attempts => {
                    log::warn!(
                        "{method} {url}: HTTP {} (attempt {attempt}), retrying in {}",
                        a.status,
                        crate::human::duration(backoff)
                    );
                }
                Err(e @ ClientError::Connection { .. }) if attempt < retry.attempts => {
                    log::warn!("{method} {e} (attempt {attempt}), retrying in {}", crate::human::duration(backoff));
                }
                other => {
                    if failed {
                        self.outage_began();
                    }
                    return other;
                }
            }
            crate::wait::sleep(backoff, None);
        }
    }

    /// An answer: when it ends an outage, the other calls wait a random
    /// part of the outage's length (see [`Outage::answered`]).
    fn outage_ended(&mut self) {
        if let Some(hold) = self.outage.answered(Instant::now()) {
            log::info!(
                "server {} answering again; requests held back {:.1} s more (a random part of the outage, so that agents back from it do not all come at once)",
                self.base,
                hold.as_secs_f64()
            );
        }
    }

    /// A call gave up: when that makes an outage, calls are held back.
    fn outage_began(&mut self) {
        match self.outage.call_failed(Instant::now()) {
            Some((hold, true)) => log::warn!(
                "server {} failing for {} s or more: requests held back for {:.1} s, then for a random part of the outage so far (at most a minute) while it still fails",
                self.base,
                crate::retry::OUTAGE_AFTER.as_secs(),
                hold.as_secs_f64()
            ),
            Some((hold, false)) => {
                log::debug!("server {} still failing: requests held back for {:.1} s", self.base, hold.as_secs_f64())
            }
            None => {}
        }
    }

    /// A call whose only success is a 2xx; anything else becomes an error.
    fn call_ok(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Json>,
        cap: usize,
        retry: Retry,
    ) -> Result<Answer, ClientError> {
        self.call(method, path, body, cap, retry)?.ok(&self.url(path))
    }

    /// Any answer below 500 means the server is up (a 404 on `/v1` too).
    pub fn is_reachable(&mut self) -> bool {
        self.reachability().is_ok()
    }

    /// `Err` says why the server cannot be reached, for the log. Not held
    /// back by an outage, but counted in it like any call: a probe that
    /// ends one starts the hold that spreads the return (see [`Outage`]).
    pub fn reachability(&mut self) -> Result<(), String> {
        let answer = self.send_once("GET", &self.url("/v1/"), None, SMALL_ANSWER, false, self.retry.timeout);
        let failed = match &answer {
            Ok(a) => is_retryable(a.status),
            Err(e) => matches!(e, ClientError::Connection { .. }),
        };
        if failed {
            let now = Instant::now();
            self.outage.attempt_failed(now);
            self.outage.call_failed(now);
        }
        let reachable = match answer {
            // Only a proxy asks for its own credentials: the server was not reached.
            Ok(a) if a.status == 407 => {
                Err("the proxy answered HTTP 407 (Proxy Authentication Required): give user:password@ in http_proxy"
                    .into())
            }
            Ok(a) if a.status < 500 => Ok(()),
            Ok(a) => Err(format!("HTTP {}", a.status)),
            Err(ClientError::Connection { reason, .. }) => Err(reason),
            Err(e) => Err(e.to_string()),
        };
        if reachable.is_ok() {
            self.outage_ended();
        }
        reachable
    }

    pub fn post_agent_data(&mut self, data: &Json) -> Result<(), ClientError> {
        self.post_agent_data_with(data, self.retry)
    }

    pub fn post_agent_data_with(&mut self, data: &Json, retry: Retry) -> Result<(), ClientError> {
        let path = format!("/v1/agents/data/{}", url_encode(&self.agent_id));
        self.call_ok("POST", &path, Some(data), SMALL_ANSWER, retry).map(drop)
    }

    /// The agent's own record on the server; `None` when it has none yet.
    pub fn get_agent_data(&mut self) -> Result<Option<Json>, ClientError> {
        self.agent_data(self.retry)
    }

    fn agent_data(&mut self, retry: Retry) -> Result<Option<Json>, ClientError> {
        let path = format!("/v1/agents/data/{}", url_encode(&self.agent_id));
        let a = self.call("GET", &path, None, SMALL_ANSWER, retry)?;
        match a.status {
            200 => a.json(&self.url(&path)).map(Some),
            404 | 204 => Ok(None),
            status => Err(ClientError::Status { url: self.url(&path), status, body: String::new() }),
        }
    }

    /// The state the agent is held in on the server (`offline` or
    /// `maintenance`) and its comment; `Ok(None)` when it is not held (or
    /// has no record). Posting a state over it would undo an operator, so
    /// a failed read (`Err`) must not be taken for "not held".
    pub fn held_state(&mut self) -> Result<Option<(AgentState, String)>, ClientError> {
        self.held_state_with(self.retry)
    }

    pub fn held_state_with(&mut self, retry: Retry) -> Result<Option<(AgentState, String)>, ClientError> {
        let Some(data) = self.agent_data(retry)? else { return Ok(None) };
        let (state, comment) = AgentState::of(&data);
        Ok(state.is_hold().then_some((state, comment)))
    }

    pub fn post_queues(&mut self, queues: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", "/v1/agents/queues", Some(queues), SMALL_ANSWER, self.retry).map(drop)
    }

    pub fn post_images(&mut self, images: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", "/v1/agents/images", Some(images), SMALL_ANSWER, self.retry).map(drop)
    }

    /// Asks for a job on `queues`; `None` when there is none (204).
    pub fn get_job(&mut self, queues: &[String]) -> Result<Option<Json>, ClientError> {
        let query: Vec<String> = queues.iter().map(|q| format!("queue={}", url_encode(q))).collect();
        let path = format!("/v1/job?{}", query.join("&"));
        let a = self.call_ok("GET", &path, None, JOB_ANSWER, self.retry)?;
        if a.status == 204 || a.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let job = a.json(&self.url(&path))?;
        match job.get("job_id").and_then(Json::as_str) {
            Some(id) if is_safe_id(id) => Ok(Some(job)),
            _ => Err(ClientError::BadAnswer { url: self.url(&path), reason: "job without a valid job_id".into() }),
        }
    }

    /// The job's `job_state` on the server, if it can be read. `idle`, when
    /// given (the runner draining a phase's pipe), runs while the request
    /// waits on the server.
    pub fn job_state(&mut self, job_id: &str, idle: Option<&mut Idle>) -> Option<JobState> {
        self.job_state_with(job_id, idle, self.retry)
    }

    pub fn job_state_with(&mut self, job_id: &str, mut idle: Option<&mut Idle>, retry: Retry) -> Option<JobState> {
        let url = self.url(&format!("/v1/result/{job_id}"));
        let answer = self.with_retries("GET", &url, retry, &mut |c| {
            let reply = c.exchange(
                "GET",
                &url,
                Payload::None,
                Keep::Memory(JOB_ANSWER),
                retry.timeout,
                idle.as_deref_mut(),
                true,
            )?;
            Ok(Answer { status: reply.status, body: reply.body })
        });
        let result = answer
            .and_then(|a| a.ok(&url))
            .and_then(|a| if a.body.is_empty() { Ok(None) } else { a.json(&url).map(Some) });
        match result {
            Ok(Some(r)) => r.get("job_state").and_then(Json::as_str).map(JobState::parse),
            Ok(None) => None,
            Err(e) if e.is_stop() => None,
            Err(e) => {
                log::warn!("cannot read the job state: {e}");
                None
            }
        }
    }

    pub fn post_result(&mut self, job_id: &str, data: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", &format!("/v1/result/{job_id}"), Some(data), SMALL_ANSWER, self.retry).map(drop)
    }

    /// Posts one log fragment (`kind` is `output` or `serial`) whose JSON body, exactly `len` bytes, `body`
    /// writes straight into the socket (fragments can be megabytes).
    pub fn post_log_fragment_streamed(
        &mut self,
        job_id: &str,
        kind: &str,
        len: u64,
        body: &mut BodyWriter,
        idle: Option<&mut Idle>,
        retry: Retry,
    ) -> Result<(), ClientError> {
        self.call_streaming(&format!("/v1/result/{job_id}/log/{kind}"), "application/json", len, body, idle, retry)
    }

    pub fn post_provision_log(&mut self, data: &Json) -> Result<(), ClientError> {
        let path = format!("/v1/agents/provision_logs/{}", url_encode(&self.agent_id));
        self.call_ok("POST", &path, Some(data), SMALL_ANSWER, self.retry).map(drop)
    }

    pub fn post_events(&mut self, job_id: &str, data: &Json) -> Result<(), ClientError> {
        self.post_events_with(job_id, data, self.retry)
    }

    pub fn post_events_with(&mut self, job_id: &str, data: &Json, retry: Retry) -> Result<(), ClientError> {
        self.call_ok("POST", &format!("/v1/job/{job_id}/events"), Some(data), SMALL_ANSWER, retry).map(drop)
    }

    /// POST with a body written by `body` (exactly `len` bytes), retried
    /// like `call`, including the 401 refresh. Only a 2xx is a success.
    pub(super) fn call_streaming(
        &mut self,
        path: &str,
        content_type: &str,
        len: u64,
        body: &mut BodyWriter,
        mut idle: Option<&mut Idle>,
        retry: Retry,
    ) -> Result<(), ClientError> {
        let url = self.url(path);
        let a = self.with_retries("POST", &url, retry, &mut |c| {
            let payload = Payload::Stream { content_type, len, write: &mut *body };
            let reply =
                c.exchange("POST", &url, payload, Keep::Drop(SMALL_ANSWER), retry.timeout, idle.as_deref_mut(), true)?;
            Ok(Answer { status: reply.status, body: Vec::new() })
        })?;
        if (200..300).contains(&a.status) {
            Ok(())
        } else {
            Err(ClientError::Status { url, status: a.status, body: String::new() })
        }
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

/// The outage hold schedule. Tests only (debug builds):
/// `TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX=SECONDS` caps each hold, so
/// that a test whose faults make an outage does not wait out minute-long
/// random holds (they grow with the outage's age).
fn outage_hold() -> crate::retry::Schedule {
    let mut hold = OUTAGE_HOLD;
    if cfg!(debug_assertions) {
        if let Some(s) =
            std::env::var("TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX").ok().and_then(|s| s.parse::<f64>().ok())
        {
            if s.is_finite() && s > 0.0 {
                hold.max = hold.max.min(Duration::from_secs_f64(s));
                hold.first = hold.first.min(hold.max);
            }
        }
    }
    hold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_less_address_means_http() {
        assert_eq!(Client::new("10.0.0.5:8000", "a", None).base_url(), "http://10.0.0.5:8000");
        assert_eq!(Client::new("https://tf.example.com/", "a", None).base_url(), "https://tf.example.com");
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
