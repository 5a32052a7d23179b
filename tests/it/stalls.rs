//! A server, proxy or name server that answers too slowly to be waited
//! for: every call has a whole-call deadline, SIGTERM is acted on whatever
//! the agent waits for, and an answer sent before the request was is read.
//!
//! The stop tests print the time from SIGTERM to exit
//! (`cargo test --test it stalls -- --nocapture | grep '^| '`); they assert
//! only a generous bound (5 s); docs/measured.md's figures come from
//! `bench/stop.sh`.

use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::fake_server::{FakeServer, Fault, FaultAction};
use crate::harness::{Agent, AgentProc, AgentSetup, QUEUE, job_json, unique_id};

const T: Duration = Duration::from_secs(60);
/// The bound the tests hold the stop to; docs/measured.md reports the figures.
const STOP_BOUND: Duration = Duration::from_secs(5);
const WEBHOOK: &str = r#""job_status_webhook":"http://hook.example/x""#;

fn agent(server: &FakeServer) -> AgentSetup {
    Agent::new(server)
        .set("polling_interval", "0.2")
        .command("setup", "echo setup")
        .command(
            "test",
            "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.2; done; mkdir -p artifacts; echo a > artifacts/a.txt",
        )
        .command("cleanup", "echo cleanup")
}

fn push_job(server: &FakeServer) -> String {
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, &format!(r#"{{{WEBHOOK},"test_data":{{"test_cmds":"x"}}}}"#)));
    job
}

/// Sends SIGTERM, waits for the exit (panics past `T`), prints and returns
/// the time it took.
fn stop(p: &mut AgentProc, what: &str) -> Duration {
    let before = p.log_text().len();
    let t = Instant::now();
    p.signal(libc::SIGTERM);
    let status = p.wait_exit(T);
    let took = t.elapsed();
    println!("| SIGTERM to exit, {what} | {:.2} s |", took.as_secs_f64());
    assert!(status.success(), "{what}: exit {status}\n{}", p.diagnostics());
    assert!(took < STOP_BOUND, "{what}: the stop took {took:?}\n{}", p.diagnostics());
    // A stop just stops: the calls it abandons are not failures to report
    // (only a fragment that may be missing is worth a line).
    let log = p.log_text();
    let after = log.get(before..).unwrap_or("");
    let loud: Vec<&str> = after
        .lines()
        .filter(|l| {
            (l.contains("] WARNING: (") || l.contains("]   ERROR: (")) && !l.contains("may be missing on the server")
        })
        .collect();
    assert!(loud.is_empty(), "{what}: the stop logged {loud:#?}");
    took
}

fn assert_no_fragment_stored_twice(server: &FakeServer, job: &str) {
    let mut numbers: Vec<i64> = server.fragments(job, "output").iter().map(|f| f.number).collect();
    let all = numbers.len();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), all, "a fragment number was stored twice");
}

#[test]
fn a_drip_fed_job_request_is_given_up_at_the_call_deadline() {
    // One byte a second never lets `server_timeout` pass without progress;
    // the call's deadline (2 × server_timeout) ends it all the same.
    let server = FakeServer::start();
    server.add_fault(Fault::new(Some("GET"), "/v1/job", 1, FaultAction::Drip(Duration::from_secs(1))));
    let job = push_job(&server);
    let mut p = agent(&server).set("server_timeout", "2").spawn();
    server.wait_until(T, "the job delivered", |s| s.job_states_posted(&job).iter().any(|j| j == "complete"));
    let gets: Vec<Instant> = server.requests_to("GET", "/v1/job").iter().map(|r| r.at).collect();
    p.kill();
    let log = p.log_text();
    assert!(log.contains("timed out after") && log.contains("(the call's deadline)"), "{log}");
    assert!(gets.len() >= 2, "{gets:?}");
    let held = gets[1].duration_since(gets[0]);
    println!("drip-fed GET /v1/job held the agent {held:?} (server_timeout 2 s)");
    assert!(held < Duration::from_secs(30), "{held:?}");
}

