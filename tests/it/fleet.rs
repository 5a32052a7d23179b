//! Fleet operation through the real binary: states set on the server,
//! restart requests, recovery failures, allocate and reserve, metrics
//! served while a phase runs, and recovery after `kill -9`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fake_server::{FakeServer, Fault};
use crate::harness::{AGENT_ID, Agent, QUEUE, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(30);
/// The status the agent documents for a phase it was killed during.
const INTERRUPTED: i64 = 99;

fn agent_data_gets(s: &FakeServer) -> usize {
    s.requests_to("GET", &format!("/v1/agents/data/{AGENT_ID}")).len()
}

fn completed(s: &FakeServer, job: &str) -> bool {
    s.job_states_posted(job).iter().any(|x| x == "complete")
}

fn status(s: &FakeServer, job: &str, phase: &str) -> Option<i64> {
    s.result(job).and_then(|r| r.get("status")?.get(phase)?.as_i64())
}

/// A port nobody listens on right now (bound, noted, released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// One scrape; the body, and how long the answer took.
fn scrape(port: u16) -> (String, Duration) {
    let start = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send scrape");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("read scrape");
    let elapsed = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (body, elapsed)
}

/// The value of the sample whose line starts with `series ` (exact labels).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Running (a zombie, waiting for some reaper, counts as gone).
fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + T;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A test command that waits for a `go` file in its run dir: the test
/// decides when the phase ends, so nothing depends on timing.
const BLOCK_UNTIL_GO: &str = "touch started; while [ ! -f go ]; do sleep 0.02; done; echo released";

#[test]
fn offline_and_maintenance_stop_intake_within_one_cycle_until_cleared() {
    let server = FakeServer::start();
    let agent = Agent::new(&server).command("test", "echo ran");
    let mut p = agent.spawn();
    server.wait_until(T, "agent polling", |s| agent_data_gets(s) >= 2);
    for state in ["offline", "maintenance"] {
        server.set_agent_state(AGENT_ID, state, "operator: cabling");
        let at = server.requests().len();
        // A cycle in flight at the change may have read the old state; the
        // job is offered once such a cycle is surely over (two reads later).
        let gets = agent_data_gets(&server);
        server.wait_until(T, "two reads after the change", |s| agent_data_gets(s) >= gets + 2);
        let job = unique_id();
        server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
        let polls = agent_data_gets(&server);
        server.wait_until(T, "four more cycles", |s| agent_data_gets(s) >= polls + 4);
        // Within one cycle: after the second read of the agent data that
        // followed the change, no job was asked for. (Not the first: a read
        // in flight when the state changed may be recorded after `at` with
        // the old state in its answer.)
        let after: Vec<_> = server.requests().into_iter().skip(at).collect();
        let reads: Vec<usize> = after
            .iter()
            .enumerate()
            .filter(|(_, r)| r.method == "GET" && r.path.starts_with("/v1/agents/data/"))
            .map(|(i, _)| i)
            .collect();
        let first_read = *reads.get(1).expect("two agent data reads after the change");
        assert!(
            !after[first_read..].iter().any(|r| r.method == "GET" && r.path == "/v1/job"),
            "asked for a job while {state}: {:?}",
            after.iter().map(|r| r.line()).collect::<Vec<_>>()
        );
        assert_eq!(server.queued_jobs(), 1, "job taken while {state}");
        assert!(p.try_wait().is_none(), "agent exited while {state}\n{}", p.diagnostics());
        // Cleared: intake resumes.
        server.set_agent_state(AGENT_ID, "waiting", "");
        server.wait_until(T, "job run after the state was cleared", |s| completed(s, &job));
        // Let the agent finish its after-job state post (a read, then a
        // post) before the next change; a change inside that window is a race
        // the server API cannot close.
        let gets = agent_data_gets(&server);
        server.wait_until(T, "next cycle after the job", |s| agent_data_gets(s) >= gets + 2);
    }
    assert!(p.log_text().contains("offline on the server (operator: cabling)"), "reason logged:\n{}", p.log_text());
}

#[test]
fn restart_state_exits_75_when_idle() {
    let server = FakeServer::start();
    let agent = Agent::new(&server);
    let mut p = agent.spawn();
    server.wait_until(T, "agent polling", |s| agent_data_gets(s) >= 2);
    server.set_agent_state(AGENT_ID, "restart", "new version");
    let status = p.wait_exit(T);
    assert_eq!(status.code(), Some(75), "{}", p.diagnostics());
    assert_eq!(server.agent_states(AGENT_ID).last().map(String::as_str), Some("offline"));
    // The supervisor starts it again: the offline it posted for its own
    // restart is cleared (an operator's would be kept) and jobs flow.
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, ""));
    let mut p = agent.spawn();
    server.wait_until(T, "job taken after the restart", |s| completed(s, &job));
    // Posted after the outcome (the skipped phases posted theirs before).
    server.wait_until(T, "waiting after the job", |s| {
        s.agent_states(AGENT_ID).last().map(String::as_str) == Some("waiting")
    });
    assert!(p.try_wait().is_none(), "{}", p.diagnostics());
}

