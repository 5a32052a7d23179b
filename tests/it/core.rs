//! The server client and the loop: cookie, auth, retries, delivery of
//! refused outcomes across restarts, config and usage errors, local jobs.

use std::path::Path;
use std::time::Duration;

use crate::fake_server::{FakeServer, Fault, FaultAction};
use crate::harness::{AGENT_ID, Agent, QUEUE, agent_command, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(30);

fn test_job(server: &FakeServer) -> String {
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    job
}

#[test]
fn every_request_carries_the_agent_cookie_and_scheme_less_address_works() {
    let server = FakeServer::start();
    let job = test_job(&server);
    let agent = Agent::new(&server).set("server_address", &server.addr()).command("test", "echo hi");
    assert!(agent.run_once(T).status.success());
    let reqs = server.requests();
    assert!(reqs.len() > 5);
    for r in &reqs {
        assert_eq!(r.header("cookie"), Some(format!("agent_name={AGENT_ID}").as_str()), "{}", r.line());
    }
    assert_eq!(server.result(&job).unwrap().get("job_state").and_then(Json::as_str), Some("complete"));
}

#[test]
fn bearer_token_sent_and_a_401_triggers_exactly_one_refresh() {
    let server = FakeServer::start();
    server.require_auth("refresh-me");
    let job = test_job(&server);
    // The token expires while the test phase runs: the next request gets a
    // 401, the agent refreshes once and replays it.
    let agent = Agent::new(&server).token("refresh-me").command("test", "echo hi; sleep 0.5; echo bye");
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "test phase state", |s| s.job_states_posted(&job).iter().any(|x| x == "test"));
    let before = server.requests_to("POST", "/v1/oauth2/refresh").len();
    server.expire_token();
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    assert_eq!(before, 1, "one refresh at start");
    assert_eq!(server.requests_to("POST", "/v1/oauth2/refresh").len(), 2, "exactly one refresh after the 401");
    let unauthorized: Vec<_> = server.requests().into_iter().filter(|r| r.status == 401).collect();
    assert_eq!(unauthorized.len(), 1, "{:?}", unauthorized.iter().map(|r| r.line()).collect::<Vec<_>>());
    for r in server.requests().iter().filter(|r| r.path.starts_with("/v1/result")) {
        assert!(r.header("authorization").is_some_and(|a| a.starts_with("Bearer tok-")), "{}", r.line());
    }
    assert_eq!(server.result(&job).unwrap().get("job_state").and_then(Json::as_str), Some("complete"));
}

#[test]
fn refused_refresh_does_not_loop() {
    let server = FakeServer::start();
    server.require_auth("the-right-one");
    test_job(&server);
    let agent = Agent::new(&server).token("a-wrong-one").command("test", "true");
    let out = agent.run_once(T);
    assert!(out.status.success());
    // One refresh at start and at most one per refused call: never a storm.
    let refreshes = server.requests_to("POST", "/v1/oauth2/refresh").len();
    let calls = server.requests().iter().filter(|r| r.status == 401 && !r.path.starts_with("/v1/oauth2")).count();
    assert!(refreshes <= calls + 1, "{refreshes} refreshes for {calls} refused calls");
    assert_eq!(server.queued_jobs(), 1, "no job taken without auth");
}

#[test]
fn server_errors_are_retried_and_nothing_is_lost() {
    let server = FakeServer::start();
    let job = test_job(&server);
    server.add_fault(Fault::status("GET", "/v1/job", 2, 503));
    server.add_fault(Fault::status("POST", &format!("/v1/result/{job}"), 2, 502));
    server.add_fault(Fault::new(
        Some("POST"),
        &format!("/v1/result/{job}/log/output"),
        1,
        FaultAction::CloseWithoutAnswer,
    ));
    let agent = Agent::new(&server).command("test", "for i in 1 2 3 4 5; do echo line$i; done");
    // With 503 on GET /v1/job a single --once cycle may see no job; loop.
    let mut p = agent.spawn();
    server.wait_until(T, "job complete", |s| {
        s.results_posted(&job).iter().any(|r| r.get("job_state").and_then(Json::as_str) == Some("complete"))
    });
    p.kill();
    let text = server.log_text_phase(&job, "output", "test");
    assert!(text.contains("line1\nline2\nline3\nline4\nline5\n"), "{text}");
    let status = server.result(&job).unwrap();
    assert_eq!(status.get("status").and_then(|s| s.get("test")).and_then(Json::as_i64), Some(0));
}

