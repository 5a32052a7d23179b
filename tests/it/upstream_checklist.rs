//! Behaviours upstream's own agent tests pin down that no other test of
//! ours did (the mapping is `tests/upstream/upstream-tests.md`), and the
//! check that keeps that table whole.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fake_server::{FakeServer, Fault};
use crate::harness::{AGENT_ID, Agent, AgentProc, AgentSetup, QUEUE, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(30);

fn status(s: &FakeServer, job: &str, phase: &str) -> Option<i64> {
    s.result(job).and_then(|r| r.get("status")?.get(phase)?.as_i64())
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// test_agent.py::test_check_and_run_{setup,provision,test}: each phase's
/// output is kept in `<phase>.log` in the run dir (where recovery and the
/// phase commands that follow read it), not only sent to the server.
#[test]
fn phase_output_lands_in_its_log_file_in_the_run_dir() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"provision_data":{"url":"u"},"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server)
        .command("setup", "echo setup1")
        .command("provision", "echo provision1")
        .command("test", "echo test1")
        .command("cleanup", "for p in setup provision test; do echo \"$p.log ends with $(tail -n 1 $p.log)\"; done");
    assert!(agent.run_once(T).status.success());
    let cleanup = server.log_text_phase(&job, "output", "cleanup");
    for p in ["setup", "provision", "test"] {
        assert!(cleanup.contains(&format!("{p}.log ends with {p}1\n")), "{cleanup}");
    }
}

/// test_agent.py::test_missing_agent_state: agent data the server does
/// not have (404) is no hold: jobs are taken, as upstream takes them. Agent
/// data the server refuses (ours differs) is logged and no job is taken
/// that cycle: an operator's `offline` or `maintenance` could not be seen.
#[test]
fn unknown_agent_data_takes_jobs_and_unreadable_takes_none() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("test", "true");
    server.add_fault(Fault::status("GET", "/v1/agents/data", 1000, 403));
    let out = agent.run_once(T);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("cannot read agent data"), "{log}");
    assert_eq!(server.queued_jobs(), 1, "no job taken while the agent data is unreadable");
    server.clear_faults();
    server.add_fault(Fault::status("GET", "/v1/agents/data", 1000, 404));
    assert!(agent.run_once(T).status.success());
    assert_eq!(status(&server, &job, "test"), Some(0));
}

