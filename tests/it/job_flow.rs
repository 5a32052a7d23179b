//! A full job through the real binary: phases, skip and stop rules,
//! results, fragments, artifacts, final state.

use std::time::Duration;

use crate::fake_server::{FakeServer, Fault};
use crate::harness::{AGENT_ID, Agent, AgentSetup, QUEUE, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(30);

/// Every phase configured; each prints its name.
pub fn all_phases(server: &FakeServer) -> AgentSetup {
    let mut a = Agent::new(server);
    for phase in ["setup", "provision", "firmware_update", "test", "allocate", "reserve", "cleanup"] {
        a = a.command(phase, &format!("echo {phase} ran"));
    }
    a
}

pub const ALL_DATA: &str = r#"{"provision_data":{"url":"x"},"firmware_update_data":{"version":"1"},"test_data":{"test_cmds":"true"},"allocate_data":{"allocate":true},"reserve_data":{"ssh_keys":["lp:x"],"timeout":"30s"}}"#;

/// The phases announced (skipped ones too, as upstream announces them).
fn phases_run(server: &FakeServer, job: &str) -> Vec<String> {
    server
        .job_states_posted(job)
        .into_iter()
        .filter(|s| !["complete", "allocated", "cancelled"].contains(&s.as_str()))
        .collect()
}

/// The phases that ran: those with a status, in order.
fn phases_with_status(server: &FakeServer, job: &str) -> Vec<String> {
    let st = status_of(server, job);
    ["setup", "provision", "firmware_update", "test", "allocate", "reserve", "cleanup"]
        .into_iter()
        .filter(|p| st.get(p).is_some())
        .map(String::from)
        .collect()
}

fn status_of(server: &FakeServer, job: &str) -> Json {
    server.result(job).and_then(|r| r.get("status").cloned()).unwrap_or(Json::Null)
}

#[test]
fn full_job_posts_phases_results_fragments_and_final_state() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, ALL_DATA));
    server.set_job_state(&job, "waiting");
    let agent = all_phases(&server)
        .command("test", "echo test ran; mkdir -p artifacts/sub; echo result > artifacts/sub/r.txt")
        .command(
            "allocate",
            "echo allocate ran; echo '{\"device_info\": {\"device_ip\": \"10.1.2.3\"}}' > device-info.json",
        );
    // Allocate waits until the job is complete or cancelled on the server.
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "allocated", |s| s.job_states_posted(&job).iter().any(|x| x == "allocated"));
    server.set_job_state(&job, "complete");
    let status = p.wait_exit(T);
    assert!(status.success(), "{}", p.diagnostics());

    assert_eq!(phases_run(&server, &job), ["setup", "provision", "firmware_update", "test", "allocate", "reserve"]);
    let st = status_of(&server, &job);
    for phase in ["setup", "provision", "firmware_update", "test", "allocate", "reserve", "cleanup"] {
        assert_eq!(st.get(phase).and_then(Json::as_i64), Some(0), "status of {phase}: {st}");
    }
    let result = server.result(&job).unwrap();
    assert_eq!(result.get("device_info").and_then(|d| d.get("device_ip")).and_then(Json::as_str), Some("10.1.2.3"));
    let last = server.results_posted(&job).last().cloned().unwrap();
    assert_eq!(last.get("job_state").and_then(Json::as_str), Some("complete"));

    // Fragments: numbered from 0 without gaps, banner and output per phase.
    let frags = server.fragments(&job, "output");
    let mut numbers: Vec<i64> = frags.iter().map(|f| f.number).collect();
    numbers.sort();
    assert_eq!(numbers, (0..frags.len() as i64).collect::<Vec<_>>());
    for phase in ["setup", "test", "cleanup"] {
        let text = server.log_text_phase(&job, "output", phase);
        assert!(text.contains(&format!("* Starting testflinger {phase} phase on {AGENT_ID} *")), "{text}");
        assert!(text.contains(&format!("{phase} ran")), "{text}");
    }
    let members = server.artifact_members(&job);
    assert!(members.iter().any(|(p, c, _)| p == "artifacts/sub/r.txt" && c == b"result\n"), "artifacts uploaded");
    // Agent state went back to waiting with no job, run dir removed.
    let data = server.agent_data(AGENT_ID).unwrap();
    assert_eq!(data.get("state").and_then(Json::as_str), Some("waiting"));
    assert_eq!(data.get("job_id").and_then(Json::as_str), Some(""));
    assert!(!agent.run_dir(&job).exists());
}

#[test]
fn output_log_matches_fragments_and_run_dir_contract() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"},"custom_field":{"kept":[1,2]}}"#));
    let agent = Agent::new(&server)
        .command("test", "test -f testflinger.json && test -f testflinger-outcome.json && test -f device-connector-error.json && grep -q custom_field testflinger.json && echo CONTRACT_OK; echo \"agent=$agent_id\"; seq 1 2000; mkdir -p artifacts && echo art > artifacts/a.txt");
    let out = agent.run_once(T);
    assert!(out.status.success());
    let text = server.log_text_phase(&job, "output", "test");
    assert!(text.contains("CONTRACT_OK"), "{text}");
    assert!(text.contains(&format!("agent={AGENT_ID}")), "config strings are in the environment: {text}");
    assert!(text.contains("\n2000\n"));
    let members = server.artifact_members(&job);
    assert!(
        members.iter().any(|(p, c, _)| p == "artifacts/a.txt" && c == b"art\n"),
        "{:?}",
        members.iter().map(|m| &m.0).collect::<Vec<_>>()
    );
}