#[test]
fn an_outcome_the_server_refused_is_delivered_after_a_restart() {
    let server = FakeServer::start();
    let job = test_job(&server);
    let agent = Agent::new(&server).command("test", "echo out; mkdir -p artifacts; echo keep > artifacts/k.txt");
    // Every final post fails for this run: outcome and artifact.
    server.add_fault(Fault::status("POST", &format!("/v1/result/{job}/artifact"), 1000, 503));
    assert!(agent.run_once(T).status.success());
    assert!(server.artifact(&job).is_none());
    let kept = agent.results_dir().join(&job);
    assert!(kept.join("testflinger-outcome.json").exists(), "kept in results_basedir");
    assert!(!agent.run_dir(&job).exists());

    server.clear_faults();
    let next = test_job(&server);
    let out = agent.run_once(T);
    assert!(out.status.success());
    assert!(server.artifact_members(&job).iter().any(|(p, c, _)| p == "artifacts/k.txt" && c == b"keep\n"));
    let last = server.results_posted(&job).last().cloned().unwrap();
    assert_eq!(last.get("job_state").and_then(Json::as_str), Some("complete"));
    assert_eq!(last.get("status").and_then(|s| s.get("test")).and_then(Json::as_i64), Some(0));
    assert!(!kept.exists());
    // The kept job went out before the next one was even asked for.
    let reqs = server.requests();
    let delivered_at = reqs
        .iter()
        .position(|r| r.path == format!("/v1/result/{job}") && r.method == "POST" && r.status == 200)
        .unwrap();
    let next_taken = reqs.iter().rposition(|r| r.path == "/v1/job" && r.status == 200).unwrap();
    assert!(delivered_at < next_taken);
    assert!(server.result(&next).is_some());
}

#[test]
fn offline_and_maintenance_stop_intake() {
    let server = FakeServer::start();
    test_job(&server);
    let agent = Agent::new(&server).command("test", "true");
    server.set_agent_state(AGENT_ID, "maintenance", "flashing the mux");
    let mut p = agent.spawn();
    server.wait_until(T, "a few polls", |s| s.requests_to("GET", &format!("/v1/agents/data/{AGENT_ID}")).len() >= 3);
    assert_eq!(server.queued_jobs(), 1);
    assert!(server.requests_to("GET", "/v1/job").is_empty());
    server.set_agent_state(AGENT_ID, "waiting", "");
    server.wait_until(T, "job taken", |s| s.queued_jobs() == 0);
    p.kill();
    assert!(p.log_text().contains("maintenance"));
}

