//! The phase runner through the real binary: live fragments against the
//! log file, secret masking, stop conditions, no orphan processes, agent
//! signals, exit codes.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fake_server::{FakeServer, Fault, FaultAction};
use crate::harness::{Agent, AgentSetup, QUEUE, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(60);

/// SHA-256 mask as upstream prints it, computed with the system's tool so
/// the test does not trust the agent's own implementation.
fn mask(secret: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("printf %s \"$S\" | sha256sum")
        .env("S", secret)
        .output()
        .expect("sha256sum");
    format!("**{}**", &String::from_utf8_lossy(&out.stdout)[..6])
}

/// A cleanup command that keeps a copy of `test.log` (the run dir is
/// removed once the job is delivered).
fn keep_test_log(agent: AgentSetup) -> AgentSetup {
    let copy = agent.dir().join("test.log.copy");
    agent.command("cleanup", &format!("cp test.log '{}'", copy.display()))
}

/// Fragment text of `phase`, one fragment per number (the last one sent
/// wins: a fragment the agent gave up on may still have reached the server).
fn phase_text(server: &FakeServer, job: &str, phase: &str) -> String {
    let mut frags = server.fragments(job, "output");
    frags.retain(|f| f.phase == phase);
    let mut by_number = std::collections::BTreeMap::new();
    for f in frags {
        by_number.insert(f.number, f.data);
    }
    by_number.into_values().collect()
}

fn status(server: &FakeServer, job: &str, phase: &str) -> Option<i64> {
    server.result(job)?.get("status")?.get(phase)?.as_i64()
}

/// A phase that leaves a tree behind if it can: the shell, a `setsid`
/// daemon, a `sleep` grandchild under a background shell, and a `sleep`
/// child, all recording their pids.
fn tree_command(pids: &Path) -> String {
    let p = pids.display();
    format!(
        "echo $$ >> {p}; \
         setsid sh -c 'echo $$ >> {p}; exec sleep 300' & \
         sh -c 'sleep 300 & echo $! >> {p}; wait' & \
         sleep 300 & echo $! >> {p}; echo tree started; wait"
    )
}

fn read_pids(path: &Path) -> Vec<i32> {
    fs::read_to_string(path).unwrap_or_default().split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// Pids of `pids` still alive (a zombie counts: nobody reaped it).
fn alive(pids: &[i32]) -> Vec<i32> {
    pids.iter().copied().filter(|p| Path::new(&format!("/proc/{p}")).exists()).collect()
}

fn wait_for_tree(pids_file: &Path, p: &mut crate::harness::AgentProc) -> Vec<i32> {
    let deadline = Instant::now() + T;
    loop {
        let pids = read_pids(pids_file);
        if pids.len() >= 4 {
            assert_eq!(alive(&pids), pids, "the tree runs before it is stopped");
            return pids;
        }
        assert!(Instant::now() < deadline, "the tree never started\n{}", p.diagnostics());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fragments_equal_the_log_byte_for_byte_even_after_503s() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    // The first fragments are refused: the stream must catch up from the file.
    server.add_fault(Fault::status("POST", &format!("/v1/result/{job}/log/output"), 3, 503));
    let agent = keep_test_log(Agent::new(&server)).command(
        "test",
        "for i in $(seq 1 12); do seq -f \"line $i.%g é \\\"q\\\" \\\\ tab\t\" 1 3000; printf 'no newline '; sleep 0.1; done; echo end",
    );
    assert!(agent.run_once(T).status.success());
    let log = fs::read(agent.dir().join("test.log.copy")).expect("test.log copy");
    let text = phase_text(&server, &job, "test");
    assert!(text.ends_with("end\n"));
    assert_eq!(text.len(), log.len(), "fragments and log differ in length");
    assert!(text.as_bytes() == log.as_slice(), "fragments differ from test.log");
    let refused =
        server.requests_to("POST", &format!("/v1/result/{job}/log/output")).iter().filter(|r| r.status == 503).count();
    assert_eq!(refused, 3, "the 503s were met");
    // Several fragments, numbered from 0 without gaps.
    let mut numbers: Vec<i64> = server.fragments(&job, "output").iter().map(|f| f.number).collect();
    numbers.sort();
    numbers.dedup();
    assert!(numbers.len() > 1);
    assert_eq!(numbers, (0..numbers.len() as i64).collect::<Vec<_>>());
}

/// Behind a proxy whose body limit (nginx's `client_max_body_size`) is
/// smaller than the agent's fragments, a fragment refused with 413 goes
/// again under its number with half the bytes: the whole output arrives,
/// byte for byte, in fragments the proxy lets through, and the job ends.
#[test]
fn fragments_refused_as_too_large_are_cut_until_they_pass() {
    const LIMIT: usize = 200 << 10;
    let server = FakeServer::start();
    server.set_body_limit(LIMIT);
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    // About 2 MB at once, then a line after a pause: the final flush and a
    // live fragment both meet the limit.
    let agent = keep_test_log(Agent::new(&server))
        .command("test", "seq -f 'line %g of output that is long enough' 1 50000; sleep 0.5; echo end");
    assert!(agent.run_once(T).status.success());
    let log = fs::read(agent.dir().join("test.log.copy")).expect("test.log copy");
    let text = phase_text(&server, &job, "test");
    assert!(
        text.as_bytes() == log.as_slice(),
        "fragments differ from test.log ({} vs {} bytes)",
        text.len(),
        log.len()
    );
    let posts = server.requests_to("POST", &format!("/v1/result/{job}/log/output"));
    assert!(posts.iter().any(|r| r.status == 413), "no fragment met the limit");
    assert!(
        posts.iter().filter(|r| r.status == 200).all(|r| r.body.len() <= LIMIT),
        "a stored fragment over the limit"
    );
    let states = server.job_states_posted(&job);
    assert!(states.iter().any(|s| s == "complete"), "outcome not delivered: {states:?}");
}

#[test]
fn secrets_are_masked_across_reads_overlapping_and_literally_and_never_leave_the_agent() {
    let server = FakeServer::start();
    let job = unique_id();
    let secrets =
        r#"{"DOT_STAR":"s3cr.t*","LONG":"overlapping-key","SHORT":"overlap","EMPTY":"","BRACKETS":"[a-z]+(x)|$"}"#;
    server.push_job(&job_json(&job, QUEUE, &format!(r#"{{"test_data":{{"test_cmds":"x","secrets":{secrets}}}}}"#)));
    let agent = keep_test_log(Agent::new(&server)).command(
        "test",
        // A secret split across two writes (two reads for the agent), one
        // that a regex would also match elsewhere, overlapping secrets, and
        // regex metacharacters.
        "printf 'split=s3cr'; sleep 0.3; printf '.t* end\\n'; \
         echo 'pattern-like=s3crXt*'; \
         echo \"env=$DOT_STAR long=$LONG short=$SHORT brackets=$BRACKETS empty=[$EMPTY]\"; \
         printf 'overlapping-ke'; sleep 0.3; echo 'y tail'",
    );
    assert!(agent.run_once(T).status.success());
    let (dot, long, short, br) = (mask("s3cr.t*"), mask("overlapping-key"), mask("overlap"), mask("[a-z]+(x)|$"));
    let expected = format!(
        "split={dot} end\npattern-like=s3crXt*\nenv={dot} long={long} short={short} brackets={br} empty=[]\n{long} tail\n"
    );
    let text = phase_text(&server, &job, "test");
    assert!(text.ends_with(&expected), "got:\n{text}\nexpected to end with:\n{expected}");
    let log = fs::read_to_string(agent.dir().join("test.log.copy")).expect("test.log copy");
    assert!(log.ends_with(&expected), "{log}");
    // Nothing the agent sent or wrote holds a secret.
    for r in server.requests() {
        for s in ["s3cr.t*", "overlapping-key", "[a-z]+(x)|$"] {
            assert!(!r.body_text().contains(s), "{s} sent in {}", r.line());
        }
    }
    for entry in walk(agent.dir()) {
        let bytes = fs::read(&entry).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("s3cr.t*") && !text.contains("overlapping-key"),
            "secret on disk in {}",
            entry.display()
        );
    }
}

/// Every file under `dir` except the agent's config (which holds no secret,
/// but is not the agent's output either).
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

const WEBHOOK: &str = r#""job_status_webhook":"http://hook.example/x""#;

#[test]
fn global_timeout_writes_its_line_emits_its_event_and_leaves_no_process() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        &format!(r#"{{{WEBHOOK},"global_timeout":2,"test_data":{{"test_cmds":"x"}}}}"#),
    ));
    let agent = Agent::new(&server);
    let pids_file = agent.dir().join("pids");
    let agent = agent.command("test", &tree_command(&pids_file)).command("cleanup", "echo cleaned");
    let mut p = agent.spawn_with(&["--once"]);
    let pids = wait_for_tree(&pids_file, &mut p);
    server.wait_until(T, "test status posted", |s| status(s, &job, "test").is_some());
    // The tree is gone by the time the phase's status is posted.
    assert_eq!(alive(&pids), Vec::<i32>::new(), "left behind after the timeout");
    assert!(p.wait_exit(T).success());
    let text = phase_text(&server, &job, "test");
    assert!(text.contains("ERROR: Global timeout reached! (2s)"), "{text}");
    assert!(server.events(&job).iter().any(|e| e == "global_timeout"), "{:?}", server.events(&job));
    assert_ne!(status(&server, &job, "test"), Some(0));
    assert_eq!(status(&server, &job, "cleanup"), Some(0), "cleanup still runs");
}

#[test]
fn output_timeout_writes_its_line_and_emits_its_event() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(
        &job,
        QUEUE,
        &format!(r#"{{{WEBHOOK},"output_timeout":1,"test_data":{{"test_cmds":"x"}}}}"#),
    ));
    // Waited for rather than stopped, the phase would print its last line
    // (or outlast run_once's deadline).
    let agent = Agent::new(&server).command("test", "echo quiet now; sleep 30; echo still running");
    assert!(agent.run_once(T).status.success());
    let text = phase_text(&server, &job, "test");
    assert!(text.contains("quiet now\n") && text.contains("ERROR: Output timeout reached! (1s)"), "{text}");
    assert!(!text.contains("still running"), "the phase was waited for, not stopped: {text}");
    assert!(server.events(&job).iter().any(|e| e == "output_timeout"));
}

#[test]
fn cancel_stops_the_phase_and_leaves_no_process() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, &format!(r#"{{{WEBHOOK},"test_data":{{"test_cmds":"x"}}}}"#)));
    let agent = Agent::new(&server);
    let pids_file = agent.dir().join("pids");
    let agent = agent.command("test", &tree_command(&pids_file)).command("cleanup", "echo cleaned");
    let mut p = agent.spawn_with(&["--once"]);
    let pids = wait_for_tree(&pids_file, &mut p);
    // The tree sleeps 300 s: only the cancel ends the phase within T.
    server.cancel_job(&job);
    server.wait_until(T, "test status posted", |s| status(s, &job, "test").is_some());
    assert_eq!(alive(&pids), Vec::<i32>::new(), "left behind after the cancel");
    assert!(p.wait_exit(T).success());
    let text = phase_text(&server, &job, "test");
    assert!(text.contains("Job cancellation was requested, exiting."), "{text}");
    assert!(server.events(&job).iter().any(|e| e == "cancelled"));
    assert!(status(&server, &job, "cleanup").is_some(), "cleanup still runs");
}

#[test]
fn sigterm_to_the_agent_mid_phase_leaves_no_process_and_delivers_the_outcome() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server);
    let pids_file = agent.dir().join("pids");
    let agent = agent.command("test", &tree_command(&pids_file)).command("cleanup", "echo cleanup ran");
    let mut p = agent.spawn();
    let pids = wait_for_tree(&pids_file, &mut p);
    p.signal(libc::SIGTERM);
    p.wait_exit(T);
    assert_eq!(alive(&pids), Vec::<i32>::new(), "left behind after SIGTERM");
    let result = server.result(&job).expect("outcome delivered");
    assert_eq!(result.get("job_state").and_then(Json::as_str), Some("complete"), "{result}");
    assert!(status(&server, &job, "test").is_some_and(|c| c != 0), "{result}");
    assert!(phase_text(&server, &job, "test").contains("tree started"));
    assert!(phase_text(&server, &job, "cleanup").contains("cleanup ran"));
}

