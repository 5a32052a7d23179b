//! Running a phase's command: its log, live stream and serial tail, the
//! runner with the phase's watcher, and what is left unsent when it ends;
//! cleanup; and the allocation hold after `allocate`.

use std::time::{Duration, Instant};

use super::report::post_state_unless_held;
use super::watcher::{PhaseWatcher, Progress};
use super::{CLEANUP_WHEN_INTERRUPTED, JobRunner, next_heartbeat};
use crate::metrics::Metrics;
use crate::output::{LiveStream, PhaseLog};
use crate::phase::{EndReason, Event, LogKind, NOT_RUN, Phase};
use crate::rundir::PendingStream;
use crate::runner::{self, Limits, Stop};
use crate::serial::SerialTail;
use crate::server::Server;
use crate::signals;
use crate::states::JobState;

impl JobRunner<'_> {
    /// Sleeps, answering metrics scrapes meanwhile.
    pub(super) fn pause(metrics: Option<&mut Metrics>, d: Duration) {
        crate::wait::sleep(d, metrics.map(|m| m as &mut dyn crate::wait::Source));
    }

    /// Runs one phase's command; returns its exit code, stop reason, and
    /// the signal that killed it, if one did.
    pub(super) fn run_phase(&mut self, phase: Phase) -> (i32, Option<Stop>, Option<i32>) {
        let Some((log, start_offset)) = self.open_log(phase) else { return (NOT_RUN, None, None) };
        let (cmd, env, limits) = self.command(phase);
        let job_id = self.plan.job_id.clone();
        // Fragment progress is saved as it goes, with what was pending before.
        let base = self.state.clone();
        let fragments = &mut self.state.fragments;
        let schedules = *self.config.schedules();
        // Without a server (`--job`) the output goes to the terminal instead.
        let server: &mut dyn Server = &mut *self.server;
        let live = (!server.is_local()).then(|| {
            let log_path = self.rundir.log(phase, LogKind::Output);
            let stream =
                LiveStream::new(&job_id, LogKind::Output, phase, &log_path, start_offset, schedules.output_interval);
            (stream, server, &mut fragments.output)
        });
        let has_live = live.is_some();
        // The connector's serial log, masked and sent as it is written.
        let serial = has_live.then(|| {
            let tail = SerialTail::new(&self.rundir, phase, &job_id, &self.masks, schedules.output_interval);
            (tail, &mut fragments.serial)
        });
        let mut progress = Progress::new(&self.rundir, phase, base);
        if let Some((_, _, counter)) = &live {
            progress.save(**counter, start_offset, None);
        }
        let mut watcher = PhaseWatcher {
            log,
            live,
            serial,
            job_id: &job_id,
            cancel_check: schedules.cancel_check,
            next_cancel_check: (phase.can_cancel() && has_live)
                .then(|| super::watcher::first_cancel_check(Instant::now(), schedules.cancel_check)),
            metrics: self.metrics.as_deref_mut(),
            progress,
            next_heartbeat: next_heartbeat(Instant::now()),
        };
        crate::notify::status(&format!("job {job_id}: {phase}"));
        let outcome = runner::run(&cmd, self.rundir.path(), &env, limits, &mut watcher);
        // A stop by the agent already has its line (the stop message, as
        // upstream prints it); a signal from elsewhere (the OOM killer, an
        // operator) would otherwise go unexplained.
        if let (Some(sig), None) = (outcome.signal, &outcome.stopped) {
            watcher.log.write(format!("\nThe {phase} command was killed by signal {sig}\n").as_bytes());
        }
        let unsent = finish_streams(watcher, phase);
        self.state.pending.extend(unsent);
        (outcome.code, outcome.stopped, outcome.signal)
    }

    /// The phase's command, its environment (the config's strings and
    /// this phase's own secrets, no other phase's) and its limits.
    fn command(&self, phase: Phase) -> (String, Vec<(String, String)>, Limits) {
        let planned = self.plan.phase(phase);
        let mut limits = planned.limits;
        if phase == Phase::Cleanup && signals::interrupted() {
            limits.global = Some(limits.global.map_or(CLEANUP_WHEN_INTERRUPTED, |g| g.min(CLEANUP_WHEN_INTERRUPTED)));
        }
        let mut env = self.config.phase_env().to_vec();
        env.extend(planned.secrets.iter().cloned());
        (planned.command.clone(), env, limits)
    }

    /// Opens the phase's log (appending: cleanup may run again after a
    /// crash) and writes the phase's banner; returns it with where the
    /// phase's part of it starts.
    fn open_log(&self, phase: Phase) -> Option<(PhaseLog, u64)> {
        let log_path = self.rundir.log(phase, LogKind::Output);
        let mut log = match PhaseLog::open(&log_path, self.masks.stream(), self.server.is_local()) {
            Ok(l) => l,
            Err(e) => {
                log::error!("cannot open {}: {e}", log_path.display());
                return None;
            }
        };
        let start_offset = log.written();
        let banner_line = format!("* Starting testflinger {phase} phase on {} *", self.config.agent_id());
        let stars = "*".repeat(banner_line.len());
        log.write(format!("{stars}\n{banner_line}\n{stars}\n").as_bytes());
        Some((log, start_offset))
    }

    /// Cleanup runs whatever happened before, so the device is left sane.
    /// Without a cleanup command the events still say it succeeded, as
    /// upstream's do; no agent state or job state is posted for cleanup.
    pub(super) fn run_cleanup(&mut self) {
        self.emit(Event::Start(Phase::Cleanup), "");
        if self.plan.phase(Phase::Cleanup).skip.is_some() {
            self.emit(Event::Success(Phase::Cleanup), "");
            return;
        }
        self.post_device_info();
        let (code, _, _) = self.run_phase(Phase::Cleanup);
        self.statuses.retain(|(p, _)| *p != Phase::Cleanup);
        self.statuses.push((Phase::Cleanup, code));
        let _ = self.write_outcome();
        self.save_progress();
        // Every phase that ran has its statuses posted so far, cleanup too
        // (upstream's cumulative post): dashboards see cleanup's status
        // before the outcome, and even when the outcome is kept for later.
        self.post_result(self.outcome());
        self.emit(
            if code == 0 { Event::Success(Phase::Cleanup) } else { Event::Ended(EndReason::Fail(Phase::Cleanup)) },
            "",
        );
    }

    /// After the allocate command: publish the device, then hold it until
    /// this job or its parent is over.
    pub(super) fn hold_allocation(&mut self) {
        while !self.post_device_info() {
            if signals::interrupted() {
                return;
            }
            Self::pause(self.metrics.as_deref_mut(), Duration::from_secs(2));
        }
        self.post_result(JobState::Allocated.post());
        let parent = self.plan.parent_job_id.clone();
        let interval = self.config.schedules().allocation_poll;
        // Without a server nothing would ever release it.
        if self.server.is_local() {
            return;
        }
        let server = &mut *self.server;
        let retry = server.retry();
        let over = |s: Option<JobState>| s.is_some_and(|s| s.is_over());
        let mut heartbeat_at = next_heartbeat(Instant::now());
        loop {
            if Instant::now() >= heartbeat_at {
                heartbeat_at = next_heartbeat(Instant::now());
                post_state_unless_held(server, Phase::Allocate, retry);
            }
            if over(server.job_state(&self.plan.job_id, None, retry))
                || parent.as_deref().is_some_and(|p| over(server.job_state(p, None, retry)))
            {
                return;
            }
            if signals::interrupted() {
                return;
            }
            Self::pause(self.metrics.as_deref_mut(), interval);
        }
    }
}

/// The phase ended: what its log and serial copy hold goes to the server;
/// what cannot is returned, to go later.
fn finish_streams(mut watcher: PhaseWatcher, phase: Phase) -> Vec<PendingStream> {
    watcher.log.finish();
    let written = watcher.log.written();
    let mut unsent = Vec::new();
    let Some((mut stream, client, counter)) = watcher.live.take() else { return unsent };
    if let Err(e) = stream.flush(client, counter, written) {
        // A stop's abandoned call is no failure to report.
        if !e.is_stop() {
            log::warn!("{phase} output not fully sent, kept for later: {e}");
        }
        unsent.push(stream.unsent());
    }
    if let Some((mut tail, serial_counter)) = watcher.serial.take() {
        tail.finish();
        if tail.started() {
            if let Err(e) = tail.stream.flush(client, serial_counter, tail.written()) {
                if !e.is_stop() {
                    log::warn!("{phase} serial log not fully sent, kept for later: {e}");
                }
                unsent.push(tail.stream.unsent());
            }
        }
    }
    unsent
}
