//! Drop-in fidelity (issue 11): the job loop and what goes on the wire, as
//! the upstream Python agent does it, and where ours differs on purpose.

use std::fs;
use std::process::Command;
use std::time::Duration;

use crate::fake_server::{FakeServer, tar_gz_headers};
use crate::harness::{AGENT_ID, Agent, QUEUE, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(30);
const HOOK: &str = r#""job_status_webhook":"http://hook.example/x""#;

fn status(s: &FakeServer, job: &str, phase: &str) -> Option<i64> {
    s.result(job).and_then(|r| r.get("status")?.get(phase)?.as_i64())
}

fn agent_posts(s: &FakeServer) -> Vec<Json> {
    s.requests_to("POST", &format!("/v1/agents/data/{AGENT_ID}")).iter().filter_map(|r| r.json()).collect()
}

/// Item 1: the connector's reserve command waits out the reservation
/// itself; the agent puts no limit on it (a config `global_timeout` of 1 s
/// and a reservation `timeout` of 1 s both pass) and only a cancel ends it.
#[test]
fn reserve_has_no_agent_timeout_and_ends_early_only_on_cancel() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        &format!(r#"{{"reserve_data":{{"ssh_keys":["lp:x"],"timeout":1}},{HOOK}}}"#),
    ));
    let agent = Agent::new(&server).set("global_timeout", "1").command("reserve", "sleep 2.5; echo reservation over");
    let out = agent.run_once(T);
    assert!(out.status.success());
    assert_eq!(status(&server, &job, "reserve"), Some(0));
    assert!(server.log_text_phase(&job, "output", "reserve").contains("reservation over"));
    let events = server.events(&job);
    assert!(!events.iter().any(|e| e.ends_with("_timeout")), "{events:?}");

    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"reserve_data":{"ssh_keys":["lp:x"],"timeout":"1s"}}"#));
    let agent = Agent::new(&server).command("reserve", "touch started; sleep 60");
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "reserve running", |s| s.fragments(&job, "output").iter().any(|f| f.phase == "reserve"));
    server.cancel_job(&job);
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    assert_ne!(status(&server, &job, "reserve"), Some(0));
}

/// Item 2: `<phase>_data.secrets` reach that phase's environment only; a
/// key two phases use has each phase's own value. Output masks them all.
/// Every phase also gets the config as upstream exports it: string keys
/// left at their defaults too (an unset command as an empty variable), the
/// token file, and no key that is not a string.
#[test]
fn secrets_reach_only_their_own_phase() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        r#"{"provision_data":{"url":"u","secrets":{"SHARED":"prov-value","PROV_ONLY":"p-only"}},
            "test_data":{"test_cmds":"x","secrets":{"SHARED":"test-value"}}}"#,
    ));
    let agent = Agent::new(&server);
    let out = agent.dir().join("env");
    fs::create_dir_all(&out).expect("mkdir");
    let dump = |phase: &str| {
        format!("echo \"${{SHARED:-unset}},${{PROV_ONLY:-unset}}\" > '{}/{phase}'; echo \"$SHARED\"", out.display())
    };
    let config_env = format!(
        "echo \"${{logging_level-unset}},${{agent_id-unset}},${{token_file-unset}},[${{firmware_update_command-unset}}],${{provision_type-unset}},${{polling_interval-unset}}\" > '{}/config'",
        out.display()
    );
    let agent = agent
        .remove("logging_level")
        .command("setup", &format!("{}; {config_env}", dump("setup")))
        .command("provision", &dump("provision"))
        .command("test", &dump("test"));
    assert!(agent.run_once(T).status.success());
    let seen = |phase: &str| fs::read_to_string(out.join(phase)).unwrap_or_else(|e| panic!("{phase}: {e}"));
    assert_eq!(
        seen("config"),
        format!(
            "INFO,{},/var/lib/testflinger-agent/refresh_token,[],unset,unset\n",
            agent.get("agent_id").unwrap_or_default()
        )
    );
    assert_eq!(seen("setup"), "unset,unset\n");
    assert_eq!(seen("provision"), "prov-value,p-only\n");
    assert_eq!(seen("test"), "test-value,unset\n");
    let text = server.log_text(&job, "output");
    for secret in ["prov-value", "p-only", "test-value"] {
        assert!(!text.contains(secret), "{secret} unmasked in {text}");
    }
}