#[test]
fn killed_by_signal_is_reported_distinctly() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, &format!(r#"{{{WEBHOOK},"test_data":{{"test_cmds":"x"}}}}"#)));
    let agent = Agent::new(&server).command("test", "echo dying; kill -9 $$");
    assert!(agent.run_once(T).status.success());
    assert_eq!(status(&server, &job, "test"), Some(137));
    assert!(phase_text(&server, &job, "test").contains("killed by signal 9"));
    let posts = server.event_posts(&job);
    let last = posts.last().expect("events posted");
    let fail = last
        .get("events")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .find(|e| e.get("event_name").and_then(Json::as_str) == Some("test_fail"));
    let detail = fail.and_then(|e| e.get("detail")).and_then(Json::as_str).unwrap_or("");
    assert!(detail.contains("killed by signal 9"), "{last}");
}

/// Runs one job whose test phase makes the file `armed`, prints `first`,
/// waits (20 s at most) until the server holds an answer to `method path`
/// (`path` given the job), writes 3 MiB (three times what the pipe holds),
/// then makes the file `released`. From `armed` to `released` the server
/// holds every such answer: if the agent stopped draining the pipe while
/// it waits for one, the writer would block, `released` would never come
/// and the answer would be a 503. Checks at least one answer was held,
/// none gave up, and every byte reached `test.log` and the fragments.
fn write_while_held(first: &str, method: &str, path: impl Fn(&str) -> String) {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = keep_test_log(Agent::new(&server));
    let dir = agent.dir();
    let (armed, holding, released) = (dir.join("armed"), dir.join("holding"), dir.join("released"));
    let path = path(&job);
    let hold = FaultAction::StallUntil {
        armed: armed.clone(),
        holding: holding.clone(),
        release: released.clone(),
        max: Duration::from_secs(20),
    };
    server.add_fault(Fault::new(Some(method), &path, 1000, hold));
    let agent = agent.command(
        "test",
        &format!(
            "touch '{}'; echo {first}; i=0; while [ ! -e '{}' ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \
             head -c 3145728 /dev/zero | tr '\\0' x; echo; touch '{}'",
            armed.display(),
            holding.display(),
            released.display()
        ),
    );
    assert!(agent.run_once(T).status.success());
    let log = fs::read(agent.dir().join("test.log.copy")).expect("test.log copy");
    assert_eq!(log.iter().filter(|&&b| b == b'x').count(), 3 << 20, "every byte in test.log");
    assert!(phase_text(&server, &job, "test").as_bytes() == log.as_slice(), "fragments differ from test.log");
    let answers: Vec<u16> =
        server.requests_to(method, &path).iter().filter(|r| r.path == path).map(|r| r.status).collect();
    assert!(!answers.contains(&503), "{method} {path} answered {answers:?}: the writer blocked while one was held");
    assert!(server.released_holds() >= 1, "no {method} {path} came while the phase ran: {answers:?}");
}

