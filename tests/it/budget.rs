//! Issue 15, the fleet's share of the server: the request budget of a
//! running phase (live output, cancel checks), jitter, one agent per run
//! dir, systemd notifications, the disk guard, the kill grace period.

use std::time::{Duration, Instant};

use crate::fake_server::{FakeServer, Fault, FaultAction};
use crate::harness::{AGENT_ID, Agent, QUEUE, job_json, unique_id};
use crate::small_disk::SmallDisk;

const T: Duration = Duration::from_secs(30);

fn completed(s: &FakeServer, job: &str) -> bool {
    s.job_states_posted(job).iter().any(|x| x == "complete")
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The first log line holding `marker` and the hold it logged right after
/// it ("… requests held back 2.5 s more", "… held back for 2.5 s").
fn logged_hold(log: &str, marker: &str) -> (String, f64) {
    let line = log.lines().find(|l| l.contains(marker)).unwrap_or_else(|| panic!("no {marker:?} in the log:\n{log}"));
    let hold = line
        .split(marker)
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("hold not read from {line:?}"));
    (line.to_string(), hold)
}

/// The end of an outage logs how long what is tried again later still waits.
const RETURN_HOLD: &str = "answering again; requests held back ";

/// With an `output_interval` of an hour: the phase's first output (its
/// banner, the first lines) goes at once, up to the bucket's burst of three
/// fragments, then nothing more while the phase keeps printing, and the
/// rest in the final flush; with a cancel check interval of an hour, at
/// most one job-state request while the phase runs.
#[test]
fn live_output_first_at_once_then_at_most_the_burst_within_the_interval() {
    let server = FakeServer::start();
    let agent = Agent::new(&server).set("output_interval", "3600").set("cancel_check_interval", "3600").command(
        "test",
        "echo first; touch started; i=0; while [ ! -f go ]; do i=$((i+1)); echo line $i; sleep 0.01; done; echo last",
    );
    let mut p = agent.spawn();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data": {"test_cmds": "x"}}"#));
    let run = agent.run_dir(&job);
    wait_for("the phase to start", || run.join("started").exists());
    let state_gets = || server.requests_to("GET", &format!("/v1/result/{job}")).len();
    let gets_at_start = state_gets();
    server.wait_until(T, "the first output, sent at once", |s| {
        s.log_text_phase(&job, "output", "test").contains("Starting testflinger test phase")
    });
    // Much more output after the first fragments went.
    wait_for("50 more lines in the log", || {
        std::fs::read_to_string(run.join("test.log")).unwrap_or_default().contains("line 50\n")
    });
    let live: Vec<_> = server.fragments(&job, "output").into_iter().filter(|f| f.phase == "test").collect();
    assert!(live.len() <= 3, "at most the burst while the output keeps coming: {live:?}");
    // The first check comes at a random point of the hour (the fleet's
    // checks out of step): rarely, but possibly, now.
    assert!(state_gets() <= gets_at_start + 1, "at most one cancel check within the interval");
    std::fs::write(run.join("go"), "").expect("write go");
    server.wait_until(T, "job complete", |s| completed(s, &job));
    let text = server.log_text_phase(&job, "output", "test");
    assert!(text.contains("\nfirst\nline 1\n") && text.contains("line 50\n") && text.ends_with("last\n"), "{text}");
    let test_fragments = server.fragments(&job, "output").iter().filter(|f| f.phase == "test").count();
    assert!(test_fragments <= 4, "the burst, then the rest in the final flush: {test_fragments}");
    p.kill();
}

