//! A fake Testflinger server (API v1) for the integration tests.
//!
//! Plain std: one accept thread, one thread per connection, HTTP/1.1 with
//! keep-alive, `Content-Length` and chunked request bodies. Every request is
//! recorded with the status the fake answered; accepted connections are
//! counted. A kept connection idle for [`READ_TIMEOUT`] (or what
//! `set_idle_timeout` says) is closed, as a server's keep-alive timeout
//! does; `set_connection_faults` closes kept connections at every moment a
//! server can (see [`ConnectionFault`]). State lives behind one mutex;
//! tests read it through the accessors and change it through the setters.
//!
//! Validation mirrors the server's OpenAPI schemas (unknown fields in agent
//! data, results, log fragments and events are refused with 422), so a test
//! fails when the agent sends something the real server would refuse. Call
//! `set_lenient(true)` to turn that off.
#![allow(dead_code)]

use crate::json::Json;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Results bodies larger than this are refused with 413, like the real server.
pub const MAX_RESULT_BYTES: usize = 16 * 1024 * 1024;
/// Any request body larger than this is refused with 413 without being read.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
const MAX_LINE: u64 = 16 * 1024;
const MAX_HEADERS: usize = 100;
/// Idle and mid-request read timeout, so connection threads always end.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One request as the fake saw it, with the status it answered
/// (0 when the connection was closed without an answer).
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Percent-decoded path without the query string.
    pub path: String,
    /// Decoded query pairs in order (`+` is a space).
    pub query: Vec<(String, String)>,
    /// Header names are lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub status: u16,
    /// When the request was fully read.
    pub at: Instant,
}

impl Recorded {
    /// First header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Json> {
        Json::parse_bytes(&self.body).ok()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// All values of query parameter `name`.
    pub fn query_all(&self, name: &str) -> Vec<String> {
        self.query.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }

    /// `METHOD /path?query -> status`, for failure messages.
    pub fn line(&self) -> String {
        let q: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let q = if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) };
        format!("{} {}{} -> {}", self.method, self.path, q, self.status)
    }
}

/// One live log fragment as posted to `/v1/result/<id>/log/<kind>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fragment {
    pub number: i64,
    pub phase: String,
    pub data: String,
    pub timestamp: String,
}

/// What a matching fault does instead of (or before) the normal answer.
#[derive(Clone, Debug)]
pub enum FaultAction {
    /// Answer this status with an empty body.
    Status(u16),
    /// Read the request, then close the connection without answering.
    CloseWithoutAnswer,
    /// Sleep, then answer normally.
    Stall(Duration),
    /// Sleep, then answer this status with an empty body: failures that
    /// take a known least time, whatever the client's retry spread.
    SlowStatus(Duration, u16),
    /// Answer exactly this.
    Body { status: u16, content_type: String, body: Vec<u8> },
    /// Handle the request normally (state changes happen), then send only
    /// the first half of the answer's bytes and close: the client cannot
    /// tell whether the server took it. Recorded with status 0.
    ResetMidAnswer,
    /// Do not handle the request: send exactly these bytes (e.g. half a
    /// status line or headers) and close. Recorded with status 0.
    RawThenClose(Vec<u8>),
    /// Answer 200 `application/json` with a `Content-Length` of `len` bytes,
    /// generated as it is written (`{"a":"xxxx...`), never held in memory.
    /// Writing stops when the client closes.
    Huge { len: u64 },
    /// Handle the request normally: lets the first matching requests
    /// through before a fault added after this one.
    Pass,
    /// Do not handle the request: answer one byte every `Duration`, an
    /// answer that never ends (a 200 announcing a megabyte), until the
    /// client closes. Recorded with status 0 when it arrives.
    Drip(Duration),
    /// Handle the request normally (state changes happen), then answer
    /// like `Drip`: a slow server that took the request.
    DripAfterHandling(Duration),
    /// Once the file `armed` exists (a phase can make it), hold each answer
    /// (making the file `holding` meanwhile, for the phase to wait on) until
    /// the file `release` exists, then handle the request normally (counted
    /// by `released_holds`); after `max` without it, answer 503 instead, so
    /// the record says which came first. Before `armed`, the request is
    /// handled normally.
    StallUntil { armed: std::path::PathBuf, holding: std::path::PathBuf, release: std::path::PathBuf, max: Duration },
    /// Do not handle the request: send exactly these bytes, then keep the
    /// connection open until the client closes it (counted by
    /// `closed_by_client`) or the server stops. Recorded with status 0.
    RawThenHold(Vec<u8>),
    /// Answer this status as soon as the head and the first body byte are
    /// in, then close without reading the rest (nginx's 413 for a body
    /// over `client_max_body_size`: the client's writes get a reset).
    /// Recorded with this status and an empty body.
    EarlyAnswer(u16),
}

/// Where `set_connection_faults` ends a kept connection, in turn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ConnectionFault {
    /// None: the request is handled and the connection kept.
    Keep,
    /// As the next request arrives, before reading a byte of it (the race
    /// of a server ending an idle connection): it is not handled, not
    /// recorded, and the unread bytes make the close a reset.
    BeforeRequest,
    /// After reading the request's head, before its body: not handled,
    /// recorded with status 0.
    MidRequest,
    /// After handling and answering it (without saying `Connection:
    /// close`): the client finds the connection closed before its next
    /// request.
    AfterAnswer,
}

const CONNECTION_FAULTS: [ConnectionFault; 4] =
    [ConnectionFault::Keep, ConnectionFault::BeforeRequest, ConnectionFault::MidRequest, ConnectionFault::AfterAnswer];

/// Matches requests whose method equals `method` (any when `None`) and whose
/// path starts with `path_prefix`, `times` times; faults are tried in the
/// order they were added.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: Option<String>,
    pub path_prefix: String,
    pub times: usize,
    pub action: FaultAction,
}

impl Fault {
    pub fn new(method: Option<&str>, path_prefix: &str, times: usize, action: FaultAction) -> Fault {
        Fault { method: method.map(str::to_string), path_prefix: path_prefix.to_string(), times, action }
    }

