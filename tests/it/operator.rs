//! What an operator reads and what goes on the wire around auth (issues 21
//! item 6 and 22): tokens and header values checked before use, the
//! refresh hold-off for every answer that gives no usable token, an
//! explicit token file that is missing, and log lines that read like prose.

use std::time::Duration;

use crate::fake_server::{FakeServer, Fault, FaultAction};
use crate::harness::{Agent, AgentProc, yaml_str};

const T: Duration = Duration::from_secs(30);

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

fn refresh_answer(json: &str, times: usize) -> Fault {
    let body =
        FaultAction::Body { status: 200, content_type: "application/json".into(), body: json.as_bytes().to_vec() };
    Fault::new(Some("POST"), "/v1/oauth2/refresh", times, body)
}

fn wait_log(p: &AgentProc, what: &str, n: usize) -> String {
    let deadline = std::time::Instant::now() + T;
    loop {
        let log = p.log_text();
        if count(&log, what) >= n {
            return log;
        }
        assert!(std::time::Instant::now() < deadline, "{what} x{n}\n{}", p.diagnostics());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 21 item 6: a token with CR/LF used to be kept; every request then
/// failed before it left and the agent never asked for another.
#[test]
fn an_access_token_with_a_line_break_is_a_failed_refresh_and_the_next_one_works() {
    let server = FakeServer::start();
    server.require_auth("secret");
    server.add_fault(refresh_answer(r#"{"access_token": "tok\r\nX-Evil: 1"}"#, 2));
    let mut p = Agent::new(&server).token("secret").spawn();
    // Two bad answers, then the real endpoint: the agent asks again.
    server.wait_until(T, "a good refresh after two bad ones", |s| s.refresh_count() >= 1);
    server.wait_until(T, "a poll with the new token", |s| {
        s.requests_to("GET", "/v1/job").iter().any(|r| r.header("authorization") == Some("Bearer tok-1"))
    });
    p.kill();
    let log = p.log_text();
    assert_eq!(
        count(&log, "access_token is empty or holds bytes that are not visible ASCII; next attempt in"),
        2,
        "{log}"
    );
    assert!(!log.contains("X-Evil"), "the token is not quoted in the log:\n{log}");
    let refreshes = server.requests_to("POST", "/v1/oauth2/refresh");
    assert_eq!(refreshes.len(), 3, "{:?}", server.request_lines());
    // The hold-off (1 s, then 2 s) between the attempts, not a storm.
    assert!(refreshes[1].at.duration_since(refreshes[0].at) >= Duration::from_millis(900));
    assert!(refreshes[2].at.duration_since(refreshes[1].at) >= Duration::from_millis(1900));
    assert!(server.requests().iter().all(|r| r.header("x-evil").is_none()));
}

/// Issue 22: a 200 without a token gave four ERROR lines per `--once`
/// cycle and no hold-off.
#[test]
fn a_refresh_answer_without_a_token_gets_the_hold_off() {
    let server = FakeServer::start();
    server.require_auth("secret");
    server.add_fault(refresh_answer(r#"{"token_type": "Bearer"}"#, 1000));
    let setup = Agent::new(&server).token("secret");
    let out = setup.run_once(T);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(count(&log, "has no access_token string; next attempt in 1 s at the earliest"), 1, "{log}");
    let refreshes = server.requests_to("POST", "/v1/oauth2/refresh");
    let refused = server.requests().iter().filter(|r| r.status == 401).count();
    assert!(
        refused > refreshes.len(),
        "{} refreshes, {refused} refused calls: {:?}",
        refreshes.len(),
        server.request_lines()
    );
    // One ERROR line per refresh (was four per cycle), and the refreshes
    // held off: 1 s, then 2 s... (a slow machine may fit in a second one).
    assert_eq!(count(&log, "has no access_token string; next attempt in"), refreshes.len(), "{log}");
    for (i, pair) in refreshes.windows(2).enumerate() {
        assert!(pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(900 << i), "{i}");
    }
}

/// Issue 21 item 6: `;` in agent_id added a cookie of its own.
#[test]
fn agent_id_is_encoded_in_the_cookie() {
    let server = FakeServer::start();
    let id = "rig;admin=1 x";
    let out = Agent::new(&server).set("agent_id", &yaml_str(id)).run_once(T);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let requests = server.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.header("cookie"), Some("agent_name=rig%3Badmin=1%20x"), "{}", r.line());
    }
}

/// Issue 22: an explicit `--token-file` that is missing was an INFO line.
/// Upstream starts anyway (and logs an ERROR at each refresh); ours starts,
/// says it once at WARNING, and uses the file once it is created.
#[test]
fn a_named_token_file_that_is_missing_is_a_warning_and_is_used_once_created() {
    let server = FakeServer::start();
    server.require_auth("secret");
    let setup = Agent::new(&server).token("secret");
    let token = setup.dir().join("refresh_token");
    std::fs::rename(&token, setup.dir().join("elsewhere")).unwrap();
    let mut p = setup.spawn();
    let log = wait_log(&p, "does not exist", 1);
    let line = log.lines().find(|l| l.contains("does not exist")).unwrap_or_default();
    assert!(line.contains("WARNING: ") && line.contains("(--token-file)"), "{line}");
    std::fs::rename(setup.dir().join("elsewhere"), &token).unwrap();
    server.wait_until(T, "a refresh once the file is there", |s| s.refresh_count() >= 1);
    p.kill();
    assert_eq!(count(&p.log_text(), "does not exist"), 1, "{}", p.log_text());
}

/// Issue 22, the worst of what an operator read: reasons said twice with
/// the OS error number, Rust debug output, durations to the nanosecond,
/// trailing spaces. An outage, then a job whose setup fails.
#[test]
fn log_lines_read_like_prose() {
    let server = FakeServer::start();
    server.stop_listening();
    let job = crate::harness::unique_id();
    server.push_job(&crate::harness::job_json(&job, crate::harness::QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let mut p = Agent::new(&server).command("setup", "exit 127").spawn_with(&["--once"]);
    let log = wait_log(&p, "still not reachable", 2);
    let line = log.lines().find(|l| l.contains("not reachable: ")).unwrap_or_default();
    assert!(line.contains("not reachable: connection refused; waits doubling up to 3 min, retrying in "), "{line}");
    server.resume_listening();
    assert!(p.wait_exit(T).code().is_some(), "{}", p.diagnostics());
    let log = p.log_text();
    assert!(log.contains(&format!("job {job} ended: setup_fail; exit statuses: setup 127")), "{log}");
    assert!(log.contains(&format!("job {job}: event setup_start\n")), "{log}");
    for line in log.lines() {
        assert!(!line.ends_with(' '), "trailing space: {line:?}");
        for debug in ["os error", "[(", "Some(", "Ok(", "Err(", "OtherError"] {
            assert!(!line.contains(debug), "{debug}: {line}");
        }
        // A Duration's debug form: digits, a point, four or more digits, `s`.
        let nanos = line.split(' ').any(|w| {
            let w = w.trim_end_matches([',', ';', ')']);
            w.strip_suffix('s').and_then(|n| n.split_once('.')).is_some_and(|(a, b)| {
                !a.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.len() >= 4
                    && b.bytes().all(|c| c.is_ascii_digit())
            })
        });
        assert!(!nanos, "unrounded duration: {line}");
    }
}

/// A proxy that answers every request with this status line, no body.
fn answering_proxy(status: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            use std::io::{BufRead, Write};
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            // The request head, up to its empty line.
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    port
}

/// Issue 22: a proxy's 407 or 500 was shown as "connection refused", and
/// a server that did not answer as "Resource temporarily unavailable (os
/// error 11)".
#[test]
fn what_the_proxy_answered_and_a_silent_server_are_said_as_such() {
    let server = FakeServer::start();
    let cases = [
        (
            "http",
            "407 Proxy Authentication Required",
            "the proxy did not pass the request on (the proxy answered HTTP 407",
        ),
        ("https", "407 Proxy Authentication Required", "the proxy did not pass the request on (proxy 127.0.0.1:"),
        ("https", "500 Internal Server Error", "the proxy did not pass the request on (proxy 127.0.0.1:"),
    ];
    for (scheme, status, said) in cases {
        let proxy = answering_proxy(status);
        let out = Agent::new(&server)
            .set("server_address", &yaml_str(&format!("{scheme}://tf.example:8000")))
            .set("server_timeout", "1")
            .env(&format!("{scheme}_proxy"), &format!("http://127.0.0.1:{proxy}"))
            .run_once(T);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        if scheme == "https" && !cfg!(feature = "tls") {
            continue; // a build without the `tls` feature refuses https:// at start
        }
        let line = log.lines().find(|l| l.contains("not reachable: ")).unwrap_or_default();
        assert!(line.contains(said), "{scheme} {status}: {line}\n{log}");
        assert!(line.contains(&format!("HTTP {}", &status[..3])), "{line}");
        assert!(!log.contains("connection refused"), "{log}");
        assert_eq!(out.status.code(), Some(69), "{log}");
    }

    server.add_fault(Fault::new(Some("GET"), "/v1/", 1, FaultAction::Stall(Duration::from_secs(3))));
    let out = Agent::new(&server).set("server_timeout", "1").run_once(T);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = log.lines().find(|l| l.contains("not reachable: ")).unwrap_or_default();
    assert!(line.contains("not reachable: no answer within 1 s"), "{line}\n{log}");
    assert!(!log.contains("temporarily unavailable"), "{log}");
}

/// A refresh the server fails (503: it is up, and failing) is not a
/// refusal: no hold-off and the token is not dropped; the next call that
/// needs a token refreshes again, as upstream retries it.
#[test]
fn a_refresh_the_server_fails_with_a_5xx_gets_no_hold_off() {
    let server = FakeServer::start();
    server.require_auth("secret");
    server.add_fault(Fault::status("POST", "/v1/oauth2/refresh", 2, 503));
    let out = Agent::new(&server).token("secret").run_once(T);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!log.contains("next attempt in"), "a 5xx started the refresh hold-off:\n{log}");
    let polled = server.requests_to("GET", "/v1/job").iter().any(|r| r.status != 401);
    assert!(polled, "no authorised poll:\n  {}\n{log}", server.request_lines().join("\n  "));
}

/// A refused refresh holds off the next one (1 s, then 2 s …). An idle agent
/// waits that out instead of polling into 401s every `polling_interval`:
/// with a poll every 0.2 s CI once saw 7 refused `GET /v1/agents/data` in
/// one second.
#[test]
fn an_idle_agent_waits_out_a_refused_refresh_instead_of_polling_into_401s() {
    let server = FakeServer::start();
    server.require_auth("secret");
    let refresh = "/v1/oauth2/refresh";
    server.add_fault(Fault::status("POST", refresh, 2, 401));
    let mut p = Agent::new(&server).token("secret").set("polling_interval", "0.2").spawn();
    server.wait_until(T, "an authorised poll", |s| {
        s.requests_to("GET", "/v1/job").iter().any(|r| r.status == 200 || r.status == 204)
    });
    p.kill();
    let reqs = server.requests();
    let refreshes: Vec<_> = reqs.iter().filter(|r| r.path == refresh).collect();
    assert!(refreshes.len() >= 3, "two refusals, then a token:\n  {}", server.request_lines().join("\n  "));
    // The second refusal comes in the polling loop: the call that needed
    // the token is refused, then nothing until the refresh is due 2 s
    // later (a poll every 0.2 s would be about 10 refused calls).
    let (second, third) = (refreshes[1].at, refreshes[2].at);
    let between = reqs.iter().filter(|r| r.status == 401 && r.path != refresh && r.at > second && r.at < third).count();
    assert!(
        between <= 1,
        "{between} refused calls while the refresh was held off:\n  {}",
        server.request_lines().join("\n  ")
    );
    assert!(third.duration_since(second) >= Duration::from_millis(1500), "the hold-off was not kept");
}