/// The connector's start line takes the agent's first fragment (with the
/// banner); the phase's first real line, written later, still goes at once
/// rather than an `output_interval` (here an hour) after it: the server has
/// it while the phase waits on the test. The fragments arrive in number
/// order, each number once.
#[test]
fn a_line_after_the_start_line_goes_without_waiting_an_interval() {
    let server = FakeServer::start();
    let agent = Agent::new(&server).set("output_interval", "3600").set("cancel_check_interval", "3600").command(
        "test",
        "echo connector start; touch started; while [ ! -f go ]; do sleep 0.01; done; \
         echo first real line; while [ ! -f end ]; do sleep 0.01; done; echo last",
    );
    let mut p = agent.spawn();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data": {"test_cmds": "x"}}"#));
    let run = agent.run_dir(&job);
    wait_for("the phase to start", || run.join("started").exists());
    server.wait_until(T, "the start line", |s| s.log_text_phase(&job, "output", "test").contains("connector start\n"));
    std::fs::write(run.join("go"), "").expect("write go");
    server.wait_until(T, "the first real line while the phase runs", |s| {
        s.log_text_phase(&job, "output", "test").contains("first real line\n")
    });
    assert!(!completed(&server, &job), "the phase is still running");
    std::fs::write(run.join("end"), "").expect("write end");
    server.wait_until(T, "job complete", |s| completed(s, &job));
    let numbers: Vec<i64> = server.fragments(&job, "output").iter().map(|f| f.number).collect();
    let expected: Vec<i64> = (0..numbers.len() as i64).collect();
    assert_eq!(numbers, expected, "fragments arrive in order, each number once");
    let text = server.log_text_phase(&job, "output", "test");
    assert!(text.ends_with("connector start\nfirst real line\nlast\n"), "{text}");
    p.kill();
}

/// A chatty phase (a line every 10 ms) over N intervals of 0.25 s posts at
/// most N + 3 live fragments (one per interval plus the burst) and the
/// final flush; the output arrives whole and in order. N is counted from
/// before the job is offered to after its end is seen, so it can only be
/// too large: a loaded machine loosens the bound, never breaks it.
#[test]
fn a_chatty_phase_posts_at_most_one_fragment_per_interval_plus_the_burst() {
    let server = FakeServer::start();
    let interval = 0.25;
    let agent = Agent::new(&server)
        .set("output_interval", &interval.to_string())
        .command("test", "i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); sleep 0.01; done");
    let mut p = agent.spawn();
    let job = unique_id();
    let began = Instant::now();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data": {"test_cmds": "x"}}"#));
    server.wait_until(T, "job complete", |s| completed(s, &job));
    let intervals = (began.elapsed().as_secs_f64() / interval).ceil() as usize;
    let test: Vec<_> = server.fragments(&job, "output").into_iter().filter(|f| f.phase == "test").collect();
    assert!(test.len() <= intervals + 3 + 1, "{} fragments over {intervals} intervals", test.len());
    let numbers: Vec<i64> = test.iter().map(|f| f.number).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "in order, each number once: {numbers:?}");
    let text: String = test.iter().map(|f| f.data.as_str()).collect();
    let lines: String = (0..200).map(|i| format!("line {i}\n")).collect();
    assert!(text.ends_with(&lines), "{text}");
    p.kill();
}