    /// Shorthand: `times` answers of `status` with an empty body.
    pub fn status(method: &str, path_prefix: &str, times: usize, status: u16) -> Fault {
        Fault::new(Some(method), path_prefix, times, FaultAction::Status(status))
    }
}

struct Auth {
    refresh_token: String,
    valid: Option<String>,
    issued: u64,
}

#[derive(Default)]
struct State {
    requests: Vec<Recorded>,
    /// Requests a `Stall` holds right now, recorded as they arrive (the
    /// others are recorded once answered).
    stalling: usize,
    /// Requests a `Drip` answers right now.
    dripping: usize,
    /// `RawThenHold` connections the client closed first.
    closed_by_client: usize,
    /// `StallUntil` answers held until their release file came.
    released_holds: usize,
    agents: HashMap<String, Json>,
    agent_states: HashMap<String, Vec<String>>,
    jobs: VecDeque<Json>,
    results: HashMap<String, Json>,
    cancelled: HashSet<String>,
    results_posted: HashMap<String, Vec<Json>>,
    fragments: HashMap<(String, String), Vec<Fragment>>,
    artifacts: HashMap<String, Vec<u8>>,
    attachments: HashMap<String, Vec<u8>>,
    event_posts: HashMap<String, Vec<Json>>,
    auth: Option<Auth>,
    faults: Vec<Fault>,
    lenient: bool,
    /// Answers say `Connection: close` and the connection ends (`false`:
    /// gunicorn's sync workers, upstream's default).
    no_keep_alive: bool,
    /// How long a connection may idle between requests (default
    /// `READ_TIMEOUT`).
    idle_timeout: Option<Duration>,
    /// The rotation of `set_connection_faults`, when on: how many requests
    /// on kept connections it has seen.
    connection_faults: Option<usize>,
    /// `set_body_limit`: bodies announced larger get an early 413.
    body_limit: Option<usize>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    /// Bumped by `stop_listening`; connections of older generations end.
    generation: AtomicU64,
    /// Connections accepted.
    accepted: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alive(&self, generation: u64) -> bool {
        !self.stop.load(Ordering::SeqCst) && self.generation.load(Ordering::SeqCst) == generation
    }
}