/// Item 3: a run dir left by `--job` in the same `execution_basedir` is
/// neither recovered nor delivered by server mode, and intake goes on.
#[test]
fn a_local_job_run_dir_is_left_alone_by_server_mode() {
    let server = FakeServer::start();
    let agent = Agent::new(&server).command("test", "echo bench run").command("cleanup", "echo cleanup ran");
    let job_file = agent.dir().join("bench-job.json");
    fs::write(&job_file, r#"{"job_id":"local-bench-1","test_data":{"test_cmds":"x"}}"#).expect("write job file");
    let mut p = agent.spawn_with(&["--job", &job_file.to_string_lossy()]);
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    let local = agent.run_dir("local-bench-1");
    assert!(local.join("testflinger.json").is_file(), "the local run dir stays for the bench");
    // As if the bench run had been killed mid-phase: no cleanup status.
    fs::write(local.join("testflinger-outcome.json"), r#"{"status":{"test":0}}"#).expect("outcome");

    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let out = agent.run_once(T);
    assert!(out.status.success());
    assert_eq!(status(&server, &job, "test"), Some(0), "intake went on");
    assert!(server.requests().iter().all(|r| !r.path.contains("local-bench-1")), "{:#?}", server.request_lines());
    assert!(local.join("testflinger.json").is_file());
    assert!(!fs::read_to_string(local.join("testflinger-outcome.json")).expect("outcome").contains("cleanup"));
}

/// Item 4: device info is posted before every phase that runs, cleanup
/// included: a provision-only job still publishes what provision found.
#[test]
fn device_info_is_posted_before_cleanup_too() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"provision_data":{"url":"u"}}"#));
    let agent = Agent::new(&server)
        .command("provision", r#"echo '{"device_info": {"device_ip": "10.0.0.9"}}' > device-info.json"#)
        .command("cleanup", "echo cleanup ran");
    assert!(agent.run_once(T).status.success());
    let posts = server.results_posted(&job);
    let provision_status = posts.iter().position(|p| p.get("status").and_then(|s| s.get("provision")).is_some());
    let info = posts.iter().position(|p| p.get("device_info").is_some());
    let cleanup_status = posts.iter().position(|p| p.get("status").and_then(|s| s.get("cleanup")).is_some());
    assert!(provision_status < info && info < cleanup_status, "{posts:?}");
    let ip = posts[info.unwrap()].get("device_info").and_then(|d| d.get("device_ip")).and_then(Json::as_str);
    assert_eq!(ip, Some("10.0.0.9"));
}

/// Item 5: phases skipped for want of a command or data still get their
/// job state, agent state and start/success events; no status of their own.
#[test]
fn skipped_phases_are_announced_and_succeed() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, &format!(r#"{{"test_data":{{"test_cmds":"x"}},{HOOK}}}"#)));
    // Only setup and test have a command; cleanup has none.
    let agent = Agent::new(&server).command("setup", "true").command("test", "true");
    assert!(agent.run_once(T).status.success());
    let phases = ["setup", "provision", "firmware_update", "test", "allocate", "reserve"];
    let mut expected: Vec<String> = phases.iter().map(|p| p.to_string()).collect();
    expected.push("complete".into());
    assert_eq!(server.job_states_posted(&job), expected);
    let states = server.agent_states(AGENT_ID);
    let during: Vec<&str> = states.iter().map(String::as_str).filter(|s| phases.contains(s)).collect();
    assert_eq!(during, phases);
    let events = server.events(&job);
    for p in phases.iter().chain(&["cleanup"]) {
        let (start, success) = (format!("{p}_start"), format!("{p}_success"));
        let at = |name: &str| events.iter().position(|e| e == name);
        assert!(at(&start).is_some() && at(&start) < at(&success), "{p}: {events:?}");
    }
    let st = server.result(&job).and_then(|r| r.get("status").cloned()).expect("status");
    assert_eq!(st.as_object().map(|o| o.len()), Some(2), "only setup and test have a status: {st}");
}

/// Item 6: the provision log's `detail` is the exit event's name.
#[test]
fn provision_log_detail_is_the_exit_event_name() {
    let server = FakeServer::start();
    for (code, detail) in [(0, "provision_success"), (3, "provision_fail")] {
        let job = unique_id();
        server.push_job(&job_json(&job, QUEUE, r#"{"provision_data":{"url":"u"}}"#));
        let agent = Agent::new(&server).command("provision", &format!("exit {code}"));
        assert!(agent.run_once(T).status.success());
        let logs: Vec<Json> = server
            .requests_to("POST", &format!("/v1/agents/provision_logs/{AGENT_ID}"))
            .iter()
            .filter_map(|r| r.json())
            .filter(|b| b.get("job_id").and_then(Json::as_str) == Some(job.as_str()))
            .collect();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0].get("exit_code").and_then(Json::as_i64), Some(code));
        assert_eq!(logs[0].get("detail").and_then(Json::as_str), Some(detail));
    }
}

/// Item 7: agent data as upstream posts it: a state always with a comment,
/// `location` and `provision_type` as "" when unset, no `cleanup` state.
#[test]
fn agent_data_posts_carry_upstreams_fields() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).remove("location").command("test", "true").command("cleanup", "true");
    assert!(agent.run_once(T).status.success());
    let posts = agent_posts(&server);
    let first = posts.first().expect("an agent data post");
    assert_eq!(first.get("location").and_then(Json::as_str), Some(""), "{first}");
    assert_eq!(first.get("provision_type").and_then(Json::as_str), Some(""), "{first}");
    assert_eq!(first.get("identifier").and_then(Json::as_str), Some("test-identifier"), "{first}");
    for p in &posts {
        if p.get("state").is_some() {
            assert!(p.get("comment").and_then(Json::as_str).is_some(), "state without comment: {p}");
        }
    }
    let states = server.agent_states(AGENT_ID);
    assert!(!states.iter().any(|s| s == "cleanup"), "{states:?}");
    let last = posts.last().expect("posts");
    assert_eq!(last.get("state").and_then(Json::as_str), Some("waiting"), "{last}");
    assert_eq!(last.get("comment").and_then(Json::as_str), Some(""), "{last}");
    assert_eq!(last.get("job_id").and_then(Json::as_str), Some(""), "{last}");
}