#[test]
fn sigusr1_mid_job_restarts_only_after_the_job() {
    let server = FakeServer::start();
    let (first, second) = (unique_id(), unique_id());
    server.push_job(&job_json(&first, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    server.push_job(&job_json(&second, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("test", BLOCK_UNTIL_GO).command("cleanup", "echo cleanup ran");
    let mut p = agent.spawn();
    wait_for_file(&agent.run_dir(&first).join("started"));
    p.signal(libc::SIGUSR1);
    // The job goes on: the phase is not stopped by the signal.
    let polls = server.requests().len();
    server.wait_until(T, "more requests while the job runs", |s| s.requests().len() >= polls + 3);
    assert!(p.try_wait().is_none(), "exited mid-job\n{}", p.diagnostics());
    assert!(!completed(&server, &first));
    std::fs::write(agent.run_dir(&first).join("go"), "").expect("release the phase");
    let status = p.wait_exit(T);
    assert_eq!(status.code(), Some(75), "{}", p.diagnostics());
    assert!(completed(&server, &first));
    assert_eq!(status_of_all(&server, &first), [("test", 0), ("cleanup", 0)]);
    assert_eq!(server.queued_jobs(), 1, "the second job waits for the restarted agent");
    assert!(server.job_states_posted(&second).is_empty());
}

fn status_of_all(s: &FakeServer, job: &str) -> Vec<(&'static str, i64)> {
    ["setup", "provision", "firmware_update", "test", "allocate", "reserve", "cleanup"]
        .into_iter()
        .filter_map(|p| Some((p, status(s, job, p)?)))
        .collect()
}

#[test]
fn exit_46_marks_offline_emits_recovery_fail_and_stops_intake() {
    let server = FakeServer::start();
    let (first, second) = (unique_id(), unique_id());
    let hook =
        r#"{"provision_data":{"url":"x"},"test_data":{"test_cmds":"x"},"job_status_webhook":"http://hook.example/x"}"#;
    server.push_job(&job_json(&first, QUEUE, hook));
    server.push_job(&job_json(&second, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server)
        .command("provision", "echo device gone; exit 46")
        .command("test", "echo test ran")
        .command("cleanup", "echo cleanup ran");
    let port = free_port();
    let mut p = agent.spawn_with(&["-p", &port.to_string()]);
    server.wait_until(T, "first job complete", |s| completed(s, &first));
    server.wait_until(T, "agent offline", |s| {
        s.agent_data(AGENT_ID).and_then(|d| d.get("state")?.as_str().map(String::from)).as_deref() == Some("offline")
    });
    let data = server.agent_data(AGENT_ID).expect("agent data");
    // Upstream's words exactly (item 7b of issue 11): operators search for them.
    let comment = data.get("comment").and_then(Json::as_str).unwrap_or("");
    assert_eq!(comment, format!("Set to offline by agent. Recovery failed during job '{first}' execution."));
    let events = server.events(&first);
    assert!(events.iter().any(|e| e == "recovery_fail"), "{events:?}");
    assert!(!events.iter().any(|e| e == "provision_fail"), "recovery_fail instead, as upstream: {events:?}");
    assert_eq!(status(&server, &first, "provision"), Some(46));
    assert_eq!(status(&server, &first, "test"), None, "no phase after a failed provision");
    assert_eq!(status(&server, &first, "cleanup"), Some(0));
    let (body, _) = scrape(port);
    assert_eq!(sample(&body, &format!("recovery_failures_total{{agent_id=\"{AGENT_ID}\"}}")), Some(1.0), "{body}");
    assert_eq!(
        sample(&body, &format!("failures_total{{agent_id=\"{AGENT_ID}\",test_phase=\"provision\"}}")),
        Some(1.0),
        "{body}"
    );

    // No intake while offline, though polling goes on.
    let polls = agent_data_gets(&server);
    server.wait_until(T, "three more cycles", |s| agent_data_gets(s) >= polls + 3);
    assert_eq!(server.queued_jobs(), 1);
    assert!(p.try_wait().is_none());
    // An operator puts it back: the second job runs.
    server.set_agent_state(AGENT_ID, "waiting", "");
    server.wait_until(T, "second job complete", |s| completed(s, &second));
}

#[test]
fn allocate_holds_the_device_until_the_parent_job_is_over() {
    let server = FakeServer::start();
    let (parent, child) = (unique_id(), unique_id());
    server.set_job_state(&parent, "waiting");
    let extra = format!(r#"{{"parent_job_id":"{parent}","allocate_data":{{"allocate":true}}}}"#);
    server.push_job(&job_json(&child, QUEUE, &extra));
    server.set_job_state(&child, "waiting");
    let agent = Agent::new(&server)
        .command("allocate", r#"echo '{"device_info": {"device_ip": "10.9.8.7"}}' > device-info.json"#)
        .command("cleanup", "echo cleanup ran");
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "allocated", |s| s.job_states_posted(&child).iter().any(|x| x == "allocated"));
    let ip = server.result(&child).and_then(|r| r.get("device_info")?.get("device_ip")?.as_str().map(String::from));
    assert_eq!(ip.as_deref(), Some("10.9.8.7"), "device info posted before allocated");
    // It keeps checking the parent, and holds.
    let checks = server.requests_to("GET", &format!("/v1/result/{parent}")).len();
    server.wait_until(T, "parent checked again", |s| {
        s.requests_to("GET", &format!("/v1/result/{parent}")).len() >= checks + 3
    });
    assert!(!completed(&server, &child));
    assert!(p.try_wait().is_none());
    server.set_job_state(&parent, "completed");
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    assert!(completed(&server, &child));
    assert_eq!(status(&server, &child, "allocate"), Some(0));
    assert_eq!(status(&server, &child, "cleanup"), Some(0));
}

/// As upstream (issue 22): a child holds whatever allocate's status, since
/// the parent waits for `allocated`; the phase's events come after the
/// release, and the failure then ends the job (no reserve).
#[test]
fn a_failing_allocate_still_holds_and_reports_after_the_release() {
    let server = FakeServer::start();
    let (parent, child) = (unique_id(), unique_id());
    server.set_job_state(&parent, "provision");
    let extra = format!(
        r#"{{"parent_job_id":"{parent}","allocate_data":{{"allocate":true}},"reserve_data":{{"timeout":5}},"job_status_webhook":"http://hook.example/x"}}"#
    );
    server.push_job(&job_json(&child, QUEUE, &extra));
    server.set_job_state(&child, "waiting");
    let agent = Agent::new(&server)
        .command("allocate", r#"echo '{"device_info": {"device_ip": "10.9.8.7"}}' > device-info.json; exit 1"#)
        .command("reserve", "echo reserve ran")
        .command("cleanup", "echo cleanup ran");
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "allocated", |s| s.job_states_posted(&child).iter().any(|x| x == "allocated"));
    let ip = server.result(&child).and_then(|r| r.get("device_info")?.get("device_ip")?.as_str().map(String::from));
    assert_eq!(ip.as_deref(), Some("10.9.8.7"), "device info posted before allocated");
    assert_eq!(status(&server, &child, "allocate"), Some(1), "the status is posted before the hold");
    let checks = server.requests_to("GET", &format!("/v1/result/{parent}")).len();
    server.wait_until(T, "parent checked again", |s| {
        s.requests_to("GET", &format!("/v1/result/{parent}")).len() >= checks + 3
    });
    assert!(p.try_wait().is_none(), "held: {}", p.diagnostics());
    let events = server.events(&child);
    assert_eq!(
        events.last().map(String::as_str),
        Some("allocate_start"),
        "no allocate event during the hold: {events:?}"
    );
    server.set_job_state(&parent, "cancelled");
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    let events = server.events(&child);
    let tail: Vec<&str> = events.iter().map(String::as_str).skip_while(|e| *e != "allocate_start").collect();
    assert_eq!(tail, ["allocate_start", "allocate_fail", "cleanup_start", "cleanup_success", "job_end"], "{events:?}");
    assert_eq!(status(&server, &child, "reserve"), None, "the failed allocate ends the job");
    assert_eq!(status(&server, &child, "cleanup"), Some(0));
}

/// A cancel that stops the allocate command is no allocation: nothing is
/// held, and `allocated` is never posted over the cancel (upstream posts it,
/// which makes the cancelled job live again on the server).
#[test]
fn a_cancel_during_allocate_holds_nothing() {
    let server = FakeServer::start();
    let (parent, child) = (unique_id(), unique_id());
    server.set_job_state(&parent, "provision");
    let extra = format!(r#"{{"parent_job_id":"{parent}","allocate_data":{{"allocate":true}}}}"#);
    server.push_job(&job_json(&child, QUEUE, &extra));
    server.set_job_state(&child, "waiting");
    let agent = Agent::new(&server)
        .command("allocate", r#"echo '{"device_info": {"device_ip": "10.9.8.7"}}' > device-info.json; sleep 60"#)
        .command("cleanup", "echo cleanup ran");
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "allocate running", |s| s.job_states_posted(&child).iter().any(|x| x == "allocate"));
    server.cancel_job(&child);
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    let states = server.job_states_posted(&child);
    assert!(!states.iter().any(|x| x == "allocated"), "{states:?}");
    assert_eq!(states.last().map(String::as_str), Some("cancelled"), "{states:?}");
}

/// Issue 22: the state read before `waiting` after a job fails (500): the
/// operator's `maintenance` set during the job, which the agent could not
/// see, stays; nothing is posted over it.
#[test]
fn a_failed_state_read_after_a_job_posts_nothing_over_the_operators_state() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("test", BLOCK_UNTIL_GO).command("cleanup", "true");
    let mut p = agent.spawn_with(&["--once"]);
    wait_for_file(&agent.run_dir(&job).join("started"));
    server.set_agent_state(AGENT_ID, "maintenance", "swapping the cable");
    let path = format!("/v1/agents/data/{AGENT_ID}");
    server.add_fault(Fault::status("GET", &path, 1000, 500));
    std::fs::write(agent.run_dir(&job).join("go"), "").expect("release the phase");
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    assert!(completed(&server, &job));
    let failed_reads = server.requests_to("GET", &path).iter().filter(|r| r.status == 500).count();
    assert!(failed_reads > 0, "the agent tried to read its state");
    let data = server.agent_data(AGENT_ID).expect("agent data");
    assert_eq!(data.get("state").and_then(Json::as_str), Some("maintenance"), "{data}");
    assert_eq!(data.get("comment").and_then(Json::as_str), Some("swapping the cable"), "{data}");
    assert_eq!(data.get("job_id").and_then(Json::as_str), Some(""), "the job id is still cleared: {data}");
}

/// The `waiting` held back by a failed read goes once a cycle reads a
/// state that is not an operator's.
#[test]
fn waiting_held_back_by_a_failed_read_is_posted_once_the_state_reads() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("test", BLOCK_UNTIL_GO).command("cleanup", "true");
    let mut p = agent.spawn();
    wait_for_file(&agent.run_dir(&job).join("started"));
    let path = format!("/v1/agents/data/{AGENT_ID}");
    server.add_fault(Fault::status("GET", &path, 1000, 500));
    std::fs::write(agent.run_dir(&job).join("go"), "").expect("release the phase");
    server.wait_until(T, "job complete", |s| completed(s, &job));
    let failed = |s: &FakeServer| s.requests_to("GET", &path).iter().filter(|r| r.status == 500).count();
    let after_job = failed(&server);
    server.wait_until(T, "two more failed reads", |s| failed(s) >= after_job + 2);
    let states = server.agent_states(AGENT_ID);
    assert_eq!(states.last().map(String::as_str), Some("test"), "nothing posted while unseen: {states:?}");
    server.clear_faults();
    server.wait_until(T, "waiting posted", |s| s.agent_states(AGENT_ID).last().map(String::as_str) == Some("waiting"));
    assert!(p.try_wait().is_none(), "{}", p.diagnostics());
}

/// A `waiting` whose post failed after a job (an outage, or the client's
/// outage hold) is owed, not dropped: it goes once a cycle reads a state
/// that is not an operator's, instead of leaving the job's last phase shown
/// until the next heartbeat.
#[test]
fn waiting_whose_post_failed_after_a_job_is_posted_later() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("test", BLOCK_UNTIL_GO).command("cleanup", "true");
    let mut p = agent.spawn();
    wait_for_file(&agent.run_dir(&job).join("started"));
    let path = format!("/v1/agents/data/{AGENT_ID}");
    server.add_fault(Fault::status("POST", &path, 1000, 500));
    std::fs::write(agent.run_dir(&job).join("go"), "").expect("release the phase");
    server.wait_until(T, "job complete", |s| completed(s, &job));
    // Two polling cycles later the post and its retries are over.
    let reads = |s: &FakeServer| s.requests_to("GET", &path).len();
    let after_job = reads(&server);
    server.wait_until(T, "two cycles after the job", |s| reads(s) >= after_job + 2);
    assert_ne!(
        server.agent_states(AGENT_ID).last().map(String::as_str),
        Some("waiting"),
        "refused posts are not stored"
    );
    server.clear_faults();

    server.wait_until(T, "waiting posted", |s| s.agent_states(AGENT_ID).last().map(String::as_str) == Some("waiting"));
    assert!(p.try_wait().is_none(), "{}", p.diagnostics());
}

#[test]
fn metrics_answer_during_a_phase_despite_hostile_scrapers() {
    let server = FakeServer::start();
    let agent_setup = Agent::new(&server);
    let textfile = agent_setup.dir().join("node-exporter").join("testflinger.prom");
    std::fs::create_dir_all(textfile.parent().expect("parent")).expect("mkdir");
    let agent = agent_setup
        .set("metrics_textfile", &crate::harness::yaml_str(&textfile.to_string_lossy()))
        .command("setup", "echo setup")
        // `fail` jobs fail their test, `block` jobs wait for the test's go.
        .command("test", &format!("grep -q FAILME testflinger.json && exit 3; grep -q BLOCKME testflinger.json && {{ {BLOCK_UNTIL_GO}; }}; true"));
    let (failing, blocking) = (unique_id(), unique_id());
    server.push_job(&job_json(&failing, QUEUE, r#"{"test_data":{"test_cmds":"FAILME"}}"#));
    let port = free_port();
    let mut p = agent.spawn_with(&["-p", &port.to_string()]);
    server.wait_until(T, "failing job complete", |s| completed(s, &failing));
    server.push_job(&job_json(&blocking, QUEUE, r#"{"test_data":{"test_cmds":"BLOCKME"}}"#));
    wait_for_file(&agent.run_dir(&blocking).join("started"));

    // Hostile scrapers: one silent, one sending header bytes without end.
    let _silent = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut endless = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    endless.set_write_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let _ = endless.write_all(b"GET / HTTP/1.1\r\nX-Junk: ");
    for _ in 0..50 {
        if endless.write_all(&[b'z'; 1024]).is_err() {
            break;
        }
    }

    let mut worst = Duration::ZERO;
    let mut body = String::new();
    for _ in 0..10 {
        let (b, took) = scrape(port);
        worst = worst.max(took);
        body = b;
    }
    eprintln!("metrics scrape during a running phase: worst of 10 took {worst:?}");
    assert!(worst < Duration::from_secs(2), "scrape took {worst:?}");
    let a = format!("agent_id=\"{AGENT_ID}\"");
    assert_eq!(sample(&body, &format!("jobs_total{{{a}}}")), Some(2.0), "{body}");
    assert_eq!(sample(&body, &format!("failures_total{{{a},test_phase=\"test\"}}")), Some(1.0), "{body}");
    let labels = |phase: &str| format!("{a},test_phase=\"{phase}\",identifier=\"test-identifier\",release=\"\"");
    assert_eq!(sample(&body, &format!("phase_duration_seconds_count{{{}}}", labels("setup"))), Some(2.0), "{body}");
    assert_eq!(sample(&body, &format!("phase_duration_seconds_count{{{}}}", labels("test"))), Some(1.0), "{body}");
    assert_eq!(sample(&body, &format!("phase_duration_seconds_bucket{{{},le=\"60.0\"}}", labels("test"))), Some(1.0));
    assert_eq!(sample(&body, &format!("recovery_failures_total{{{a}}}")), Some(0.0), "{body}");

    // The phase itself kept streaming and ends normally.
    std::fs::write(agent.run_dir(&blocking).join("go"), "").expect("go");
    server.wait_until(T, "blocking job complete", |s| completed(s, &blocking));
    let text = std::fs::read_to_string(&textfile).expect("textfile written");
    assert!(text.contains(&format!("phase_duration_seconds_count{{{}}} 2.0", labels("test"))), "{text}");
    assert!(p.try_wait().is_none());
}

#[test]
fn kill_9_mid_phase_then_restart_delivers_the_outcome_with_cleanup() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        r#"{"test_data":{"test_cmds":"HANGME"},"job_status_webhook":"http://hook.example/x"}"#,
    ));
    let agent = Agent::new(&server)
        .command("setup", "echo setup done")
        // The test phase records its pid, prints, and hangs.
        .command("test", "grep -q HANGME testflinger.json || exit 0; echo $$ > test.pid; mkdir -p artifacts; echo kept > artifacts/a.txt; echo before the crash; exec sleep 300")
        .command("cleanup", "echo CLEANUP RAN in $(basename $PWD)");
    let mut p = agent.spawn();
    let rundir = agent.run_dir(&job);
    wait_for_file(&rundir.join("test.pid"));
    let streamed = |s: &FakeServer| {
        s.requests().iter().position(|r| {
            r.method == "POST" && r.path.ends_with("/log/output") && r.body_text().contains("before the crash")
        })
    };
    server.wait_until(T, "test output streamed", |s| streamed(s).is_some());
    // The agent records a fragment as sent right after the post, before its
    // next request: waiting for one makes the kill land mid-phase rather
    // than between a post and its record (a crash there may send that one
    // fragment again; see docs/operations.md, crash recovery).
    server.wait_until(T, "the agent's next request", |s| streamed(s).is_some_and(|i| s.requests().len() > i + 1));
    let pid: i32 = std::fs::read_to_string(rundir.join("test.pid")).expect("pid").trim().parse().expect("pid number");
    p.kill();
    assert!(!completed(&server, &job));
    assert!(alive(pid), "the phase command outlives the killed agent");

    let other = unique_id();
    server.push_job(&job_json(&other, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let mut p = agent.spawn();
    server.wait_until(T, "recovered outcome delivered", |s| completed(s, &job));
    assert_eq!(status(&server, &job, "setup"), Some(0));
    assert_eq!(status(&server, &job, "test"), Some(INTERRUPTED));
    assert_eq!(status(&server, &job, "cleanup"), Some(0));
    let cleanup = server.log_text_phase(&job, "output", "cleanup");
    assert!(cleanup.contains(&format!("CLEANUP RAN in {job}")), "cleanup ran in the run dir: {cleanup}");
    let test_log = server.log_text_phase(&job, "output", "test");
    assert_eq!(test_log.matches("before the crash").count(), 1, "output not sent twice: {test_log}");
    assert!(test_log.contains("killed or lost power"), "{test_log}");
    let members = server.artifact_members(&job);
    assert!(members.iter().any(|(path, data, _)| path == "artifacts/a.txt" && data == b"kept\n"));
    let events = server.events(&job);
    assert!(events.iter().any(|e| e == "test_fail"), "{events:?}");
    assert!(events.iter().any(|e| e == "cleanup_success"), "{events:?}");
    // The webhook gets the whole list each time: the last one still holds
    // the events from before the crash, in order, once each.
    let before: Vec<&str> = events.iter().map(String::as_str).take_while(|e| *e != "test_fail").collect();
    let skipped = ["provision_start", "provision_success", "firmware_update_start", "firmware_update_success"];
    let mut expected = vec!["job_start", "setup_start", "setup_success"];
    expected.extend(skipped);
    expected.push("test_start");
    assert_eq!(before, expected, "{events:?}");
    // The leftover phase process was stopped before cleanup ran.
    assert!(!alive(pid), "leftover test command still running");
    // Fragment numbers never repeat across the two agent runs.
    let mut numbers: Vec<i64> = server.fragments(&job, "output").iter().map(|f| f.number).collect();
    numbers.sort();
    let len = numbers.len();
    numbers.dedup();
    assert_eq!(numbers.len(), len, "duplicate fragment numbers");
    // Only then a new job was taken.
    server.wait_until(T, "next job complete", |s| completed(s, &other));
    let first_other = server.requests().iter().position(|r| r.path.contains(&other));
    let last_job = server.requests().iter().rposition(|r| r.path == format!("/v1/result/{job}") && r.method == "POST");
    assert!(last_job < first_other, "new job taken before the recovered one was delivered");
    assert!(!rundir.exists());
    assert!(p.try_wait().is_none());
}

/// A job whose cleanup kills the agent (a connector that SIGKILLs its
/// parent, `$PPID` of the phase's shell) on every run: the first run and
/// two recoveries end that way; the start after gives the job up as
/// failed, delivers its outcome, and takes the next job.
#[test]
fn a_job_that_keeps_killing_the_agent_is_given_up_after_two_recoveries() {
    use std::os::unix::process::ExitStatusExt;
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        r#"{"test_data":{"test_cmds":"KILLER"},"job_status_webhook":"http://hook.example/x"}"#,
    ));
    let agent = Agent::new(&server)
        .command("test", "echo test ran")
        .command("cleanup", "grep -q KILLER testflinger.json && { echo ran >> ../../killer-cleanups; kill -KILL $PPID; }; echo cleanup done");
    for run in 1..=3 {
        let mut p = agent.spawn();
        let status = p.wait_exit(T);
        assert_eq!(status.signal(), Some(libc::SIGKILL), "run {run} was not killed by its job\n{}", p.diagnostics());
        assert!(!completed(&server, &job), "run {run}");
    }
    let other = unique_id();
    server.push_job(&job_json(&other, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let mut p = agent.spawn();
    server.wait_until(T, "the given-up job's outcome", |s| completed(s, &job));
    assert_eq!(status(&server, &job, "test"), Some(0));
    assert_eq!(status(&server, &job, "cleanup"), Some(INTERRUPTED));
    let cleanup = server.log_text_phase(&job, "output", "cleanup");
    assert!(cleanup.contains("the agent stopped during this job 3 times; giving up"), "{cleanup}");
    // Run by the first agent and the two recoveries, not by the fourth.
    let runs = std::fs::read_to_string(agent.dir().join("killer-cleanups")).unwrap_or_default();
    assert_eq!(runs.lines().count(), 3, "{runs}");
    let events = server.events(&job);
    assert!(events.iter().any(|e| e == "cleanup_fail"), "{events:?}");
    server.wait_until(T, "next job complete", |s| completed(s, &other));
    assert_eq!(status(&server, &other, "cleanup"), Some(0));
    assert!(!agent.run_dir(&job).exists() && !agent.results_dir().join(&job).exists());
    assert!(p.try_wait().is_none(), "{}", p.diagnostics());
}

/// Should even giving a job up stop the agent (the count says three
/// recoveries began), the run dir is set aside untouched and intake goes on.
#[test]
fn a_job_whose_give_up_also_stopped_the_agent_is_set_aside() {
    let server = FakeServer::start();
    let job = unique_id();
    let agent = Agent::new(&server).command("cleanup", "echo cleanup ran >> ../../cleanups");
    let dir = agent.run_dir(&job);
    std::fs::create_dir_all(&dir).expect("run dir");
    std::fs::write(dir.join("testflinger.json"), format!(r#"{{"job_id":"{job}","test_data":{{"test_cmds":"x"}}}}"#))
        .expect("job file");
    std::fs::write(dir.join("testflinger-outcome.json"), "{}").expect("outcome file");
    std::fs::write(dir.join(".recovery-attempts"), "3").expect("count");
    let other = unique_id();
    server.push_job(&job_json(&other, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let mut p = agent.spawn();
    server.wait_until(T, "next job complete", |s| completed(s, &other));
    assert!(agent.results_dir().join(".undeliverable").join(&job).join("testflinger.json").exists());
    assert!(!dir.exists());
    assert!(server.requests().iter().all(|r| !r.path.contains(&job)), "the set-aside job was reported");
    let cleanups = std::fs::read_to_string(agent.dir().join("cleanups")).unwrap_or_default();
    assert_eq!(cleanups.lines().count(), 1, "cleanup ran for the set-aside job: {cleanups}");
    assert!(p.log_text().contains("set aside"), "{}", p.log_text());
    assert!(p.try_wait().is_none());
}
