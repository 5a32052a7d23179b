//! Issue 13 through the binary: a secret the connector echoes everywhere it
//! can (serial log, `device-connector-error.json`, `device-info.json`,
//! artifacts) reaches neither the server, the webhook's events, the agent's
//! log nor any file in `results_basedir`; links planted where the agent
//! writes are refused; what the agent creates has private modes.

use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fake_server::{FakeServer, Fault};
use crate::harness::{Agent, QUEUE, job_json, unique_id, yaml_str};
use crate::json::Json;

const T: Duration = Duration::from_secs(60);
const SECRET: &str = "hunter2-supersecret-XYZ";
const WEBHOOK: &str = r#""job_status_webhook":"http://hook.example/x""#;

/// The upstream mask, computed with the system's sha256sum.
fn mask(secret: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("printf %s \"$S\" | sha256sum")
        .env("S", secret)
        .output()
        .expect("sha256sum");
    format!("**{}**", &String::from_utf8_lossy(&out.stdout)[..6])
}

/// Where the metrics textfile goes (one per server, so per test).
fn server_prom(server: &FakeServer) -> PathBuf {
    std::env::temp_dir().join(format!("tf-secrets-{}-{}.prom", std::process::id(), server.port()))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Provision echoes the secret into its serial log (written while it runs,
/// split across two writes, and again at its end), into
/// `device-connector-error.json` and `device-info.json`; test fails with it
/// in `device-connector-error.json`; cleanup puts it in artifacts.
fn leaky_agent(server: &FakeServer) -> crate::harness::AgentSetup {
    let provision = "printf 'serial says hunter2-super' >> provision-serial.log; sleep 0.6; \
         printf 'secret-XYZ and more\\n' >> provision-serial.log; sleep 2.4; \
         echo \"last line $TOKEN\" >> provision-serial.log; \
         printf '{\"device_info\":{\"ip\":\"%s\",\"release\":\"r-%s\"}}' \"$TOKEN\" \"$TOKEN\" > device-info.json; \
         printf '{\"provision_exception_info\":{\"exception_name\":\"ProvisioningError\",\"exception_message\":\"slow %s\"}}' \"$TOKEN\" > device-connector-error.json";
    let test = "printf '{\"test_exception_info\":{\"exception_name\":\"TestError\",\"exception_message\":\"failed with %s\",\"exception_cause\":\"cause %s\"}}' \"$TOKEN\" \"$TOKEN\" > device-connector-error.json; exit 1";
    let prom = yaml_str(&server_prom(server).display().to_string());
    Agent::new(server)
        .set("mask_artifacts", "true")
        .set("metrics_textfile", &prom)
        .command("provision", provision)
        .command("test", test)
        // Cleanup has no secrets of its own in its environment (each phase
        // gets only its `<phase>_data.secrets`): it writes the value itself,
        // in the job that has it (not in a later job without secrets).
        .command("cleanup", &format!("grep -q provision_data testflinger.json || exit 0; TOKEN='{SECRET}'; mkdir -p artifacts; echo \"artifact $TOKEN\" > artifacts/out.txt; printf 'bin\\0%s' \"$TOKEN\" > artifacts/core.bin; mkfifo \"artifacts/fifo-$TOKEN\"; python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' \"artifacts/sock-$TOKEN\"; echo named > \"artifacts/name-$TOKEN\""))
}

#[test]
fn a_secret_the_connector_echoes_everywhere_never_leaves_the_agent_unmasked() {
    let server = FakeServer::start();
    let job = unique_id();
    let data = format!(
        r#"{{{WEBHOOK},"provision_data":{{"url":"x","secrets":{{"TOKEN":"{SECRET}"}}}},"test_data":{{"test_cmds":"x","secrets":{{"TOKEN":"{SECRET}"}}}}}}"#
    );
    server.push_job(&job_json(&job, QUEUE, &data));
    let agent = leaky_agent(&server);
    // The artifact cannot be delivered: the job is kept in results_basedir.
    server.add_fault(Fault::status("POST", &format!("/v1/result/{job}/artifact"), 1000, 503));
    let first = agent.run_once(T);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let m = mask(SECRET);

    let kept = agent.results_dir().join(&job);
    assert!(kept.join("testflinger-outcome.json").exists(), "kept in results_basedir");
    let mut masked_seen = false;
    for f in files_under(&agent.results_dir()) {
        let bytes = fs::read(&f).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(SECRET), "secret in {}:\n{text}", f.display());
        masked_seen |= text.contains(&m);
    }
    assert!(masked_seen, "the masked form is kept (events, serial copy)");
    let events_file = fs::read_to_string(kept.join(".events.json")).expect(".events.json kept");
    let prom = fs::read_to_string(server_prom(&server)).expect("metrics textfile");
    let _ = fs::remove_file(server_prom(&server));
    assert!(!prom.contains(SECRET) && prom.contains(&format!("r-{m}")), "release label masked:\n{prom}");
    assert!(events_file.contains(&format!("failed with {m}")), "{events_file}");
    assert!(!kept.join("provision-serial.log").exists(), "the connector's raw serial log is not kept");
    assert!(!kept.join("device-connector-error.json").exists());

    // Delivered on the next run.
    server.clear_faults();
    let next = unique_id();
    server.push_job(&job_json(&next, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    assert!(agent.run_once(T).status.success());
    assert!(!kept.exists(), "delivered");

    for r in server.requests() {
        assert!(!r.body_text().contains(SECRET), "secret sent in {}:\n{}", r.line(), r.body_text());
        assert!(!r.path.contains(SECRET));
    }
    let serial = server.log_text_phase(&job, "serial", "provision");
    assert_eq!(serial, format!("serial says {m} and more\nlast line {m}\n"));
    // Sent while provision ran, not only at its end: the first serial
    // fragment came well before provision's exit status (the phase goes on
    // for 2.4 s after its serial log's first line).
    let reqs = server.requests();
    let first_serial = reqs.iter().find(|r| r.path == format!("/v1/result/{job}/log/serial")).expect("serial sent");
    let provision_done = reqs
        .iter()
        .find(|r| r.path == format!("/v1/result/{job}") && r.body_text().contains("\"provision\":0"))
        .expect("provision status posted");
    let ahead = provision_done.at.saturating_duration_since(first_serial.at);
    assert!(ahead >= Duration::from_secs(1), "the first serial fragment came only {ahead:?} before the phase's end");

    let events = server.event_posts(&job);
    let last = events.last().expect("events posted").to_string();
    assert!(last.contains(&format!("TestError: failed with {m} caused by cause {m}")), "{last}");
    let provision_logs: Vec<String> =
        server.requests_to("POST", "/v1/agents/provision_logs").iter().map(|r| r.body_text()).collect();
    // The provision log's detail is the exit event's name, as upstream's
    // (issue 11, item 6): the connector's text does not go there.
    assert!(!provision_logs.is_empty(), "no provision log posted");
    assert!(provision_logs.iter().all(|b| b.contains(r#""detail":"provision_success""#)), "{provision_logs:?}");
    let device_info = server
        .results_posted(&job)
        .into_iter()
        .find_map(|r| r.get("device_info").cloned())
        .expect("device info posted");
    assert_eq!(device_info.get("ip").and_then(Json::as_str), Some(m.as_str()));

    let members = server.artifact_members(&job);
    let member = |n: &str| {
        members.iter().find(|(p, _, _)| p == n).map(|(_, d, _)| d.clone()).unwrap_or_else(|| panic!("{n} in artifact"))
    };
    assert_eq!(String::from_utf8_lossy(&member("artifacts/out.txt")), format!("artifact {m}\n"));
    assert_eq!(member(&format!("artifacts/name-{m}")), b"named\n");
    // Binary files are left alone: masking is for text.
    assert_eq!(member("artifacts/core.bin"), [b"bin\0".as_slice(), SECRET.as_bytes()].concat());

    let log = fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).unwrap();
    assert!(!log.contains(SECRET), "secret in the agent log:\n{log}");
    assert!(log.contains(&format!("failed with {m}")), "{log}");
    // A fifo is packed (as upstream's tarfile does), under its masked name.
    assert!(member(&format!("artifacts/fifo-{m}")).is_empty());
    // Any log line about the job is masked, whichever module writes it: here
    // the archive's, naming a socket it skips (made with python3).
    assert!(log.contains(&format!("sock-{m} (a socket")), "{log}");
}

#[test]
fn a_link_planted_at_the_log_file_is_refused_and_its_target_untouched() {
    let server = FakeServer::start();
    let agent = Agent::new(&server);
    let victim = agent.dir().join("victim.txt");
    fs::write(&victim, "untouched").unwrap();
    fs::create_dir_all(agent.logging_dir()).unwrap();
    let log = agent.logging_dir().join("testflinger-agent.log");
    symlink(&victim, &log).unwrap();
    let out = agent.run_once(T);
    assert!(out.status.success());
    assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.contains("refusing")).unwrap_or_else(|| panic!("no refusal:\n{stderr}"));
    assert!(line.contains(&log.display().to_string()) && line.contains("symbolic link"), "{line}");
}

#[test]
fn a_link_planted_at_the_run_dir_is_refused_and_its_target_untouched() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).command("test", "echo ran");
    let target = agent.dir().join("elsewhere");
    fs::create_dir_all(&target).unwrap();
    fs::write(target.join("keep.txt"), "keep").unwrap();
    fs::create_dir_all(agent.execution_dir()).unwrap();
    symlink(&target, agent.run_dir(&job)).unwrap();
    let out = agent.run_once(T);
    assert!(out.status.success());
    let names: Vec<_> = fs::read_dir(&target).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("keep.txt")], "nothing written through the link");
    let log = fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).unwrap();
    let refusal = format!("refusing {}: it is a symbolic link", agent.run_dir(&job).display());
    assert!(log.contains(&refusal), "{log}");
    let status = server.result(&job).expect("outcome");
    assert_eq!(status.get("status").and_then(|s| s.get("setup")).and_then(Json::as_i64), Some(100));
}