#[test]
fn restricted_to_limits_the_queues_asked_for() {
    let server = FakeServer::start();
    let agent = Agent::new(&server).set("job_queues", "[test-queue, private-q]");
    server.set_agent_state(AGENT_ID, "waiting", "");
    server.set_restricted_to(AGENT_ID, r#"{"private-q": ["alice"]}"#);
    assert!(agent.run_once(T).status.success());
    let polls = server.requests_to("GET", "/v1/job");
    assert_eq!(polls.last().map(|r| r.query_all("queue")), Some(vec!["private-q".to_string()]));
}

#[test]
fn waits_for_an_unreachable_server() {
    let server = FakeServer::start();
    server.stop_listening();
    let job = test_job(&server);
    let agent = Agent::new(&server).command("test", "true");
    let mut p = agent.spawn_with(&["--once"]);
    // It says it is waiting, and does wait; then the server comes back.
    let deadline = std::time::Instant::now() + T;
    while !p.log_text().contains("not reachable") {
        assert!(std::time::Instant::now() < deadline, "{}", p.diagnostics());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.try_wait().is_none(), "the agent waits rather than exits");
    server.resume_listening();
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    assert!(server.result(&job).is_some());
    assert!(p.log_text().contains("not reachable"));
}

fn run_with_config(text: &str) -> (i32, String) {
    let dir = crate::harness::TempDir::new("tf-conf");
    let path = dir.path().join("bad.conf");
    std::fs::write(&path, text).unwrap();
    let out = agent_command().arg("-c").arg(&path).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn config_errors_exit_2_naming_the_key() {
    let good = "agent_id: a\nserver_address: 127.0.0.1:1\njob_queues: [q]\n";
    let cases = [
        (format!("{good}test_comand: echo\n"), "test_comand"),
        ("agent_id: a\njob_queues: [q]\n".to_string(), "server_address"),
        ("server_address: x\njob_queues: [q]\n".to_string(), "agent_id"),
        ("agent_id: a\nserver_address: x\njob_queues: q1\n".to_string(), "job_queues"),
        (format!("{good}polling_interval: often\n"), "polling_interval"),
        (format!("{good}global_timeout: -5\n"), "global_timeout"),
        // Issue 21: out of range, they aborted the agent mid-job.
        (format!("{good}global_timeout: 18446744073709551615\n"), "global_timeout"),
        (format!("{good}output_timeout: 31536001\n"), "output_timeout"),
        (format!("{good}polling_interval: 1e300\n"), "polling_interval"),
        (format!("{good}server_timeout: 86401\n"), "server_timeout"),
        (format!("{good}logging_level: CHATTY\n"), "logging_level"),
        (format!("{good}advertised_queues: [a, b]\n"), "advertised_queues"),
    ];
    for (text, key) in cases {
        let (code, stderr) = run_with_config(&text);
        assert_eq!(code, 2, "{key}: {stderr}");
        assert!(stderr.contains(&format!("`{key}`")), "{key}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
    }
    let (code, stderr) = run_with_config("agent_id: [unclosed\n");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("line"), "{stderr}");
    let out = agent_command().args(["-c", "/nonexistent/tf.conf"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tf.conf"));
}

#[test]
fn upstream_example_config_loads_unchanged() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream-all-keys.conf");
    let dir = crate::harness::TempDir::new("tf-fixture");
    // Local-job mode reads the config fully and needs no server; send its
    // files to a temp dir so the fixture itself stays as upstream has it.
    let text = std::fs::read_to_string(&fixture).unwrap().replace("/tmp/testflinger", &dir.path().to_string_lossy());
    let conf = dir.path().join("agent.conf");
    std::fs::write(&conf, text).unwrap();
    let job = dir.path().join("job.json");
    std::fs::write(&job, r#"{"job_id":"fixture-job","job_queue":"rpi4b"}"#).unwrap();
    let out = agent_command().arg("-c").arg(&conf).arg("--job").arg(&job).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Setup") && stdout.contains("Cleanup"), "{stdout}");
}

#[test]
fn usage_errors_exit_2_and_help_and_version_work() {
    for bad in [&["--bogus"][..], &["-p", "notaport"], &["extra-arg"]] {
        let out = agent_command().args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
    }
    let out = agent_command().arg("--help").output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--token-file"));
    let out = agent_command().arg("-V").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("testflinger-agent "));
}

#[test]
fn local_job_runs_without_a_server_and_reports_failure() {
    let dir = crate::harness::TempDir::new("tf-local");
    let d = dir.path().to_string_lossy();
    let conf = dir.path().join("agent.conf");
    std::fs::write(
        &conf,
        format!(
            "agent_id: bench\nserver_address: 127.0.0.1:9\njob_queues: [q]\nexecution_basedir: {d}/run\nlogging_basedir: {d}/logs\n\
             setup_command: echo setting up\ntest_command: echo \"token=$TOKEN\"; exit 4\ncleanup_command: echo cleaning\n"
        ),
    )
    .unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "job_id: bench-1\njob_queue: q\ntest_data:\n  test_cmds: run it\n  secrets:\n    TOKEN: hunter2\n",
    )
    .unwrap();
    let out = agent_command().arg("-c").arg(&conf).arg("--job").arg(&job).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "a failed phase fails the command: {stdout}");
    assert!(stdout.contains("setting up") && stdout.contains("cleaning"));
    assert!(!stdout.contains("hunter2"), "secret masked on the terminal: {stdout}");
    assert!(stdout.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["test", "4"]), "{stdout}");
    let log = std::fs::read_to_string(dir.path().join("run/bench-1/test.log")).unwrap();
    assert!(log.contains("token=**") && !log.contains("hunter2"));
    let written = std::fs::read_to_string(dir.path().join("run/bench-1/testflinger.json")).unwrap();
    assert!(!written.contains("hunter2"), "secrets never reach the disk");
}

