//! Run dir, processes and start-up as upstream's agent has them (issue 11,
//! items 10 to 16): descriptors of phase commands, start-up checks of the
//! directories, `server_address` and `agent_id`, the token file, the
//! unreachable server, the agent's own log file, exit statuses.

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::fake_server::{FakeServer, Fault, FaultAction};
use crate::harness::{Agent, QUEUE, job_json, unique_id, yaml_str};
use crate::json::Json;

const T: Duration = Duration::from_secs(30);

fn push_test_job(server: &FakeServer) -> String {
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    job
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A config error: exit 2, one line on stderr naming the key.
fn assert_config_error(out: &Output, key: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{key}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{key}: one line: {err}");
    assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
}

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// Item 10.
#[test]
fn phase_commands_get_only_stdin_stdout_stderr() {
    let server = FakeServer::start();
    let job = push_test_job(&server);
    let probe = r#"echo "stdin is $(readlink /proc/$$/fd/0)"; for n in $(seq 3 64) 255; do [ -e /proc/$$/fd/$n ] && echo "leaked fd $n: $(readlink /proc/$$/fd/$n)"; done; echo probed"#;
    let mut p = Agent::new(&server).leak_fds().command("test", probe).spawn();
    server.wait_until(T, "the job's outcome", |s| {
        s.result(&job).and_then(|r| r.get("job_state").and_then(Json::as_str).map(String::from)).as_deref()
            == Some("complete")
    });
    // The agent itself did inherit them: the probe would have seen them.
    for fd in [10, 11, 12] {
        assert!(
            Path::new(&format!("/proc/{}/fd/{fd}", p.pid())).exists(),
            "fd {fd} not inherited\n{}",
            p.diagnostics()
        );
    }
    let out = server.log_text(&job, "output");
    assert!(out.contains("stdin is /dev/null"), "{out}");
    assert!(out.contains("probed"), "{out}");
    assert!(!out.contains("leaked fd"), "{out}");
    p.kill();
}

/// Item 11.
#[test]
fn unusable_basedirs_exit_2_before_any_request() {
    let server = FakeServer::start();
    push_test_job(&server);
    for key in ["execution_basedir", "results_basedir", "logging_basedir"] {
        let setup = Agent::new(&server);
        let file = setup.dir().join("a-file");
        fs::write(&file, "not a directory").unwrap();
        // Under a regular file: cannot be created. The file itself: not a directory.
        for dir in [file.join("sub"), file.clone()] {
            let setup = Agent::new(&server).set(key, &yaml_str(&dir.to_string_lossy()));
            let out = setup.run_once(T);
            assert_config_error(&out, key);
            assert!(stderr(&out).contains(&*dir.to_string_lossy()), "{}", stderr(&out));
        }
    }
    assert_eq!(server.requests().len(), 0, "no request before the checks pass: {:?}", server.request_lines());
    assert_eq!(server.queued_jobs(), 1);
}

/// Item 11.
#[test]
fn missing_basedirs_are_created_at_start() {
    let server = FakeServer::start();
    let setup = Agent::new(&server);
    let base = setup.dir().join("new/deeper");
    let setup = setup
        .set("results_basedir", &yaml_str(&base.join("results").to_string_lossy()))
        .set("execution_basedir", &yaml_str(&base.join("run").to_string_lossy()));
    let out = setup.run_once(T);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(base.join("results").is_dir() && base.join("run").is_dir());
}

/// Item 12.
#[test]
fn bad_server_address_exits_2() {
    let server = FakeServer::start();
    for address in
        ["htp://x", "ftp://host:21", "http://", "http://:8000", "http://host:99999", "host:port", "http://a b"]
    {
        let out = Agent::new(&server).set("server_address", &yaml_str(address)).run_once(T);
        assert_config_error(&out, "server_address");
    }
    assert_eq!(server.requests().len(), 0);
}

/// A `metrics_textfile` that names no file was taken at start and failed
/// at every scrape; it is a config error now.
#[test]
fn a_metrics_textfile_that_names_no_file_exits_2() {
    let server = FakeServer::start();
    for path in ["", "/", "/var/lib/node_exporter/", "tf.prom"] {
        let out = Agent::new(&server).set("metrics_textfile", &yaml_str(path)).run_once(T);
        assert_config_error(&out, "metrics_textfile");
    }
    assert_eq!(server.requests().len(), 0);
}

/// Item 12.
#[test]
fn agent_id_is_refused_or_percent_encoded_in_paths() {
    let server = FakeServer::start();
    for id in ["../../etc", "..", "a/b"] {
        let out = Agent::new(&server).set("agent_id", &yaml_str(id)).run_once(T);
        assert_config_error(&out, "agent_id");
    }
    assert_eq!(server.requests().len(), 0);

    let id = "lab rig #1?x=%";
    let out = Agent::new(&server).set("agent_id", &yaml_str(id)).run_once(T);
    assert!(out.status.success(), "{}", stderr(&out));
    // The fake decodes the path: the whole id arrived in its segment.
    let posts = server.requests_to("POST", "/v1/agents/data/");
    assert!(!posts.is_empty(), "{:?}", server.request_lines());
    for r in &posts {
        assert_eq!(r.path, format!("/v1/agents/data/{id}"), "{}", r.line());
    }
    assert_eq!(server.agent_states(id), vec!["waiting"]);
}

/// Item 13.
#[test]
fn the_token_file_in_use_is_said_once_at_start() {
    let server = FakeServer::start();
    let out = Agent::new(&server).run_once(T);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    let default = "/var/lib/testflinger-agent/refresh_token";
    assert_eq!(count(&log, default), 1, "upstream's default, named once:\n{log}");
    let line = log.lines().find(|l| l.contains(default)).unwrap_or_default();
    assert!(line.contains("(the default)"), "{line}");
    if !Path::new(default).exists() {
        assert!(line.contains("does not exist") && line.contains("without a token"), "{line}");
        assert!(server.requests().iter().all(|r| r.header("authorization").is_none()));
    }

    let setup = Agent::new(&server).token("r1");
    let path = setup.dir().join("refresh_token").to_string_lossy().into_owned();
    let out = setup.run_once(T);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(count(&log, &path), 1, "{log}");
    assert!(log.contains(&format!("token file {path} (--token-file)")), "{log}");
}

/// Item 13.
#[test]
fn a_broken_token_file_is_reported_once_per_change() {
    let server = FakeServer::start();
    server.require_auth("secret");
    let setup = Agent::new(&server).token("secret");
    let token = setup.dir().join("refresh_token");
    fs::write(&token, "{not json").unwrap();
    let mut p = setup.spawn();
    let polls = |s: &FakeServer| s.requests_to("GET", "/v1/agents/data").len();
    server.wait_until(T, "ten refused polls", |s| polls(s) >= 10);
    let log = p.log_text();
    assert_eq!(count(&log, "has no \"refresh_token\""), 1, "{log}");
    assert!(log.contains("WARNING: "), "{log}");

    // Fixed: used, and said.
    fs::write(&token, r#"{"refresh_token": "secret"}"#).unwrap();
    server.wait_until(T, "a refresh", |s| s.refresh_count() >= 1);
    // Broken in another way, found at the next 401.
    fs::remove_file(&token).unwrap();
    fs::create_dir(&token).unwrap();
    server.expire_token();
    let seen = polls(&server);
    server.wait_until(T, "ten more polls", |s| polls(s) >= seen + 10);
    let log = p.log_text();
    assert_eq!(count(&log, "cannot read token file"), 1, "{log}");
    assert_eq!(count(&log, "has no \"refresh_token\""), 1, "{log}");
    assert!(count(&log, " read") >= 1, "{log}");
    p.kill();
}

/// Item 14.
#[test]
fn unreachable_server_reason_is_logged_once_per_change() {
    let server = FakeServer::start();
    server.stop_listening();
    let mut p = Agent::new(&server).spawn();
    let wait_log = |p: &crate::harness::AgentProc, what: &str, n: usize| {
        let deadline = std::time::Instant::now() + T;
        while count(&p.log_text(), what) < n {
            assert!(std::time::Instant::now() < deadline, "{what} x{n}\n{}", p.diagnostics());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_log(&p, "still not reachable", 3);
    let log = p.log_text();
    assert_eq!(count(&log, "not reachable: connection refused"), 1, "{log}");
    let line = log.lines().find(|l| l.contains("not reachable: connection refused")).unwrap_or_default();
    assert!(line.contains(" WARNING: "), "{line}");

    server.resume_listening();
    wait_log(&p, "reachable again", 1);
    server.wait_until(T, "polling", |s| !s.requests_to("GET", "/v1/job").is_empty());
    server.stop_listening();
    wait_log(&p, "not reachable: connection refused", 2);
    assert!(p.try_wait().is_none(), "keeps waiting\n{}", p.diagnostics());
    p.kill();
}

/// Item 14.
#[test]
fn once_gives_up_on_an_unreachable_server() {
    let server = FakeServer::start();
    server.stop_listening();
    let out = Agent::new(&server).set("server_timeout", "1").run_once(T);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{log}");
    assert!(log.contains("giving up"), "{log}");
    assert_eq!(count(&log, "not reachable: connection refused"), 1, "{log}");
}

/// Item 14: the reason names the layer that failed (TLS here: `https://`
/// to a plain-HTTP server).
#[cfg(feature = "tls")]
#[test]
fn a_tls_failure_is_named_as_such() {
    let server = FakeServer::start();
    let out = Agent::new(&server)
        .set("server_address", &yaml_str(&format!("https://{}", server.addr())))
        .set("server_timeout", "1")
        .run_once(T);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{log}");
    assert_eq!(count(&log, "not reachable: TLS failure"), 1, "{log}");
}

/// Item 14.
#[test]
fn an_http_error_body_is_logged_as_one_short_line() {
    let server = FakeServer::start();
    let body = format!("<html>\n<body>\n<h1>Bad request</h1>\n{}\n</body></html>\n", "y".repeat(1000));
    server.add_fault(Fault::new(
        Some("POST"),
        "/v1/agents/data",
        1,
        FaultAction::Body { status: 400, content_type: "text/html".into(), body: body.into_bytes() },
    ));
    let out = Agent::new(&server).run_once(T);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let line = log.lines().find(|l| l.contains("HTTP 400")).unwrap_or_else(|| panic!("no HTTP 400 line:\n{log}"));
    let (_, snippet) = line.split_once("HTTP 400 ").unwrap_or_default();
    assert!(snippet.starts_with("<html> <body> <h1>Bad request</h1> yyy"), "{line}");
    assert_eq!(snippet.chars().count(), 200, "{line}");
    assert!(!log.lines().any(|l| l.starts_with("<body>") || l.starts_with("yyy")), "{log}");
}

/// Item 15.
#[test]
fn log_lines_have_upstream_layout_and_level_names() {
    let server = FakeServer::start();
    server.add_fault(Fault::status("GET", "/v1/agents/data", 1, 503));
    let setup = Agent::new(&server);
    let out = setup.run_once(T);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = fs::read_to_string(setup.logging_dir().join("testflinger-agent.log")).unwrap();
    let warning = log.lines().find(|l| l.contains("HTTP 503")).unwrap_or_else(|| panic!("{log}"));
    // `[YY-MM-DD HH:MM:SS] WARNING: (file.rs:line)| message`
    let (stamp, rest) = warning.split_at(19);
    assert!(stamp.starts_with('[') && stamp.ends_with(']') && stamp.as_bytes()[9] == b' ', "{warning}");
    assert!(rest.starts_with(" WARNING: (") && rest.contains(".rs:") && rest.contains(")| "), "{warning}");
    assert!(log.lines().any(|l| l.get(19..).is_some_and(|r| r.starts_with("    INFO: ("))), "{log}");
    assert!(!log.contains("WARN:") && !log.contains("[WARN]"), "{log}");
    assert_eq!(stderr(&out).lines().filter(|l| l.contains(" WARNING: ")).count(), count(&log, " WARNING: "));
}

/// Item 15.
#[test]
fn log_file_rotates_daily_keeping_six() {
    let server = FakeServer::start();
    let setup = Agent::new(&server).env("TZ", "UTC");
    let dir = setup.logging_dir();
    fs::create_dir_all(&dir).unwrap();
    let current = dir.join("testflinger-agent.log");
    fs::write(&current, "a line of 2024-03-10\n").unwrap();
    let noon = UNIX_EPOCH + Duration::from_secs(1_710_072_000); // 2024-03-10T12:00:00Z
    fs::File::options().append(true).open(&current).unwrap().set_modified(noon).unwrap();
    for day in 1..=8 {
        fs::write(dir.join(format!("testflinger-agent.log.2020-01-{day:02}")), "old\n").unwrap();
    }
    let out = setup.run_once(T);
    assert!(out.status.success(), "{}", stderr(&out));
    let rotated = dir.join("testflinger-agent.log.2024-03-10");
    assert_eq!(fs::read_to_string(&rotated).unwrap_or_default(), "a line of 2024-03-10\n");
    let now = fs::read_to_string(&current).unwrap();
    assert!(!now.contains("2024-03-10") && now.contains("polling"), "{now}");
    let mut kept: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("testflinger-agent.log."))
        .collect();
    kept.sort();
    let want: Vec<String> = ["2020-01-04", "2020-01-05", "2020-01-06", "2020-01-07", "2020-01-08", "2024-03-10"]
        .iter()
        .map(|d| format!("testflinger-agent.log.{d}"))
        .collect();
    assert_eq!(kept, want);
    // Written today: not rotated again at the next start.
    assert!(fs::metadata(&current).unwrap().modified().unwrap() > SystemTime::now() - Duration::from_secs(3600));
    assert!(setup.run_once(T).status.success());
    assert_eq!(count(&fs::read_to_string(&current).unwrap(), "polling"), 2);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1 + want.len());
}

/// Item 16.
#[test]
fn systemd_unit_stops_on_config_errors_and_docs_list_every_exit_status() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = fs::read_to_string(root.join("deploy/testflinger-agent@.service")).unwrap();
    let prevent = unit
        .lines()
        .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .expect("RestartPreventExitStatus= in the unit");
    assert!(prevent.split_whitespace().any(|s| s == "2"), "{prevent}");
    assert!(unit.lines().any(|l| l == "Restart=always"), "restarts on anything else (75, crashes)");

    // The status the unit refuses to restart on is what a config error gives.
    let server = FakeServer::start();
    assert_config_error(&Agent::new(&server).set("polling_interval", "soon").run_once(T), "polling_interval");

    // Every status the binary defines is in the exit status table
    // (docs/operations.md, "Exit status").
    let main = fs::read_to_string(root.join("src/main.rs")).unwrap();
    let table = fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let mut codes = vec!["0".to_string(), "1".to_string()];
    for line in main.lines().filter(|l| l.starts_with("const EXIT_")) {
        let code = line.rsplit('=').next().unwrap_or_default().trim().trim_end_matches(';');
        codes.push(code.to_string());
    }
    assert!(codes.len() >= 5, "{codes:?}");
    for code in codes {
        assert!(table.contains(&format!("| {code} |")), "docs/operations.md exit status table lacks {code}");
    }
}

/// Issue 21, item 7: a state comment from the server with line breaks and
/// other control characters is logged escaped, as one line; it cannot
/// forge a record of its own.
#[test]
fn server_text_with_line_breaks_cannot_forge_log_lines() {
    let server = FakeServer::start();
    let forged = "cabling\n<3>[26-01-01 00:00:00]   ERROR: (agent.rs:1)| FORGED\r\n\u{1b}[2Jagain";
    server.set_agent_state(crate::harness::AGENT_ID, "offline", forged);
    let agent = Agent::new(&server);
    // stderr as the journal (see budget::journal_stderr_gets_priority_prefixes_and_no_timestamps).
    let journal = agent.dir().join("stderr-0.txt");
    fs::write(&journal, "").unwrap();
    let meta = fs::metadata(&journal).unwrap();
    let mut p = agent
        .env(
            "JOURNAL_STREAM",
            &format!("{}:{}", std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta)),
        )
        .spawn();
    let deadline = std::time::Instant::now() + T;
    let log = loop {
        let log = p.log_text();
        if log.contains("not taking jobs") {
            break log;
        }
        assert!(std::time::Instant::now() < deadline && p.try_wait().is_none(), "no offline line\n{}", p.diagnostics());
        std::thread::sleep(Duration::from_millis(20));
    };
    p.kill();
    assert!(
        log.contains(r"(cabling\n<3>[26-01-01 00:00:00]   ERROR: (agent.rs:1)| FORGED\r\n\u{1b}[2Jagain)"),
        "{log}"
    );
    for line in log.lines() {
        assert!(
            line.starts_with('[') && line.get(19..).is_some_and(|r| r.contains(".rs:")),
            "a line of no record: {line:?}\n{log}"
        );
        assert!(!line.contains(['\r', '\u{1b}']), "{line:?}");
    }
    let entries = p.stderr_text();
    assert!(entries.contains(r"<6>agent is offline on the server (cabling\n<3>[26-01-01"), "{entries}");
    for entry in entries.lines() {
        assert!(["<3>", "<4>", "<6>", "<7>"].iter().any(|n| entry.starts_with(n)), "{entry:?}\n{entries}");
        assert!(!entry.contains("FORGED") || entry.starts_with("<6>agent is offline"), "{entry:?}");
    }
}
