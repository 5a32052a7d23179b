//! Crash recovery: jobs an earlier agent left behind when it was killed or
//! lost power.
//!
//! A run dir in `execution_basedir` (or one in `results_basedir` whose
//! cleanup never ran) is finished before any new job is taken: processes
//! of its interrupted phase that outlived the agent are stopped, the phase
//! is reported as interrupted, cleanup runs so the device is not left half
//! provisioned, and the outcome is delivered (or kept for later). Run dirs
//! of local `--job` runs (marked as such, see `rundir`) are not jobs of
//! the server's and are left alone.
//!
//! What was running is read from the run dir alone: a phase whose
//! `<phase>.log` exists but which has no code in `testflinger-outcome.json`
//! was running when the agent died (the log is opened just before the
//! command starts, the code written just after it ends).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::job::JobRunner;
use crate::json::Json;
use crate::metrics::Metrics;
use crate::phase::Phase;
use crate::rundir::{self, RunDir};
use crate::server::Server;

/// Recoveries a job gets. The start after that many gives the job up as
/// failed without running anything of it; should even that stop the
/// agent, the next start sets the run dir aside: no job can keep a device
/// in a crash loop, whatever stops the agent.
pub(crate) const MAX_RECOVERY_ATTEMPTS: u32 = 2;

/// How long leftover processes get between SIGTERM and SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(3);

/// What a left-behind run dir needs.
#[derive(Debug, PartialEq)]
pub(crate) struct Leftover {
    pub job_id: String,
    pub dir: RunDir,
    /// The phase that was running when the agent died, if any.
    pub interrupted: Option<Phase>,
    /// Cleanup has not run to its end yet (and a cleanup command exists).
    pub needs_cleanup: bool,
}

/// Reads `dir` (a run dir) to decide what is left to do.
pub(crate) fn inspect(config: &Config, job_id: &str, dir: &RunDir) -> Leftover {
    let outcome = dir.outcome();
    let has_code =
        |phase: Phase| outcome.as_ref().and_then(|o| o.get("status")).and_then(|s| s.get(phase.as_str())).is_some();
    let interrupted = Phase::ALL.into_iter().rev().find(|p| dir.has_log(*p) && !has_code(*p));
    let needs_cleanup = !config.command(Phase::Cleanup).trim().is_empty() && !has_code(Phase::Cleanup);
    Leftover { job_id: job_id.to_string(), dir: dir.clone(), interrupted, needs_cleanup }
}

/// Finishes every job an earlier agent left unfinished. Jobs that only
/// await delivery stay in `results_basedir` for the polling loop.
pub(crate) fn recover(config: &Config, server: &mut dyn Server, metrics: &mut Metrics) {
    let mut todo = Vec::new();
    for (job_id, dir) in rundir::run_dirs(config.execution_basedir()) {
        todo.push(inspect(config, &job_id, &dir));
    }
    for (job_id, dir) in rundir::run_dirs(config.results_basedir()) {
        let left = inspect(config, &job_id, &dir);
        if left.interrupted.is_some() || left.needs_cleanup {
            todo.push(left);
        }
    }
    let resumed = !todo.is_empty();
    for left in todo {
        resume(config, server, metrics, left);
    }
    if resumed {
        // As after any job: the server no longer shows one running here.
        let retry = server.retry();
        if let Err(e) = server.post_agent_data(&Json::object().with("job_id", Json::str("")), retry) {
            log::warn!("cannot clear the job id: {e}");
        }
    }
}