#[test]
fn a_link_the_connector_plants_at_the_outcome_file_is_refused_and_its_target_untouched() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server);
    let victim = agent.dir().join("victim.json");
    fs::write(&victim, "untouched").unwrap();
    let agent = agent.command(
        "setup",
        &format!("rm testflinger-outcome.json && ln -s '{}' testflinger-outcome.json", victim.display()),
    );
    assert!(agent.run_once(T).status.success());
    assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
    let log = fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).unwrap();
    assert!(log.contains("testflinger-outcome.json: it is a symbolic link"), "{log}");
    // The server still has the outcome, from memory.
    let status = server.result(&job).expect("outcome");
    assert_eq!(status.get("status").and_then(|s| s.get("setup")).and_then(Json::as_i64), Some(0));
}

#[test]
fn what_the_agent_creates_is_private_and_an_exposed_token_file_is_named() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server).token("rt");
    let token = agent.dir().join("refresh_token");
    fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // The test phase records the modes while the run dir exists.
    let modes = agent.dir().join("modes.txt");
    let agent = agent.command(
        "test",
        &format!("stat -c '%n %a' . testflinger.json testflinger-outcome.json test.log > '{}'", modes.display()),
    );
    // Kept, so results_basedir and the kept files exist to look at.
    server.add_fault(Fault::status("POST", &format!("/v1/result/{job}"), 1000, 503));
    let out = agent.run_once(T);
    assert!(out.status.success());
    let mode = |p: &Path| fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).mode() & 0o777;
    let seen = fs::read_to_string(&modes).expect("modes recorded");
    let expected = ". 700\ntestflinger.json 600\ntestflinger-outcome.json 600\ntest.log 600\n";
    assert_eq!(seen, expected);
    assert_eq!(mode(&agent.logging_dir()), 0o750);
    assert_eq!(mode(&agent.logging_dir().join("testflinger-agent.log")), 0o640);
    assert_eq!(mode(&agent.execution_dir()), 0o700);
    assert_eq!(mode(&agent.results_dir()), 0o700);
    let kept = agent.results_dir().join(&job);
    assert_eq!(mode(&kept), 0o700);
    for f in files_under(&kept) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    let log = fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).unwrap();
    let warning = log.lines().find(|l| l.contains("chmod 600")).unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(warning.contains(&token.display().to_string()), "{warning}");
}