/// A logged duration ("412 ms", "1.2 s", "3 min"; see `human::duration`)
/// in seconds.
fn secs(text: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = text.strip_suffix(" ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix(" min") {
        (n, 60.0)
    } else {
        (text.strip_suffix(" s")?, 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

/// The waits the agent logged after `marker` (the rest of the line).
fn waits(log: &str, marker: &str) -> Vec<f64> {
    log.lines().filter(|l| l.contains(marker)).filter_map(|l| secs(l.rsplit_once(WAIT)?.1.trim())).collect()
}

/// How a logged wait is introduced: "retrying in 1.2 s", "next poll in 500 ms".
const WAIT: &str = " in ";

/// Polls are spread ±20 % around `polling_interval`, and the retries while
/// the server is away are spread over the whole (doubling) backoff, so a
/// fleet started together does not stay in step.
#[test]
fn polling_and_outage_retries_are_jittered() {
    let server = FakeServer::start();
    server.stop_listening();
    // Each retry's wait is logged at DEBUG (the first, with the reason, at WARNING).
    let agent = Agent::new(&server).set("polling_interval", "0.5").set("logging_level", "DEBUG");
    let mut p = agent.spawn();
    wait_for("four retries while the server is away", || waits(&p.log_text(), "not reachable").len() >= 4);
    server.resume_listening();
    wait_for("six polls", || waits(&p.log_text(), "next poll in ").len() >= 6);
    p.kill();
    let log = p.log_text();
    let retries = waits(&log, "not reachable");
    // Without jitter: 0.5, 1, 2, 4 s exactly.
    let mut cap = 0.5;
    for w in &retries[..4] {
        assert!((0.1 - 1e-9..=cap + 1e-9).contains(w), "retry wait {w} outside [0.1, {cap}]: {retries:?}");
        cap *= 2.0;
    }
    assert!(retries[..4].iter().zip([0.5, 1.0, 2.0, 4.0]).any(|(w, plain)| (w - plain).abs() > 1e-6), "{retries:?}");
    let polls = waits(&log, "next poll in ");
    assert!(polls.iter().all(|w| (0.4 - 1e-9..=0.6 + 1e-9).contains(w)), "poll waits outside 0.5 s ± 20 %: {polls:?}");
    let (lo, hi) = polls.iter().fold((f64::MAX, 0.0f64), |(lo, hi), w| (lo.min(*w), hi.max(*w)));
    assert!(hi - lo > 0.001, "poll waits all the same: {polls:?}");
}

/// A second agent on the same `execution_basedir` exits at once (73) with
/// one line naming the first one's pid; once the first is gone (killed,
/// so the kernel released its lock), an agent starts there again.
#[test]
fn a_second_agent_on_the_same_run_dir_exits_naming_the_first() {
    let server = FakeServer::start();
    let agent = Agent::new(&server);
    let data_gets = |s: &FakeServer| s.requests_to("GET", "/v1/agents/data/").len();
    let mut first = agent.spawn();
    server.wait_until(T, "the first agent polling", |s| data_gets(s) >= 1);
    let mut second = agent.spawn();
    let status = second.wait_exit(T);
    assert_eq!(status.code(), Some(73), "{}", second.diagnostics());
    let err = second.stderr_text();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("in use by another agent (pid {})", first.pid())), "{err}");
    assert!(first.try_wait().is_none(), "the first agent keeps running");
    first.kill();
    let before = data_gets(&server);
    let mut third = agent.spawn();
    server.wait_until(T, "an agent polling again", |s| data_gets(s) > before);
    assert!(third.try_wait().is_none(), "{}", third.diagnostics());
    third.kill();
}

/// `kill_grace`: a cancelled phase that ignores SIGTERM gets SIGKILL after
/// the configured period (the log names it), and the job still ends.
#[test]
fn kill_grace_is_the_configured_period_between_sigterm_and_sigkill() {
    let server = FakeServer::start();
    let agent = Agent::new(&server)
        .set("kill_grace", "0.1")
        .set("cancel_check_interval", "0.1")
        .command("test", "trap 'echo got-term' TERM; touch started; while :; do sleep 0.05; done")
        .arg("--once");
    // Queued before the start: `--once` takes whatever its first poll finds.
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data": {"test_cmds": "x"}}"#));
    let mut p = agent.spawn();
    wait_for("the phase to start", || agent.run_dir(&job).join("started").exists());
    server.cancel_job(&job);
    assert!(p.wait_exit(T).success(), "{}", p.diagnostics());
    let log = p.log_text();
    assert!(log.contains("the phase did not end within 100 ms of SIGTERM; sending SIGKILL"), "{log}");
    assert!(server.log_text_phase(&job, "output", "test").contains("got-term"));
}

/// Under systemd `Type=notify`: `READY=1` after start-up, `STATUS=` with
/// what the agent does, `WATCHDOG=1` while `WATCHDOG_USEC` is set, and
/// `STOPPING=1` on SIGTERM; messages as datagrams on `NOTIFY_SOCKET`.
#[test]
fn systemd_notify_ready_status_watchdog_stopping() {
    use std::os::unix::net::UnixDatagram;
    let server = FakeServer::start();
    let agent = Agent::new(&server).set("polling_interval", "0.2");
    let path = agent.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let agent = agent.env("NOTIFY_SOCKET", &path.to_string_lossy()).env("WATCHDOG_USEC", "100000");
    let mut p = agent.spawn();
    let mut got: Vec<String> = Vec::new();
    let read_until = |what: &str, got: &mut Vec<String>, done: &dyn Fn(&[String]) -> bool| {
        let deadline = Instant::now() + T;
        let mut buf = [0u8; 4096];
        while !done(got) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; got {got:?}");
            if let Ok(n) = sock.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    let count = |got: &[String], msg: &str| got.iter().filter(|m| m.lines().any(|l| l == msg)).count();
    read_until("READY, a status and watchdog pings", &mut got, &|g| {
        count(g, "READY=1") == 1 && count(g, "WATCHDOG=1") >= 3 && count(g, "STATUS=waiting for a job") >= 1
    });
    assert!(got[0].starts_with("READY=1\nSTATUS="), "READY first: {got:?}");
    assert_eq!(count(&got, "STATUS=waiting for a job"), 1, "a status is sent when it changes only: {got:?}");
    p.signal(libc::SIGTERM);
    read_until("STOPPING", &mut got, &|g| count(g, "STOPPING=1") == 1);
    assert!(p.wait_exit(T).success());
}

/// When stderr is the journal (`JOURNAL_STREAM` names its device and
/// inode), log lines there carry `<N>` priorities and no timestamp; the
/// log file keeps its timestamps.
#[test]
fn journal_stderr_gets_priority_prefixes_and_no_timestamps() {
    use std::os::unix::fs::MetadataExt;
    let server = FakeServer::start();
    let agent = Agent::new(&server);
    // The harness opens stderr-0.txt with File::create: same inode.
    let stderr = agent.dir().join("stderr-0.txt");
    std::fs::write(&stderr, "").expect("create stderr file");
    let meta = std::fs::metadata(&stderr).expect("stat");
    let agent = agent.env("JOURNAL_STREAM", &format!("{}:{}", meta.dev(), meta.ino()));
    let out = agent.run_once(T);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(["<3>", "<4>", "<6>", "<7>"].iter().any(|p| line.starts_with(p)), "{line:?} in\n{text}");
        assert!(!line.starts_with('['), "no timestamp: {line:?}");
    }
    assert!(text.lines().any(|l| l.starts_with("<6>testflinger-agent ")), "{text}");
    let log = std::fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).expect("log file");
    // The file keeps upstream's layout: `[YY-MM-DD HH:MM:SS]  LEVEL: ...`.
    assert!(log.lines().all(|l| l.starts_with('[')), "{log}");
}