#[test]
fn sigterm_is_honoured_while_any_request_is_drip_fed() {
    // Each kind of request in turn drips its answer; the stop must come
    // within the bound, nothing may be stored twice, and what the stop
    // left behind is delivered by the next start.
    let kinds: [(&str, &str, bool); 9] = [
        ("GET", "/v1/job/{job}/attachments", false),
        ("GET", "/v1/job", false),
        ("GET", "/v1/agents/data/", false),
        ("POST", "/v1/agents/data/", false),
        ("GET", "/v1/result/{job}", false),
        ("POST", "/v1/result/{job}", false),
        ("POST", "/v1/result/{job}/log/output", true),
        ("POST", "/v1/job/{job}/events", false),
        ("POST", "/v1/result/{job}/artifact", false),
    ];
    for (method, path, handled) in kinds {
        let server = FakeServer::start();
        let job = if path.ends_with("/attachments") {
            let job = unique_id();
            server.push_job(&job_json(
                &job,
                QUEUE,
                &format!(r#"{{{WEBHOOK},"attachments_status":"complete","test_data":{{"test_cmds":"x","attachments":[{{"agent":"t"}}]}}}}"#),
            ));
            job
        } else {
            push_job(&server)
        };
        let prefix = path.replace("{job}", &job);
        let every = Duration::from_secs(1);
        let action = if handled { FaultAction::DripAfterHandling(every) } else { FaultAction::Drip(every) };
        server.add_fault(Fault::new(Some(method), &prefix, 1, action));
        let setup = agent(&server).set("server_timeout", "30");
        let mut p = setup.spawn();
        server.wait_until(T, &format!("{method} {path} drip-fed"), |s| s.dripping() > 0);
        stop(&mut p, &format!("drip-fed {method} {path}"));
        server.clear_faults();
        let next = setup.run_once(T);
        assert!(next.status.success(), "{method} {path}: {}", String::from_utf8_lossy(&next.stderr));
        server.wait_until(T, &format!("{method} {path}: the outcome delivered"), |s| {
            s.job_states_posted(&job).iter().any(|j| j == "complete")
        });
        assert_no_fragment_stored_twice(&server, &job);
    }
}

/// A proxy that takes connections and never answers.
fn stalled_proxy() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            let mut c = conn;
            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 512];
            if c.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"CONNECT ")) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            held.push(c);
            if held.len() > 50 {
                break;
            }
        }
    });
    (port, seen)
}

/// A CONNECT tunnel is for https, which a build without TLS refuses at start.
#[cfg(feature = "tls")]
#[test]
fn sigterm_is_honoured_while_a_proxy_holds_connect() {
    let server = FakeServer::start();
    let (port, connects) = stalled_proxy();
    let mut p = agent(&server)
        .set("server_address", &format!("\"https://127.0.0.1:{}\"", server.port()))
        .set("server_timeout", "30")
        .env("HTTPS_PROXY", &format!("http://127.0.0.1:{port}"))
        .spawn();
    server.wait_until(T, "the proxy asked to CONNECT", |_| connects.load(Ordering::SeqCst) > 0);
    stop(&mut p, "stalled CONNECT proxy");
    // A stop while the server is away just stops (issue 22): no start-up
    // registration, no ERROR lines.
    let log = p.log_text();
    assert!(!log.contains("ERROR"), "{log}");
    assert!(server.requests().is_empty(), "{:?}", server.request_lines());
}