#[test]
fn the_child_keeps_writing_while_a_fragment_waits_for_its_answer() {
    // The first line's fragment is held until the phase has written all
    // 3 MiB: the agent drains the pipe while it waits.
    write_while_held("first line", "POST", |job| format!("/v1/result/{job}/log/output"));
}

#[test]
fn the_child_keeps_writing_while_a_cancel_check_waits_for_its_answer() {
    // The job's state is read every 3 s while a phase runs: the first
    // check into the phase is held until the phase has written all 3 MiB.
    write_while_held("first line", "GET", |job| format!("/v1/result/{job}"));
}

/// The token expires mid-phase and the refresh it needs is held by the
/// server until the phase has written all 3 MiB: the agent drains the pipe
/// while the refresh waits too (it did not: the child blocked on a full
/// pipe until the server gave up on the refresh).
#[test]
fn the_child_keeps_writing_while_a_token_refresh_waits_for_its_answer() {
    let server = FakeServer::start();
    server.require_auth("secret");
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = keep_test_log(Agent::new(&server).token("secret").set("cancel_check_interval", "0.5"));
    let dir = agent.dir();
    let (armed, holding, released) = (dir.join("armed"), dir.join("holding"), dir.join("released"));
    let hold = FaultAction::StallUntil {
        armed: armed.clone(),
        holding: holding.clone(),
        release: released.clone(),
        max: Duration::from_secs(20),
    };
    server.add_fault(Fault::new(Some("POST"), "/v1/oauth2/refresh", 1000, hold));
    let agent = agent.arg("--once").command(
        "test",
        &format!(
            "touch '{}'; echo first line; i=0; while [ ! -e '{}' ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \
             head -c 3145728 /dev/zero | tr '\\0' x; echo; touch '{}'",
            armed.display(),
            holding.display(),
            released.display()
        ),
    );
    let mut p = agent.spawn();
    let deadline = Instant::now() + T;
    while !armed.exists() {
        assert!(Instant::now() < deadline && p.try_wait().is_none(), "the phase never started\n{}", p.diagnostics());
        std::thread::sleep(Duration::from_millis(10));
    }
    server.expire_token();
    let status = p.wait_exit(T);
    assert!(status.success(), "{}", p.diagnostics());
    let log = fs::read(agent.dir().join("test.log.copy")).expect("test.log copy");
    assert_eq!(log.iter().filter(|&&b| b == b'x').count(), 3 << 20, "every byte in test.log");
    let answers: Vec<u16> = server.requests_to("POST", "/v1/oauth2/refresh").iter().map(|r| r.status).collect();
    assert!(server.released_holds() >= 1, "no refresh came while the phase ran: {answers:?}");
    assert!(!answers.contains(&503), "refresh answered {answers:?}: the writer blocked while it was held");
    assert!(phase_text(&server, &job, "test").as_bytes() == log.as_slice(), "fragments differ from test.log");
}