/// The disk guard: with less free space under execution_basedir than
/// `min_free_mb` (here more MiB than any disk has), no job is taken, the
/// agent's state comment on the server says why, the log says it once; and
/// the metrics carry the host gauges.
#[test]
fn disk_guard_takes_no_job_says_why_once_and_metrics_show_host_vitals() {
    let server = FakeServer::start();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let agent = Agent::new(&server).set("min_free_mb", "1000000000000").arg("-p").arg(&port.to_string());
    let mut p = agent.spawn();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, ""));
    server.wait_until(T, "the comment saying why", |s| {
        s.agent_data(crate::harness::AGENT_ID)
            .and_then(|d| d.get("comment").and_then(|c| c.as_str().map(String::from)))
            .is_some_and(|c| c.starts_with("Not taking jobs: ") && c.contains("below min_free_mb 1000000000000"))
    });
    let polls = |s: &FakeServer| s.requests_to("GET", "/v1/agents/data/").len();
    let seen = polls(&server);
    server.wait_until(T, "five more polling cycles", |s| polls(s) >= seen + 5);
    assert!(server.requests_to("GET", "/v1/job").is_empty(), "no job asked for");
    assert_eq!(server.queued_jobs(), 1);
    assert_eq!(p.log_text().matches("Not taking jobs: ").count(), 1, "logged once");

    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    use std::io::{Read, Write};
    c.set_read_timeout(Some(T)).expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("scrape");
    let mut body = String::new();
    c.read_to_string(&mut body).expect("read scrape");
    let value = |name: &str| -> Option<f64> {
        body.lines().find_map(|l| l.strip_prefix(name)?.split_once("} ")?.1.trim().parse().ok())
    };
    for name in [
        "testflinger_agent_disk_free_bytes",
        "testflinger_agent_memory_available_bytes",
        "testflinger_agent_resident_memory_bytes",
    ] {
        assert!(value(name).is_some_and(|v| v > 0.0), "{name} in\n{body}");
    }
    if std::path::Path::new("/sys/class/thermal/thermal_zone0/temp").exists() {
        assert!(value("testflinger_agent_cpu_temperature_celsius").is_some(), "{body}");
    }
    p.kill();
}