/// Item 8: `testflinger-outcome.json` starts as `{}`.
#[test]
fn outcome_file_starts_empty() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server);
    let copy = agent.dir().join("outcome-at-setup");
    let agent = agent.command("setup", &format!("cp testflinger-outcome.json '{}'", copy.display()));
    assert!(agent.run_once(T).status.success());
    assert_eq!(fs::read_to_string(&copy).expect("copied outcome"), "{}");
}

fn id_name(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().expect("run id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Item 9: artifact headers as Python's `tarfile` writes them: permission
/// bits only, and the owner's user and group names.
#[test]
fn artifact_headers_carry_permission_bits_and_owner_names() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server)
        .command("test", "mkdir -p artifacts/sub && chmod 755 artifacts/sub && echo r > artifacts/sub/r.txt && chmod 640 artifacts/sub/r.txt");
    assert!(agent.run_once(T).status.success());
    let headers = tar_gz_headers(&server.artifact(&job).expect("artifact")).expect("tar.gz");
    let find = |p: &str| {
        headers.iter().find(|h| h.path.trim_end_matches('/') == p).unwrap_or_else(|| panic!("{p} in {headers:?}"))
    };
    assert_eq!(find("artifacts/sub").mode, 0o755);
    assert_eq!(find("artifacts/sub/r.txt").mode, 0o640);
    let (user, group) = (id_name("-un"), id_name("-gn"));
    for h in &headers {
        assert_eq!((h.uname.as_str(), h.gname.as_str()), (user.as_str(), group.as_str()), "{h:?}");
    }
}

/// Item 17: typed job fields of the wrong type are named in a warning with
/// what was used instead; the job still runs.
#[test]
fn wrong_typed_job_fields_are_warned_about() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"global_timeout":"soon","output_timeout":-3,"test_data":"a string"}"#));
    let agent = Agent::new(&server).set("output_timeout", "60").command("setup", "true").command("test", "true");
    let mut p = agent.spawn_with(&["--once"]);
    assert!(p.wait_exit(T).success());
    let log = p.log_text();
    for warning in [
        r#"global_timeout: "soon" is not a positive number of seconds; using the default, 14400 s"#,
        "output_timeout: -3 is not a positive number of seconds; using the config's, 60 s",
        "test_data: a string, not a mapping; the test phase is skipped",
    ] {
        assert!(log.contains(warning), "{warning:?} not in\n{log}");
    }
    assert_eq!(status(&server, &job, "setup"), Some(0));
    assert_eq!(status(&server, &job, "test"), None);
}