/// test_client.py::test_post_advertised_{queues,images}: the config's
/// `advertised_queues` and `advertised_images` go to their endpoints as
/// the mappings they are.
#[test]
fn advertised_queues_and_images_are_posted() {
    let server = FakeServer::start();
    let agent = Agent::new(&server)
        .set("advertised_queues", "{q1: first queue}")
        .set("advertised_images", "q1:\n  img1: \"url: http://foo\"");
    let out = agent.run_once(T);
    assert!(out.status.success(), "{}", stderr(&out));
    let body = |path: &str| server.requests_to("POST", path).last().and_then(|r| r.json());
    let queues = body("/v1/agents/queues").expect("advertised queues posted");
    assert_eq!(queues, Json::parse(r#"{"q1":"first queue"}"#).unwrap());
    let images = body("/v1/agents/images").expect("advertised images posted");
    assert_eq!(images, Json::parse(r#"{"q1":{"img1":"url: http://foo"}}"#).unwrap());
}

/// test_client.py::test_save_artifacts_{missing,empty}_artifacts_dir: no
/// artifact upload when the job left no `artifacts/` or an empty one; the
/// outcome still goes.
#[test]
fn no_artifact_upload_without_artifacts() {
    let server = FakeServer::start();
    let (none, empty) = (unique_id(), unique_id());
    server.push_job(&job_json(&none, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    server.push_job(&job_json(&empty, QUEUE, r#"{"test_data":{"test_cmds":"mkdir"}}"#));
    let agent = Agent::new(&server).command("test", "if grep -q mkdir testflinger.json; then mkdir artifacts; fi");
    assert!(agent.run_once(T).status.success());
    assert!(agent.run_once(T).status.success());
    for job in [&none, &empty] {
        assert_eq!(status(&server, job, "test"), Some(0));
        assert!(server.requests_to("POST", &format!("/v1/result/{job}/artifact")).is_empty(), "{job}");
    }
}

/// test_client.py::test_get_job_incorrect_role and
/// test_check_jobs_unauthorized_returns_none: a job poll refused (403, or
/// 401 when no token helps) is no job; the agent polls again later and
/// takes the job once the server hands it out.
#[test]
fn a_refused_job_poll_is_no_job_and_polling_goes_on() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("test", "true");
    for refusal in [403, 401] {
        server.add_fault(Fault::status("GET", "/v1/job", 1000, refusal));
        let out = agent.run_once(T);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(server.queued_jobs(), 1, "{refusal}");
        server.clear_faults();
    }
    assert!(agent.run_once(T).status.success());
    assert_eq!(status(&server, &job, "test"), Some(0));
}

/// test_client.py::test_attachment_endpoint_error: attachments the server
/// cannot serve end the job before its phases (upstream: an exception;
/// ours: setup fails with 100 naming why, cleanup runs).
#[test]
fn attachments_the_server_cannot_serve_fail_setup() {
    let server = FakeServer::start();
    let job = unique_id();
    let fields = r#"{"attachments_status":"complete","test_data":{"attachments":[{"agent":"a.txt"}],"test_cmds":"x"}}"#;
    server.push_job(&job_json(&job, QUEUE, fields));
    server.add_fault(Fault::status("GET", &format!("/v1/job/{job}/attachments"), 1000, 404));
    let agent = Agent::new(&server).command("test", "echo test ran").command("cleanup", "true");
    assert!(agent.run_once(T).status.success());
    assert_eq!(status(&server, &job, "setup"), Some(100));
    assert_eq!(status(&server, &job, "test"), None);
    assert_eq!(status(&server, &job, "cleanup"), Some(0));
}

/// test_client.py::test_transmit_job_outcome_missing_json: a kept run dir
/// without its `testflinger.json` does not stop intake (upstream cannot
/// name its job and logs it; ours names it by the run dir and delivers it).
#[test]
fn a_kept_run_dir_without_its_job_file_does_not_stop_intake() {
    let server = FakeServer::start();
    let agent = Agent::new(&server).command("test", "true");
    let orphan_id = unique_id();
    let orphan = agent.results_dir().join(&orphan_id);
    fs::create_dir_all(&orphan).unwrap();
    fs::write(orphan.join("testflinger-outcome.json"), "{}").unwrap();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let out = agent.run_once(T);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status(&server, &job, "test"), Some(0), "{}", stderr(&out));
    assert_eq!(server.results_posted(&orphan_id).len(), 1, "{}", stderr(&out));
}

/// test_client.py::test_status_update_endpoint_error: events the server
/// refuses are logged; the job and its outcome go on.
#[test]
fn events_the_server_refuses_do_not_stop_the_job() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        r#"{"job_status_webhook":"http://hook.example/x","test_data":{"test_cmds":"x"}}"#,
    ));
    server.add_fault(Fault::status("POST", &format!("/v1/job/{job}/events"), 1000, 404));
    let agent = Agent::new(&server).command("test", "true").command("cleanup", "true");
    assert!(agent.run_once(T).status.success());
    assert_eq!(status(&server, &job, "test"), Some(0));
    assert_eq!(status(&server, &job, "cleanup"), Some(0));
    assert_eq!(server.job_states_posted(&job).last().map(String::as_str), Some("complete"));
}

/// test_client.py::test_result_get_endpoint_error: a job state that cannot
/// be read is not a cancel: every phase runs.
#[test]
fn an_unreadable_job_state_is_not_a_cancel() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"provision_data":{"url":"u"},"test_data":{"test_cmds":"x"}}"#));
    server.add_fault(Fault::status("GET", &format!("/v1/result/{job}"), 1000, 404));
    let agent = Agent::new(&server).command("provision", "true").command("test", "true").command("cleanup", "true");
    assert!(agent.run_once(T).status.success());
    for p in ["provision", "test", "cleanup"] {
        assert_eq!(status(&server, &job, p), Some(0), "{p}");
    }
}

/// test_client.py::test_check_jobs_with_unrestricted_queues: with no
/// `restricted_to` owners the poll asks for every queue of the config.
#[test]
fn an_unrestricted_agent_polls_all_its_queues() {
    let server = FakeServer::start();
    server.set_restricted_to(AGENT_ID, "{}");
    let agent = Agent::new(&server).set("job_queues", "[queue1, queue2]");
    assert!(agent.run_once(T).status.success());
    let polls = server.requests_to("GET", "/v1/job");
    assert_eq!(polls.last().map(|r| r.query_all("queue")), Some(vec!["queue1".to_string(), "queue2".to_string()]));
}

/// test_agent.py::test_agent_metrics_release_label_after_provision (ours
/// differs in where the release comes from): after a successful provision
/// the phases' `release` label is `device_info.release` from
/// `device-info.json` (upstream reads the device's os-release over SSH);
/// before it, and without one, as upstream's empty or unknown.
#[test]
fn release_label_after_provision_comes_from_device_info() {
    let server = FakeServer::start();
    let (with, without) = (unique_id(), unique_id());
    server.push_job(&job_json(&with, QUEUE, r#"{"provision_data":{"url":"u"},"test_data":{"test_cmds":"release"}}"#));
    server.push_job(&job_json(&without, QUEUE, r#"{"provision_data":{"url":"u"},"test_data":{"test_cmds":"x"}}"#));
    let setup = Agent::new(&server);
    let textfile = setup.dir().join("metrics.prom");
    let agent = setup
        .set("metrics_textfile", &crate::harness::yaml_str(&textfile.to_string_lossy()))
        .command(
            "provision",
            r#"if grep -q release testflinger.json; then echo '{"device_info":{"device_ip":"10.0.0.1","release":"22.04.5"}}' > device-info.json; fi"#,
        )
        .command("setup", "true")
        .command("test", "true");
    // The metrics count since the agent started: one run per job.
    let run = || {
        assert!(agent.run_once(T).status.success());
        fs::read_to_string(&textfile).expect("metrics textfile")
    };
    let count = |text: &str, phase: &str, release: &str| {
        let key = format!(
            "phase_duration_seconds_count{{agent_id=\"{AGENT_ID}\",test_phase=\"{phase}\",identifier=\"test-identifier\",release=\"{release}\"}} "
        );
        text.lines().find_map(|l| l.strip_prefix(key.as_str())).map(str::to_string)
    };
    let text = run();
    assert_eq!(count(&text, "setup", "").as_deref(), Some("1.0"), "before provision: {text}");
    for (phase, release) in [("provision", "22.04.5"), ("test", "22.04.5")] {
        assert_eq!(count(&text, phase, release).as_deref(), Some("1.0"), "{phase}: {text}");
    }
    let text = run();
    for (phase, release) in [("provision", "unknown"), ("test", "unknown")] {
        assert_eq!(count(&text, phase, release).as_deref(), Some("1.0"), "{phase}: {text}");
    }
}

/// Upstream's agent.py (no upstream test pins it): every phase of the loop
/// (setup to reserve) is counted in `phase_duration_seconds`, a skipped one
/// too, with its short duration (0 s here); cleanup is not.
#[test]
fn skipped_phases_are_counted_in_phase_durations() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let setup = Agent::new(&server);
    let textfile = setup.dir().join("metrics.prom");
    let agent =
        setup.set("metrics_textfile", &crate::harness::yaml_str(&textfile.to_string_lossy())).command("test", "true");
    assert!(agent.run_once(T).status.success());
    let text = fs::read_to_string(&textfile).expect("metrics textfile");
    for phase in ["setup", "provision", "firmware_update", "test", "allocate", "reserve"] {
        let key = format!(
            "phase_duration_seconds_count{{agent_id=\"{AGENT_ID}\",test_phase=\"{phase}\",identifier=\"test-identifier\",release=\"\"}} 1.0"
        );
        assert!(text.lines().any(|l| l == key), "{phase}: {text}");
    }
    let skipped = format!(
        "phase_duration_seconds_sum{{agent_id=\"{AGENT_ID}\",test_phase=\"setup\",identifier=\"test-identifier\",release=\"\"}} 0.0"
    );
    assert!(text.lines().any(|l| l == skipped), "{text}");
    assert!(!text.contains("test_phase=\"cleanup\""), "{text}");
}

/// test_agent.py::test_provision_error_in_event_detail and
/// test_provision_error_no_cause: the `provision_fail` event's detail is
/// the connector's exception from `device-connector-error.json`, as
/// `Name: message caused by cause`, or `Name: message` when the cause is
/// null.
#[test]
fn provision_fail_detail_is_the_connectors_exception() {
    let server = FakeServer::start();
    for (cause, detail) in [(r#""MyCause""#, "MyName: MyMessage caused by MyCause"), ("null", "MyName: MyMessage")] {
        let job = unique_id();
        let fields = r#"{"job_status_webhook":"http://hook.example/x","provision_data":{"url":"u"}}"#;
        server.push_job(&job_json(&job, QUEUE, fields));
        let error = format!(
            r#"{{"provision_exception_info":{{"exception_name":"MyName","exception_message":"MyMessage","exception_cause":{cause}}}}}"#
        );
        let agent =
            Agent::new(&server).command("provision", &format!("echo '{error}' > device-connector-error.json; exit 99"));
        assert!(agent.run_once(T).status.success());
        let last = server.event_posts(&job).last().cloned().expect("events posted");
        let fails: Vec<String> = last
            .get("events")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e.get("event_name").and_then(Json::as_str) == Some("provision_fail"))
            .filter_map(|e| e.get("detail").and_then(Json::as_str).map(str::to_string))
            .collect();
        assert_eq!(fails, [detail], "{last}");
    }
}

/// test_stop_condition_checkers.py::test_output_timeout_update: output
/// restarts the output timeout; a phase that keeps printing for longer
/// than it is not stopped.
#[test]
fn steady_output_keeps_the_output_timeout_away() {
    let server = FakeServer::start();
    let job = unique_id();
    let fields = r#"{"job_status_webhook":"http://hook.example/x","output_timeout":2,"test_data":{"test_cmds":"x"}}"#;
    server.push_job(&job_json(&job, QUEUE, fields));
    let agent = Agent::new(&server).command("test", "for i in $(seq 1 20); do echo tick $i; sleep 0.2; done");
    assert!(agent.run_once(T).status.success());
    assert_eq!(status(&server, &job, "test"), Some(0));
    assert!(server.log_text_phase(&job, "output", "test").contains("tick 20\n"));
    assert!(!server.events(&job).iter().any(|e| e == "output_timeout"), "{:?}", server.events(&job));
}

fn agent_data_gets(s: &FakeServer) -> usize {
    s.requests_to("GET", &format!("/v1/agents/data/{AGENT_ID}")).len()
}

/// test_status_handler.py::test_check_restart_offline_priority_over_restart:
/// a restart asked for (SIGUSR1) while an operator holds the agent offline
/// or in maintenance waits until the hold is lifted; the agent does not go
/// away and come back `waiting` over the operator's state. Lifted, the
/// restart comes at the next poll.
#[test]
fn a_restart_waits_while_the_operator_holds_the_agent() {
    let server = FakeServer::start();
    let agent = Agent::new(&server).set("polling_interval", "0.2");
    let mut p = hold_with_a_restart_pending(&server, &agent);
    let seen = agent_data_gets(&server);
    server.wait_until(T, "polls after the signal", |s| agent_data_gets(s) >= seen + 5);
    assert!(p.try_wait().is_none(), "restarted while held: {}", p.diagnostics());
    let data = server.agent_data(AGENT_ID).expect("agent data");
    assert_eq!(data.get("state").and_then(Json::as_str), Some("maintenance"), "{data}");
    assert_eq!(data.get("comment").and_then(Json::as_str), Some("rewiring"), "{data}");
    let posted = server.agent_states(AGENT_ID).len();
    server.set_agent_state(AGENT_ID, "waiting", "");
    assert_eq!(p.wait_exit(T).code(), Some(75), "{}", p.diagnostics());
    assert_eq!(server.agent_states(AGENT_ID)[posted..], ["offline"]);
    let data = server.agent_data(AGENT_ID).expect("agent data");
    let comment = data.get("comment").and_then(Json::as_str).unwrap_or_default();
    assert!(comment.starts_with("Restarting: "), "{data}");
}

/// SIGTERM stops the agent whatever the hold, a restart pending or not:
/// it exits 0 and leaves the operator's state alone.
#[test]
fn sigterm_stops_at_once_while_held_with_a_restart_pending() {
    let server = FakeServer::start();
    // The agent waits out its polling interval: a stop that waited for
    // the next poll would outlast T.
    let agent = Agent::new(&server).set("polling_interval", "600");
    let mut p = hold_with_a_restart_pending(&server, &agent);
    let posted = server.agent_states(AGENT_ID).len();
    let gets = agent_data_gets(&server);
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(T).code(), Some(0), "{}", p.diagnostics());
    // The pending restart did not cut the wait short: no poll spin.
    assert_eq!(agent_data_gets(&server), gets, "{}", p.diagnostics());
    assert_eq!(server.agent_states(AGENT_ID).len(), posted, "posted a state on the way out");
    let data = server.agent_data(AGENT_ID).expect("agent data");
    assert_eq!(data.get("state").and_then(Json::as_str), Some("maintenance"), "{data}");
}

/// Upstream's agent.py retries kept outcomes and goes on: outcomes the
/// server will not take hold back jobs, not a restart; they stay kept for
/// the restarted agent.
#[test]
fn a_restart_does_not_wait_for_undelivered_outcomes() {
    let server = FakeServer::start();
    let (kept, next) = (unique_id(), unique_id());
    server.push_job(&job_json(&kept, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server)
        .set("polling_interval", "0.2")
        .command("test", "mkdir -p artifacts; echo keep > artifacts/k.txt");
    server.add_fault(Fault::status("POST", &format!("/v1/result/{kept}/artifact"), 1000, 503));
    assert!(agent.run_once(T).status.success());
    let kept_dir = agent.results_dir().join(&kept);
    assert!(kept_dir.exists(), "kept in results_basedir");
    server.push_job(&job_json(&next, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let mut p = agent.spawn();
    server.wait_until(T, "delivery refused", |_| p.log_text().contains("earlier outcomes are still undelivered"));
    p.signal(libc::SIGUSR1);
    assert_eq!(p.wait_exit(T).code(), Some(75), "{}", p.diagnostics());
    assert!(kept_dir.exists(), "still kept");
    assert_eq!(server.queued_jobs(), 1, "no job taken");
}

/// Starts the agent held in maintenance and sends SIGUSR1 once it has
/// seen the hold; returns when the agent has said the restart waits.
fn hold_with_a_restart_pending(server: &FakeServer, agent: &AgentSetup) -> AgentProc {
    server.set_agent_state(AGENT_ID, "maintenance", "rewiring");
    let p = agent.spawn();
    server.wait_until(T, "the hold seen", |_| p.log_text().contains("agent is maintenance on the server (rewiring)"));
    p.signal(libc::SIGUSR1);
    server
        .wait_until(T, "the restart put off", |_| p.log_text().contains("restart requested (SIGUSR1); waiting until"));
    p
}

// ---- the table's check --------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Upstream's agent tests, as `file::Class::test` (or `file::test`): the
/// `def test*` at the top of `tests/test_*.py` or one level into a class,
/// as `tests/upstream/upstream_tests.py` lists them.
fn upstream_test_names(tests_dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = fs::read_dir(tests_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", tests_dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("test_") && n.ends_with(".py"))
        })
        .collect();
    files.sort();
    let mut names = Vec::new();
    for f in files {
        let file = f.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let text = fs::read_to_string(&f).unwrap_or_default();
        let mut class: Option<String> = None;
        for line in text.lines() {
            let indent = line.len() - line.trim_start().len();
            let t = line.trim_start();
            if indent == 0 && !t.is_empty() && !t.starts_with('#') && !t.starts_with('@') && !t.starts_with(')') {
                class = t.strip_prefix("class ").map(|c| c.split(['(', ':']).next().unwrap_or("").trim().to_string());
            }
            let def = t.strip_prefix("def ").or_else(|| t.strip_prefix("async def "));
            let Some(name) = def.map(|d| d.split('(').next().unwrap_or("").trim()) else { continue };
            if !name.starts_with("test") {
                continue;
            }
            match (indent, &class) {
                (0, _) => names.push(format!("{file}::{name}")),
                (4, Some(c)) => names.push(format!("{file}::{c}::{name}")),
                _ => {}
            }
        }
    }
    names
}

/// The test function names defined in a Rust file (`fn name` after
/// `#[test]`), or the scenario keys of `scenarios.py`.
fn our_tests_in(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    if path.extension().is_some_and(|e| e == "py") {
        return text
            .lines()
            .filter_map(|l| l.strip_prefix("    \"")?.split_once("\": {").map(|(k, _)| k.to_string()))
            .collect();
    }
    let mut names = Vec::new();
    let mut after_test = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[test]") {
            after_test = true;
        } else if after_test && t.starts_with("fn ") {
            names.push(t[3..].split(['(', '<']).next().unwrap_or("").to_string());
            after_test = false;
        }
    }
    names
}

/// The first cells of the "How it differs" table (the table cites a row by
/// the start of its first cell), wherever the docs keep it: README.md or
/// docs/*.md.
fn readme_rows() -> Vec<String> {
    let text = crate::docs::all_docs_text(&repo());
    let section = text.split("## How it differs from the upstream agent").nth(1).unwrap_or("");
    let section = section.split("\n## ").next().unwrap_or("");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(" |").next())
        .map(str::to_string)
        .collect()
}

struct Row {
    upstream: String,
    ours: String,
    status: String,
}

fn table_rows(text: &str) -> Vec<Row> {
    text.lines()
        .filter(|l| l.starts_with("| `test_"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            let cell = |i: usize| cells.get(i).copied().unwrap_or("").to_string();
            Row { upstream: cell(0).trim_matches('`').to_string(), ours: cell(2), status: cell(3) }
        })
        .collect()
}

/// `tests/upstream/upstream-tests.md` names every upstream agent test (when
/// the upstream checkout is there to compare with) once, and every test of
/// ours and README row it cites exists: a test renamed or removed, or an
/// upstream release with new tests, fails here until the table follows.
#[test]
fn upstream_tests_table_is_whole_and_cites_what_exists() {
    let table = repo().join("tests/upstream/upstream-tests.md");
    let text = fs::read_to_string(&table).expect("tests/upstream/upstream-tests.md");
    let rows = table_rows(&text);
    assert!(rows.len() >= 100, "only {} rows read from {}", rows.len(), table.display());
    let mut problems = Vec::new();

    let mut seen = std::collections::BTreeSet::new();
    for r in &rows {
        if !seen.insert(r.upstream.clone()) {
            problems.push(format!("{}: listed twice", r.upstream));
        }
    }
    let upstream = std::env::var_os("UPSTREAM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/upstream/testflinger"))
        .join("agent/tests");
    if upstream.is_dir() {
        let names = upstream_test_names(&upstream);
        assert!(names.len() >= 100, "only {} upstream tests found in {}", names.len(), upstream.display());
        for n in &names {
            if !seen.contains(n) {
                problems.push(format!("{n}: upstream test missing from the table"));
            }
        }
        for n in &seen {
            if !names.contains(n) {
                problems.push(format!("{n}: in the table but not upstream"));
            }
        }
    } else {
        eprintln!("no upstream checkout at {}: only our side of the table is checked", upstream.display());
    }

    let readme = readme_rows();
    for r in &rows {
        let mut cited = 0;
        for piece in r.ours.split('`').skip(1).step_by(2) {
            cited += 1;
            if let Some(row) = piece.strip_prefix("README: ") {
                if !readme.iter().any(|x| x.starts_with(row)) {
                    problems.push(format!("{}: no README differences row {row:?}", r.upstream));
                }
                continue;
            }
            let Some((path, name)) = piece.rsplit_once("::") else {
                problems.push(format!("{}: cannot read {piece:?} as path::name", r.upstream));
                continue;
            };
            if !our_tests_in(&repo().join(path)).iter().any(|n| n == name) {
                problems.push(format!("{}: {piece} does not exist", r.upstream));
            }
        }
        let excused = ["not applicable", "being fixed"].iter().any(|s| r.status.starts_with(s));
        if cited == 0 && !excused {
            problems.push(format!("{}: cites no test of ours and no README row", r.upstream));
        }
        if !["same", "ours differs", "not applicable", "being fixed"].iter().any(|s| r.status.starts_with(s)) {
            problems.push(format!(
                "{}: status {:?} is none of same / ours differs / not applicable / being fixed",
                r.upstream, r.status
            ));
        }
    }
    assert!(problems.is_empty(), "{}:\n{}", table.display(), problems.join("\n"));
}

/// The `offline` an agent posts before it restarts is its own, not an
/// operator's: when the restarted agent's `waiting` over it does not reach
/// the server (a 503 burst at start), the agent still takes jobs once the
/// server answers, rather than reading its own `offline` as a hold forever.
#[test]
fn its_own_restart_offline_is_not_a_hold_when_the_waiting_post_failed() {
    let server = FakeServer::start();
    server.set_agent_state(AGENT_ID, "offline", "Restarting: restart signal received from the supervisor");
    // Every attempt of the start-up post fails; later posts go through.
    server.add_fault(Fault::status("POST", &format!("/v1/agents/data/{AGENT_ID}"), 4, 503));
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server)
        .set("polling_interval", "0.2")
        .env("TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX", "0.5")
        .command("test", "echo hi");
    let mut p = agent.spawn();
    server
        .wait_until(T, "the job taken and completed", |s| s.job_states_posted(&job).iter().any(|st| st == "complete"));
    p.kill();
}

