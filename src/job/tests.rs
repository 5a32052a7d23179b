//! The job core against the recording fake server: real phase commands
//! (`sh -c` with `echo`, `exit N`, `sleep`), no network, no binary.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::*;
use crate::phase::RECOVERY_FAILED;
use crate::server::Local;
use crate::server::fake::{Call, Fake};
use crate::states::AgentState;

/// Every phase's command prints its name.
const ALL: &str = "setup_command: echo setup-out\nprovision_command: echo provision-out\n\
    firmware_update_command: echo firmware-out\ntest_command: echo test-out\n\
    allocate_command: echo allocate-out\nreserve_command: echo reserve-out\ncleanup_command: echo cleanup-out\n";
const HOOK: &str = r#""job_status_webhook":"http://hook.example""#;

/// A config whose run and results dirs are this test's own (removed on drop).
struct Bench {
    dir: PathBuf,
    config: Config,
}

impl Bench {
    fn new(name: &str, conf: &str) -> Bench {
        let dir = std::env::temp_dir().join(format!("tf-job-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // `conf`'s commands replace those of `ALL` (a key may not appear twice).
        let replaced = |line: &&str| conf.lines().any(|c| c.split(':').next() == line.split(':').next());
        let all: String = ALL.lines().filter(|l| !replaced(l)).map(|l| format!("{l}\n")).collect();
        // Cancel checks while a phase runs come often.
        let text = format!(
            "agent_id: a\nserver_address: x\njob_queues: [q]\npolling_interval: 0.1\ncancel_check_interval: 0.02\n\
             execution_basedir: {:?}\nresults_basedir: {:?}\n{all}{conf}",
            dir.join("run"),
            dir.join("results")
        );
        let config = Config::parse(&text, Path::new("t.conf")).expect("test config");
        Bench { dir, config }
    }

    fn run(&self, server: &mut dyn Server, job: &str) -> Summary {
        JobRunner::new(&self.config, server, Json::parse(job).expect("test job")).run()
    }

    fn run_dir(&self, job_id: &str) -> PathBuf {
        self.config.execution_basedir().join(job_id)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Phases run one at a time in this process (see `runner::TEST_SERIAL`).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    crate::runner::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn phases(summary: &Summary) -> Vec<(&'static str, i32)> {
    summary.statuses.iter().map(|(p, c)| (p.as_str(), *c)).collect()
}

/// Where `name` is in the recorded calls, for order checks.
fn position(fake: &Fake, what: impl Fn(&Call) -> bool) -> usize {
    fake.calls.iter().position(what).expect("the call was made")
}

fn last_position(fake: &Fake, what: impl Fn(&Call) -> bool) -> usize {
    fake.calls.iter().rposition(what).expect("the call was made")
}

fn has_event(body: &Json, name: &str) -> bool {
    body.get("events")
        .and_then(Json::as_array)
        .unwrap_or(&[])
        .iter()
        .any(|e| e.get("event_name").and_then(Json::as_str) == Some(name))
}

/// A job-state script: the job is cancelled once `path` exists.
fn cancelled_once(path: PathBuf) -> impl FnMut(&str) -> Option<JobState> {
    move |_| path.exists().then_some(JobState::Cancelled)
}

#[test]
fn phases_run_in_order_and_skipped_ones_are_announced() {
    let _serial = serial();
    let bench = Bench::new("order", "");
    let mut fake = Fake::new();
    let job = format!(r#"{{"job_id":"j1",{HOOK},"provision_data":{{"url":"u"}},"test_data":{{"test_cmds":"t"}}}}"#);
    let summary = bench.run(&mut fake, &job);

    assert_eq!(phases(&summary), [("setup", 0), ("provision", 0), ("test", 0), ("cleanup", 0)]);
    assert_eq!((summary.end_reason, summary.delivered, summary.failed()), (EndReason::NormalExit, true, false));
    // Skipped phases are posted as started, as upstream does; cleanup is not.
    let all = ["setup", "provision", "firmware_update", "test", "allocate", "reserve"];
    assert_eq!(fake.job_states_posted(), [&all[..], &["complete"]].concat());
    assert_eq!(fake.agent_states_posted(), all);
    assert_eq!(
        fake.last_events(),
        [
            "job_start",
            "setup_start",
            "setup_success",
            "provision_start",
            "provision_success",
            "firmware_update_start",
            "firmware_update_success",
            "test_start",
            "test_success",
            "allocate_start",
            "allocate_success",
            "reserve_start",
            "reserve_success",
            "cleanup_start",
            "cleanup_success",
            "job_end",
        ]
    );
    // The outputs of the phases that ran, in order, and no other.
    let output = fake.log("output");
    let at = |s: &str| output.find(s).unwrap_or_else(|| panic!("{s} not streamed: {output}"));
    assert!(
        at("setup-out") < at("provision-out")
            && at("provision-out") < at("test-out")
            && at("test-out") < at("cleanup-out")
    );
    assert!(!output.contains("firmware-out") && !output.contains("reserve-out"), "{output}");
    let provision_log = fake.calls.iter().find_map(|c| match c {
        Call::ProvisionLog(b) => Some(b.to_string_compact()),
        _ => None,
    });
    assert_eq!(provision_log.as_deref(), Some(r#"{"job_id":"j1","exit_code":0,"detail":"provision_success"}"#));
    // Delivered: the outcome is last and the run dir is gone.
    let Some(Call::Result(_, outcome)) = fake.calls.last() else { panic!("no outcome last: {:?}", fake.calls.last()) };
    assert_eq!(
        outcome.to_string_compact(),
        r#"{"status":{"setup":0,"provision":0,"test":0,"cleanup":0},"job_state":"complete"}"#
    );
    assert!(!bench.run_dir("j1").exists());
}

#[test]
fn a_failed_setup_ends_the_job_and_cleanup_still_runs() {
    let _serial = serial();
    let bench = Bench::new("setup-fail", "setup_command: exit 3\n");
    let mut fake = Fake::new();
    let summary = bench.run(&mut fake, &format!(r#"{{"job_id":"j2",{HOOK},"test_data":{{"test_cmds":"t"}}}}"#));
    assert_eq!(phases(&summary), [("setup", 3), ("cleanup", 0)]);
    assert_eq!(summary.end_reason, EndReason::Fail(Phase::Setup));
    assert_eq!(fake.job_states_posted(), ["setup", "complete"]);
    assert_eq!(
        fake.last_events(),
        ["job_start", "setup_start", "setup_fail", "cleanup_start", "cleanup_success", "job_end"]
    );
}

#[test]
fn a_failed_test_does_not_end_the_job_but_recovery_failure_does() {
    let _serial = serial();
    let bench = Bench::new("test-fail", "test_command: exit 3\n");
    let mut fake = Fake::new();
    let summary = bench.run(&mut fake, r#"{"job_id":"j3","test_data":{"test_cmds":"t"},"reserve_data":{"x":1}}"#);
    assert_eq!(phases(&summary), [("setup", 0), ("test", 3), ("reserve", 0), ("cleanup", 0)]);
    assert!(summary.failed() && !summary.recovery_failed);

    let bench = Bench::new("recovery-fail", &format!("provision_command: exit {RECOVERY_FAILED}\n"));
    let mut fake = Fake::new();
    let summary =
        bench.run(&mut fake, &format!(r#"{{"job_id":"j4",{HOOK},"provision_data":{{"u":1}},"test_data":{{"t":1}}}}"#));
    assert_eq!(phases(&summary), [("setup", 0), ("provision", RECOVERY_FAILED), ("cleanup", 0)]);
    assert!(summary.recovery_failed);
    assert_eq!(summary.end_reason, EndReason::RecoveryFail);
    assert!(fake.last_events().contains(&"recovery_fail".to_string()), "{:?}", fake.last_events());
    assert!(fake.calls.iter().any(
        |c| matches!(c, Call::ProvisionLog(b) if b.get("detail").and_then(Json::as_str) == Some("recovery_fail"))
    ));
}

#[test]
fn a_job_cancelled_before_it_starts_runs_only_cleanup_and_stays_cancelled() {
    let _serial = serial();
    let bench = Bench::new("cancel-first", "");
    let mut fake = Fake::new().with_states(|_| Some(JobState::Cancelled));
    let summary = bench.run(&mut fake, &format!(r#"{{"job_id":"j5",{HOOK},"test_data":{{"t":1}}}}"#));
    assert_eq!(phases(&summary), [("cleanup", 0)]);
    assert_eq!(summary.end_reason, EndReason::Cancelled);
    assert_eq!(fake.job_states_posted(), ["cancelled"]);
    assert_eq!(fake.last_events(), ["job_start", "cancelled", "cleanup_start", "cleanup_success", "job_end"]);
}

#[test]
fn a_cancel_between_phases_stops_before_the_next_one() {
    let _serial = serial();
    let bench = Bench::new("cancel-between", "");
    // Cancelled once setup's status is recorded: no phase is cut short.
    let outcome = bench.run_dir("j6").join("testflinger-outcome.json");
    let setup_done = move |_: &str| {
        let text = std::fs::read_to_string(&outcome).unwrap_or_default();
        text.contains("setup").then_some(JobState::Cancelled)
    };
    let mut fake = Fake::new().with_states(setup_done);
    let summary = bench.run(&mut fake, r#"{"job_id":"j6","provision_data":{"u":1},"test_data":{"t":1}}"#);
    assert_eq!(phases(&summary), [("setup", 0), ("cleanup", 0)]);
    assert_eq!(summary.end_reason, EndReason::Cancelled);
    assert_eq!(fake.job_states_posted(), ["setup", "cancelled"]);
}

#[test]
fn a_cancel_during_a_phase_stops_its_command() {
    let _serial = serial();
    let bench = Bench::new("cancel-during", "test_command: echo begun; sleep 30\n");
    // Cancelled once the command has written (the log exists before it has).
    let log = bench.run_dir("j7").join("test.log");
    let begun = move |_: &str| {
        std::fs::read_to_string(&log).unwrap_or_default().contains("begun").then_some(JobState::Cancelled)
    };
    let mut fake = Fake::new().with_states(begun);
    let summary =
        bench.run(&mut fake, &format!(r#"{{"job_id":"j7",{HOOK},"test_data":{{"t":1}},"reserve_data":{{"r":1}}}}"#));
    assert_eq!(summary.end_reason, EndReason::Cancelled);
    let codes = phases(&summary);
    assert!(matches!(codes[..], [("setup", 0), ("test", c), ("cleanup", 0)] if c != 0), "{codes:?}");
    assert_eq!(fake.job_states_posted(), ["setup", "provision", "firmware_update", "test", "cancelled"]);
    let events = fake.last_events();
    assert!(events.contains(&"cancelled".to_string()) && !events.contains(&"reserve_start".to_string()), "{events:?}");
    assert!(fake.log("output").contains("begun"));
}

#[test]
fn an_allocation_is_held_whatever_allocate_exits_with_until_the_parent_ends() {
    let _serial = serial();
    let bench = Bench::new("hold-parent", "allocate_command: exit 3\n");
    let parent_reads = Rc::new(Cell::new(0));
    let reads = parent_reads.clone();
    let mut fake = Fake::new().with_states(move |id| {
        if id != "parent" {
            return None;
        }
        reads.set(reads.get() + 1);
        Some(if reads.get() < 3 { JobState::Phase(Phase::Test) } else { JobState::Completed })
    });
    let job = format!(r#"{{"job_id":"j8",{HOOK},"parent_job_id":"parent","allocate_data":{{"allocate":true}}}}"#);
    let summary = bench.run(&mut fake, &job);
    assert_eq!(phases(&summary), [("setup", 0), ("allocate", 3), ("cleanup", 0)]);
    assert_eq!(summary.end_reason, EndReason::Fail(Phase::Allocate));
    assert_eq!(parent_reads.get(), 3, "the hold reads the parent until it is over, and no longer");
    assert_eq!(
        fake.job_states_posted(),
        ["setup", "provision", "firmware_update", "test", "allocate", "allocated", "complete"]
    );
    // The phase's events follow the release.
    let allocated = position(
        &fake,
        |c| matches!(c, Call::Result(_, b) if b.get("job_state").and_then(Json::as_str) == Some("allocated")),
    );
    let last_parent_read = last_position(&fake, |c| matches!(c, Call::JobState(id) if id == "parent"));
    let fail_event = position(&fake, |c| matches!(c, Call::Events(_, b) if has_event(b, "allocate_fail")));
    assert!(allocated < last_parent_read && last_parent_read < fail_event, "{:?}", fake.calls);
}

#[test]
fn an_allocation_is_released_by_a_cancel_and_not_held_after_one() {
    let _serial = serial();
    // Cancelled while held: released, and the next phase sees the cancel.
    let bench = Bench::new("hold-cancel", "");
    let outcome = bench.run_dir("j9").join("testflinger-outcome.json");
    let allocate_done = move |id: &str| {
        let text = std::fs::read_to_string(&outcome).unwrap_or_default();
        (id == "j9" && text.contains("allocate")).then_some(JobState::Cancelled)
    };
    let mut fake = Fake::new().with_states(allocate_done);
    let summary = bench.run(&mut fake, r#"{"job_id":"j9","allocate_data":{"allocate":true},"reserve_data":{"r":1}}"#);
    assert_eq!(phases(&summary), [("setup", 0), ("allocate", 0), ("cleanup", 0)]);
    assert_eq!(summary.end_reason, EndReason::Cancelled);
    assert_eq!(
        fake.job_states_posted(),
        ["setup", "provision", "firmware_update", "test", "allocate", "allocated", "cancelled"]
    );

    // Cancelled while allocate runs: `allocated` would revive the job.
    let bench = Bench::new("hold-none", "allocate_command: sleep 30\n");
    let mut fake = Fake::new().with_states(cancelled_once(bench.run_dir("j10").join("allocate.log")));
    let summary = bench.run(&mut fake, r#"{"job_id":"j10","allocate_data":{"allocate":true}}"#);
    assert_eq!(summary.end_reason, EndReason::Cancelled);
    assert_eq!(fake.job_states_posted(), ["setup", "provision", "firmware_update", "test", "allocate", "cancelled"]);
}

#[test]
fn a_job_resumed_after_a_crash_sends_the_missed_output_and_marks_the_phase() {
    let _serial = serial();
    let bench = Bench::new("resume", "");
    let job = Json::parse(&format!(r#"{{"job_id":"j11",{HOOK},"test_data":{{"t":1}}}}"#)).expect("job");
    // What the killed agent left: setup done (half its output sent, in
    // fragments 0..5), test running, one event posted.
    let rundir = RunDir::of(bench.config.execution_basedir(), "j11");
    rundir.create(bench.config.execution_basedir(), false, &job).expect("run dir");
    rundir.write_outcome(&rundir::outcome_of(&[(Phase::Setup, 0)])).expect("outcome");
    std::fs::write(rundir.log(Phase::Setup, crate::phase::LogKind::Output), "sent|missed\n").expect("setup log");
    std::fs::write(rundir.log(Phase::Test, crate::phase::LogKind::Output), "half").expect("test log");
    std::fs::write(rundir.events_file(), r#"[{"event_name":"job_start","timestamp":"t","detail":""}]"#)
        .expect("events");
    let mut state = DeliveryState::default();
    state.fragments.output = 5;
    state.pending.push(crate::rundir::PendingStream {
        kind: crate::phase::LogKind::Output,
        phase: Phase::Setup,
        sent: 5,
        inflight_end: None,
    });
    rundir.save_state(&state).expect("state");

    let mut fake = Fake::new();
    let summary = JobRunner::new(&bench.config, &mut fake, job).resume(Some(Phase::Test));
    assert_eq!(phases(&summary), [("setup", 0), ("test", INTERRUPTED_BY_AGENT_LOSS), ("cleanup", 0)]);
    assert_eq!(summary.end_reason, EndReason::Fail(Phase::Test));
    assert!(summary.delivered);
    // The missed output goes first, numbered on, before cleanup's.
    let Some(Call::Fragment(_, first)) = fake.calls.iter().find(|c| matches!(c, Call::Fragment(..))) else {
        panic!("no fragment")
    };
    assert_eq!(first.get("fragment_number").and_then(Json::as_i64), Some(5));
    assert_eq!(
        (first.get("phase").and_then(Json::as_str), first.get("log_data").and_then(Json::as_str)),
        (Some("setup"), Some("missed\n"))
    );
    assert!(fake.log("output").contains("cleanup-out"));
    assert_eq!(fake.last_events(), ["job_start", "test_fail", "cleanup_start", "cleanup_success", "job_end"]);
    let Some(Call::Result(_, outcome)) = fake.calls.last() else { panic!("no outcome last") };
    assert_eq!(outcome.to_string_compact(), r#"{"status":{"setup":0,"test":99,"cleanup":0},"job_state":"complete"}"#);
}

#[test]
fn an_outcome_the_server_refuses_is_kept_and_delivered_later() {
    let _serial = serial();
    let bench = Bench::new("kept", "test_command: mkdir -p artifacts && echo hi > artifacts/a.txt\n");
    let complete =
        |c: &Call| matches!(c, Call::Result(_, b) if b.get("job_state").and_then(Json::as_str) == Some("complete"));
    let mut down = Fake::new().failing(complete);
    let summary = bench.run(&mut down, r#"{"job_id":"j12","test_data":{"t":1}}"#);
    assert!(!summary.delivered);
    assert!(
        down.calls.iter().any(|c| matches!(c, Call::Artifact(id) if id == "j12")),
        "the artifacts went before the outcome"
    );
    let kept = bench.config.results_basedir().join("j12");
    assert!(kept.is_dir() && !bench.run_dir("j12").exists());

    let mut up = Fake::new();
    assert!(crate::delivery::deliver_kept(&mut up, bench.config.results_basedir(), bench.config.execution_basedir()));
    // Sent once: only the outcome was missing.
    assert!(!up.calls.iter().any(|c| matches!(c, Call::Artifact(_))), "{:?}", up.calls);
    let Some(Call::Result(_, outcome)) = up.calls.last() else { panic!("no outcome: {:?}", up.calls) };
    assert_eq!(outcome.to_string_compact(), r#"{"status":{"setup":0,"test":0,"cleanup":0},"job_state":"complete"}"#);
    assert!(!kept.exists());
}

#[test]
fn a_cancelled_job_is_delivered_as_cancelled() {
    let _serial = serial();
    let bench = Bench::new("kept-cancel", "");
    let mut fake = Fake::new().with_states(cancelled_once(bench.run_dir("j13").join("setup.log")));
    let summary = bench.run(&mut fake, r#"{"job_id":"j13","test_data":{"t":1}}"#);
    assert_eq!(summary.end_reason, EndReason::Cancelled);
    let Some(Call::Result(_, outcome)) = fake.calls.last() else { panic!("no outcome last") };
    assert_eq!(outcome.get("job_state").and_then(Json::as_str), Some("cancelled"));
}

#[test]
fn an_operator_hold_is_not_overwritten_by_phase_states() {
    let _serial = serial();
    let bench = Bench::new("held", "");
    let mut fake = Fake::new();
    fake.held = Some((AgentState::Maintenance, "bench work".into()));
    let summary = bench.run(&mut fake, r#"{"job_id":"j14","test_data":{"t":1}}"#);
    assert_eq!(phases(&summary), [("setup", 0), ("test", 0), ("cleanup", 0)]);
    assert!(fake.agent_states_posted().is_empty(), "{:?}", fake.agent_states_posted());
    assert!(fake.calls.contains(&Call::HeldState));
}

#[test]
fn without_a_server_the_phases_run_and_the_run_dir_stays() {
    let _serial = serial();
    let bench = Bench::new("local", "");
    let summary = bench.run(&mut Local, r#"{"job_id":"j15","test_data":{"t":1},"allocate_data":{"allocate":true}}"#);
    // No hold: nobody could release it.
    assert_eq!(phases(&summary), [("setup", 0), ("test", 0), ("allocate", 0), ("cleanup", 0)]);
    assert!(!summary.delivered);
    let dir = bench.run_dir("j15");
    assert!(dir.join(".local-job").exists(), "marked as --job's");
    let log = std::fs::read_to_string(dir.join("test.log")).unwrap_or_default();
    assert!(log.contains("test-out"), "{log}");
    assert!(!bench.config.results_basedir().join("j15").exists(), "not kept for a delivery");
}

#[test]
fn a_connectors_serial_log_is_streamed_masked_beside_the_output() {
    let _serial = serial();
    let bench = Bench::new("serial", "test_command: echo out; echo console s3cret > test-serial.log\n");
    let mut fake = Fake::new();
    let job = r#"{"job_id":"j16","test_data":{"t":1,"secrets":{"TOKEN":"s3cret"}}}"#;
    let summary = bench.run(&mut fake, job);
    assert_eq!(phases(&summary), [("setup", 0), ("test", 0), ("cleanup", 0)]);
    let serial = fake.log("serial");
    assert!(serial.starts_with("console ") && !serial.contains("s3cret"), "{serial}");
    assert!(fake.log("output").contains("out") && !fake.log("output").contains("console"));
}

#[test]
fn the_phase_heartbeat_is_due_within_twelve_hours_shortened_by_a_random_part() {
    let now = Instant::now();
    let due: Vec<Duration> = (0..500).map(|_| next_heartbeat(now) - now).collect();
    assert!(due.iter().all(|d| *d >= PHASE_HEARTBEAT.mul_f64(0.8) && *d <= PHASE_HEARTBEAT), "{due:?}");
    assert!(due.iter().any(|d| *d < PHASE_HEARTBEAT.mul_f64(0.9)), "not spread");
}