/// The fake server. Stops (and frees its port) when dropped.
pub struct FakeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl FakeServer {
    /// Binds `127.0.0.1:0` and serves in background threads.
    pub fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake server: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake server: local_addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let handle = spawn_acceptor(listener, shared.clone(), 0);
        FakeServer { addr, shared, acceptor: Mutex::new(Some(handle)) }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT` (no scheme).
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes the listening socket (new connections are refused) and ends open
    /// connections after their current request; the state is kept.
    pub fn stop_listening(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.acceptor.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }

    /// Listens again on the same port after `stop_listening`.
    pub fn resume_listening(&self) {
        let mut slot = self.acceptor.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => panic!("fake server: rebind {}: {e}", self.addr),
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        let generation = self.shared.generation.load(Ordering::SeqCst);
        *slot = Some(spawn_acceptor(listener, self.shared.clone(), generation));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    // ---- recorded requests -------------------------------------------------

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Requests with this method (case-insensitive) whose path starts with `path_prefix`.
    pub fn requests_to(&self, method: &str, path_prefix: &str) -> Vec<Recorded> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.starts_with(path_prefix))
            .cloned()
            .collect()
    }

    /// How many requests a `Stall` fault holds unanswered right now.
    pub fn stalling(&self) -> usize {
        self.lock().stalling
    }

    /// How many requests a `Drip` fault answers right now.
    pub fn dripping(&self) -> usize {
        self.lock().dripping
    }

    /// How many answers a `StallUntil` held until its release file came.
    pub fn released_holds(&self) -> usize {
        self.lock().released_holds
    }

    /// How many `RawThenHold` connections the client closed before the
    /// server did.
    pub fn closed_by_client(&self) -> usize {
        self.lock().closed_by_client
    }

    /// One line per recorded request: `METHOD /path?q -> status`.
    pub fn request_lines(&self) -> Vec<String> {
        self.lock().requests.iter().map(Recorded::line).collect()
    }

    /// Polls `cond` every 10 ms; panics naming `what`, with the recorded
    /// request lines, when it is still false after `timeout`.
    pub fn wait_until(&self, timeout: Duration, what: &str, cond: impl Fn(&FakeServer) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}\nrequests seen:\n  {}",
                    self.request_lines().join("\n  ")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    // ---- agents ------------------------------------------------------------

    /// The `state` field of each POST to `/v1/agents/data/<id>` that had one, in order.
    pub fn agent_states(&self, id: &str) -> Vec<String> {
        self.lock().agent_states.get(id).cloned().unwrap_or_default()
    }

    /// The stored agent data (what `GET /v1/agents/data/<id>` answers).
    pub fn agent_data(&self, id: &str) -> Option<Json> {
        self.lock().agents.get(id).cloned()
    }

    /// Sets the agent's state and comment as an operator would (not recorded
    /// in `agent_states`).
    pub fn set_agent_state(&self, id: &str, state: &str, comment: &str) {
        let mut st = self.lock();
        let data = agent_entry(&mut st, id);
        data.set("state", Json::str(state));
        data.set("comment", Json::str(comment));
        data.set("updated_at", Json::str(now_iso()));
    }

    /// Sets `restricted_to`, e.g. `{"test-queue": ["alice"]}` as JSON text.
    pub fn set_restricted_to(&self, id: &str, json_text: &str) {
        let v = Json::parse(json_text).expect("set_restricted_to: invalid JSON");
        agent_entry(&mut self.lock(), id).set("restricted_to", v);
    }

    // ---- jobs and results --------------------------------------------------

    /// Queues a job (JSON text with at least `job_id` and `job_queue`); its
    /// result starts as `{"job_state": "waiting"}`.
    pub fn push_job(&self, json_text: &str) {
        let job = Json::parse(json_text).expect("push_job: invalid JSON");
        let id = job["job_id"].as_str().expect("push_job: job needs a string job_id").to_string();
        assert!(job["job_queue"].as_str().is_some(), "push_job: job needs a string job_queue");
        let mut st = self.lock();
        st.results.entry(id).or_insert_with(|| {
            let mut r = Json::obj();
            r.set("job_state", Json::str("waiting"));
            r
        });
        st.jobs.push_back(job);
    }

    /// Jobs still queued (not handed out).
    pub fn queued_jobs(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Marks the job cancelled; later agent posts of `job_state` do not overwrite it.
    pub fn cancel_job(&self, job_id: &str) {
        let mut st = self.lock();
        st.cancelled.insert(job_id.to_string());
        st.results.entry(job_id.to_string()).or_insert_with(Json::obj).set("job_state", Json::str("cancelled"));
    }

    /// Sets the job's `job_state` (e.g. a parent job becoming `complete`).
    pub fn set_job_state(&self, job_id: &str, state: &str) {
        self.lock().results.entry(job_id.to_string()).or_insert_with(Json::obj).set("job_state", Json::str(state));
    }

    /// The stored result (merged posts plus `job_state`).
    pub fn result(&self, job_id: &str) -> Option<Json> {
        self.lock().results.get(job_id).cloned()
    }

    /// Every accepted `POST /v1/result/<job_id>` body, in order.
    pub fn results_posted(&self, job_id: &str) -> Vec<Json> {
        self.lock().results_posted.get(job_id).cloned().unwrap_or_default()
    }

    /// The `job_state` values the agent posted, in order.
    pub fn job_states_posted(&self, job_id: &str) -> Vec<String> {
        self.results_posted(job_id).iter().filter_map(|r| r["job_state"].as_str().map(str::to_string)).collect()
    }

    // ---- logs --------------------------------------------------------------

    /// Fragments of `kind` (`output` or `serial`) in arrival order.
    pub fn fragments(&self, job_id: &str, kind: &str) -> Vec<Fragment> {
        self.lock().fragments.get(&(job_id.to_string(), kind.to_string())).cloned().unwrap_or_default()
    }

    /// All fragment data of `kind`, ordered by fragment number.
    pub fn log_text(&self, job_id: &str, kind: &str) -> String {
        let mut f = self.fragments(job_id, kind);
        f.sort_by_key(|f| f.number);
        f.iter().map(|f| f.data.as_str()).collect()
    }

    /// Like `log_text`, only fragments of one phase.
    pub fn log_text_phase(&self, job_id: &str, kind: &str, phase: &str) -> String {
        let mut f = self.fragments(job_id, kind);
        f.retain(|f| f.phase == phase);
        f.sort_by_key(|f| f.number);
        f.iter().map(|f| f.data.as_str()).collect()
    }

    // ---- artifacts and attachments -----------------------------------------

    /// The bytes of the last uploaded artifact `file` part.
    pub fn artifact(&self, job_id: &str) -> Option<Vec<u8>> {
        self.lock().artifacts.get(job_id).cloned()
    }

    /// Members of the uploaded tar.gz: (path, content, tar entry type byte).
    /// Empty when there is no artifact; panics when it is not a tar.gz.
    pub fn artifact_members(&self, job_id: &str) -> Vec<(String, Vec<u8>, u8)> {
        match self.artifact(job_id) {
            Some(bytes) => tar_gz_members(&bytes).unwrap_or_else(|e| panic!("artifact of {job_id}: {e}")),
            None => Vec::new(),
        }
    }

    /// What `GET /v1/job/<job_id>/attachments` answers (200 application/gzip).
    pub fn set_attachments(&self, job_id: &str, bytes: Vec<u8>) {
        self.lock().attachments.insert(job_id.to_string(), bytes);
    }

    // ---- events ------------------------------------------------------------

    /// Event names of the last events post for the job (each post carries all events).
    pub fn events(&self, job_id: &str) -> Vec<String> {
        let st = self.lock();
        let Some(last) = st.event_posts.get(job_id).and_then(|p| p.last()) else { return Vec::new() };
        last["events"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["event_name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    /// Every accepted events post for the job, in order.
    pub fn event_posts(&self, job_id: &str) -> Vec<Json> {
        self.lock().event_posts.get(job_id).cloned().unwrap_or_default()
    }

    // ---- auth --------------------------------------------------------------

    /// Turns authentication on: `refresh_token` is the one valid refresh
    /// token; agent endpoints then need `Authorization: Bearer tok-N`.
    pub fn require_auth(&self, refresh_token: &str) {
        self.lock().auth = Some(Auth { refresh_token: refresh_token.to_string(), valid: None, issued: 0 });
    }

    /// Invalidates the current access token (the next agent request gets 401).
    pub fn expire_token(&self) {
        if let Some(a) = self.lock().auth.as_mut() {
            a.valid = None;
        }
    }

    /// How many access tokens were issued (successful refreshes).
    pub fn refresh_count(&self) -> u64 {
        self.lock().auth.as_ref().map_or(0, |a| a.issued)
    }

    // ---- connections ---------------------------------------------------------

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// `false`: every answer says `Connection: close` and ends the
    /// connection, as upstream's gunicorn (sync workers) does.
    pub fn set_keep_alive(&self, on: bool) {
        self.lock().no_keep_alive = !on;
    }

    /// How long a kept connection may idle before the fake closes it (a
    /// server's keep-alive timeout).
    pub fn set_idle_timeout(&self, timeout: Duration) {
        self.lock().idle_timeout = Some(timeout);
    }

    /// Every request that comes on a kept connection (not the first on a
    /// connection: those always go through, so the client can progress)
    /// meets the next of the [`ConnectionFault`] moments in turn.
    pub fn set_connection_faults(&self, on: bool) {
        self.lock().connection_faults = on.then_some(0);
    }

    /// Every request whose `Content-Length` is over `bytes` is answered 413
    /// as soon as its head and first body byte are in, and the connection
    /// closed unread (nginx's `client_max_body_size`, 1 MiB by default, in
    /// front of the server). Recorded with status 413 and an empty body.
    pub fn set_body_limit(&self, bytes: usize) {
        self.lock().body_limit = Some(bytes);
    }

    // ---- faults and strictness ---------------------------------------------

    pub fn add_fault(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// When true, bodies are not checked against the OpenAPI schemas.
    pub fn set_lenient(&self, lenient: bool) {
        self.lock().lenient = lenient;
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.acceptor.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

fn spawn_acceptor(listener: TcpListener, shared: Arc<Shared>, generation: u64) -> JoinHandle<()> {
    thread::spawn(move || {
        for conn in listener.incoming() {
            if !shared.alive(generation) {
                break;
            }
            match conn {
                Ok(stream) => {
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    let shared = shared.clone();
                    thread::spawn(move || serve_connection(stream, shared, generation));
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

// ---- HTTP ------------------------------------------------------------------

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
    at: Instant,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn record(&self, status: u16) -> Recorded {
        Recorded {
            method: self.method.clone(),
            path: self.path.clone(),
            query: self.query.clone(),
            headers: self.headers.clone(),
            body: self.body.clone(),
            status,
            at: self.at,
        }
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn empty(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Vec::new() }
    }

    fn json(status: u16, v: &Json) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: format!("{v}\n").into_bytes(),
        }
    }

    fn ok() -> Response {
        Response {
            status: 200,
            headers: vec![("Content-Type".into(), "text/html; charset=utf-8".into())],
            body: b"OK".to_vec(),
        }
    }

    /// A JSON error like APIFlask's: `{"detail": {}, "message": "..."}`.
    fn error(status: u16, message: &str) -> Response {
        let mut v = Json::obj();
        v.set("detail", Json::obj());
        v.set("message", Json::str(message));
        Response::json(status, &v)
    }
}

enum ReadError {
    /// End of stream, timeout or I/O error: just close.
    Close,
    /// Malformed or too large: answer this status, then close.
    Reply(u16, &'static str),
}

/// Waits for the first byte of the next request, looking at the server's
/// stop every 20 ms; false when the connection must end (closed by the
/// client, the server stopping, or idle past its timeout).
fn wait_for_request(reader: &mut BufReader<TcpStream>, shared: &Shared, generation: u64) -> bool {
    let idle_timeout = shared.lock().idle_timeout.unwrap_or(READ_TIMEOUT);
    let started = Instant::now();
    let _ = reader.get_ref().set_read_timeout(Some(Duration::from_millis(20)));
    let ready = loop {
        match reader.fill_buf() {
            Ok(b) => break !b.is_empty(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) =>
            {
                if !shared.alive(generation) || started.elapsed() >= idle_timeout {
                    break false;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = reader.get_ref().set_read_timeout(Some(READ_TIMEOUT));
    ready
}

fn serve_connection(stream: TcpStream, shared: Arc<Shared>, generation: u64) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let mut served = 0usize;
    while shared.alive(generation) {
        if !wait_for_request(&mut reader, &shared, generation) {
            break;
        }
        let fault = {
            let mut st = shared.lock();
            match st.connection_faults.as_mut() {
                Some(n) if served > 0 => {
                    *n += 1;
                    CONNECTION_FAULTS[*n % CONNECTION_FAULTS.len()]
                }
                _ => ConnectionFault::Keep,
            }
        };
        served += 1;
        if fault == ConnectionFault::BeforeRequest {
            break;
        }
        let req = match read_request(&mut reader, &mut writer, &shared, fault == ConnectionFault::MidRequest) {
            Ok(Some(req)) => req,
            Ok(None) | Err(ReadError::Close) => break,
            Err(ReadError::Reply(status, msg)) => {
                let _ = write_response(&mut writer, &Response::error(status, msg), false);
                break;
            }
        };
        if !shared.alive(generation) {
            break;
        }
        let keep_alive = req.keep_alive && !shared.lock().no_keep_alive;
        match handle(&shared, req) {
            Reply::Full(resp) => {
                if write_response(&mut writer, &resp, keep_alive).is_err()
                    || !keep_alive
                    || fault == ConnectionFault::AfterAnswer
                {
                    break;
                }
            }
            Reply::Close => break,
            Reply::RawThenHold(bytes) => {
                let _ = writer.write_all(&bytes);
                let _ = writer.flush();
                let _ = writer.set_read_timeout(Some(Duration::from_millis(50)));
                let mut buf = [0u8; 512];
                while shared.alive(generation) {
                    match reader.read(&mut buf) {
                        Ok(0) => {
                            shared.lock().closed_by_client += 1;
                            break;
                        }
                        Ok(_) => {}
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        }
                        Err(_) => {
                            shared.lock().closed_by_client += 1;
                            break;
                        }
                    }
                }
                break;
            }
            Reply::Raw(bytes) => {
                let _ = writer.write_all(&bytes);
                let _ = writer.flush();
                break;
            }
            Reply::Huge(len) => {
                let _ = write_huge(&mut writer, len);
                break;
            }
            Reply::Drip(every) => {
                shared.lock().dripping += 1;
                let answer =
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{\"a\":\"";
                for b in answer.iter().chain(std::iter::repeat(&b'x')) {
                    if !shared.alive(generation) || writer.write_all(&[*b]).and_then(|()| writer.flush()).is_err() {
                        break;
                    }
                    thread::sleep(every);
                }
                shared.lock().dripping -= 1;
                break;
            }
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

fn read_line(reader: &mut BufReader<TcpStream>) -> Result<Option<String>, ReadError> {
    let mut buf = Vec::new();
    match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf) {
        Ok(0) => Ok(None),
        Ok(_) if !buf.ends_with(b"\n") => {
            if buf.len() as u64 >= MAX_LINE {
                Err(ReadError::Reply(431, "line too long"))
            } else {
                Err(ReadError::Close)
            }
        }
        Ok(_) => {
            while buf.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                buf.pop();
            }
            Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
        }
        Err(_) => Err(ReadError::Close),
    }
}

/// Reads one request; `Ok(None)` on a clean end of stream between requests.
/// `cut`: stop after the head, record the request with status 0, close.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    shared: &Shared,
    cut: bool,
) -> Result<Option<Request>, ReadError> {
    // Tolerate empty lines between requests.
    let line = loop {
        match read_line(reader) {
            Ok(Some(l)) if l.is_empty() => continue,
            Ok(Some(l)) => break l,
            Ok(None) => return Ok(None),
            Err(ReadError::Close) => return Ok(None),
            Err(e) => return Err(e),
        }
    };
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ReadError::Reply(400, "bad request line"));
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !method.bytes().all(|c| c.is_ascii_uppercase()) {
        return Err(ReadError::Reply(400, "bad request line"));
    }
    let http10 = version == "HTTP/1.0";
    let method = method.to_string();

    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let Some(l) = read_line(reader)? else { return Err(ReadError::Close) };
        if l.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(ReadError::Reply(431, "too many headers"));
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(ReadError::Reply(400, "bad header line"));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.to_ascii_lowercase());
    let connection = header("connection").unwrap_or_default();
    let keep_alive = if http10 { connection.contains("keep-alive") } else { !connection.contains("close") };

    let (path, query) = split_target(target);
    if cut {
        let req = Request { method, path, query, headers, body: Vec::new(), keep_alive: false, at: Instant::now() };
        shared.lock().requests.push(req.record(0));
        return Err(ReadError::Close);
    }
    let over_limit = {
        let limit = shared.lock().body_limit;
        let len = header("content-length").and_then(|l| l.trim().parse::<usize>().ok());
        matches!((limit, len), (Some(limit), Some(len)) if len > limit)
    };
    if over_limit || early_answer(shared, &method, &path) {
        let mut first = [0u8; 1];
        let _ = reader.read(&mut first);
        let status = {
            let mut st = shared.lock();
            let found = if over_limit {
                None
            } else {
                st.faults.iter_mut().find(|f| {
                    f.times > 0
                        && matches!(f.action, FaultAction::EarlyAnswer(_))
                        && f.method.as_ref().is_none_or(|m| m.eq_ignore_ascii_case(&method))
                        && path.starts_with(&f.path_prefix)
                })
            };
            let status = match found {
                Some(f) => {
                    f.times -= 1;
                    match f.action {
                        FaultAction::EarlyAnswer(s) => s,
                        _ => 500,
                    }
                }
                None if over_limit => 413,
                None => 500,
            };
            let req = Request {
                method: method.clone(),
                path: path.clone(),
                query: query.clone(),
                headers: headers.clone(),
                body: Vec::new(),
                keep_alive: false,
                at: Instant::now(),
            };
            st.requests.push(req.record(status));
            status
        };
        let _ = write_response(writer, &Response::error(status, "Request Entity Too Large"), false);
        return Err(ReadError::Close);
    }

    if header("expect").is_some_and(|e| e.contains("100-continue")) {
        let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    let body = if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        read_chunked(reader)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.trim().parse().map_err(|_| ReadError::Reply(400, "bad Content-Length"))?;
        if len > MAX_BODY_BYTES {
            return Err(ReadError::Reply(413, "body too large"));
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).map_err(|_| ReadError::Close)?;
        body
    } else {
        Vec::new()
    };

    Ok(Some(Request { method, path, query, headers, body, keep_alive, at: Instant::now() }))
}

/// Whether the first fault matching the request is an `EarlyAnswer`.
fn early_answer(shared: &Shared, method: &str, path: &str) -> bool {
    let st = shared.lock();
    let found = st.faults.iter().find(|f| {
        f.times > 0
            && f.method.as_ref().is_none_or(|m| m.eq_ignore_ascii_case(method))
            && path.starts_with(&f.path_prefix)
    });
    found.is_some_and(|f| matches!(f.action, FaultAction::EarlyAnswer(_)))
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let Some(line) = read_line(reader)? else { return Err(ReadError::Close) };
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ReadError::Reply(400, "bad chunk size"))?;
        if size == 0 {
            // Trailer section, up to the empty line.
            loop {
                match read_line(reader)? {
                    Some(l) if l.is_empty() => return Ok(body),
                    Some(_) => continue,
                    None => return Ok(body),
                }
            }
        }
        if body.len() + size > MAX_BODY_BYTES {
            return Err(ReadError::Reply(413, "body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).map_err(|_| ReadError::Close)?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).map_err(|_| ReadError::Close)?;
        if &crlf != b"\r\n" {
            return Err(ReadError::Reply(400, "bad chunk terminator"));
        }
    }
}

fn split_target(target: &str) -> (String, Vec<(String, String)>) {
    // Absolute form (`http://host/path`), as sent to proxies.
    let target = match target.find("://") {
        Some(i) => target[i + 3..].find('/').map_or("/", |j| &target[i + 3 + j..]),
        None => target,
    };
    let target = target.split('#').next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect();
    (percent_decode(path, false), query)
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Request Entity Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn write_response(w: &mut TcpStream, resp: &Response, keep_alive: bool) -> std::io::Result<()> {
    write_response_to(w, resp, keep_alive)
}

fn write_response_to(w: &mut dyn Write, resp: &Response, keep_alive: bool) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    head.push_str("Server: fake-testflinger\r\n");
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    // 1xx and 204 carry no body and no Content-Length (RFC 9110 8.6).
    let bodyless = resp.status == 204 || resp.status < 200;
    if !bodyless {
        head.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    head.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
    let mut out = head.into_bytes();
    if !bodyless {
        out.extend_from_slice(&resp.body);
    }
    w.write_all(&out)?;
    w.flush()
}

// ---- routing -----------------------------------------------------------------

/// What to send back on the connection.
enum Reply {
    Full(Response),
    /// Close without a (complete) answer.
    Close,
    /// Send these bytes, then close.
    Raw(Vec<u8>),
    /// A 200 JSON answer of this many bytes, generated while writing.
    Huge(u64),
    /// One byte of a never-ending answer every so often (see `Drip`).
    Drip(Duration),
    /// Send these bytes, then wait for the client to close (see `RawThenHold`).
    RawThenHold(Vec<u8>),
}

fn serialize(resp: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = write_response_to(&mut out, resp, false);
    out
}

/// `{"a":"xxx...` up to `len` bytes, in 64 KiB writes.
fn write_huge(w: &mut TcpStream, len: u64) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nServer: fake-testflinger\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    w.write_all(head.as_bytes())?;
    let chunk = vec![b'x'; 64 * 1024];
    let start = b"{\"a\":\"";
    let mut left = len;
    let n = left.min(start.len() as u64) as usize;
    w.write_all(&start[..n])?;
    left -= n as u64;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    w.flush()
}

