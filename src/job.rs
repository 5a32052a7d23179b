//! One job: the phases of its plan in order with their stop rules, events,
//! and the outcome, from the run dir to the server.
//!
//! Progress is reported to the [`Server`] as it happens; with none (the
//! local `--job` mode, [`crate::server::Local`]) the same phases run and
//! only the run dir and the terminal see the output.
//!
//! `run` and `resume` read as their steps; both end in `finish`.

use std::time::{Duration, Instant};

use crate::archive;
use crate::attachments;
use crate::config::Config;
use crate::delivery;
use crate::events::Events;
use crate::json::Json;
use crate::metrics::Metrics;
use crate::outbound::{JobSecrets, LogMasking};
use crate::phase::{EndReason, Event, INTERRUPTED_BY_AGENT_LOSS, NOT_RUN, Phase};
use crate::rundir::{self, DeliveryState, RunDir};
use crate::runner::Stop;
use crate::server::Server;
use crate::signals;
use crate::states::JobState;

mod execute;
pub mod plan;
mod report;
#[cfg(test)]
mod tests;
mod watcher;

pub use plan::JobPlan;

/// The setup status of a job whose attachments were refused or could not
/// be fetched (no command ran; like a command that could not start).
const ATTACHMENTS_FAILED: i32 = NOT_RUN;
/// How often the agent's state is re-posted while one phase (or an
/// allocation hold) lasts: reservations last days, and the server forgets
/// agents it has not heard from; twice a day keeps "at least daily".
const PHASE_HEARTBEAT: Duration = Duration::from_secs(12 * 3600);

/// When the agent's state is next re-posted while a phase or an allocation
/// hold lasts, from `now`: shortened by a random part, so that a fleet's
/// jobs started together do not post together.
fn next_heartbeat(now: Instant) -> Instant {
    crate::deadline::after(now, crate::jitter::early(PHASE_HEARTBEAT))
}
/// One cancel check may wait this long (how often: `cancel_check_interval`).
const CANCEL_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Cleanup after the agent was told to stop must not hold the stop forever.
const CLEANUP_WHEN_INTERRUPTED: Duration = Duration::from_secs(120);

/// What became of a job, for the agent loop and the `--job` summary.
#[derive(Debug)]
pub struct Summary {
    pub job_id: String,
    pub statuses: Vec<(Phase, i32)>,
    pub recovery_failed: bool,
    pub interrupted: bool,
    /// Why the job ended.
    pub end_reason: EndReason,
    /// The outcome reached the server (always false without a server).
    pub delivered: bool,
}

impl Summary {
    pub fn failed(&self) -> bool {
        self.statuses.iter().any(|(_, c)| *c != 0) || self.end_reason != EndReason::NormalExit
    }
}

pub struct JobRunner<'a> {
    config: &'a Config,
    server: &'a mut dyn Server,
    plan: JobPlan,
    rundir: RunDir,
    /// Fragment numbers, output left unsent, and whether the job was
    /// cancelled on the server (the outcome must then not turn it back into
    /// a completed one): saved in the run dir as they change.
    state: DeliveryState,
    /// A phase exited with `RECOVERY_FAILED`: the agent goes offline.
    recovery_failed: bool,
    /// Every secret value of the job (all phases'): job text on its way
    /// out goes through them (see `outbound`).
    masks: JobSecrets,
    /// The agent's log lines are masked with `masks` while the job lives.
    _log_masking: LogMasking,
    events: Events,
    statuses: Vec<(Phase, i32)>,
    metrics: Option<&'a mut Metrics>,
    /// The `release` label of the phase metrics: `""` until provisioning
    /// succeeds, then what the connector reported (see `device_release`).
    release: String,
}