/// The disk guard lets go when space returns: on a small tmpfs, a file
/// fills it below `min_free_mb`, no job is taken; the file goes, the
/// comment is cleared, the job runs.
#[test]
fn disk_guard_takes_jobs_again_when_space_returns() {
    let server = FakeServer::start();
    let agent = Agent::new(&server);
    let small = agent.dir().join("small-disk");
    std::fs::create_dir_all(&small).expect("mkdir");
    let Some(disk) = SmallDisk::mount(&small, 8) else { return };
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![0u8; 6 << 20]).expect("fill the tmpfs");
    let agent = disk
        .enter(agent)
        .set("execution_basedir", &crate::harness::yaml_str(&small.join("run").to_string_lossy()))
        .set("min_free_mb", "4")
        .command("test", "echo ran");
    let mut p = agent.spawn();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data": {"test_cmds": "x"}}"#));
    let comment = |s: &FakeServer| {
        s.agent_data(crate::harness::AGENT_ID).and_then(|d| d.get("comment").and_then(|c| c.as_str().map(String::from)))
    };
    server.wait_until(T, "the low-space comment", |s| comment(s).is_some_and(|c| c.contains("below min_free_mb 4")));
    assert!(server.requests_to("GET", "/v1/job").is_empty(), "no job asked for");
    std::fs::remove_file(&filler).expect("free the space");
    server.wait_until(T, "job complete", |s| completed(s, &job));
    assert!(p.log_text().contains("again; taking jobs"), "{}", p.log_text());
    // The comment was cleared after the low-space one.
    let comments: Vec<String> = server
        .requests_to("POST", "/v1/agents/data/")
        .iter()
        .filter_map(|r| r.json()?.get("comment")?.as_str().map(String::from))
        .collect();
    let low = comments.iter().position(|c| c.contains("below min_free_mb 4")).expect("low-space comment posted");
    assert!(comments[low + 1..].iter().any(|c| c.is_empty()), "{comments:?}");
    p.kill();
}

/// During an outage's hold an idle agent sends nothing: no reachability
/// probe and no error line per poll; it sleeps until the hold is over and
/// then polls again.
#[test]
fn an_idle_agent_sends_nothing_while_an_outage_holds_its_calls() {
    let server = FakeServer::start();
    let data = format!("/v1/agents/data/{AGENT_ID}");
    // The start-up read and post fail whole (4 attempts each, 1.75 s apiece
    // ±20 %): 3 s of failures make an outage, and the post begins its hold.
    // Each failure takes 0.15 s, so that the eight span 3 s however the
    // waits between attempts fall (a CI run once had them span 2.95 s).
    let slow_503 = FaultAction::SlowStatus(Duration::from_millis(150), 503);
    server.add_fault(Fault::new(Some("GET"), &data, 4, slow_503.clone()));
    server.add_fault(Fault::new(Some("POST"), &data, 4, slow_503));
    let agent = Agent::new(&server)
        .set("polling_interval", "0.2")
        .set("logging_level", "DEBUG")
        .env("TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX", "3");
    let mut p = agent.spawn();
    server.wait_until(T, "a poll for a job after the hold", |s| !s.requests_to("GET", "/v1/job").is_empty());
    p.kill();
    let log = p.log_text();
    let (_, hold) = logged_hold(&log, "requests held back for ");
    let reqs = server.requests();
    let last_failed = reqs.iter().rposition(|r| r.status == 503).expect("the failed requests were recorded");
    let next = reqs.get(last_failed + 1).unwrap_or_else(|| panic!("nothing after the hold:\n{log}"));
    let gap = next.at.duration_since(reqs[last_failed].at).as_secs_f64();
    // The hold is logged to 0.1 s; before it is over nothing may go out.
    assert!(
        gap >= hold - 0.1,
        "{} {} went {gap:.2} s after the hold of {hold} s began:\n  {}",
        next.method,
        next.path,
        server.request_lines().join("\n  ")
    );
    assert!(!log.contains("not tried"), "held calls were made and logged as failures:\n{log}");
}