/// Applies faults, routes, records.
fn handle(shared: &Shared, req: Request) -> Reply {
    let action = {
        let mut st = shared.lock();
        let found = st.faults.iter_mut().find(|f| {
            f.times > 0
                && f.method.as_ref().is_none_or(|m| m.eq_ignore_ascii_case(&req.method))
                && req.path.starts_with(&f.path_prefix)
        });
        found.map(|f| {
            f.times -= 1;
            f.action.clone()
        })
    };
    let resp = match action {
        Some(FaultAction::Status(s)) => Response::empty(s),
        Some(FaultAction::Body { status, content_type, body }) => {
            Response { status, headers: vec![("Content-Type".into(), content_type)], body }
        }
        Some(FaultAction::CloseWithoutAnswer) => {
            shared.lock().requests.push(req.record(0));
            return Reply::Close;
        }
        Some(FaultAction::RawThenClose(bytes)) => {
            shared.lock().requests.push(req.record(0));
            return Reply::Raw(bytes);
        }
        Some(FaultAction::Huge { len }) => {
            shared.lock().requests.push(req.record(200));
            return Reply::Huge(len);
        }
        Some(FaultAction::Drip(every)) => {
            shared.lock().requests.push(req.record(0));
            return Reply::Drip(every);
        }
        Some(FaultAction::DripAfterHandling(every)) => {
            let mut st = shared.lock();
            let resp = route(&mut st, &req);
            st.requests.push(req.record(resp.status));
            return Reply::Drip(every);
        }
        // Answered in `read_request`, before the body.
        Some(FaultAction::EarlyAnswer(status)) => Response::empty(status),
        Some(FaultAction::ResetMidAnswer) => {
            let resp = route(&mut shared.lock(), &req);
            let mut bytes = serialize(&resp);
            bytes.truncate(bytes.len() / 2);
            shared.lock().requests.push(req.record(0));
            return Reply::Raw(bytes);
        }
        Some(FaultAction::RawThenHold(bytes)) => {
            shared.lock().requests.push(req.record(0));
            return Reply::RawThenHold(bytes);
        }
        Some(FaultAction::StallUntil { armed, holding, release, max }) if armed.exists() && !release.exists() => {
            shared.lock().stalling += 1;
            let _ = std::fs::write(&holding, "");
            let deadline = Instant::now() + max;
            while !release.exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            let mut state = shared.lock();
            state.stalling -= 1;
            if release.exists() {
                state.released_holds += 1;
                route(&mut state, &req)
            } else {
                Response::error(503, "the release file never came")
            }
        }
        Some(FaultAction::StallUntil { .. }) => route(&mut shared.lock(), &req),
        Some(FaultAction::Stall(d)) => {
            shared.lock().stalling += 1;
            thread::sleep(d);
            let mut state = shared.lock();
            state.stalling -= 1;
            route(&mut state, &req)
        }
        Some(FaultAction::SlowStatus(d, status)) => {
            thread::sleep(d);
            Response::empty(status)
        }
        Some(FaultAction::Pass) | None => route(&mut shared.lock(), &req),
    };
    shared.lock().requests.push(req.record(resp.status));
    Reply::Full(resp)
}