#[test]
fn sigterm_is_honoured_while_a_name_lookup_hangs() {
    let server = FakeServer::start();
    let mut p = agent(&server)
        .set("server_address", &format!("\"http://tf-hang.example:{}\"", server.port()))
        .set("server_timeout", "30")
        .env("TESTFLINGER_AGENT_TEST_LOOKUP_DELAY", "120")
        .spawn();
    let started = Instant::now();
    while !p.log_text().contains("polling http://tf-hang.example") {
        assert!(started.elapsed() < T, "the agent never started\n{}", p.diagnostics());
        assert!(p.try_wait().is_none(), "{}", p.diagnostics());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(&mut p, "hanging name lookup");
    assert!(!p.log_text().contains("ERROR"), "{}", p.log_text());
}

#[test]
fn a_hanging_name_lookup_is_given_up_at_the_call_deadline() {
    let server = FakeServer::start();
    let out = agent(&server)
        .set("server_address", &format!("\"http://tf-hang.example:{}\"", server.port()))
        .set("server_timeout", "1")
        .env("TESTFLINGER_AGENT_TEST_LOOKUP_DELAY", "120")
        .run_once(T);
    // --once gives up after server_timeout: exit 69 (unreachable).
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("looking up tf-hang.example: timed out after"), "{text}");
}

#[test]
fn an_early_413_on_the_artifact_drops_it_and_the_agent_takes_the_next_job() {
    // nginx answers 413 as soon as it sees a body over its limit and
    // closes: our writes get a reset, the answer is read all the same.
    let server = FakeServer::start();
    let first = push_job(&server);
    let second = push_job(&server);
    server.add_fault(Fault::new(
        Some("POST"),
        &format!("/v1/result/{first}/artifact"),
        1,
        FaultAction::EarlyAnswer(413),
    ));
    let mut p = agent(&server).set("server_timeout", "5").spawn();
    server.wait_until(T, "both outcomes delivered", |s| {
        [&first, &second].iter().all(|j| s.job_states_posted(j).iter().any(|st| st == "complete"))
    });
    p.kill();
    let log = p.log_text();
    assert!(log.contains(&format!("job {first}: the server refuses the artifacts")), "{log}");
    assert!(!log.contains("still undelivered"), "{log}");
    assert!(server.artifact(&first).is_none(), "the refused artifact was stored");
    assert!(!server.artifact_members(&second).is_empty(), "the next job's artifact is missing");
    let refused = server.requests_to("POST", &format!("/v1/result/{first}/artifact"));
    assert_eq!(refused.iter().map(|r| r.status).collect::<Vec<_>>(), vec![413], "sent once, refused once");
}

/// The watchdog keeps beating while a request waits on a slow server: a
/// healthy agent waiting is not a hung one.
#[test]
fn the_watchdog_beats_while_a_request_is_drip_fed() {
    use std::os::unix::net::UnixDatagram;
    let server = FakeServer::start();
    server.add_fault(Fault::new(Some("GET"), "/v1/job", 1, FaultAction::Drip(Duration::from_secs(1))));
    let setup = agent(&server).set("server_timeout", "30");
    let path = setup.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let mut p = setup.env("NOTIFY_SOCKET", &path.to_string_lossy()).env("WATCHDOG_USEC", "400000").spawn();
    server.wait_until(T, "the job request drip-fed", |s| s.dripping() > 0);
    let mut buf = [0u8; 4096];
    // Drop what came before the drip.
    while sock.recv(&mut buf).is_ok() {}
    let deadline = Instant::now() + T;
    let mut beats = 0;
    while beats < 5 {
        assert!(Instant::now() < deadline, "{beats} watchdog beats while the request dripped");
        assert!(server.dripping() > 0, "the drip ended before five beats: {beats}");
        if let Ok(n) = sock.recv(&mut buf) {
            beats += String::from_utf8_lossy(&buf[..n]).lines().filter(|l| *l == "WATCHDOG=1").count();
        }
    }
    stop(&mut p, "drip-fed GET /v1/job under the watchdog");
}

