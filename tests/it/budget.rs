//! Issue 15, the fleet's share of the server: the request budget of a
//! running phase (live output, cancel checks), jitter, one agent per run
//! dir, systemd notifications, the disk guard, the kill grace period.

use std::time::{Duration, Instant};

use crate::fake_server::FakeServer;
use crate::harness::{Agent, QUEUE, job_json, unique_id};

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

/// With an `output_interval` of an hour: the phase's first output (its
/// banner) still goes at once, then nothing more while the phase keeps
/// printing, and the rest in the final flush; with a cancel check
/// interval of an hour, no job-state request while the phase runs.
#[test]
fn live_output_first_at_once_then_at_most_one_fragment_per_interval() {
    let server = FakeServer::start();
    let agent = Agent::new(&server)
        .set("output_interval", "3600")
        .set("cancel_check_interval", "3600")
        .command("test", "echo first; touch started; i=0; while [ ! -f go ]; do i=$((i+1)); echo line $i; sleep 0.01; done; echo last");
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
    // Much more output after the first fragment went.
    wait_for("50 more lines in the log", || {
        std::fs::read_to_string(run.join("test.log")).unwrap_or_default().contains("line 50\n")
    });
    let live: Vec<_> = server.fragments(&job, "output").into_iter().filter(|f| f.phase == "test").collect();
    assert_eq!(live.len(), 1, "one fragment while the output keeps coming: {live:?}");
    assert_eq!(state_gets(), gets_at_start, "no cancel check within the interval");
    std::fs::write(run.join("go"), "").expect("write go");
    server.wait_until(T, "job complete", |s| completed(s, &job));
    let text = server.log_text_phase(&job, "output", "test");
    assert!(text.contains("\nfirst\nline 1\n") && text.contains("line 50\n") && text.ends_with("last\n"), "{text}");
    let test_fragments = server.fragments(&job, "output").iter().filter(|f| f.phase == "test").count();
    assert_eq!(test_fragments, 2, "the first output, then the rest in the final flush");
    p.kill();
}