fn route(st: &mut State, req: &Request) -> Response {
    let path = req.path.trim_end_matches('/');
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let m = req.method.as_str();

    if segs.first() != Some(&"v1") {
        return Response::error(404, "Not Found");
    }
    let rest = &segs[1..];

    // The root and the token endpoint need no token.
    match (m, rest) {
        ("GET", []) => {
            let mut v = Json::obj();
            v.set("status", Json::str("ok"));
            return Response::json(200, &v);
        }
        ("POST", ["oauth2", "refresh"]) => return refresh(st, req),
        _ => {}
    }

    if let Some(auth) = &st.auth {
        let sent = req.header("authorization").and_then(|h| h.strip_prefix("Bearer ")).map(str::trim);
        if auth.valid.is_none() || sent != auth.valid.as_deref() {
            return Response::error(401, "Invalid or expired token");
        }
    }

    match (m, rest) {
        ("POST", ["agents", "data", id]) => post_agent_data(st, req, id),
        ("GET", ["agents", "data", id]) => match st.agents.get(*id) {
            Some(d) => Response::json(200, d),
            None => Response::error(404, "Agent not found"),
        },
        ("POST", ["agents", "queues"]) | ("POST", ["agents", "images"]) => match body_object(req) {
            Ok(_) => Response::ok(),
            Err(r) => r,
        },
        ("POST", ["agents", "provision_logs", _id]) => match body_object(req) {
            Ok(_) => Response::ok(),
            Err(r) => r,
        },
        ("GET", ["job"]) => get_job(st, req),
        ("GET", ["job", id, "attachments"]) => match st.attachments.get(*id) {
            Some(b) => Response {
                status: 200,
                headers: vec![("Content-Type".into(), "application/gzip".into())],
                body: b.clone(),
            },
            None => Response::empty(204),
        },
        ("POST", ["job", id, "events"]) => post_events(st, req, id),
        ("GET", ["result", id]) => match st.results.get(*id) {
            Some(r) => Response::json(200, r),
            None => Response::empty(204),
        },
        ("POST", ["result", id]) => post_result(st, req, id),
        ("POST", ["result", id, "log", kind]) => post_log(st, req, id, kind),
        ("POST", ["result", id, "artifact"]) => post_artifact(st, req, id),
        (_, ["agents", ..]) | (_, ["job", ..]) | (_, ["result", ..]) | (_, ["oauth2", ..]) | (_, []) => {
            Response::error(405, "Method Not Allowed")
        }
        _ => Response::error(404, "Not Found"),
    }
}