/// One job whose outcome the server keeps failing with a 500 (while it
/// answers every other call: a server bug for that one document, say)
/// must not take the device out of the fleet: upstream's
/// `retry_old_results` swallows the error and takes the next job.
#[test]
fn one_outcome_the_server_keeps_failing_does_not_stop_intake() {
    let server = FakeServer::start();
    let (kept, next) = (unique_id(), unique_id());
    server.push_job(&job_json(&kept, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server)
        .set("polling_interval", "0.2")
        .env("TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX", "0.5")
        .command("test", "echo hi");
    server.add_fault(Fault::status("POST", &format!("/v1/result/{kept}"), 100_000, 500));
    assert!(agent.run_once(T).status.success());
    server.push_job(&job_json(&next, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let mut p = agent.spawn();
    server.wait_until(T, "the next job taken", |s| s.queued_jobs() == 0);
    server.wait_until(T, "the next job's outcome", |s| s.job_states_posted(&next).iter().any(|x| x == "complete"));
    // The failing outcome is not given up: it is still tried after.
    let tries = |s: &FakeServer| s.requests_to("POST", &format!("/v1/result/{kept}")).len();
    let before = tries(&server);
    // Its retries double (full jitter) up to 3 min: here at most 32 s apart.
    server.wait_until(Duration::from_secs(60), "the kept outcome tried again", |s| tries(s) > before);
    p.kill();
    assert!(p.log_text().contains("taking jobs meanwhile"), "{}", p.log_text());
}