/// A typo'd phase key (`tset_data`) gets a WARNING naming the key and the
/// one meant, and the summary says the test was skipped and why, where
/// before the job ran green without a word above INFO.
#[test]
fn local_job_names_a_typoed_key_and_the_phases_it_skipped() {
    let dir = crate::harness::TempDir::new("tf-local-typo");
    let d = dir.path().to_string_lossy();
    let conf = dir.path().join("agent.conf");
    std::fs::write(
        &conf,
        format!(
            "agent_id: bench\nserver_address: 127.0.0.1:9\njob_queues: [q]\nexecution_basedir: {d}/run\nlogging_basedir: {d}/logs\n\
             setup_command: exit 3\ntest_command: echo tested\n"
        ),
    )
    .unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, "job_id: typo-1\njob_queue: q\ntset_data:\n  test_cmds: run it\n").unwrap();
    let out = agent_command().arg("-c").arg(&conf).arg("--job").arg(&job).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let warning = "unknown job key tset_data (did you mean test_data?): ignored";
    assert!(stderr.lines().any(|l| l.contains("WARNING") && l.contains(warning)), "{stderr}");
    let summary: Vec<Vec<&str>> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("== job typo-1"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let line = |phase: &str| summary.iter().find(|l| l.first() == Some(&phase)).map(|l| l[1..].join(" "));
    assert_eq!(line("setup").as_deref(), Some("3"), "{stdout}");
    assert_eq!(line("test").as_deref(), Some("skipped: no test_data in the job"), "{stdout}");
    assert_eq!(line("provision").as_deref(), Some("skipped: no provision_command configured"), "{stdout}");
    assert_eq!(line("cleanup").as_deref(), Some("skipped: no cleanup_command configured"), "{stdout}");
    assert!(stdout.contains(&format!("warning: {warning}")), "{stdout}");
    assert_eq!(out.status.code(), Some(1), "setup failed: {stdout}");
}

/// The README's first command works from any directory: the example's
/// phase commands need no file beside the config.
#[test]
fn bundled_example_runs_from_any_directory() {
    let dir = crate::harness::TempDir::new("tf-example-cwd");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let out = agent_command()
        .current_dir(dir.path())
        .arg("-c")
        .arg(examples.join("agent.conf"))
        .arg("--job")
        .arg(examples.join("job.yaml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["test", "0"]), "{stdout}");
    assert!(stdout.contains("TOKEN is set") && !stdout.contains("s3cr3t-value"), "{stdout}");
    let run = dir.path().join("tf-example/run/00000000-0000-4000-8000-000000000001");
    assert!(run.join("artifacts/result.txt").is_file(), "{stdout}");
}

#[test]
fn an_empty_poll_does_not_wait_for_the_server_to_close_the_connection() {
    // A 204 carries no body and, as the HTTP spec allows, no Content-Length;
    // here the server also keeps the connection open after it although it
    // said `Connection: close`. Reading that 204's "body" until the
    // connection closes would hang each poll for the whole server_timeout
    // (an hour here): the agent must close it itself and poll again while
    // the server still holds the connection. (A 204 on a connection the
    // server keeps is read the same way and the connection reused: the
    // polls of `faults::` and `http::http_one_kept_connection_carries_a_whole_job`.)
    let server = FakeServer::start();
    let answer = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_vec();
    server.add_fault(Fault::new(Some("GET"), "/v1/job", 3, FaultAction::RawThenHold(answer)));
    let mut p = Agent::new(&server).set("server_timeout", "3600").spawn();
    server.wait_until(T, "three held polls closed by the agent and a fourth poll", |s| {
        s.closed_by_client() >= 3 && s.requests_to("GET", "/v1/job").len() >= 4
    });
    let log = p.log_text();
    assert!(!log.contains("not reachable") && !log.contains("WARNING"), "{log}");
    p.kill();
}