/// Starts an agent in one state and returns it once there (see
/// `stop_times_in_each_state`); the guard keeps what the state needs.
fn into_state(state: &str) -> (FakeServer, AgentProc, Option<(u16, Arc<AtomicUsize>)>) {
    let server = FakeServer::start();
    let slow_job = |server: &FakeServer, fault: &dyn Fn(&str) -> Fault| {
        let job = push_job(server);
        server.add_fault(fault(&job));
        job
    };
    let base = agent(&server).set("server_timeout", "30").command("test", "echo started; sleep 30");
    let mut proxy = None;
    let setup = match state {
        "polling" | "phase" => base,
        "held fragment" => {
            slow_job(&server, &|job| {
                Fault::new(
                    Some("POST"),
                    &format!("/v1/result/{job}/log/output"),
                    1,
                    FaultAction::Stall(Duration::from_secs(15)),
                )
            });
            base
        }
        "delivering" => {
            slow_job(&server, &|job| {
                Fault::new(
                    Some("POST"),
                    &format!("/v1/result/{job}/artifact"),
                    1,
                    FaultAction::Stall(Duration::from_secs(15)),
                )
            });
            agent(&server).set("server_timeout", "30")
        }
        "drip-feeding server" => {
            server.add_fault(Fault::new(Some("GET"), "/v1/job", 1, FaultAction::Drip(Duration::from_secs(1))));
            base
        }
        "stalled proxy" => {
            let (port, seen) = stalled_proxy();
            proxy = Some((port, seen));
            base.set("server_address", &format!("\"https://127.0.0.1:{}\"", server.port()))
                .env("HTTPS_PROXY", &format!("http://127.0.0.1:{port}"))
        }
        "hanging name lookup" => base
            .set("server_address", &format!("\"http://tf-hang.example:{}\"", server.port()))
            .env("TESTFLINGER_AGENT_TEST_LOOKUP_DELAY", "120"),
        other => panic!("unknown state {other}"),
    };
    if state == "phase" {
        push_job(&server);
    }
    let p = setup.spawn();
    let reached: Box<dyn Fn(&FakeServer) -> bool> = match state {
        "polling" => Box::new(|s: &FakeServer| s.requests_to("GET", "/v1/job").len() >= 2),
        "phase" => Box::new(|s: &FakeServer| {
            s.requests()
                .iter()
                .any(|r| r.path.ends_with("/log/output") && String::from_utf8_lossy(&r.body).contains("started"))
        }),
        "held fragment" | "delivering" => Box::new(|s: &FakeServer| s.stalling() > 0),
        "drip-feeding server" => Box::new(|s: &FakeServer| s.dripping() > 0),
        "stalled proxy" => {
            let seen = proxy.as_ref().map(|(_, s)| s.clone()).expect("proxy");
            Box::new(move |_: &FakeServer| seen.load(Ordering::SeqCst) > 0)
        }
        _ => {
            let log = p.log_path().to_path_buf();
            Box::new(move |_: &FakeServer| {
                std::fs::read_to_string(&log).unwrap_or_default().contains("polling http://tf-hang.example")
            })
        }
    };
    server.wait_until(T, state, |s| reached(s));
    (server, p, proxy)
}

/// docs/measured.md's table: time from SIGTERM to exit in each state, `STOP_REPS`
/// times each (default 5). Run by `bench/stop.sh`.
#[test]
#[ignore = "a bench: bench/stop.sh"]
fn stop_times_in_each_state() {
    let reps: usize = std::env::var("STOP_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    println!("| state | median | max | runs |");
    println!("|---|---|---|---|");
    for state in [
        "polling",
        "phase",
        "held fragment",
        "delivering",
        "drip-feeding server",
        "stalled proxy",
        "hanging name lookup",
    ] {
        let mut times: Vec<f64> = Vec::new();
        for _ in 0..reps {
            let (_server, mut p, _proxy) = into_state(state);
            let t = Instant::now();
            p.signal(libc::SIGTERM);
            let status = p.wait_exit(T);
            times.push(t.elapsed().as_secs_f64());
            assert!(status.success(), "{state}: {status}\n{}", p.diagnostics());
        }
        times.sort_by(f64::total_cmp);
        println!("| {state} | {:.2} s | {:.2} s | {reps} |", times[times.len() / 2], times[times.len() - 1]);
    }
}