#[test]
fn a_stalled_server_does_not_stall_the_phase() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    // Two live fragments are answered 4 s late, while the child writes more
    // than the pipe holds: the agent keeps draining it while it waits.
    server.add_fault(Fault::new(
        Some("POST"),
        &format!("/v1/result/{job}/log/output"),
        2,
        FaultAction::Stall(Duration::from_secs(4)),
    ));
    let agent = keep_test_log(Agent::new(&server));
    let elapsed = agent.dir().join("elapsed");
    let agent = agent.command(
        "test",
        &format!(
            "t0=$(date +%s); for i in $(seq 1 30); do seq 1 100000; sleep 0.05; done; echo $(( $(date +%s) - t0 )) > '{}'",
            elapsed.display()
        ),
    );
    assert!(agent.run_once(T).status.success());
    let secs: u64 = fs::read_to_string(&elapsed).ok().and_then(|s| s.trim().parse().ok()).expect("elapsed");
    assert!(secs < 15, "the phase took {secs} s while the server stalled");
    let log = fs::read(agent.dir().join("test.log.copy")).expect("test.log copy");
    assert!(
        server.log_text_phase(&job, "output", "test").as_bytes() == log.as_slice(),
        "fragments differ from test.log"
    );
}

/// No output fragment number was stored twice (a retry of a fragment the
/// server had taken, only slowly, would be).
fn assert_no_fragment_stored_twice(server: &FakeServer, job: &str) {
    let numbers: Vec<i64> = server.fragments(job, "output").iter().map(|f| f.number).collect();
    let mut unique = numbers.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), numbers.len(), "a fragment number was stored twice: {numbers:?}");
}