fn resume(config: &Config, server: &mut dyn Server, metrics: &mut Metrics, mut left: Leftover) {
    let what = match &left.interrupted {
        Some(p) => format!("interrupted during {p}"),
        None => "interrupted between phases".to_string(),
    };
    log::warn!(
        "job {}: found in {} ({what}); finishing it before taking new jobs",
        left.job_id,
        left.dir.path().display()
    );
    let attempts = left.dir.recovery_attempts();
    if attempts > MAX_RECOVERY_ATTEMPTS {
        match left.dir.set_aside(config.results_basedir(), &left.job_id) {
            Ok(to) => log::error!(
                "job {}: the agent stopped during this job {} times, giving it up included; set aside in {} for an operator",
                left.job_id,
                attempts + 1,
                to.display()
            ),
            Err(e) => log::error!("job {}: cannot set {} aside: {e}", left.job_id, left.dir.path().display()),
        }
        return;
    }
    // Counted before anything of the attempt runs: an agent that dies
    // during it, wherever, has used it up.
    let mut give_up = (attempts >= MAX_RECOVERY_ATTEMPTS)
        .then(|| format!("the agent stopped during this job {} times; giving up", attempts + 1));
    if let Err(e) = left.dir.set_recovery_attempts(attempts + 1) {
        give_up = Some(format!("cannot count the recovery attempts ({e}); giving up rather than risk a crash loop"));
    }
    stop_leftover_processes(left.dir.path());
    // JobRunner works in execution_basedir; bring the job back there.
    let from = left.dir.path().to_path_buf();
    if let Err(e) = left.dir.move_to(config.execution_basedir(), &left.job_id) {
        log::error!(
            "job {}: cannot move {} back to {}: {e}",
            left.job_id,
            from.display(),
            config.execution_basedir().join(&left.job_id).display()
        );
        return;
    }
    let Some(job) = left.dir.job() else {
        // Without the job nothing can run; deliver what the dir holds.
        log::error!("job {}: testflinger.json unreadable; delivering the outcome as it is", left.job_id);
        left.dir.keep(config.results_basedir(), &left.job_id);
        return;
    };
    let runner = JobRunner::new(config, server, job).with_metrics(metrics);
    let summary = match give_up {
        Some(why) => runner.give_up(left.interrupted, &why),
        None => runner.resume(left.interrupted),
    };
    log::info!(
        "job {}: recovered ({}); {}; delivered: {}",
        summary.job_id,
        summary.end_reason,
        crate::human::exit_statuses(&summary.statuses),
        if summary.delivered { "yes" } else { "no, kept for later" }
    );
}