/// Item 18: the packing log line counts the files packed.
#[test]
fn artifacts_log_line_counts_the_files() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command(
        "test",
        "mkdir -p artifacts/d && echo a > artifacts/a && echo b > artifacts/d/b && ln -s a artifacts/l",
    );
    let mut p = agent.spawn_with(&["--once"]);
    assert!(p.wait_exit(T).success());
    let log = p.log_text();
    let line =
        log.lines().find(|l| l.contains("artifacts packed:")).unwrap_or_else(|| panic!("no packing line in\n{log}"));
    assert!(line.contains("artifacts packed: 3 files, "), "{line}");
    assert!(!line.contains(" from 0 in "), "{line}");
}

/// Item 19 (ours on purpose): the outcome of a cancelled job keeps it
/// cancelled; upstream posts `job_state: "complete"` over the cancel.
#[test]
fn a_cancelled_job_stays_cancelled_after_its_outcome() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("test", "sleep 60").command("cleanup", "true");
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "test running", |s| s.job_states_posted(&job).iter().any(|x| x == "test"));
    server.cancel_job(&job);
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    let posts = server.results_posted(&job);
    let outcome = posts.last().expect("outcome");
    assert_eq!(outcome.get("job_state").and_then(Json::as_str), Some("cancelled"), "{posts:?}");
    assert!(outcome.get("status").and_then(|s| s.get("cleanup")).is_some(), "{outcome}");
    assert!(!server.job_states_posted(&job).iter().any(|s| s == "complete"), "{posts:?}");

    // Cancelled while cleanup runs (no cancel check stops it): the same.
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server)
        .command("test", "true")
        .command("cleanup", "touch started; while [ ! -f go ]; do sleep 0.02; done");
    let mut p = agent.spawn_with(&["--once"]);
    let started = agent.run_dir(&job).join("started");
    server.wait_until(T, "cleanup running", |_| started.exists());
    server.cancel_job(&job);
    fs::write(agent.run_dir(&job).join("go"), "").expect("release cleanup");
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    let posts = server.results_posted(&job);
    assert_eq!(posts.last().and_then(|o| o.get("job_state")).and_then(Json::as_str), Some("cancelled"), "{posts:?}");
}

/// Issue 22: a cancel landing after the test phase (here while cleanup
/// runs) ends the job `cancelled`; `job_end` says so too, not
/// `normal_exit` (upstream says `normal_exit` for every cancel).
#[test]
fn a_cancel_during_cleanup_ends_the_events_with_cancelled() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        r#"{"test_data":{"test_cmds":"x"},"job_status_webhook":"http://hook.example/x"}"#,
    ));
    let agent = Agent::new(&server)
        .command("test", "true")
        .command("cleanup", "touch started; while [ ! -f go ]; do sleep 0.02; done");
    let mut p = agent.spawn_with(&["--once"]);
    let started = agent.run_dir(&job).join("started");
    server.wait_until(T, "cleanup running", |_| started.exists());
    server.cancel_job(&job);
    fs::write(agent.run_dir(&job).join("go"), "").expect("release cleanup");
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    let posts = server.results_posted(&job);
    assert_eq!(posts.last().and_then(|o| o.get("job_state")).and_then(Json::as_str), Some("cancelled"), "{posts:?}");
    let last = server.event_posts(&job).last().and_then(|p| p.get("events")?.as_array()?.last().cloned());
    let end = last.expect("events posted");
    assert_eq!(end.get("event_name").and_then(Json::as_str), Some("job_end"), "{end}");
    assert_eq!(end.get("detail").and_then(Json::as_str), Some("cancelled"), "{end}");
}

/// Item 20 (ours on purpose): a phase the agent kills reports 143
/// (SIGTERM), where upstream reports 247.
#[test]
fn a_phase_killed_at_its_timeout_reports_143() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"},"global_timeout":1}"#));
    let agent = Agent::new(&server).command("test", "sleep 60");
    assert!(agent.run_once(T).status.success());
    assert_eq!(status(&server, &job, "test"), Some(143));
}