#[test]
fn skip_rules() {
    let server = FakeServer::start();
    let job = unique_id();
    // provision: data missing; firmware_update: skip true; test: empty data;
    // allocate: no command; reserve: runs.
    server.push_job(&job_json(
        &job,
        QUEUE,
        r#"{"firmware_update_data":{"skip":true,"version":"1"},"test_data":{},"allocate_data":{"allocate":true},"reserve_data":{"timeout":5}}"#,
    ));
    let agent = all_phases(&server).remove("allocate_command");
    assert!(agent.run_once(T).status.success());
    assert_eq!(phases_run(&server, &job), ["setup", "provision", "firmware_update", "test", "allocate", "reserve"]);
    assert_eq!(phases_with_status(&server, &job), ["setup", "reserve", "cleanup"]);
    let st = status_of(&server, &job);
    assert!(st.get("test").is_none() && st.get("provision").is_none(), "{st}");
    assert_eq!(st.get("cleanup").and_then(Json::as_i64), Some(0));
}

#[test]
fn failed_provision_skips_test_but_runs_cleanup() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, ALL_DATA));
    let agent = all_phases(&server)
        .command("provision", "echo flashing; echo '{\"provision_exception_info\": {\"exception_name\": \"ProvisioningError\", \"exception_message\": \"no boot\", \"exception_cause\": null}}' > device-connector-error.json; exit 3");
    assert!(agent.run_once(T).status.success());
    assert_eq!(phases_run(&server, &job), ["setup", "provision"]);
    let st = status_of(&server, &job);
    assert_eq!(st.get("provision").and_then(Json::as_i64), Some(3));
    assert_eq!(st.get("cleanup").and_then(Json::as_i64), Some(0), "{st}");
    assert!(st.get("test").is_none());
    let plog = server.requests_to("POST", "/v1/agents/provision_logs/");
    assert_eq!(plog.len(), 1);
    let body = plog[0].json().unwrap();
    assert_eq!(body.get("exit_code").and_then(Json::as_i64), Some(3));
    assert_eq!(body.get("detail").and_then(Json::as_str), Some("provision_fail"));
}

#[test]
fn failed_test_still_runs_allocate_and_reserve() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"},"reserve_data":{"timeout":"1m"}}"#));
    let agent = all_phases(&server).command("test", "echo failing; exit 1");
    assert!(agent.run_once(T).status.success());
    assert_eq!(phases_with_status(&server, &job), ["setup", "test", "reserve", "cleanup"]);
    let st = status_of(&server, &job);
    assert_eq!(st.get("test").and_then(Json::as_i64), Some(1));
    assert_eq!(st.get("reserve").and_then(Json::as_i64), Some(0));
}

#[test]
fn events_are_posted_whole_when_the_job_has_a_webhook() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        r#"{"job_status_webhook":"http://hook.example/x","test_data":{"test_cmds":"x"}}"#,
    ));
    let agent = Agent::new(&server).command("test", "exit 2").command("cleanup", "true");
    assert!(agent.run_once(T).status.success());
    let events = server.events(&job);
    assert_eq!(events.first().map(String::as_str), Some("job_start"));
    for e in ["test_start", "test_fail", "cleanup_start", "cleanup_success", "job_end"] {
        assert!(events.iter().any(|x| x == e), "{e} in {events:?}");
    }
    assert_eq!(events.last().map(String::as_str), Some("job_end"));
}

#[test]
fn no_events_without_a_webhook() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    assert!(Agent::new(&server).command("test", "true").run_once(T).status.success());
    assert!(server.requests_to("POST", "/v1/job/").is_empty());
    assert!(server.result(&job).is_some());
}

#[test]
fn cancelled_job_stops_before_next_phase_and_runs_cleanup() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, ALL_DATA));
    let agent = all_phases(&server).command("provision", "touch provisioned");
    // Cancel while setup runs: the agent checks before each phase.
    let agent = agent.command("setup", "sleep 0.5");
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "setup started", |s| s.job_states_posted(&job).iter().any(|x| x == "setup"));
    server.cancel_job(&job);
    assert!(p.wait_exit(T).success());
    assert_eq!(phases_run(&server, &job), ["setup"]);
    let st = status_of(&server, &job);
    assert!(st.get("cleanup").is_some(), "{st}");
}

#[test]
fn events_the_server_missed_at_the_end_are_delivered_with_the_outcome() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        r#"{"job_status_webhook":"http://hook.example/x","test_data":{"test_cmds":"x"}}"#,
    ));
    // Every events post of the job's run fails, and so does the outcome:
    // the job is kept, and delivered with its events after a restart.
    server.add_fault(Fault::status("POST", &format!("/v1/job/{job}/events"), 1000, 503));
    server.add_fault(Fault::status("POST", &format!("/v1/result/{job}"), 1000, 503));
    let agent = Agent::new(&server).command("test", "echo hi");
    assert!(agent.run_once(T).status.success());
    assert!(server.events(&job).is_empty());
    server.clear_faults();
    assert!(agent.run_once(T).status.success());
    let events = server.events(&job);
    assert_eq!(events.first().map(String::as_str), Some("job_start"), "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("job_end"), "{events:?}");
    assert!(final_state_complete(&server, &job));
}

fn final_state_complete(server: &FakeServer, job: &str) -> bool {
    server.results_posted(job).iter().any(|r| r.get("job_state").and_then(Json::as_str) == Some("complete"))
}