/// An idle agent that waited out an outage does not poll the moment its
/// probe gets an answer: the server says how long it holds its requests
/// back (a random part of the outage, capped here at 3 s), and nothing
/// follows the probe before that, nor is a held call made and logged.
#[test]
fn an_idle_agent_back_from_an_outage_polls_after_a_random_hold() {
    let server = FakeServer::start();
    let agent = Agent::new(&server)
        .set("polling_interval", "0.2")
        .set("logging_level", "DEBUG")
        .env("TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX", "3");
    let mut p = agent.spawn();
    server.wait_until(T, "a first poll", |s| !s.requests_to("GET", "/v1/job").is_empty());
    server.stop_listening();
    let stopped = Instant::now();
    // Down until a probe has failed 3.5 s after the stop: for the agent,
    // failing since its first attempt after the stop, that is an outage.
    let probes = || p.log_text().matches("not reachable").count();
    let seen = std::cell::Cell::new(0);
    wait_for("a probe failing 3.5 s into the outage", || {
        let now = probes();
        let late = now > seen.get() && seen.get() > 0 && stopped.elapsed() >= Duration::from_millis(3500);
        seen.set(now);
        late
    });
    let before = server.requests().len();
    server.resume_listening();
    server.wait_until(T, "a poll after the outage", |s| s.requests()[before..].iter().any(|r| r.path == "/v1/job"));
    p.kill();
    let log = p.log_text();
    let (line, hold) = logged_hold(&log, RETURN_HOLD);
    assert!((0.0..=3.05).contains(&hold), "hold {hold} s outside (0, 3 s]: {line}");
    let reqs = server.requests();
    let (probe, next) = (&reqs[before], &reqs[before + 1]);
    assert_eq!((probe.method.as_str(), probe.path.as_str()), ("GET", "/v1/"), "the return is found by a probe");
    let gap = next.at.duration_since(probe.at).as_secs_f64();
    assert!(
        gap >= hold - 0.1,
        "{} {} went {gap:.2} s after the probe, within its hold of {hold} s:\n  {}",
        next.method,
        next.path,
        server.request_lines().join("\n  ")
    );
    assert!(!log.contains("not tried") && !log.contains("cannot get a job"), "held calls were made:\n{log}");
}