impl<'a> JobRunner<'a> {
    /// `job` must have a safe `job_id` (checked by the caller).
    pub fn new(config: &'a Config, server: &'a mut dyn Server, job: Json) -> JobRunner<'a> {
        let plan = JobPlan::new(config, job);
        let rundir = RunDir::of(config.execution_basedir(), &plan.job_id);
        let events = Events::new(plan.webhook.as_deref(), &plan.job_queue, config.agent_id());
        let masks = JobSecrets::new(plan.secret_values());
        JobRunner {
            config,
            server,
            plan,
            rundir,
            state: DeliveryState::default(),
            recovery_failed: false,
            _log_masking: masks.mask_log_lines(),
            masks,
            events,
            statuses: Vec::new(),
            metrics: None,
            release: String::new(),
        }
    }

    /// Counts this job in `metrics` and serves them while phases run.
    pub fn with_metrics(mut self, metrics: &'a mut Metrics) -> JobRunner<'a> {
        self.metrics = Some(metrics);
        self
    }

    /// Runs the whole job and delivers (or keeps) its outcome.
    pub fn run(mut self) -> Summary {
        self.start();
        if let Err(e) = self.prepare() {
            return self.fail_to_prepare(e);
        }
        self.events.keep_in(self.rundir.events_file());
        let end = match self.fetch_attachments() {
            Ok(()) => self.run_phases(),
            // The stop cut the download short: no fault of the job's.
            Err(_) if signals::interrupted() => EndReason::AgentInterrupted,
            Err(why) => self.attachments_failed(&why),
        };
        self.run_cleanup();
        // A cancel can also land while a phase that cannot be cancelled
        // (provision, cleanup) runs, or after the last check: the outcome
        // must still not turn the job back into a completed one.
        if !self.state.cancelled && self.is_cancelled() {
            self.state.cancelled = true;
        }
        self.finish(end)
    }

    /// Finishes a job whose agent was killed (or lost power) while it ran,
    /// from what its run dir recorded: the phases that ended keep their
    /// codes; `interrupted`, the phase that was running, gets
    /// [`INTERRUPTED_BY_AGENT_LOSS`] and a `<phase>_fail` event; cleanup
    /// runs (again, when it was the interrupted one); then artifacts and
    /// outcome are delivered or kept like any job's.
    pub fn resume(mut self, interrupted: Option<Phase>) -> Summary {
        self.restore();
        self.post_job_id();
        let end = match interrupted {
            Some(phase) => self.mark_interrupted(phase),
            None => EndReason::NormalExit,
        };
        // The output the server missed goes before cleanup's, in order.
        self.flush_pending();
        if !self.statuses.iter().any(|(p, _)| *p == Phase::Cleanup) {
            self.run_cleanup();
        }
        self.finish(end)
    }

    /// Finishes a job whose recovery kept stopping the agent: nothing runs
    /// again (cleanup, or what follows it, may be what stops it). The
    /// phase that was running (cleanup when none was) fails with `why`,
    /// which its log and `<phase>_fail` event carry; the outcome is
    /// delivered or kept like any job's.
    pub fn give_up(mut self, interrupted: Option<Phase>, why: &str) -> Summary {
        self.restore();
        self.post_job_id();
        let phase = interrupted.unwrap_or(Phase::Cleanup);
        log::error!("job {}: {why}", self.plan.job_id);
        if let Err(e) = self.rundir.append_to_log(phase, &format!("\nERROR: {why}\n")) {
            log::warn!("cannot note the give-up in the {phase} log: {e}");
        }
        if !self.statuses.iter().any(|(p, _)| *p == phase) {
            self.statuses.push((phase, INTERRUPTED_BY_AGENT_LOSS));
        }
        let _ = self.write_outcome();
        self.post_result(self.outcome());
        self.emit(Event::Ended(EndReason::Fail(phase)), why);
        self.flush_pending();
        self.finish(EndReason::Fail(phase))
    }

    /// The end shared by `run` and `resume`: the `job_end` event, then the
    /// outcome delivered or kept.
    fn finish(mut self, end: EndReason) -> Summary {
        // The event agrees with the outcome: a job posted `cancelled` did
        // not end normally (a failure keeps its own reason).
        let end = if self.state.cancelled && end == EndReason::NormalExit { EndReason::Cancelled } else { end };
        self.emit(Event::JobEnd, &end.to_string());
        let delivered = self.deliver();
        Summary {
            job_id: self.plan.job_id.clone(),
            statuses: self.statuses.clone(),
            recovery_failed: self.recovery_failed,
            interrupted: signals::interrupted(),
            end_reason: end,
            delivered,
        }
    }

    /// The job begins: the server learns the agent took it, the webhook
    /// hears `job_start`, the log says what of the job is ignored.
    fn start(&mut self) {
        self.post_job_id();
        let job_url = self.server.job_url(&self.plan.job_id);
        self.emit(Event::JobStart, &job_url);
        for warning in &self.plan.warnings {
            log::warn!("job {}: {warning}", self.plan.job_id);
        }
        if let Some(m) = self.metrics.as_deref_mut() {
            m.job_started();
        }
    }

    /// The run dir could not be made: setup fails and the outcome is
    /// reported without one (nothing can be kept for later).
    fn fail_to_prepare(mut self, e: std::io::Error) -> Summary {
        log::error!("cannot prepare run dir {}: {e}", self.rundir.path().display());
        self.statuses.push((Phase::Setup, NOT_RUN));
        self.emit(Event::JobEnd, &format!("cannot prepare the run dir: {e}"));
        let outcome = self.outcome().with("job_state", Json::str(JobState::Complete.as_str()));
        self.post_result(outcome);
        Summary {
            job_id: self.plan.job_id.clone(),
            statuses: self.statuses.clone(),
            recovery_failed: false,
            interrupted: false,
            end_reason: EndReason::Fail(Phase::Setup),
            delivered: false,
        }
    }

    /// The attachments were refused or could not be fetched: setup fails
    /// before any command runs.
    fn attachments_failed(&mut self, why: &str) -> EndReason {
        let why = self.masks.text(why);
        log::error!("job {}: setup failed: {why}", self.plan.job_id);
        self.record_status(Phase::Setup, ATTACHMENTS_FAILED);
        let end = EndReason::Fail(Phase::Setup);
        self.emit_masked(Event::Ended(end), &why);
        end
    }

    /// The phases before cleanup, until one ends the job.
    fn run_phases(&mut self) -> EndReason {
        for phase in Phase::BEFORE_CLEANUP {
            if signals::interrupted() {
                return EndReason::AgentInterrupted;
            }
            if self.is_cancelled() {
                log::info!("job {}: cancelled before {phase}", self.plan.job_id);
                self.emit(Event::Ended(EndReason::Cancelled), "");
                self.state.cancelled = true;
                return EndReason::Cancelled;
            }
            // A skipped phase is still announced and succeeds, as upstream
            // reports it: dashboards and webhooks see every phase.
            self.post_result(JobState::Phase(phase).post());
            self.post_agent_state(phase);
            self.emit(Event::Start(phase), "");
            if let Some(why) = self.plan.phase(phase).skip.clone() {
                log::info!("job {}: skipping {phase}: {why}", self.plan.job_id);
                // Counted as upstream counts every phase of its loop: a
                // dashboard's count per phase is the number of jobs.
                if let Some(m) = self.metrics.as_deref_mut() {
                    m.phase_ended(phase.as_str(), 0.0, 0, &self.release);
                }
                self.emit(Event::Success(phase), "");
                continue;
            }
            if let Some(end) = self.run_one(phase) {
                return end;
            }
        }
        EndReason::NormalExit
    }

    /// Runs `phase` and reports it; returns why the job ends, if it does.
    fn run_one(&mut self, phase: Phase) -> Option<EndReason> {
        self.post_device_info();
        log::info!("job {}: running {phase}", self.plan.job_id);
        let started = Instant::now();
        let (code, stopped, signal) = self.run_phase(phase);
        log::info!("job {}: {phase} exited with {code}", self.plan.job_id);
        if phase == Phase::Provision && code == 0 {
            self.release = self.device_release();
        }
        if let Some(m) = self.metrics.as_deref_mut() {
            m.phase_ended(phase.as_str(), started.elapsed().as_secs_f64(), code, &self.release);
        }
        self.record_status(phase, code);
        // As upstream: the allocation is held whatever allocate's status
        // (a parent waits for `allocated`, not for a status), and the
        // phase's events follow the release. Unlike upstream, not after a
        // cancel (`allocated` would turn the cancelled job back into a live
        // one) nor when the agent is stopping.
        if phase == Phase::Allocate && !matches!(stopped, Some(Stop::Cancelled | Stop::Interrupted)) {
            self.hold_allocation();
        }
        if let Some(stop) = &stopped {
            self.emit(Event::Ended(stop.reason()), stop.message().trim());
        }
        let failure = self.report_exit(phase, code, signal.filter(|_| stopped.is_none()));
        match stopped {
            Some(Stop::Cancelled) => {
                self.state.cancelled = true;
                // Upstream goes on to the next phase, whose cancel check
                // emits a second `cancelled`; webhooks see the same.
                if Phase::BEFORE_CLEANUP.last() != Some(&phase) {
                    self.emit(Event::Ended(EndReason::Cancelled), "");
                }
                Some(EndReason::Cancelled)
            }
            Some(Stop::Interrupted) => Some(EndReason::AgentInterrupted),
            _ => failure.filter(|_| phase != Phase::Test),
        }
    }

    /// A phase's status: in the outcome file, the saved progress, and
    /// posted (the statuses so far, as upstream posts them).
    fn record_status(&mut self, phase: Phase, code: i32) {
        self.statuses.push((phase, code));
        if let Err(e) = self.write_outcome() {
            log::error!("cannot write the outcome file: {e}");
        }
        self.save_progress();
        self.post_result(self.outcome());
    }

    /// Takes back what an earlier agent recorded in the run dir: statuses,
    /// events, fragment numbers, unsent output, a cancel.
    fn restore(&mut self) {
        self.statuses = self.rundir.statuses();
        self.events.restore(self.rundir.events_file());
        // The events owed are the restored list's to say (see `deliver`).
        self.state = DeliveryState { events: None, ..self.rundir.load_state() };
    }

    /// `phase` was running when the agent died: its log says so, its
    /// status is [`INTERRUPTED_BY_AGENT_LOSS`] (cleanup's is left to its
    /// rerun), and it is reported failed.
    fn mark_interrupted(&mut self, phase: Phase) -> EndReason {
        let detail = format!(
            "the agent stopped (killed or lost power) while {phase} ran; status {INTERRUPTED_BY_AGENT_LOSS} means its real exit status is unknown"
        );
        log::warn!("job {}: {detail}", self.plan.job_id);
        if let Err(e) = self.rundir.append_to_log(phase, &format!("\nERROR: {detail}\n")) {
            log::warn!("cannot note the interruption in the {phase} log: {e}");
        }
        let mut end = EndReason::NormalExit;
        if phase != Phase::Cleanup {
            self.statuses.push((phase, INTERRUPTED_BY_AGENT_LOSS));
            end = EndReason::Fail(phase);
            if let Some(m) = self.metrics.as_deref_mut() {
                m.phase_ended(phase.as_str(), 0.0, INTERRUPTED_BY_AGENT_LOSS, "");
            }
        }
        let _ = self.write_outcome();
        self.post_result(self.outcome());
        self.emit(Event::Ended(EndReason::Fail(phase)), &detail);
        end
    }

    /// Unpacks the job's attachments into the run dir, when it has some.
    /// Without a server (`--job`) they are skipped: there is nothing to
    /// download from.
    fn fetch_attachments(&mut self) -> Result<(), String> {
        if !self.plan.attachments {
            return Ok(());
        }
        if self.server.is_local() {
            log::warn!("job {}: attachments are not fetched without a server", self.plan.job_id);
            return Ok(());
        }
        let done = attachments::fetch(self.server, &self.plan.job_id, &self.rundir)?;
        log::info!("job {}: attachments unpacked: {} files, {} bytes", self.plan.job_id, done.files, done.bytes);
        Ok(())
    }

    /// Creates the run dir and the files device connectors expect.
    fn prepare(&mut self) -> std::io::Result<()> {
        self.rundir.create(self.config.execution_basedir(), self.server.is_local(), &self.plan.document)
    }

    fn outcome(&self) -> Json {
        rundir::outcome_of(&self.statuses)
    }

    fn write_outcome(&self) -> std::io::Result<()> {
        self.rundir.write_outcome(&self.outcome())
    }

    fn save_progress(&self) {
        if let Err(e) = self.rundir.save_state(&self.state) {
            log::debug!("cannot save fragment progress: {e}");
        }
    }

    /// Sends the output the server missed before the agent died.
    fn flush_pending(&mut self) {
        // Saves its progress; what is not sent stays pending for delivery.
        let _ = delivery::send_pending(self.server, &self.rundir, &self.plan.job_id, &mut self.state);
    }

    /// Packs artifacts, delivers the outcome, and removes the run dir, or
    /// moves it to `results_basedir` to be delivered later.
    fn deliver(&mut self) -> bool {
        let artifacts = self.rundir.artifacts();
        if archive::has_content(&artifacts) {
            let dest = self.rundir.archive();
            let mask = self.config.mask_artifacts().then_some(&self.masks);
            match archive::pack_artifacts(&artifacts, &dest, mask) {
                // pack_artifacts logs the size and the time it took.
                Ok(_) => {}
                Err(e) => {
                    log::error!("cannot pack artifacts (the outcome is still delivered): {e}");
                    let _ = std::fs::remove_file(&dest);
                }
            }
        }
        let mut state = std::mem::take(&mut self.state);
        state.events = self.events.owed();
        if let Err(e) = self.rundir.save_state(&state) {
            log::error!("cannot save delivery state in {}: {e}", self.rundir.path().display());
        }
        // Delivered from memory: on a full disk the outcome file may be stale.
        let outcome = self.outcome();
        // Without a server the outcome stays in the run dir (`--job` says where).
        if self.server.is_local() {
            return false;
        }
        match delivery::deliver_with(self.server, &self.rundir, &self.plan.job_id, state, outcome) {
            Ok(()) => {
                self.rundir.remove();
                true
            }
            Err(e) => {
                if e.is_stop() {
                    log::info!(
                        "job {}: stopping; the outcome is kept and delivered at the next start",
                        self.plan.job_id
                    );
                } else {
                    log::error!("job {}: outcome not delivered, keeping it for later: {e}", self.plan.job_id);
                }
                self.rundir.keep(self.config.results_basedir(), &self.plan.job_id);
                false
            }
        }
    }
}