fn body_object(req: &Request) -> Result<Json, Response> {
    match Json::parse_bytes(&req.body) {
        Ok(v @ Json::Obj(_)) => Ok(v),
        Ok(_) => Err(Response::error(422, "JSON body must be an object")),
        Err(e) => Err(Response::error(400, &format!("invalid JSON: {e}"))),
    }
}

/// 422 unless every key of `obj` is in `allowed` (skipped when lenient).
fn check_keys(st: &State, obj: &Json, allowed: &[&str]) -> Result<(), Response> {
    if st.lenient {
        return Ok(());
    }
    for (k, _) in obj.as_object().into_iter().flatten() {
        if !allowed.contains(&k.as_str()) {
            return Err(Response::error(422, &format!("unknown field: {k}")));
        }
    }
    Ok(())
}

fn refresh(st: &mut State, req: &Request) -> Response {
    let body = match body_object(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(token) = body["refresh_token"].as_str().filter(|t| !t.is_empty()) else {
        return Response::error(422, "refresh_token is required");
    };
    match st.auth.as_mut() {
        Some(auth) if auth.refresh_token == token => {
            auth.issued += 1;
            let access = format!("tok-{}", auth.issued);
            auth.valid = Some(access.clone());
            let mut v = Json::obj();
            v.set("access_token", Json::str(access));
            v.set("token_type", Json::str("Bearer"));
            v.set("expires_in", Json::Int(600));
            Response::json(200, &v)
        }
        _ => Response::error(401, "Invalid refresh token"),
    }
}

fn agent_entry<'a>(st: &'a mut State, id: &str) -> &'a mut Json {
    st.agents.entry(id.to_string()).or_insert_with(|| {
        let mut d = Json::obj();
        d.set("name", Json::str(id));
        d.set("state", Json::str(""));
        d.set("comment", Json::str(""));
        d.set("queues", Json::Arr(Vec::new()));
        d.set("location", Json::str(""));
        d.set("provision_type", Json::str(""));
        d.set("job_id", Json::str(""));
        d.set("restricted_to", Json::obj());
        d.set("updated_at", Json::str(now_iso()));
        d
    })
}