#[test]
fn after_a_crash_the_serial_log_is_sent_only_from_its_masked_copy() {
    let server = FakeServer::start();
    let job = unique_id();
    let data = format!(r#"{{"test_data":{{"test_cmds":"x","secrets":{{"TOKEN":"{SECRET}"}}}}}}"#);
    server.push_job(&job_json(&job, QUEUE, &data));
    let agent = Agent::new(&server)
        .command("test", "echo \"before the crash $TOKEN\" >> test-serial.log; echo started > started; exec sleep 300")
        .command("cleanup", "echo cleanup ran");
    let mut p = agent.spawn();
    let m = mask(SECRET);
    server.wait_until(T, "serial streamed while the phase runs", |s| {
        s.log_text_phase(&job, "serial", "test").contains(&m)
    });
    p.kill();
    // The connector goes on writing while no agent watches; a resumed job
    // has no secrets to mask this with, so it must not be sent.
    let raw = agent.run_dir(&job).join("test-serial.log");
    let mut text = fs::read_to_string(&raw).expect("raw serial log");
    text.push_str(&format!("after the crash {SECRET}\n"));
    fs::write(&raw, text).unwrap();

    let mut p = agent.spawn();
    server.wait_until(T, "recovered outcome delivered", |s| s.job_states_posted(&job).iter().any(|x| x == "complete"));
    p.kill();
    for r in server.requests() {
        assert!(!r.body_text().contains(SECRET), "secret sent in {}:\n{}", r.line(), r.body_text());
    }
    assert_eq!(server.log_text_phase(&job, "serial", "test"), format!("before the crash {m}\n"));
    let mut numbers: Vec<i64> = server.fragments(&job, "serial").iter().map(|f| f.number).collect();
    let len = numbers.len();
    numbers.sort();
    numbers.dedup();
    assert_eq!(numbers.len(), len, "serial fragment numbers repeated across the restart");
}
