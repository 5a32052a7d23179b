//! Directories the agent cannot write, and outcomes the server refuses for
//! good: reported, never silently dropped, and the agent goes on.

use std::path::Path;
use std::time::Duration;

use crate::fake_server::{FakeServer, Fault};
use crate::harness::{Agent, QUEUE, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(30);

fn push_test_job(server: &FakeServer) -> String {
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    job
}

fn final_status(server: &FakeServer, job: &str) -> Option<Json> {
    server
        .results_posted(job)
        .into_iter()
        .find(|r| r.get("job_state").and_then(Json::as_str) == Some("complete"))
        .and_then(|r| r.get("status").cloned())
}

/// Once the agent is running, `dir` stops being usable: it becomes a
/// regular file, so that mkdir under it fails even for root. (An unusable
/// directory at start is a config error: see `startup.rs`.)
fn break_dir_after_start(server: &FakeServer, dir: &Path) {
    server.wait_until(T, "the agent polling", |s| !s.requests_to("GET", "/v1/job").is_empty());
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::write(dir, "").unwrap();
}

#[test]
fn unwritable_execution_basedir_reports_the_job_as_failed() {
    let server = FakeServer::start();
    let agent = Agent::new(&server).command("test", "echo never");
    let mut p = agent.spawn();
    break_dir_after_start(&server, &agent.execution_dir());
    let job = push_test_job(&server);
    server.wait_until(T, "the outcome", |s| final_status(s, &job).is_some());
    p.kill();
    let status = final_status(&server, &job).expect("the job is reported, not dropped");
    assert_eq!(status.get("setup").and_then(Json::as_i64), Some(100), "{status}");
    assert!(status.get("test").is_none());
    let log = std::fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).unwrap();
    assert!(log.contains("cannot prepare run dir"), "{log}");
}

#[test]
fn unwritable_results_basedir_keeps_the_job_in_place_and_delivers_it_later() {
    let server = FakeServer::start();
    let job = unique_id();
    let agent = Agent::new(&server).command("test", "echo kept in place");
    server.add_fault(Fault::status("POST", &format!("/v1/result/{job}"), 1000, 503));
    let mut p = agent.spawn();
    break_dir_after_start(&server, &agent.results_dir());
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    // The outcome cannot go out and cannot be moved: it stays in the run dir.
    let deadline = std::time::Instant::now() + T;
    while !p.log_text().contains("cannot move") {
        assert!(std::time::Instant::now() < deadline, "never tried to keep the job:\n{}", p.diagnostics());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(agent.run_dir(&job).join("testflinger-outcome.json").exists());
    // The server comes back: the same agent, without a restart, delivers it.
    server.clear_faults();
    server.wait_until(T, "delivered", |s| final_status(s, &job).is_some());
    p.kill();
    let status = final_status(&server, &job).unwrap();
    assert_eq!(status.get("test").and_then(Json::as_i64), Some(0));
    assert!(server.log_text_phase(&job, "output", "test").contains("kept in place"));
}

#[test]
fn an_outcome_refused_for_good_is_set_aside_and_intake_goes_on() {
    let server = FakeServer::start();
    let first = push_test_job(&server);
    let agent = Agent::new(&server).command("test", "true");
    // 404: the server no longer knows the job. Retrying cannot help.
    server.add_fault(Fault::status("POST", &format!("/v1/result/{first}"), 1000, 404));
    assert!(agent.run_once(T).status.success());
    assert!(agent.results_dir().join(&first).exists(), "kept after the first refusal");
    let second = push_test_job(&server);
    assert!(agent.run_once(T).status.success());
    assert!(final_status(&server, &second).is_some(), "the next job is taken and delivered");
    let aside = agent.results_dir().join(".undeliverable").join(&first);
    assert!(aside.join("testflinger-outcome.json").exists(), "set aside, not deleted");
    assert!(!agent.results_dir().join(&first).exists());
}
