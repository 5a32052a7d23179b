//! What a job tells the server (and its webhook) as it goes, and what it
//! reads back from the connector's files to say it. Every text here went
//! through the job's secrets first. Without a server (`--job`) the posts
//! go nowhere and events only reach the log.

use super::JobRunner;
use crate::json::Json;
use crate::outbound::Masked;
use crate::phase::{EndReason, Event, Phase, RECOVERY_FAILED};
use crate::retry::Retry;
use crate::server::Server;
use crate::states::{AgentState, JobState};

impl JobRunner<'_> {
    /// Emits an event; its detail goes through the job's secrets.
    pub(super) fn emit(&mut self, event: Event, detail: &str) {
        let detail = self.masks.text(detail);
        self.emit_masked(event, &detail);
    }

    pub(super) fn emit_masked(&mut self, event: Event, detail: &Masked) {
        self.events.emit(self.server, &self.plan.job_id, event, detail);
    }

    pub(super) fn post_result(&mut self, data: Json) {
        match self.server.post_result(&self.plan.job_id, &data) {
            Err(e) if !e.is_stop() => log::warn!("result update not posted: {e}"),
            _ => {}
        }
    }

    /// Posts the agent's state for a phase; there is none for cleanup
    /// (upstream posts none, and dashboards show the last phase).
    pub(super) fn post_agent_state(&mut self, state: Phase) {
        let retry = self.server.retry();
        post_state_unless_held(self.server, state, retry);
    }

    /// Tells the server the agent works on this job (before it starts or
    /// resumes).
    pub(super) fn post_job_id(&mut self) {
        let retry = self.server.retry();
        let _ =
            self.server.post_agent_data(&Json::object().with("job_id", Json::str(self.plan.job_id.as_str())), retry);
    }

    pub(super) fn is_cancelled(&mut self) -> bool {
        let retry = self.server.retry();
        self.server.job_state(&self.plan.job_id, None, retry) == Some(JobState::Cancelled)
    }

    /// The events after a phase's command exited with `code`, with the
    /// connector's failure detail and the signal from elsewhere than the
    /// agent that killed it, if one did. Returns the failure, if it failed.
    pub(super) fn report_exit(&mut self, phase: Phase, code: i32, signal: Option<i32>) -> Option<EndReason> {
        let mut detail = self.connector_error(phase);
        if let Some(sig) = signal {
            // Distinct from an exit code of 128+N chosen by the command.
            let sep = if detail.is_empty() { "" } else { "; " };
            detail.push(&Masked::agent(format!("{sep}killed by signal {sig}")));
        }
        if phase == Phase::Provision {
            self.post_provision_log(code);
        }
        // Exit 46 is reported as `recovery_fail` instead of the phase's
        // own failure event, with the connector's detail (as upstream).
        let failure = match code {
            0 => None,
            RECOVERY_FAILED => Some(EndReason::RecoveryFail),
            _ => Some(EndReason::Fail(phase)),
        };
        if code == RECOVERY_FAILED {
            self.recovery_failed = true;
            log::error!("job {}: {phase} exited with 46: device recovery failed", self.plan.job_id);
        }
        match failure {
            None => self.emit(Event::Success(phase), ""),
            Some(reason) => self.emit_masked(Event::Ended(reason), &detail),
        }
        failure
    }

    /// The detail is the exit event's name, as upstream sends it; the
    /// connector's own detail goes with the event.
    fn post_provision_log(&mut self, code: i32) {
        let exit_event = match code {
            0 => Event::Success(Phase::Provision),
            RECOVERY_FAILED => Event::Ended(EndReason::RecoveryFail),
            _ => Event::Ended(EndReason::Fail(Phase::Provision)),
        };
        let body = Json::object()
            .with("job_id", Json::str(self.plan.job_id.as_str()))
            .with("exit_code", Json::int(i64::from(code)))
            .with("detail", Json::str(exit_event.to_string()));
        match self.server.post_provision_log(&body) {
            Err(e) if !e.is_stop() => log::warn!("provision log not posted: {e}"),
            _ => {}
        }
    }

    /// Text of the connector's failure detail for `phase`, if it left one,
    /// masked: it goes to the log, the events and the provision log.
    fn connector_error(&self, phase: Phase) -> Masked {
        self.masks.text(&self.rundir.connector_error(phase))
    }

    /// What the connector left in `device-info.json` (its `device_info`
    /// member, or the whole object), masked; `None` when there is none or
    /// it is not JSON.
    fn device_info(&self) -> Option<Json> {
        Some(self.masks.json(&self.rundir.device_info()?))
    }

    /// Posts the device info the connector left, if any; false when the
    /// post failed.
    pub(super) fn post_device_info(&mut self) -> bool {
        let Some(info) = self.device_info() else { return true };
        match self.server.post_result(&self.plan.job_id, &Json::object().with("device_info", info)) {
            Ok(()) => true,
            Err(e) => {
                if !e.is_stop() {
                    log::warn!("device info not posted: {e}");
                }
                false
            }
        }
    }

    /// The release label for metrics after a successful provision: the
    /// `release` the connector put in `device-info.json`'s `device_info`,
    /// else `unknown` (upstream asks the device over SSH, which would block
    /// this single-threaded agent for up to half a minute).
    pub(super) fn device_release(&self) -> String {
        let info = self.device_info();
        let release = info.as_ref().and_then(|i| i.get("release")).and_then(Json::as_str).filter(|r| !r.is_empty());
        release.unwrap_or("unknown").to_string()
    }
}

/// Posts the agent's `state` (a phase name), unless an operator holds the
/// agent offline or in maintenance, or its state cannot be read: an
/// operator may put the agent in maintenance while a job runs, and a phase
/// name must not overwrite that (upstream's does). Also the heartbeat of
/// long phases.
pub(super) fn post_state_unless_held(server: &mut dyn Server, state: Phase, retry: Retry) {
    match server.held_state(retry) {
        Ok(None) => {}
        Ok(Some((held, _))) => {
            log::info!("agent is {held} on the server; not posting state {state}");
            return;
        }
        Err(e) if e.is_stop() => return,
        // Unseen, it may be an operator's: the next phase's post reads again.
        Err(e) => {
            log::warn!("state {state} not posted: cannot read the agent's state on the server first: {e}");
            return;
        }
    }
    match server.post_agent_data(&AgentState::Busy(state).post(""), retry) {
        Err(e) if !e.is_stop() => log::warn!("agent state {state} not posted: {e}"),
        _ => {}
    }
}