/// Processes working in `dir` (found by their cwd in /proc) outlived the
/// agent that started them: a connector still flashing the device must not
/// race the cleanup. They get SIGTERM, then SIGKILL. Linux only.
fn stop_leftover_processes(dir: &Path) {
    let pids = processes_in(dir);
    if pids.is_empty() {
        return;
    }
    log::warn!(
        "stopping {} leftover process(es) of the interrupted job: pids {}",
        pids.len(),
        crate::human::list(&pids)
    );
    for pid in &pids {
        // SAFETY: kill(2) with a pid read from /proc; at worst ESRCH.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    let deadline = crate::deadline::from_now(LEFTOVER_GRACE);
    while Instant::now() < deadline && !processes_in(dir).is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in processes_in(dir) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn processes_in(dir: &Path) -> Vec<libc::pid_t> {
    let Ok(canonical) = dir.canonicalize() else { return Vec::new() };
    let me = std::process::id() as libc::pid_t;
    let Ok(proc) = fs::read_dir("/proc") else { return Vec::new() };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&canonical)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::fake::{Call, Fake};

    fn config(cleanup: &str) -> Config {
        config_in(cleanup, "")
    }

    /// `dirs`: more lines of config (the run and results dirs).
    fn config_in(cleanup: &str, dirs: &str) -> Config {
        let text = format!("agent_id: a\nserver_address: x\njob_queues: [q]\ncleanup_command: {cleanup:?}\n{dirs}");
        Config::parse(&text, Path::new("t.conf")).expect("test config")
    }

    #[test]
    fn finds_the_interrupted_phase_from_logs_and_codes() {
        let dir = std::env::temp_dir().join(format!("tf-recovery-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("testflinger.json"), "{}").unwrap();
        fs::write(dir.join("testflinger-outcome.json"), r#"{"status":{"setup":0,"provision":0}}"#).unwrap();
        for p in ["setup", "provision", "test"] {
            fs::write(dir.join(format!("{p}.log")), "x").unwrap();
        }
        let left = inspect(&config("true"), "j", &RunDir::new(dir.clone()));
        assert_eq!(left.interrupted, Some(Phase::Test));
        assert!(left.needs_cleanup);

        // Killed between phases: nothing interrupted, cleanup still owed.
        fs::write(dir.join("testflinger-outcome.json"), r#"{"status":{"setup":0,"provision":0,"test":1}}"#).unwrap();
        let left = inspect(&config("true"), "j", &RunDir::new(dir.clone()));
        assert_eq!(left.interrupted, None);
        assert!(left.needs_cleanup);

        // Killed during cleanup.
        fs::write(dir.join("cleanup.log"), "x").unwrap();
        assert_eq!(inspect(&config("true"), "j", &RunDir::new(dir.clone())).interrupted, Some(Phase::Cleanup));

        // Finished: nothing to do but deliver.
        fs::write(dir.join("testflinger-outcome.json"), r#"{"status":{"setup":0,"provision":0,"test":1,"cleanup":0}}"#)
            .unwrap();
        let left = inspect(&config("true"), "j", &RunDir::new(dir.clone()));
        assert_eq!((left.interrupted, left.needs_cleanup), (None, false));
        assert!(!inspect(&config(""), "j", &RunDir::new(dir.clone())).needs_cleanup);
        let _ = fs::remove_dir_all(&dir);
    }

    /// What an agent killed during `test` leaves: setup done, test begun;
    /// `attempts` recoveries of it begun before.
    fn left_behind(config: &Config, job_id: &str, attempts: u32) -> RunDir {
        let job = Json::parse(&format!(r#"{{"job_id":"{job_id}","test_data":{{"t":1}}}}"#)).expect("job");
        let dir = RunDir::of(config.execution_basedir(), job_id);
        dir.create(config.execution_basedir(), false, &job).expect("run dir");
        dir.write_outcome(&rundir::outcome_of(&[(Phase::Setup, 0)])).expect("outcome");
        fs::write(dir.log(Phase::Setup, crate::phase::LogKind::Output), "x").expect("setup log");
        fs::write(dir.log(Phase::Test, crate::phase::LogKind::Output), "x").expect("test log");
        if attempts > 0 {
            dir.set_recovery_attempts(attempts).expect("attempts");
        }
        dir
    }

    fn bench(name: &str) -> (Config, std::path::PathBuf) {
        let base = std::env::temp_dir().join(format!("tf-recover-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let dirs = format!("execution_basedir: {:?}\nresults_basedir: {:?}\n", base.join("run"), base.join("results"));
        let config = config_in("echo cleanup-out", &dirs);
        (config, base)
    }

    fn outcomes(fake: &Fake) -> Vec<String> {
        let results = fake.calls.iter().filter_map(|c| match c {
            Call::Result(_, b) if b.get("job_state").is_some_and(|s| s.as_str() != Some("test")) => {
                Some(b.to_string_compact())
            }
            _ => None,
        });
        results.collect()
    }

    #[test]
    fn a_job_a_killed_agent_left_is_finished_and_delivered() {
        let _serial = crate::runner::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (config, base) = bench("resume");
        let dir = left_behind(&config, "j1", 0);
        let mut fake = Fake::new();
        recover(&config, &mut fake, &mut Metrics::new("a", ""));
        assert_eq!(outcomes(&fake), [r#"{"status":{"setup":0,"test":99,"cleanup":0},"job_state":"complete"}"#]);
        assert!(fake.log("output").contains("cleanup-out"), "cleanup ran again");
        assert_eq!(fake.calls.last(), Some(&Call::AgentData(Json::object().with("job_id", Json::str("")))));
        assert!(!dir.path().exists());
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn a_job_that_keeps_stopping_the_agent_is_given_up_then_set_aside() {
        let _serial = crate::runner::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (config, base) = bench("give-up");
        // The third attempt runs nothing: the outcome goes as it stands.
        left_behind(&config, "j2", MAX_RECOVERY_ATTEMPTS);
        let mut fake = Fake::new();
        recover(&config, &mut fake, &mut Metrics::new("a", ""));
        assert_eq!(outcomes(&fake), [r#"{"status":{"setup":0,"test":99},"job_state":"complete"}"#]);
        assert!(fake.log("output").is_empty(), "nothing ran: {}", fake.log("output"));
        // One more and it is only set aside, for an operator.
        left_behind(&config, "j3", MAX_RECOVERY_ATTEMPTS + 1);
        let mut fake = Fake::new();
        recover(&config, &mut fake, &mut Metrics::new("a", ""));
        assert!(outcomes(&fake).is_empty(), "{:?}", fake.calls);
        assert!(config.results_basedir().join(".undeliverable").join("j3").is_dir());
        let _ = fs::remove_dir_all(&base);
    }
}