#[test]
fn a_slow_server_gets_each_fragment_once() {
    // Answers 4 s late are slow, not lost (upstream waits 60 s for a log
    // post): the agent waits for them rather than re-sending the fragment,
    // which the server would store a second time under the same number.
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    server.add_fault(Fault::new(
        Some("POST"),
        &format!("/v1/result/{job}/log/output"),
        2,
        FaultAction::Stall(Duration::from_secs(4)),
    ));
    let agent =
        keep_test_log(Agent::new(&server)).command("test", "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.5; done");
    assert!(agent.run_once(T).status.success());
    assert_no_fragment_stored_twice(&server, &job);
    let log = fs::read_to_string(agent.dir().join("test.log.copy")).expect("test.log copy");
    assert_eq!(server.log_text_phase(&job, "output", "test"), log);
    assert_eq!(log.matches("line 1\n").count(), 1, "{log}");
    let agent_log = fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).unwrap_or_default();
    assert!(!agent_log.contains("log fragment not sent"), "a slow answer counted as a failure: {agent_log}");
}

#[test]
fn output_sent_after_the_phase_waits_for_a_slow_answer_too() {
    // The first fragment (the banner) goes at once; the rest is within the
    // output interval when the phase ends, so the end-of-phase flush sends
    // it, and the server holds that answer 4 s. A `server_timeout` of 2 s
    // must not make the agent send it again: the server stores both.
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let path = format!("/v1/result/{job}/log/output");
    server.add_fault(Fault::new(Some("POST"), &path, 1, FaultAction::Pass));
    server.add_fault(Fault::new(Some("POST"), &path, 1, FaultAction::Stall(Duration::from_secs(4))));
    let agent = Agent::new(&server).set("server_timeout", "2").command("test", "echo first; sleep 0.3; echo second");
    assert!(agent.run_once(T).status.success());
    // The held request is stored when its answer goes, maybe after the agent gave up on it.
    server.wait_until(T, "the held answer given", |s| s.stalling() == 0);
    assert_no_fragment_stored_twice(&server, &job);
    let text = phase_text(&server, &job, "test");
    assert_eq!((text.matches("first\n").count(), text.matches("second\n").count()), (1, 1), "{text}");
}