/// After an outage a running job's live output, cancel checks and
/// heartbeats wait a random part of it (they are tried again later
/// anyway), but what nobody would send again goes at once: the state of
/// each phase that follows, the outcome, the agent's state. A hold over
/// every call once dropped a job's allocate and reserve posts in CI.
#[test]
fn after_an_outage_only_what_is_tried_again_later_is_held_back() {
    let server = FakeServer::start();
    let agent = Agent::new(&server)
        .set("logging_level", "DEBUG")
        .set("output_interval", "0.2")
        .env("TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX", "30")
        .command("test", "echo started; while [ ! -f go ]; do echo tick; sleep 0.1; done; echo done");
    let mut p = agent.spawn();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data": {"test_cmds": "x"}}"#));
    server.wait_until(T, "the test phase's output", |s| s.log_text(&job, "output").contains("tick"));
    server.stop_listening();
    // Failing for 3 s over several calls is an outage; 6 s makes one
    // whose end holds back for a random part of about 6 s.
    let down = Instant::now();
    wait_for("an outage", || p.log_text().contains("requests held back for"));
    while down.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let resumed = server.requests().len();
    server.resume_listening();
    wait_for("the answer that ends the outage", || p.log_text().contains(RETURN_HOLD));
    let (line, hold) = logged_hold(&p.log_text(), RETURN_HOLD);
    // The hold runs from the answer that ended the outage (the first
    // request after the return). Within it the running phase sends nothing
    // (its output, cancel checks and heartbeats are tried again later):
    // watched for up to 2 s of it.
    let answer_at = server.requests()[resumed].at;
    let hold_ends = answer_at + Duration::from_secs_f64(hold);
    let watched = answer_at + Duration::from_secs_f64((hold - 0.2).clamp(0.0, 2.0));
    while Instant::now() < watched {
        std::thread::sleep(Duration::from_millis(20));
    }
    let during: Vec<String> =
        server.requests()[resumed + 1..].iter().filter(|r| r.at < watched).map(|r| r.line()).collect();
    assert!(during.is_empty(), "sent within the hold of {hold} s after the outage: {during:?}\n{line}");
    std::fs::write(agent.run_dir(&job).join("go"), "").expect("write go");
    server.wait_until(T, "the job complete", |s| completed(s, &job));
    let completed_at = Instant::now();
    p.kill();
    // The phases after the test posted their state, as a job without an
    // outage does, even while the hold lasted.
    let states = server.job_states_posted(&job);
    let after_test: Vec<&str> =
        states.iter().map(String::as_str).skip_while(|s| *s != "test").skip_while(|s| *s == "test").collect();
    assert_eq!(after_test, ["allocate", "reserve", "complete"], "all states: {states:?}");
    // With 2 s or more of the hold left when the phase ended, the job's
    // end did not wait for it.
    if hold_ends.saturating_duration_since(watched) > Duration::from_secs(2) {
        assert!(
            completed_at < hold_ends,
            "the job completed {:.1} s after the return, after the hold of {hold} s: it waited",
            completed_at.duration_since(answer_at).as_secs_f64()
        );
    }
    let log = p.log_text();
    assert!(!log.contains("result update not posted"), "a state post was dropped:\n{log}");
}

/// Outcomes kept through an outage are tried again later anyway: the first
/// request answered after it ends the outage, and the rest of the delivery
/// waits out the hold that follows (a random part of the outage) instead of
/// going with it. A round cut short so is not a failed delivery round.
#[test]
fn kept_outcomes_wait_out_the_hold_after_an_outage() {
    let server = FakeServer::start();
    let agent = Agent::new(&server)
        .set("logging_level", "DEBUG")
        .set("polling_interval", "0.2")
        .env("TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX", "30")
        .command("test", "echo started; while [ ! -f go ]; do sleep 0.1; done; echo done");
    let mut p = agent.spawn();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data": {"test_cmds": "x"}}"#));
    server.wait_until(T, "the test phase", |s| s.job_states_posted(&job).iter().any(|x| x == "test"));
    server.stop_listening();
    let down = Instant::now();
    wait_for("an outage", || p.log_text().contains("requests held back for"));
    // The job ends during the outage: its outcome is kept.
    std::fs::write(agent.run_dir(&job).join("go"), "").expect("write go");
    wait_for("the job's end", || p.log_text().contains(&format!("job {job} ended")));
    while down.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = server.requests().len();
    server.resume_listening();
    server.wait_until(T, "the kept outcome", |s| completed(s, &job));
    p.kill();
    let log = p.log_text();
    let (_, hold) = logged_hold(&log, RETURN_HOLD);
    let reqs = server.requests();
    let first = &reqs[before];
    let outcome = reqs[before..]
        .iter()
        .find(|r| r.method == "POST" && r.path == format!("/v1/result/{job}"))
        .expect("the outcome was posted");
    let gap = outcome.at.duration_since(first.at).as_secs_f64();
    assert!(
        gap >= hold - 0.1,
        "the outcome went {gap:.2} s after the first answer, within the hold of {hold} s:\n  {}",
        server.request_lines().join("\n  ")
    );
    let after = &log[log.find(RETURN_HOLD).unwrap_or(0)..];
    assert!(!after.contains("still undelivered"), "the round cut by the hold counted as failed:\n{after}");
}
