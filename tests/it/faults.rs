//! Fault injection: the real agent against a fake server that fails in
//! every way a lab's server and network do. For each fault the agent must
//! log it, keep going, retry with backoff (no hot loop), keep its memory
//! small, and once the fault ends every job's outcome, every output
//! fragment and every artifact must arrive.
//!
//! "Once" is exact where the fake never handled the failed request (error
//! statuses, refused or closed connections, bad answers to GETs). Where it
//! did handle it and only the answer was lost (reset mid-answer, stall past
//! the client's timeout) the agent cannot know, so a re-send is allowed,
//! but a re-sent fragment must carry the same number and the same data and
//! a re-sent outcome must be the same outcome.
//!
//! Each test prints one row of the table in the project notes:
//! `cargo test --test it faults -- --nocapture 2>&1 | grep '^| '`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fake_server::{FakeServer, Fault, FaultAction, Recorded};
use crate::harness::{AGENT_ID, Agent, AgentProc, AgentSetup, QUEUE, job_json, unique_id};
use crate::json::Json;

/// How long a test waits for all its jobs to be delivered.
const DEADLINE: Duration = Duration::from_secs(150);
/// Peak RSS the agent must stay under, whatever the server sends.
const MAX_HWM_KB: u64 = 32 * 1024;
/// Requests to one endpoint (method and path) in any one second: a retry
/// without backoff repeats one request hundreds of times a second. Counted
/// per endpoint, not all together: a job of instant phases posts what
/// upstream posts for each phase (16 events in its second), and after a
/// hold the agent may deliver a kept outcome and run two such jobs within
/// one second (101 requests in all, seen in a run that was doing no wrong).
const MAX_PER_SECOND: usize = 30;
/// Failed requests to one endpoint in any one second.
const MAX_FAILED_PER_SECOND: usize = 6;

const TEST_LINES: usize = 6;

/// The phase commands: each prints lines naming its job (the run dir's
/// name), the test phase slowly, so that live fragments meet the faults,
/// and leaves an artifact.
fn agent(server: &FakeServer) -> AgentSetup {
    Agent::new(server)
        // These faults make outages: holds (random, growing with the
        // outage's age up to a minute) would make each run minutes long.
        .env("TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX", "2")
        .set("polling_interval", "0.2")
        .set("server_timeout", "1")
        .command("setup", "echo \"setup of $(basename \"$PWD\")\"")
        .command(
            "test",
            &format!(
                "j=$(basename \"$PWD\"); for i in $(seq 1 {TEST_LINES}); do echo \"test of $j line $i\"; sleep 0.15; done; \
                 mkdir -p artifacts; echo \"artifact of $j\" > artifacts/out.txt"
            ),
        )
        .command("cleanup", "echo \"cleanup of $(basename \"$PWD\")\"")
}

fn push_jobs(server: &FakeServer, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let id = unique_id();
            server.push_job(&job_json(
                &id,
                QUEUE,
                r#"{"job_status_webhook":"http://hooks.invalid/tf","test_data":{"test_cmds":"x"}}"#,
            ));
            id
        })
        .collect()
}

pub fn banner(phase: &str) -> String {
    let line = format!("* Starting testflinger {phase} phase on {AGENT_ID} *");
    let stars = "*".repeat(line.len());
    format!("{stars}\n{line}\n{stars}\n")
}

/// What the server must hold for `job`, phase by phase.
pub fn expected_output(job: &str) -> Vec<(&'static str, String)> {
    let test: String = (1..=TEST_LINES).map(|i| format!("test of {job} line {i}\n")).collect();
    vec![
        ("setup", format!("{}setup of {job}\n", banner("setup"))),
        ("test", format!("{}{test}", banner("test"))),
        ("cleanup", format!("{}cleanup of {job}\n", banner("cleanup"))),
    ]
}