/// A phase whose first output fragment the server holds for 15 s: the
/// phase writes `late` 6 s in, which it must not live to do once `stop`
/// (run when the fragment is held) or its 2 s timeout has ended it.
fn stopped_while_a_fragment_is_held(
    job_fields: &str,
    stop: impl FnOnce(&mut crate::harness::AgentProc),
) -> (FakeServer, String, AgentSetup) {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, &format!(r#"{{{job_fields}"test_data":{{"test_cmds":"x"}}}}"#)));
    server.add_fault(Fault::new(
        Some("POST"),
        &format!("/v1/result/{job}/log/output"),
        1,
        FaultAction::Stall(Duration::from_secs(15)),
    ));
    let agent = Agent::new(&server);
    let late = agent.dir().join("late");
    let agent = agent.command("test", &format!("echo started; sleep 6; touch '{}'; sleep 30", late.display()));
    let mut p = agent.spawn_with(&["--once"]);
    server.wait_until(T, "the first fragment held", |s| s.stalling() > 0);
    // The held fragment may be the banner alone: under load the shell may
    // not have written its line yet, and a stop then would leave none.
    let log = agent.run_dir(&job).join("test.log");
    server.wait_until(T, "the phase's line in its log", |_| {
        fs::read_to_string(&log).unwrap_or_default().contains("started\n")
    });
    stop(&mut p);
    p.wait_exit(T);
    assert!(!late.exists(), "the phase lived on until the held answer came");
    (server, job, agent)
}

#[test]
fn the_agents_stop_ends_the_phase_while_a_fragment_waits_on_a_slow_server() {
    // The held fragment is abandoned a second after the stop and counted
    // as sent (the server had all of it: sending it again could store it
    // twice); the rest of the job is kept and delivered at the next start.
    let mut signalled = None;
    let (server, job, agent) = stopped_while_a_fragment_is_held("", |p| {
        let t = Instant::now();
        p.signal(libc::SIGTERM);
        let status = p.wait_exit(T);
        signalled = Some((t.elapsed(), status));
    });
    let (took, status) = signalled.expect("stopped");
    println!("SIGTERM to exit with a fragment held: {took:?}");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
    server.wait_until(T, "the held answer given", |s| s.stalling() == 0);
    let next = agent.run_once(T);
    assert!(next.status.success(), "{}", String::from_utf8_lossy(&next.stderr));
    server.wait_until(T, "the kept outcome delivered", |s| s.job_states_posted(&job).iter().any(|j| j == "complete"));
    let text = phase_text(&server, &job, "test");
    assert_eq!((text.matches("started\n").count(), text.matches("The agent was stopped").count()), (1, 1), "{text}");
    assert_no_fragment_stored_twice(&server, &job);
}

#[test]
fn a_timeout_ends_the_phase_while_a_fragment_waits_on_a_slow_server() {
    let (server, job, _agent) = stopped_while_a_fragment_is_held(&format!(r#"{WEBHOOK},"global_timeout":2,"#), |_| {});
    let text = phase_text(&server, &job, "test");
    assert!(text.contains("started\n") && text.contains("ERROR: Global timeout reached! (2s)"), "{text}");
    assert!(server.events(&job).iter().any(|e| e == "global_timeout"), "{:?}", server.events(&job));
}