fn post_agent_data(st: &mut State, req: &Request, id: &str) -> Response {
    let body = match body_object(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let allowed = ["comment", "identifier", "job_id", "location", "log", "provision_type", "queues", "state"];
    if let Err(r) = check_keys(st, &body, &allowed) {
        return r;
    }
    if !st.lenient {
        for (k, v) in body.as_object().into_iter().flatten() {
            let ok = match k.as_str() {
                "log" | "queues" => v.as_array().is_some_and(|a| a.iter().all(|x| x.as_str().is_some())),
                _ => v.as_str().is_some(),
            };
            if !ok {
                return Response::error(422, &format!("wrong type for field: {k}"));
            }
        }
    }
    if let Some(s) = body["state"].as_str() {
        st.agent_states.entry(id.to_string()).or_default().push(s.to_string());
    }
    let data = agent_entry(st, id);
    for (k, v) in body.as_object().into_iter().flatten() {
        if k == "log" {
            // The server appends and keeps the last 100 lines.
            let mut lines = data["log"].as_array().cloned().unwrap_or_default();
            lines.extend(v.as_array().cloned().unwrap_or_default());
            let excess = lines.len().saturating_sub(100);
            lines.drain(..excess);
            data.set("log", Json::Arr(lines));
        } else {
            data.set(k, v.clone());
        }
    }
    data.set("updated_at", Json::str(now_iso()));
    let mut resp = Response::ok();
    resp.headers.push(("Set-Cookie".into(), format!("agent_name={id}; Path=/")));
    resp
}

fn cookie<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .filter(|(k, _)| k == "cookie")
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim())
}

fn get_job(st: &mut State, req: &Request) -> Response {
    if cookie(req, "agent_name").is_none_or(str::is_empty) {
        return Response::error(401, "Agent not identified");
    }
    let queues: Vec<&str> = req.query.iter().filter(|(k, _)| k == "queue").map(|(_, v)| v.as_str()).collect();
    if queues.is_empty() {
        return Response::error(400, "No queue(s) specified in request");
    }
    let pos = st.jobs.iter().position(|j| j["job_queue"].as_str().is_some_and(|q| queues.contains(&q)));
    match pos.and_then(|p| st.jobs.remove(p)) {
        Some(job) => Response::json(200, &job),
        None => Response::empty(204),
    }
}

