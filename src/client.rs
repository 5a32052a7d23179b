//! The Testflinger server API, one method per endpoint: the only module
//! that speaks HTTP.
//!
//! Every request carries the `agent_name` cookie and, when a token file is
//! configured, a bearer token (refreshed once and replayed once on a 401).
//! Connection errors and 500/502/503/504 are retried a few times with backoff;
//! what still fails is returned to the caller, which keeps the data and tries
//! again later: the client never drops anything on its own.
//! Every answer read into memory is capped, so a broken or hostile server
//! cannot make the agent allocate without bound.
//!
//! Redirects are followed only within the server's origin (scheme, host,
//! port): the token, the cookie and the body never go anywhere else, and
//! https is never given up for http. Such a redirect is refused and logged.

mod proxy;
#[cfg(feature = "tls")]
mod tls;
mod transport;
pub mod wire;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::json::Json;

pub use transport::{BodyWriter, Idle};
use transport::{Failure, Keep, Net, Payload, Reply};
use wire::Url;

/// Same-origin redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

/// Cap on ordinary answers (agent data, results, token).
const SMALL_ANSWER: usize = 1 << 20;
/// Cap on a job: jobs carry scripts and data, but not megabytes of it.
const JOB_ANSWER: usize = 16 << 20;
/// Cap on the attachments archive on disk.
pub const ATTACHMENTS_MAX: u64 = 4 << 30;

#[derive(Debug)]
pub enum ClientError {
    /// No answer: connection refused, reset, timed out, TLS failure.
    Connection { url: String, reason: String },
    /// The server answered with a status the caller cannot use.
    Status { url: String, status: u16, body: String },
    /// The answer was larger than the cap for that endpoint.
    TooLarge { url: String, limit: usize },
    /// The answer was not what the API promises (bad JSON...).
    BadAnswer { url: String, reason: String },
    /// A local file the request needed could not be used.
    Local { path: PathBuf, reason: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ClientError::Connection { url, reason } => write!(f, "{url}: no answer: {reason}"),
            ClientError::Status { url, status, body } => write!(f, "{url}: HTTP {status} {body}"),
            ClientError::TooLarge { url, limit } => write!(f, "{url}: answer larger than {limit} bytes"),
            ClientError::BadAnswer { url, reason } => write!(f, "{url}: bad answer: {reason}"),
            ClientError::Local { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// The server refuses this request for good: trying again cannot help.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Status { status, .. } if (400..500).contains(status) && !matches!(status, 401 | 408 | 429))
    }
}

fn is_retryable(status: u16) -> bool {
    matches!(status, 500 | 502 | 503 | 504)
}

/// How hard one call tries before giving the failure back.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            first_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        }
    }
}

/// A server answer, body already read (and capped).
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    fn json(&self, url: &str) -> Result<Json, ClientError> {
        Json::parse_bytes(&self.body).map_err(|e| ClientError::BadAnswer { url: url.to_string(), reason: e.to_string() })
    }

    /// Only a 2xx is a success; anything else is an error quoting the start
    /// of the answer.
    fn ok(self, url: &str) -> Result<Answer, ClientError> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            Err(ClientError::Status { url: url.to_string(), status: self.status, body: body_snippet(&self.body) })
        }
    }
}

pub struct Client {
    base: String,
    agent_id: String,
    token_file: Option<PathBuf>,
    access_token: Option<String>,
    /// When the last refresh was refused: a server that refuses our refresh
    /// token is not asked again on every call (no 401 storm of our own).
    refresh_refused: Option<std::time::Instant>,
    /// Refused refreshes in a row: the hold-off doubles with each.
    refresh_failures: u32,
    /// What was last said about the token file, so that a broken file is
    /// reported once per change rather than on every request.
    token_status: Option<String>,
    pub policy: RetryPolicy,
    /// Proxies and TLS trust.
    net: Net,
}

/// After a refused refresh, calls go out without a new attempt for this
/// long, doubled for each further refusal in a row up to the cap: a token
/// endpoint that fails for a moment is retried within seconds, one that
/// keeps refusing is asked every few minutes.
const REFRESH_HOLD_OFF: Duration = Duration::from_secs(1);
const REFRESH_HOLD_OFF_MAX: Duration = Duration::from_secs(300);

