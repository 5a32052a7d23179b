//! What the conformance suite (issue 16, tests/upstream) found different
//! from the upstream agent and the agent now does as upstream does: the
//! status posts, the agent data at start-up, the events of stopped,
//! cancelled and exit-46 jobs. Each test names the difference it covers.

use std::time::Duration;

use crate::fake_server::FakeServer;
use crate::harness::{AGENT_ID, Agent, QUEUE, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(30);
const HOOK: &str = r#""job_status_webhook":"http://hook.example/x""#;

/// The last events post, as `name: detail` lines.
fn events(s: &FakeServer, job: &str) -> Vec<String> {
    let posts = s.event_posts(job);
    let Some(last) = posts.last() else { return Vec::new() };
    last.get("events")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let field = |k: &str| e.get(k).and_then(Json::as_str).unwrap_or("").to_string();
            format!("{}: {}", field("event_name"), field("detail"))
        })
        .collect()
}

/// (a) After cleanup the statuses so far, cleanup's included, are posted
/// on their own before the outcome (upstream posts them after each phase
/// that ran, cleanup too).
#[test]
fn cleanup_status_is_posted_before_the_outcome() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("setup", "true").command("test", "echo test").command("cleanup", "exit 3");
    assert!(agent.run_once(T).status.success());
    let posts = server.results_posted(&job);
    let with_cleanup: Vec<usize> = posts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.get("job_state").is_none() && p.get("status").and_then(|s| s.get("cleanup")).is_some())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(with_cleanup.len(), 1, "one status post with cleanup's: {posts:?}");
    let post = &posts[with_cleanup[0]];
    let status = post.get("status").expect("status");
    for (phase, code) in [("setup", 0), ("test", 0), ("cleanup", 3)] {
        assert_eq!(status.get(phase).and_then(Json::as_i64), Some(code), "{post}");
    }
    let outcome = posts.iter().rposition(|p| p.get("job_state").and_then(Json::as_str) == Some("complete"));
    assert!(outcome.is_some_and(|o| o > with_cleanup[0]), "the outcome comes after it: {posts:?}");
}

/// (b) At start-up the agent posts no `job_id` (upstream posts its
/// location, queues and provision type only); it posts the job's id when
/// it takes one and `""` once it is over.
#[test]
fn job_id_is_posted_for_a_job_only() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("test", "echo test");
    assert!(agent.run_once(T).status.success());
    let posts: Vec<Json> =
        server.requests_to("POST", &format!("/v1/agents/data/{AGENT_ID}")).iter().filter_map(|r| r.json()).collect();
    let first = posts.first().expect("agent data posted");
    assert!(first.get("queues").is_some(), "the start-up post comes first: {first}");
    let ids: Vec<&str> = posts.iter().filter_map(|p| p.get("job_id")?.as_str()).collect();
    assert_eq!(ids, [job.as_str(), ""], "{posts:?}");
}

/// (c) A phase the agent stops has the stop's message in its output, as
/// upstream's, and no "killed by signal" line; its `<phase>_fail` detail is
/// the connector's (none here). A kill from elsewhere still says which
/// signal (`killed_by_signal_is_reported_distinctly` in streaming.rs).
#[test]
fn a_phase_the_agent_stops_has_its_stop_message_only() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        &format!(r#"{{"global_timeout":1,"test_data":{{"test_cmds":"x"}},{HOOK}}}"#),
    ));
    let agent = Agent::new(&server).command("test", "echo started; sleep 60");
    assert!(agent.run_once(T).status.success());
    let text = server.log_text_phase(&job, "output", "test");
    assert!(text.contains("ERROR: Global timeout reached! (1s)"), "{text}");
    assert!(!text.contains("killed by signal"), "{text}");
    let ev = events(&server, &job);
    assert!(ev.contains(&"global_timeout: ERROR: Global timeout reached! (1s)".to_string()), "{ev:?}");
    assert!(ev.contains(&"test_fail: ".to_string()), "{ev:?}");
}

/// (d) A cancel mid-phase: the stop's `cancelled`, the phase's failure,
/// then the `cancelled` of the next phase's check (upstream's sequence),
/// cleanup. `job_end` says `cancelled` (upstream: `normal_exit`; see
/// docs/differences.md, the row on the outcome of a cancelled job).
#[test]
fn a_cancel_mid_phase_has_upstreams_events() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, &format!(r#"{{"test_data":{{"test_cmds":"x"}},{HOOK}}}"#)));
    let agent = Agent::new(&server).command("test", "echo started; sleep 60").command("cleanup", "true");
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "test output", |s| s.log_text_phase(&job, "output", "test").contains("started"));
    server.cancel_job(&job);
    assert!(p.wait_exit(T).success());
    let ev = events(&server, &job);
    let from_test: Vec<&str> = ev.iter().skip_while(|e| !e.starts_with("test_start")).map(String::as_str).collect();
    assert_eq!(
        from_test,
        [
            "test_start: ",
            "cancelled: Job cancellation was requested, exiting.",
            "test_fail: ",
            "cancelled: ",
            "cleanup_start: ",
            "cleanup_success: ",
            "job_end: cancelled",
        ],
        "{ev:?}"
    );
}

/// (e) Exit 46 (device recovery failed): `recovery_fail` with the
/// connector's detail instead of `provision_fail`, and the job ends with
/// `recovery_fail`, as upstream's.
#[test]
fn exit_46_has_upstreams_events() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        &format!(r#"{{"provision_data":{{"url":"x"}},"test_data":{{"test_cmds":"x"}},{HOOK}}}"#),
    ));
    let error = r#"{"provision_exception_info":{"exception_name":"RecoveryError","exception_message":"no console","exception_cause":null}}"#;
    let agent = Agent::new(&server)
        .command("provision", &format!("echo '{error}' > device-connector-error.json; exit 46"))
        .command("test", "echo should not run");
    assert!(agent.run_once(T).status.success());
    let ev = events(&server, &job);
    let from_provision: Vec<&str> =
        ev.iter().skip_while(|e| !e.starts_with("provision_start")).map(String::as_str).collect();
    assert_eq!(
        from_provision,
        [
            "provision_start: ",
            "recovery_fail: RecoveryError: no console",
            "cleanup_start: ",
            "cleanup_success: ",
            "job_end: recovery_fail"
        ],
        "{ev:?}"
    );
}