fn post_result(st: &mut State, req: &Request, id: &str) -> Response {
    if req.body.len() > MAX_RESULT_BYTES {
        return Response::error(413, "Payload Too Large");
    }
    let body = match body_object(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = check_keys(st, &body, &["device_info", "job_state", "status"]) {
        return r;
    }
    if !st.lenient {
        let bad_status = body
            .get("status")
            .is_some_and(|s| s.as_object().is_none_or(|m| m.iter().any(|(_, v)| !matches!(v, Json::Int(_)))));
        let bad_info = body.get("device_info").is_some_and(|d| d.as_object().is_none());
        let bad_state = body.get("job_state").is_some_and(|s| s.as_str().is_none());
        if bad_status || bad_info || bad_state {
            return Response::error(422, "invalid result fields");
        }
    }
    st.results_posted.entry(id.to_string()).or_default().push(body.clone());
    let cancelled = st.cancelled.contains(id);
    let stored = st.results.entry(id.to_string()).or_insert_with(Json::obj);
    for (k, v) in body.as_object().into_iter().flatten() {
        if k == "job_state" && cancelled {
            continue;
        }
        stored.set(k, v.clone());
    }
    Response::ok()
}

const PHASES: [&str; 7] = ["setup", "provision", "firmware_update", "test", "allocate", "reserve", "cleanup"];

fn post_log(st: &mut State, req: &Request, id: &str, kind: &str) -> Response {
    if kind != "output" && kind != "serial" {
        return Response::error(404, "Invalid log type");
    }
    let body = match body_object(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = check_keys(st, &body, &["fragment_number", "timestamp", "phase", "log_data"]) {
        return r;
    }
    let (Some(number), Some(timestamp), Some(phase), Some(data)) = (
        body["fragment_number"].as_i64().filter(|_| matches!(body["fragment_number"], Json::Int(_))),
        body["timestamp"].as_str(),
        body["phase"].as_str(),
        body["log_data"].as_str(),
    ) else {
        return Response::error(422, "fragment_number, timestamp, phase and log_data are required");
    };
    if !st.lenient && !PHASES.contains(&phase) {
        return Response::error(422, &format!("invalid phase: {phase}"));
    }
    let fragment =
        Fragment { number, phase: phase.to_string(), data: data.to_string(), timestamp: timestamp.to_string() };
    st.fragments.entry((id.to_string(), kind.to_string())).or_default().push(fragment);
    Response::ok()
}

fn post_artifact(st: &mut State, req: &Request, id: &str) -> Response {
    let Some(ct) = req.header("content-type") else {
        return Response::error(400, "missing Content-Type");
    };
    let Some(boundary) = multipart_boundary(ct) else {
        return Response::error(400, "not multipart/form-data with a boundary");
    };
    match multipart_parts(&req.body, &boundary) {
        Some(parts) => match parts.into_iter().find(|p| p.name == "file") {
            Some(p) => {
                st.artifacts.insert(id.to_string(), p.data);
                Response::ok()
            }
            None => Response::error(400, "no part named file"),
        },
        None => Response::error(400, "malformed multipart body"),
    }
}

fn post_events(st: &mut State, req: &Request, id: &str) -> Response {
    let body = match body_object(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = check_keys(st, &body, &["agent_id", "events", "job_queue", "job_status_webhook"]) {
        return r;
    }
    if !st.lenient {
        let events_ok = body.get("events").is_none_or(|e| {
            e.as_array().is_some_and(|a| {
                a.iter().all(|ev| {
                    ev["event_name"].as_str().is_some()
                        && ev.as_object().is_some_and(|m| {
                            m.iter().all(|(k, _)| ["event_name", "timestamp", "detail"].contains(&k.as_str()))
                        })
                })
            })
        });
        if body["job_status_webhook"].as_str().is_none() || !events_ok {
            return Response::error(422, "invalid status update");
        }
    }
    st.event_posts.entry(id.to_string()).or_default().push(body);
    Response::ok()
}

// ---- multipart and tar -------------------------------------------------------

pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

/// The `boundary` parameter of a `multipart/form-data` Content-Type.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut it = content_type.split(';');
    if !it.next()?.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    it.filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .filter(|b| !b.is_empty())
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    hay[from..].windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// Splits a multipart body into parts; `None` when it is malformed.
pub fn multipart_parts(body: &[u8], boundary: &str) -> Option<Vec<Part>> {
    let delim = format!("--{boundary}").into_bytes();
    let next_delim = format!("\r\n--{boundary}").into_bytes();
    let mut pos = find(body, &delim, 0)? + delim.len();
    let mut parts = Vec::new();
    loop {
        if body[pos..].starts_with(b"--") {
            return Some(parts); // closing delimiter
        }
        // Rest of the delimiter line (transport padding), then headers.
        pos = find(body, b"\r\n", pos)? + 2;
        let (head, data_start) = if body[pos..].starts_with(b"\r\n") {
            (String::new(), pos + 2) // a part without headers
        } else {
            let head_end = find(body, b"\r\n\r\n", pos)?;
            (String::from_utf8_lossy(&body[pos..head_end]).into_owned(), head_end + 4)
        };
        let data_end = find(body, &next_delim, data_start)?;
        let mut part = Part { name: String::new(), filename: None, content_type: None, data: Vec::new() };
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else { continue };
            let k = k.trim().to_ascii_lowercase();
            if k == "content-disposition" {
                for param in v.split(';').skip(1) {
                    if let Some((pk, pv)) = param.trim().split_once('=') {
                        let pv = pv.trim().trim_matches('"').to_string();
                        match pk.trim() {
                            "name" => part.name = pv,
                            "filename" => part.filename = Some(pv),
                            _ => {}
                        }
                    }
                }
            } else if k == "content-type" {
                part.content_type = Some(v.trim().to_string());
            }
        }
        part.data = body[data_start..data_end].to_vec();
        parts.push(part);
        pos = data_end + next_delim.len();
    }
}

/// Un-gzips and lists a tarball: (path, content, entry type byte).
pub fn tar_gz_members(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>, u8)>, String> {
    let gz = flate2::read::GzDecoder::new(bytes);
    let mut archive = tar::Archive::new(gz);
    let mut out = Vec::new();
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
        let kind = entry.header().entry_type().as_byte();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(|e| e.to_string())?;
        out.push((path, data, kind));
    }
    Ok(out)
}

/// One member's header as written: path, the raw mode field, user and
/// group names.
#[derive(Clone, Debug)]
pub struct TarHeader {
    pub path: String,
    pub mode: u32,
    pub uname: String,
    pub gname: String,
}

/// Un-gzips a tarball and lists its members' headers.
pub fn tar_gz_headers(bytes: &[u8]) -> Result<Vec<TarHeader>, String> {
    let gz = flate2::read::GzDecoder::new(bytes);
    let mut archive = tar::Archive::new(gz);
    let mut out = Vec::new();
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let h = entry.header();
        let name = |n: Result<Option<&str>, std::str::Utf8Error>| n.ok().flatten().unwrap_or("").to_string();
        out.push(TarHeader {
            path: entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned(),
            mode: h.mode().map_err(|e| e.to_string())?,
            uname: name(h.username()),
            gname: name(h.groupname()),
        });
    }
    Ok(out)
}

/// Current UTC time as ISO 8601 (`2024-01-02T03:04:05Z`).
pub fn now_iso() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