/// What arrived for a set of jobs, against what must have.
#[derive(Default, Debug)]
pub struct Tally {
    pub jobs: usize,
    pub outcomes_lost: usize,
    /// Jobs whose final outcome arrived more than once.
    pub outcomes_resent: usize,
    /// Re-sent outcomes that differ from the first.
    pub outcomes_differing: usize,
    pub fragments_lost: usize,
    /// Fragment numbers seen twice with different data.
    pub fragments_duplicated: usize,
    /// Fragment numbers seen twice with the same data.
    pub fragments_resent: usize,
    pub artifacts_lost: usize,
    pub artifacts_resent: usize,
    pub problems: Vec<String>,
}

impl Tally {
    fn problem(&mut self, p: String) {
        if self.problems.len() < 20 {
            self.problems.push(p);
        }
    }
}

/// Checks every job: outcome `complete` with each phase 0, output fragments
/// numbered from 0 without gaps whose text is exactly the phases' output,
/// the artifact.
pub fn tally(server: &FakeServer, jobs: &[String], expected: impl Fn(&str) -> Vec<(&'static str, String)>) -> Tally {
    let mut t = Tally { jobs: jobs.len(), ..Tally::default() };
    let mut uploads_by_path: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for r in server.requests().iter().filter(|r| r.method == "POST" && r.status == 200 && r.path.ends_with("/artifact"))
    {
        *uploads_by_path.entry(r.path.clone()).or_default() += 1;
    }
    for job in jobs {
        let exp = expected(job);
        // Outcome.
        let finals: Vec<Json> = server
            .results_posted(job)
            .into_iter()
            .filter(|r| r.get("job_state").and_then(Json::as_str) == Some("complete"))
            .collect();
        match finals.first() {
            None => {
                t.outcomes_lost += 1;
                t.problem(format!("{job}: no outcome"));
            }
            Some(first) => {
                let codes: Vec<(String, Option<i64>)> = first
                    .get("status")
                    .and_then(Json::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(p, c)| (p.clone(), c.as_i64()))
                    .collect();
                let want: Vec<(String, Option<i64>)> = exp.iter().map(|(p, _)| (p.to_string(), Some(0))).collect();
                if codes != want {
                    t.outcomes_lost += 1;
                    t.problem(format!("{job}: outcome {first} (want every phase 0)"));
                }
                if finals.len() > 1 {
                    t.outcomes_resent += 1;
                    if finals.iter().any(|f| f.to_string() != first.to_string()) {
                        t.outcomes_differing += 1;
                        t.problem(format!("{job}: outcomes differ: {finals:?}"));
                    }
                }
            }
        }
        // Fragments: one text per number, numbers 0..n.
        let mut by_number: BTreeMap<i64, (String, String)> = BTreeMap::new();
        for f in server.fragments(job, "output") {
            match by_number.get(&f.number) {
                Some((phase, data)) if *phase == f.phase && *data == f.data => t.fragments_resent += 1,
                Some(_) => {
                    t.fragments_duplicated += 1;
                    t.problem(format!("{job}: fragment {} sent twice with different data", f.number));
                }
                None => {
                    by_number.insert(f.number, (f.phase, f.data));
                }
            }
        }
        let n = by_number.len() as i64;
        let gaps =
            (0..n).filter(|i| !by_number.contains_key(i)).count() + by_number.keys().filter(|k| **k >= n).count();
        if gaps > 0 {
            t.fragments_lost += gaps;
            t.problem(format!("{job}: fragment numbers {:?} have gaps", by_number.keys().collect::<Vec<_>>()));
        }
        for (phase, want) in &exp {
            let got: String = by_number.values().filter(|(p, _)| p == phase).map(|(_, d)| d.as_str()).collect();
            if got != *want {
                // Count it as one lost fragment unless the text is longer
                // (then something was sent twice under two numbers).
                if got.len() > want.len() {
                    t.fragments_duplicated += 1;
                } else {
                    t.fragments_lost += 1;
                }
                t.problem(format!("{job}: {phase} output {got:?}, want {want:?}"));
            }
        }
        // Artifact.
        let uploads = uploads_by_path.get(&format!("/v1/result/{job}/artifact")).copied().unwrap_or(0);
        let members = server.artifact_members(job);
        let want = format!("artifact of {job}\n");
        if !members.iter().any(|(p, d, _)| p == "artifacts/out.txt" && *d == want.as_bytes()) {
            t.artifacts_lost += 1;
            t.problem(format!("{job}: artifact missing ({} members)", members.len()));
        }
        if uploads > 1 {
            t.artifacts_resent += 1;
        }
    }
    t
}

/// `VmHWM` (peak RSS) or `VmRSS` of a process, in kB.
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{key}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Most requests (matching `pred`) inside any window of `window`.
fn max_in_window(reqs: &[Recorded], window: Duration, pred: impl Fn(&Recorded) -> bool) -> usize {
    let mut times: Vec<Instant> = reqs.iter().filter(|r| pred(r)).map(|r| r.at).collect();
    times.sort();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi].duration_since(times[lo]) >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Endpoint of a request, ids folded, for per-endpoint counts.
fn endpoint(r: &Recorded) -> String {
    let segs: Vec<&str> = r.path.split('/').map(|s| if s.len() >= 32 { "<id>" } else { s }).collect();
    format!("{} {}", r.method, segs.join("/"))
}

enum Once {
    /// The fake never handled a failed request: everything arrives exactly once.
    Exactly,
    /// Answers were lost after the fake handled the request: identical re-sends allowed.
    AtLeast,
}

/// Waits until every job's outcome arrived, then checks everything and
/// prints the table row. `log_must_show` is a piece of the agent's log
/// that proves it noticed the fault.
fn finish(
    name: &str,
    server: &FakeServer,
    p: &mut AgentProc,
    setup: &AgentSetup,
    jobs: &[String],
    once: Once,
    log_must_show: &[&str],
) {
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let done = |s: &FakeServer| {
        jobs.iter()
            .all(|j| s.results_posted(j).iter().any(|r| r.get("job_state").and_then(Json::as_str) == Some("complete")))
    };
    while !done(server) {
        if let Some(status) = p.try_wait() {
            panic!("{name}: the agent exited ({status}) before delivering every job\n{}", p.diagnostics());
        }
        if Instant::now() > deadline {
            panic!(
                "{name}: not every job delivered within {DEADLINE:?}\nrequests:\n  {}\n{}",
                server.request_lines().join("\n  "),
                p.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The run dirs are removed once delivered: nothing is left behind.
    let leftovers = |dir: &Path| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    server.wait_until(Duration::from_secs(20), "run and results dirs empty", |_| {
        leftovers(&setup.execution_dir()) == 0 && leftovers(&setup.results_dir()) == 0
    });
    assert!(p.try_wait().is_none(), "{name}: the agent must keep running\n{}", p.diagnostics());
    let hwm = proc_status_kb(p.pid(), "VmHWM").unwrap_or(0);
    let t = tally(server, jobs, expected_output);
    let log = p.log_text();
    let reqs = server.requests();
    let rate = max_in_window(&reqs, Duration::from_secs(1), |_| true);
    let mut busiest = (0, String::new());
    let exact = |r: &Recorded| format!("{} {}", r.method, r.path);
    for e in reqs.iter().map(exact).collect::<std::collections::BTreeSet<_>>() {
        let n = max_in_window(&reqs, Duration::from_secs(1), |x| exact(x) == e);
        busiest = busiest.max((n, e));
    }
    let mut per_endpoint: BTreeMap<String, usize> = BTreeMap::new();
    for r in reqs.iter().filter(|r| r.status == 0 || r.status >= 400) {
        let e = endpoint(r);
        let n =
            max_in_window(&reqs, Duration::from_secs(1), |x| (x.status == 0 || x.status >= 400) && endpoint(x) == e);
        per_endpoint.insert(e, n);
    }
    println!(
        "| {name} | {} | {} | {} lost, {} duplicated ({} identical re-sends) | {:.1} MB | {} req max/s |",
        t.jobs,
        t.outcomes_lost,
        t.fragments_lost,
        t.fragments_duplicated,
        t.fragments_resent,
        hwm as f64 / 1024.0,
        rate
    );
    assert!(t.problems.is_empty(), "{name}: {:#?}\n{}", t.problems, p.diagnostics());
    assert_eq!((t.outcomes_lost, t.fragments_lost, t.fragments_duplicated, t.artifacts_lost), (0, 0, 0, 0), "{name}");
    if matches!(once, Once::Exactly) {
        assert_eq!(
            (t.outcomes_resent, t.fragments_resent, t.artifacts_resent),
            (0, 0, 0),
            "{name}: the server never took a failed request, so nothing may arrive twice"
        );
    }
    match crate::harness::agent_wrapper() {
        // The pid is the emulator's: its RSS (translated code, its own heap) says nothing of the agent's.
        Some(w) => println!("{name}: peak RSS cap not checked: the agent runs under `{w}`, whose RSS this is"),
        None => assert!(hwm > 0 && hwm < MAX_HWM_KB, "{name}: peak RSS {hwm} kB"),
    }
    let timeline = || {
        let t0 = reqs[0].at;
        let lines: Vec<String> =
            reqs.iter().map(|r| format!("{:8.3} {}", r.at.duration_since(t0).as_secs_f64(), r.line())).collect();
        lines
    };
    if busiest.0 > MAX_PER_SECOND {
        panic!(
            "{name}: {} requests to {} in one second: a hot loop?\n{}\n{}",
            busiest.0,
            busiest.1,
            timeline().join("\n"),
            p.diagnostics()
        );
    }
    for (e, n) in &per_endpoint {
        if *n > MAX_FAILED_PER_SECOND {
            let lines = timeline();
            panic!(
                "{name}: {n} failed requests to {e} in one second: no backoff?\n{}\n{}",
                lines.join("\n"),
                p.diagnostics()
            );
        }
    }
    for piece in log_must_show {
        assert!(log.contains(piece), "{name}: the agent's log does not mention {piece:?}\n{log}");
    }
}

/// The endpoints one job uses, with its id.
fn job_endpoints(job: &str) -> Vec<(&'static str, String)> {
    vec![
        ("POST", format!("/v1/job/{job}/events")),
        ("GET", format!("/v1/result/{job}")),
        ("POST", format!("/v1/result/{job}/log/output")),
        ("POST", format!("/v1/result/{job}/artifact")),
        ("POST", format!("/v1/result/{job}")),
    ]
}

/// The endpoints every polling cycle uses.
fn loop_endpoints() -> Vec<(&'static str, String)> {
    let mut e = handled_loop_endpoints();
    e.push(("GET", "/v1/job".to_string()));
    e
}

/// Those whose answer may be lost after the server handled the request.
/// Not `GET /v1/job`: the server hands the job out when it answers, so a
/// job whose answer is lost is lost to every agent (a limit of the API: the
/// request is not idempotent and carries no id the agent could ask again).
fn handled_loop_endpoints() -> Vec<(&'static str, String)> {
    vec![("GET", format!("/v1/agents/data/{AGENT_ID}")), ("POST", format!("/v1/agents/data/{AGENT_ID}"))]
}

fn body(status: u16, content_type: &str, body: &[u8]) -> FaultAction {
    FaultAction::Body { status, content_type: content_type.into(), body: body.to_vec() }
}

#[test]
fn faults_bursts_of_5xx_on_every_endpoint() {
    let server = FakeServer::start();
    let jobs = push_jobs(&server, 3);
    for (i, status) in [500u16, 502, 503, 504].into_iter().enumerate() {
        // Two in a row per status: the first job meets eight on each of its
        // endpoints (more than one call's retries), the others two.
        for (method, path) in job_endpoints(&jobs[i % 3]).into_iter().chain(loop_endpoints()) {
            server.add_fault(Fault::status(method, &path, 2, status));
        }
    }
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish(
        "5xx bursts (500/502/503/504 x2 on each endpoint)",
        &server,
        &mut p,
        &setup,
        &jobs,
        Once::Exactly,
        &["HTTP 503", "retrying"],
    );
}

#[test]
fn faults_server_down_mid_job() {
    let server = FakeServer::start();
    let jobs = push_jobs(&server, 3);
    let setup = agent(&server);
    let mut p = setup.spawn();
    server.wait_until(DEADLINE, "the first job's test phase", |s| {
        s.job_states_posted(&jobs[0]).iter().any(|x| x == "test")
    });
    server.stop_listening();
    // Down until the agent has finished the job without the server and
    // found the server unreachable.
    let deadline = Instant::now() + DEADLINE;
    while !p.log_text().contains(&format!("job {}: kept in", jobs[0])) {
        assert!(Instant::now() < deadline, "agent never noticed the server was down\n{}", p.diagnostics());
        std::thread::sleep(Duration::from_millis(20));
    }
    server.resume_listening();
    finish(
        "connection refused (server down mid-job)",
        &server,
        &mut p,
        &setup,
        &jobs,
        Once::Exactly,
        &["Connection refused", "kept in"],
    );
}

#[test]
fn faults_connections_reset_mid_answer() {
    let server = FakeServer::start();
    let jobs = push_jobs(&server, 3);
    for (i, job) in jobs.iter().enumerate() {
        for (method, path) in job_endpoints(job) {
            let action = if i == 1 {
                // Cut inside the status line or headers, request not handled.
                FaultAction::RawThenClose(b"HTTP/1.1 200 OK\r\nContent-Le".to_vec())
            } else {
                FaultAction::ResetMidAnswer
            };
            server.add_fault(Fault::new(Some(method), &path, 2, action));
        }
    }
    for (method, path) in handled_loop_endpoints() {
        server.add_fault(Fault::new(Some(method), &path, 2, FaultAction::ResetMidAnswer));
    }
    for (method, path) in loop_endpoints() {
        server.add_fault(Fault::new(Some(method), &path, 1, FaultAction::RawThenClose(b"HTTP/1.1 2".to_vec())));
    }
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish("connections reset mid-answer", &server, &mut p, &setup, &jobs, Once::AtLeast, &["retrying"]);
}

#[test]
fn faults_answers_stall_past_the_timeout() {
    let server = FakeServer::start();
    let jobs = push_jobs(&server, 2);
    // server_timeout is 1 s; each stall is longer.
    let stall = FaultAction::Stall(Duration::from_millis(2500));
    for job in &jobs {
        for (method, path) in job_endpoints(job) {
            server.add_fault(Fault::new(Some(method), &path, 1, stall.clone()));
        }
    }
    for (method, path) in handled_loop_endpoints() {
        server.add_fault(Fault::new(Some(method), &path, 1, stall.clone()));
    }
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish("answers stall 2.5 s past a 1 s timeout", &server, &mut p, &setup, &jobs, Once::AtLeast, &["retrying"]);
}

#[test]
fn faults_truncated_or_invalid_json() {
    let server = FakeServer::start();
    let jobs = push_jobs(&server, 2);
    let json = "application/json";
    let agent_data = format!("/v1/agents/data/{AGENT_ID}");
    for b in [&b"{\"state\": \"wai"[..], b"[1,2", b"\xff\xfe{}", b"{\"state\": 5, \"restricted_to\": [1]}", b""] {
        server.add_fault(Fault::new(Some("GET"), &agent_data, 1, body(200, json, b)));
    }
    for b in [
        &b"{\"job_id\": \"abc\", \"job_queue\": \"te"[..],
        b"{\"job_id\": 17, \"job_queue\": \"test-queue\"}",
        b"null",
        b"{\"job_id\": \"../../etc\", \"job_queue\": \"test-queue\"}",
        b"{\"job_id\": \"\"}",
        b"[]",
    ] {
        server.add_fault(Fault::new(Some("GET"), "/v1/job", 1, body(200, json, b)));
    }
    for job in &jobs {
        // The cancel check reads these: broken answers are not a cancel.
        for b in [&b"{\"job_state\": \"cancel"[..], b"\"cancelled\"", b"{\"job_state\": [\"cancelled\"]}"] {
            server.add_fault(Fault::new(Some("GET"), &format!("/v1/result/{job}"), 1, body(200, json, b)));
        }
    }
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish(
        "truncated or invalid JSON (agent data, job, result)",
        &server,
        &mut p,
        &setup,
        &jobs,
        Once::Exactly,
        &["bad answer"],
    );
    // The broken job answers were refused, not run.
    assert!(!setup.execution_dir().join("abc").exists());
}

#[test]
fn faults_a_200_mb_answer_keeps_memory_small() {
    let server = FakeServer::start();
    let jobs = push_jobs(&server, 2);
    let huge = FaultAction::Huge { len: 200 << 20 };
    server.add_fault(Fault::new(Some("GET"), &format!("/v1/agents/data/{AGENT_ID}"), 2, huge.clone()));
    server.add_fault(Fault::new(Some("GET"), "/v1/job", 2, huge.clone()));
    for job in &jobs {
        server.add_fault(Fault::new(Some("GET"), &format!("/v1/result/{job}"), 2, huge.clone()));
        // A POST whose answer is huge: the result was not taken.
        server.add_fault(Fault::new(Some("POST"), &format!("/v1/result/{job}"), 1, huge.clone()));
    }
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish("200 MB answers (agent data, job, result)", &server, &mut p, &setup, &jobs, Once::Exactly, &["larger than"]);
}

#[test]
fn faults_wrong_content_types() {
    let server = FakeServer::start();
    let jobs = push_jobs(&server, 2);
    let html = b"<html><body><h1>502 Bad Gateway</h1></body></html>";
    server.add_fault(Fault::new(Some("GET"), &format!("/v1/agents/data/{AGENT_ID}"), 2, body(200, "text/html", html)));
    server.add_fault(Fault::new(Some("GET"), "/v1/job", 2, body(200, "text/html", html)));
    for job in &jobs {
        server.add_fault(Fault::new(Some("GET"), &format!("/v1/result/{job}"), 2, body(200, "text/html", html)));
        server.add_fault(Fault::new(Some("POST"), &format!("/v1/result/{job}"), 1, body(503, "text/html", html)));
    }
    // A job served as text/plain is still a job: the agent goes by the body.
    let plain = unique_id();
    let text =
        job_json(&plain, QUEUE, r#"{"job_status_webhook":"http://hooks.invalid/tf","test_data":{"test_cmds":"x"}}"#);
    server.add_fault(Fault::new(Some("GET"), "/v1/job", 1, body(200, "text/plain", text.as_bytes())));
    let setup = agent(&server);
    let mut p = setup.spawn();
    let mut all = vec![plain];
    all.extend(jobs);
    finish(
        "wrong content types (HTML for JSON, job as text/plain)",
        &server,
        &mut p,
        &setup,
        &all,
        Once::Exactly,
        &["bad answer"],
    );
}

#[test]
fn faults_a_401_storm_with_the_refresh_failing_too() {
    let server = FakeServer::start();
    server.require_auth("the-refresh-token");
    let jobs = push_jobs(&server, 3);
    let setup = agent(&server).token("the-refresh-token");
    let mut p = setup.spawn();
    server.wait_until(DEADLINE, "the first job's test phase", |s| {
        s.job_states_posted(&jobs[0]).iter().any(|x| x == "test")
    });
    // The access token expires and the token endpoint fails: refused,
    // then down, then refused again, before it works.
    let refresh = "/v1/oauth2/refresh";
    server.add_fault(Fault::status("POST", refresh, 1, 401));
    server.add_fault(Fault::status("POST", refresh, 2, 503));
    server.add_fault(Fault::status("POST", refresh, 1, 401));
    server.expire_token();
    finish("401 storm, refresh refused and failing", &server, &mut p, &setup, &jobs, Once::Exactly, &["refresh"]);
    let unauthorized = server.requests().iter().filter(|r| r.status == 401).count();
    assert!(unauthorized > 0, "the storm happened");
    // Refreshes are not stormed either.
    let refreshes = server.requests_to("POST", refresh);
    assert!(max_in_window(&refreshes, Duration::from_secs(1), |_| true) <= 3, "refresh storm: {}", refreshes.len());
}

/// Issue 12: a chunk size of `ffffffffffffffff` on any answer crashed the
/// agent (an overflow in the answer reader). Hostile chunk sizes and
/// lengths on every endpoint: each is a bad answer, logged and retried.
#[test]
fn faults_hostile_chunk_sizes_and_lengths_on_every_endpoint() {
    let hostile: [&[u8]; 6] = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7fffffffffffffff\r\n{\"job_state\":\"complete\"}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000001\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 99999999999999999999999\r\n\r\n{}",
    ];
    let server = FakeServer::start();
    let jobs = push_jobs(&server, 3);
    for (i, job) in jobs.iter().enumerate() {
        for (k, (method, path)) in job_endpoints(job).into_iter().enumerate() {
            let raw = hostile[(i + k) % hostile.len()].to_vec();
            server.add_fault(Fault::new(Some(method), &path, 1, FaultAction::RawThenClose(raw)));
        }
    }
    for (k, (method, path)) in loop_endpoints().into_iter().enumerate() {
        for raw in [hostile[k % hostile.len()], hostile[(k + 3) % hostile.len()]] {
            server.add_fault(Fault::new(Some(method), &path, 1, FaultAction::RawThenClose(raw.to_vec())));
        }
    }
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish(
        "hostile chunk sizes and lengths on every endpoint",
        &server,
        &mut p,
        &setup,
        &jobs,
        Once::Exactly,
        &["bad chunk size", "bad Content-Length", "retrying"],
    );
}

/// Job durations out of every range (members of a job's JSON object).
pub const HUGE_DURATIONS: [&str; 4] = [
    r#""global_timeout":9223372036854775807,"output_timeout":9223372036854775807"#,
    r#""global_timeout":1e300,"output_timeout":18446744073709551616"#,
    r#""global_timeout":-9223372036854775808,"output_timeout":-1e300"#,
    r#""global_timeout":31536001,"output_timeout":4294967296.0"#,
];

/// Issue 21: `"global_timeout": 9223372036854775807` aborted the agent
/// (an instant overflow), and recovery resumed the job into the same
/// abort. Jobs with durations out of every range, with no timeout in the
/// config (the case that aborted): each runs to its end with the default
/// limits and a warning.
#[test]
fn faults_huge_job_durations() {
    let server = FakeServer::start();
    let jobs: Vec<String> = HUGE_DURATIONS
        .iter()
        .map(|durations| {
            let id = unique_id();
            let extra = format!(
                r#"{{{durations},"job_status_webhook":"http://hooks.invalid/tf","test_data":{{"test_cmds":"x"}}}}"#
            );
            server.push_job(&job_json(&id, QUEUE, &extra));
            id
        })
        .collect();
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish(
        "huge job durations (i64::MAX, 1e300, u64::MAX + 1, negative)",
        &server,
        &mut p,
        &setup,
        &jobs,
        Once::Exactly,
        &["is more than the longest allowed", "is not a positive number of seconds"],
    );
}

/// Issue 21: a server that drips its answers one byte a second holds no
/// request past the call's deadline (2 × server_timeout, here 2 s). Not
/// handled by the server, so everything arrives exactly once. Log
/// fragments are left out: their answers are waited for 60 s per attempt
/// (a slow answer must not make the agent send them twice).
#[test]
fn faults_answers_dripped_one_byte_a_second() {
    let server = FakeServer::start();
    let jobs = push_jobs(&server, 2);
    let drip = FaultAction::Drip(Duration::from_secs(1));
    for job in &jobs {
        for (method, path) in job_endpoints(job) {
            if !path.ends_with("/log/output") {
                server.add_fault(Fault::new(Some(method), &path, 1, drip.clone()));
            }
        }
    }
    for (method, path) in loop_endpoints() {
        server.add_fault(Fault::new(Some(method), &path, 1, drip.clone()));
    }
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish(
        "answers dripped 1 byte/s (whole-call deadline 2 s)",
        &server,
        &mut p,
        &setup,
        &jobs,
        Once::Exactly,
        &["(the call's deadline)"],
    );
}

/// Issue 21: an early 413 on an artifact upload (the server answers at the
/// first body byte and closes): the answer is read, the artifact dropped
/// with an ERROR, the outcome delivered, and the agent goes on.
#[test]
fn faults_an_early_413_on_an_artifact_upload() {
    let server = FakeServer::start();
    let refused = push_jobs(&server, 1).remove(0);
    let jobs = push_jobs(&server, 2);
    server.add_fault(Fault::new(
        Some("POST"),
        &format!("/v1/result/{refused}/artifact"),
        1,
        FaultAction::EarlyAnswer(413),
    ));
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish(
        "early 413 on an artifact upload (then two jobs)",
        &server,
        &mut p,
        &setup,
        &jobs,
        Once::Exactly,
        &["refuses the artifacts"],
    );
    assert!(server.job_states_posted(&refused).iter().any(|s| s == "complete"), "the refused job's outcome");
    assert!(server.artifact(&refused).is_none());
}

/// Kept connections closed at every moment a server can: as a request
/// arrives (unread), after its head, after its answer; and idle ones at
/// the server's keep-alive timeout. No request the server did not handle
/// may be lost, none it handled may be handled twice: the agent sends a
/// request again on a new connection only when it cannot have been
/// handled (see `client/transport/keep.rs`).
#[test]
fn faults_kept_connections_closed_at_every_moment() {
    let server = FakeServer::start();
    server.set_connection_faults(true);
    let jobs = push_jobs(&server, 3);
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish(
        "kept connections closed before, during and after requests",
        &server,
        &mut p,
        &setup,
        &jobs,
        Once::Exactly,
        &["sending it on a new one", "the server closed the kept connection"],
    );
    let (connections, requests) = (server.connections(), server.requests().len() as u64);
    println!("{connections} connections for {requests} requests");
    assert!(connections < requests, "connections are reused: {connections} for {requests} requests");
}

/// A server whose keep-alive timeout is shorter than the agent's gaps
/// (gunicorn's async workers: 2 s): it closes every idle connection
/// first; the agent sees it and opens a new one, nothing fails.
#[test]
fn faults_a_keep_alive_timeout_shorter_than_the_polls() {
    let server = FakeServer::start();
    server.set_idle_timeout(Duration::from_millis(100));
    let jobs = push_jobs(&server, 2);
    let setup = agent(&server);
    let mut p = setup.spawn();
    finish(
        "keep-alive timeout 0.1 s, polls every 0.2 s",
        &server,
        &mut p,
        &setup,
        &jobs,
        Once::Exactly,
        &["the server closed the kept connection"],
    );
    let failed: Vec<String> = server.requests().iter().filter(|r| r.status == 0).map(|r| r.line()).collect();
    assert!(failed.is_empty(), "{failed:?}");
}