fn refresh_hold_off(failures: u32) -> Duration {
    (REFRESH_HOLD_OFF * 2u32.saturating_pow(failures.saturating_sub(1).min(16))).min(REFRESH_HOLD_OFF_MAX)
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
            refresh_refused: None,
            refresh_failures: 0,
            token_status: None,
            policy: RetryPolicy::default(),
            net: Net::new(),
        }
    }

    /// A CA file (PEM) trusted for https on top of the system store: the
    /// config's `server_ca_file`.
    pub fn set_ca_file(&mut self, path: Option<PathBuf>) {
        self.net.set_ca_file(path);
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The refresh token, or why there is none (`Err(None)`: no token file).
    fn token_file_state(&self) -> Result<String, Option<String>> {
        let path = self.token_file.as_ref().ok_or(None)?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Some(format!("token file {} does not exist: requests go without a token", path.display())));
            }
            Err(e) => return Err(Some(format!("cannot read token file {}: {e}", path.display()))),
        };
        match Json::parse(&text).ok().and_then(|j| j.get("refresh_token")?.as_str().map(String::from)) {
            Some(t) if !t.is_empty() => Ok(t),
            _ => Err(Some(format!("token file {} has no \"refresh_token\" string", path.display()))),
        }
    }

    /// Says once, at start, which token file is used and whether it can be.
    pub fn log_token_file(&mut self, origin: &str) {
        let Some(path) = self.token_file.clone() else {
            log::info!("no token file: requests go without a token");
            return;
        };
        let status = self.token_file_state().err().flatten();
        match &status {
            None => log::info!("token file {} ({origin})", path.display()),
            Some(problem) if !path.exists() => log::info!("{problem} ({origin})"),
            Some(problem) => log::warn!("{problem} ({origin})"),
        }
        self.token_status = status;
    }

    fn read_refresh_token(&mut self) -> Option<String> {
        let state = self.token_file_state();
        let status = state.as_ref().err().cloned().flatten();
        if status != self.token_status {
            match &status {
                Some(problem) if self.token_file.as_ref().is_some_and(|p| !p.exists()) => log::info!("{problem}"),
                Some(problem) => log::warn!("{problem}"),
                None => log::info!("token file {} read", self.token_file.as_ref().map_or(String::new(), |p| p.display().to_string())),
            }
            self.token_status = status;
        }
        state.ok()
    }

    /// Exchanges the refresh token for an access token. Returns whether we
    /// now hold one.
    fn refresh(&mut self) -> bool {
        if self.refresh_refused.is_some_and(|t| t.elapsed() < refresh_hold_off(self.refresh_failures)) {
            return false;
        }
        let Some(refresh_token) = self.read_refresh_token() else {
            return false;
        };
        let url = self.url("/v1/oauth2/refresh");
        let body = Json::object().with("refresh_token", Json::str(refresh_token.as_str())).to_string_compact();
        match self.send_once("POST", &url, Some(body.as_bytes()), SMALL_ANSWER, false) {
            Ok(a) if a.status == 200 => match a.json(&url).ok().and_then(|j| j.get("access_token")?.as_str().map(String::from)) {
                Some(token) => {
                    log::debug!("got a new access token from {url}");
                    self.access_token = Some(token);
                    self.refresh_refused = None;
                    self.refresh_failures = 0;
                    true
                }
                None => {
                    log::error!("{url}: answer has no access_token");
                    false
                }
            },
            Ok(a) => {
                self.refresh_failures = self.refresh_failures.saturating_add(1);
                log::error!(
                    "{url}: token refresh refused with HTTP {}; next attempt in {:?} at the earliest",
                    a.status,
                    refresh_hold_off(self.refresh_failures)
                );
                self.access_token = None;
                self.refresh_refused = Some(std::time::Instant::now());
                false
            }
            Err(e) => {
                log::error!("token refresh failed: {e}");
                false
            }
        }
    }

    /// One JSON (or empty) exchange, no retries.
    fn send_once(&self, method: &str, url: &str, body: Option<&[u8]>, cap: usize, auth: bool) -> Result<Answer, ClientError> {
        let payload = match body {
            Some(bytes) => Payload::Bytes { content_type: "application/json", bytes },
            None => Payload::None,
        };
        let reply = self.exchange(method, url, payload, Keep::Memory(cap), self.policy.timeout, None, auth)?;
        Ok(Answer { status: reply.status, body: reply.body })
    }

    /// One exchange through the transport, following redirects that stay
    /// on the server's origin and refusing the others.
    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        method: &str,
        url: &str,
        mut payload: Payload,
        keep: Keep,
        timeout: Duration,
        mut idle: Option<&mut Idle>,
        auth: bool,
    ) -> Result<Reply, ClientError> {
        let origin = Url::parse(url).map_err(|e| ClientError::Connection { url: url.to_string(), reason: e.to_string() })?;
        let headers = self.headers(auth);
        let mut target = origin.clone();
        let mut method = method;
        for hop in 0..=MAX_REDIRECTS {
            let reply = transport::exchange(&self.net, method, &target, &headers, payload.reborrow(), keep, timeout, idle.as_deref_mut())
                .map_err(|f| match f {
                    Failure::Net(e) => ClientError::Connection { url: target.to_string(), reason: e.to_string() },
                    Failure::TooLarge(limit) => ClientError::TooLarge { url: target.to_string(), limit: limit as usize },
                    Failure::Local(path, e) => ClientError::Local { path, reason: e.to_string() },
                })?;
            let status = reply.status;
            let location = match (&reply.location, status) {
                (Some(l), 301 | 302 | 303 | 307 | 308) => l,
                _ => return Ok(reply),
            };
            let refuse = |why: String| {
                log::error!("{method} {target}: HTTP {status} redirect refused: {why}; the token, cookie and body were not sent there");
                Err(ClientError::Status { url: target.to_string(), status, body: format!("redirect refused: {why}") })
            };
            let next = match target.join(location) {
                Ok(next) => next,
                Err(e) => return refuse(e.to_string()),
            };
            if !origin.same_origin(&next) {
                let why = if origin.https && !next.https { "a downgrade from https to http" } else { "on another origin" };
                return refuse(format!("{next} is {why} (the server is {}://{})", origin.scheme(), origin.host_header()));
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
    pub fn call(&mut self, method: &str, path: &str, body: Option<&Json>, cap: usize) -> Result<Answer, ClientError> {
        let url = self.url(path);
        let body_text = body.map(|b| b.to_string_compact());
        self.with_retries(method, &url, &mut |c| c.send_once(method, &url, body_text.as_deref().map(str::as_bytes), cap, true))
    }

    /// The one retry mechanism every call goes through: a token first when
    /// there is a token file and no token yet; on a 401 one refresh and one
    /// replay; connection errors and 500/502/503/504 retried with doubling
    /// backoff up to `policy.attempts`. What `send` answers last is returned.
    fn with_retries(
        &mut self,
        method: &str,
        url: &str,
        send: &mut dyn FnMut(&Client) -> Result<Answer, ClientError>,
    ) -> Result<Answer, ClientError> {
        if self.access_token.is_none() && self.token_file.is_some() {
            self.refresh();
        }
        let mut refreshed = false;
        let mut backoff = crate::jitter::spread(self.policy.first_backoff);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match send(self) {
                // Without a token file (the default path is usually absent)
                // a 401 has nothing to refresh: it is the answer.
                Ok(a) if a.status == 401 && !refreshed && self.token_file.as_ref().is_some_and(|p| p.exists()) => {
                    refreshed = true;
                    log::info!("{method} {url}: HTTP 401, refreshing the access token");
                    if !self.refresh() {
                        return Ok(a);
                    }
                    continue;
                }
                Ok(a) if is_retryable(a.status) && attempt < self.policy.attempts => {
                    log::warn!("{method} {url}: HTTP {} (attempt {attempt}), retrying in {backoff:?}", a.status);
                }
                Err(e @ ClientError::Connection { .. }) if attempt < self.policy.attempts => {
                    log::warn!("{method} {e} (attempt {attempt}), retrying in {backoff:?}");
                }
                other => return other,
            }
            std::thread::sleep(backoff);
            // Spread (±20 %) so that agents failing together retry apart.
            backoff = crate::jitter::spread((backoff * 2).min(self.policy.max_backoff));
        }
    }

    /// A call whose only success is a 2xx; anything else becomes an error.
    fn call_ok(&mut self, method: &str, path: &str, body: Option<&Json>, cap: usize) -> Result<Answer, ClientError> {
        self.call(method, path, body, cap)?.ok(&self.url(path))
    }

    /// Any answer below 500 means the server is up (a 404 on `/v1` too).
    pub fn is_reachable(&self) -> bool {
        self.reachability().is_ok()
    }

    /// `Err` says why the server cannot be reached, for the log.
    pub fn reachability(&self) -> Result<(), String> {
        match self.send_once("GET", &self.url("/v1/"), None, SMALL_ANSWER, false) {
            Ok(a) if a.status < 500 => Ok(()),
            Ok(a) => Err(format!("HTTP {}", a.status)),
            Err(ClientError::Connection { reason, .. }) => Err(reason),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn post_agent_data(&mut self, data: &Json) -> Result<(), ClientError> {
        let path = format!("/v1/agents/data/{}", url_encode(&self.agent_id));
        self.call_ok("POST", &path, Some(data), SMALL_ANSWER).map(drop)
    }

    /// The agent's own record on the server; `None` when it has none yet.
    pub fn get_agent_data(&mut self) -> Result<Option<Json>, ClientError> {
        let path = format!("/v1/agents/data/{}", url_encode(&self.agent_id));
        let a = self.call("GET", &path, None, SMALL_ANSWER)?;
        match a.status {
            200 => a.json(&self.url(&path)).map(Some),
            404 | 204 => Ok(None),
            status => Err(ClientError::Status { url: self.url(&path), status, body: String::new() }),
        }
    }

    /// The state the agent is held in on the server (`offline` or
    /// `maintenance`) and its comment; `None` when there is none or it
    /// cannot be read. Posting a state over it would undo an operator.
    pub fn held_state(&mut self) -> Option<(String, String)> {
        let data = self.get_agent_data().ok().flatten()?;
        let state = data.get("state").and_then(Json::as_str)?;
        let comment = data.get("comment").and_then(Json::as_str).unwrap_or("");
        matches!(state, "offline" | "maintenance").then(|| (state.to_string(), comment.to_string()))
    }

    pub fn post_queues(&mut self, queues: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", "/v1/agents/queues", Some(queues), SMALL_ANSWER).map(drop)
    }

    pub fn post_images(&mut self, images: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", "/v1/agents/images", Some(images), SMALL_ANSWER).map(drop)
    }

    /// Asks for a job on `queues`; `None` when there is none (204).
    pub fn get_job(&mut self, queues: &[String]) -> Result<Option<Json>, ClientError> {
        let query: Vec<String> = queues.iter().map(|q| format!("queue={}", url_encode(q))).collect();
        let path = format!("/v1/job?{}", query.join("&"));
        let a = self.call_ok("GET", &path, None, JOB_ANSWER)?;
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
    pub fn job_state(&mut self, job_id: &str, mut idle: Option<&mut Idle>) -> Option<String> {
        let url = self.url(&format!("/v1/result/{job_id}"));
        let answer = self.with_retries("GET", &url, &mut |c| {
            let reply = c.exchange("GET", &url, Payload::None, Keep::Memory(JOB_ANSWER), c.policy.timeout, idle.as_deref_mut(), true)?;
            Ok(Answer { status: reply.status, body: reply.body })
        });
        let result = answer.and_then(|a| a.ok(&url)).and_then(|a| if a.body.is_empty() { Ok(None) } else { a.json(&url).map(Some) });
        match result {
            Ok(Some(r)) => r.get("job_state").and_then(Json::as_str).map(String::from),
            Ok(None) => None,
            Err(e) => {
                log::warn!("cannot read the job state: {e}");
                None
            }
        }
    }

    /// The agent's cookie and, when asked and it has one, its bearer token.
    fn headers(&self, auth: bool) -> Vec<(String, String)> {
        let mut headers = vec![("Cookie".to_string(), format!("agent_name={}", self.agent_id))];
        if let Some(token) = self.access_token.as_ref().filter(|_| auth) {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        headers
    }

    pub fn post_result(&mut self, job_id: &str, data: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", &format!("/v1/result/{job_id}"), Some(data), SMALL_ANSWER).map(drop)
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
    ) -> Result<(), ClientError> {
        self.call_streaming(&format!("/v1/result/{job_id}/log/{kind}"), "application/json", len, body, idle)
    }

    /// Runs `f` with one attempt per call and `timeout` per request, for
    /// calls made while a phase runs: the caller has its own retry schedule
    /// and must not leave the child's output undrained for long.
    pub fn once<T>(&mut self, timeout: Duration, f: impl FnOnce(&mut Client) -> T) -> T {
        let saved = self.policy;
        self.policy = RetryPolicy { attempts: 1, timeout, ..saved };
        let out = f(self);
        self.policy = saved;
        out
    }

    pub fn post_provision_log(&mut self, data: &Json) -> Result<(), ClientError> {
        let path = format!("/v1/agents/provision_logs/{}", url_encode(&self.agent_id));
        self.call_ok("POST", &path, Some(data), SMALL_ANSWER).map(drop)
    }

    pub fn post_events(&mut self, job_id: &str, data: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", &format!("/v1/job/{job_id}/events"), Some(data), SMALL_ANSWER).map(drop)
    }

    /// Uploads the artifact tarball at `archive` as `multipart/form-data`
    /// (part `file`), streamed from disk: memory use does not grow with its
    /// size. Retried like any call; a partial upload never counts as sent.
    pub fn post_artifact(&mut self, job_id: &str, archive: &Path) -> Result<(), ClientError> {
        let path = format!("/v1/result/{job_id}/artifact");
        let size = std::fs::metadata(archive)
            .map_err(|e| ClientError::Local { path: archive.to_path_buf(), reason: e.to_string() })?
            .len();
        let boundary = format!("tfboundary{:016x}", size ^ 0x5bd1_e995_u64.wrapping_mul(std::process::id() as u64));
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\nContent-Type: application/x-gzip\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let len = head.len() as u64 + size + tail.len() as u64;
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let mut write_body = |w: &mut dyn std::io::Write| -> std::io::Result<()> {
            w.write_all(head.as_bytes())?;
            let mut f = std::fs::File::open(archive)?;
            let copied = std::io::copy(&mut f, w)?;
            if copied != size {
                return Err(std::io::Error::other("archive changed size while uploading"));
            }
            w.write_all(tail.as_bytes())
        };
        self.call_streaming(&path, &content_type, len, &mut write_body, None)
    }

    /// POST with a body written by `body` (exactly `len` bytes), retried
    /// like `call`, including the 401 refresh. Only a 2xx is a success.
    pub fn call_streaming(
        &mut self,
        path: &str,
        content_type: &str,
        len: u64,
        body: &mut BodyWriter,
        mut idle: Option<&mut Idle>,
    ) -> Result<(), ClientError> {
        let url = self.url(path);
        let a = self.with_retries("POST", &url, &mut |c| {
            let payload = Payload::Stream { content_type, len, write: &mut *body };
            let reply = c.exchange("POST", &url, payload, Keep::Drop(SMALL_ANSWER), c.policy.timeout, idle.as_deref_mut(), true)?;
            Ok(Answer { status: reply.status, body: Vec::new() })
        })?;
        if (200..300).contains(&a.status) {
            Ok(())
        } else {
            Err(ClientError::Status { url, status: a.status, body: String::new() })
        }
    }

    /// Downloads the job's attachments archive to `dest`, streaming.
    /// Returns false when the server has none (204).
    pub fn download_attachments(&mut self, job_id: &str, dest: &Path) -> Result<bool, ClientError> {
        let url = self.url(&format!("/v1/job/{job_id}/attachments"));
        let a = self.with_retries("GET", &url, &mut |c| c.download_once(&url, dest))?;
        match a.status {
            200 => Ok(true),
            204 => Ok(false),
            status => Err(ClientError::Status { url, status, body: String::new() }),
        }
    }

    /// One download attempt; the body goes to `dest` only on a 200 (the
    /// answer's own body is left empty). A cut-off download is an error, to
    /// be retried, never unpacked.
    fn download_once(&self, url: &str, dest: &Path) -> Result<Answer, ClientError> {
        let keep = Keep::File { path: dest, cap: ATTACHMENTS_MAX, other: SMALL_ANSWER };
        let reply = self.exchange("GET", url, Payload::None, keep, self.policy.timeout, None, true)?;
        Ok(Answer { status: reply.status, body: Vec::new() })
    }
}

/// Job ids name directories on disk: allow only what a UUID needs.
pub fn is_safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') && id != "." && id != ".."
}

/// The start of an error answer for a log line: one line (runs of white
/// space and control characters become one space), at most 200 characters.
fn body_snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let words: Vec<&str> = text.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()).collect();
    words.join(" ").chars().take(200).collect()
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
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

    #[test]
    fn job_ids_that_could_escape_the_run_dir_are_refused() {
        assert!(is_safe_id("0d3a59a2-7e7b-4a3e-9f7d-3f1c2b9e8a11"));
        for bad in ["", "..", "../x", "a/b", "a b"] {
            assert!(!is_safe_id(bad), "{bad}");
        }
    }

    #[test]
    fn refresh_hold_off_doubles_up_to_five_minutes() {
        assert_eq!(refresh_hold_off(1), Duration::from_secs(1));
        assert_eq!(refresh_hold_off(2), Duration::from_secs(2));
        assert_eq!(refresh_hold_off(4), Duration::from_secs(8));
        assert_eq!(refresh_hold_off(20), Duration::from_secs(300));
        assert_eq!(refresh_hold_off(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn error_bodies_become_one_short_line() {
        let html = format!("<html>\r\n  <body>\n\tBad\x00 gateway {}</body>\n", "x".repeat(500));
        let line = body_snippet(html.as_bytes());
        assert!(line.starts_with("<html> <body> Bad gateway xxx"), "{line}");
        assert_eq!(line.chars().count(), 200);
        assert_eq!(body_snippet("é".repeat(300).as_bytes()).chars().count(), 200);
    }

    #[test]
    fn queue_names_are_encoded() {
        assert_eq!(url_encode("my queue&x"), "my%20queue%26x");
    }
}
