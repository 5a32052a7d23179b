//! The agent's own state posts besides the loop's: a `waiting` owed since
//! a failed read, the `offline` before a restart, and the daily heartbeat.

use std::time::{Duration, SystemTime};

use super::{Agent, FilterStop, RESTARTING};
use crate::json::Json;
use crate::states::AgentState;

impl Agent<'_> {
    /// The state could not be read before posting `waiting`: an operator
    /// may have set one, so nothing is posted until a cycle sees it.
    pub(super) fn owe_waiting(&mut self, e: &crate::client::ClientError) {
        if e.is_stop() {
            return;
        }
        log::warn!("cannot read the agent's state on the server, so waiting is not posted over it yet: {e}");
        self.waiting_unposted = true;
    }

    /// Posts the `waiting` owed since a failed read, now that the state
    /// (`state`, `comment`) was read: not over an operator's hold, nor
    /// over a restart request.
    pub(super) fn post_owed_waiting(&mut self, state: &AgentState, comment: &str) {
        let held = state.is_hold() && !comment.starts_with(RESTARTING);
        if held || *state == AgentState::Restart {
            self.waiting_unposted = false;
            return;
        }
        match self.post_data(&AgentState::Waiting.post("")) {
            Ok(()) => self.waiting_unposted = false,
            Err(e) => log::warn!("cannot post the waiting state yet: {e}"),
        }
    }

    /// Tells the server why the agent goes away for a moment.
    pub(super) fn post_restarting(&mut self, comment: &str) {
        let comment = format!("{RESTARTING}{comment}");
        if let Err(e) = self.client.post_agent_data(&AgentState::Offline.post(&comment)).filter_stop() {
            log::warn!("cannot post the restart: {e}");
        }
    }

    /// Re-posts the state when the server has not heard from us for a day,
    /// so that an agent kept offline for long is not forgotten.
    pub(super) fn heartbeat(&mut self, agent_data: Option<&Json>, state: &AgentState, comment: &str) {
        let updated_at = agent_data.and_then(|d| d.get("updated_at")).and_then(Json::as_str);
        if !heartbeat_due(updated_at, self.last_post.elapsed(), SystemTime::now(), self.config.schedules().heartbeat) {
            return;
        }
        let state = if state.as_str().is_empty() { &AgentState::Waiting } else { state };
        log::info!("heartbeat: re-posting state {state}");
        // The comment goes along, or an operator's reason would be wiped.
        match self.post_data(&state.post(comment)) {
            Ok(()) => {}
            Err(e) if e.is_stop() => {}
            Err(e) => log::warn!("heartbeat not posted: {e}"),
        }
    }
}

/// Whether a heartbeat is owed: the server's `updated_at` (ISO 8601, UTC)
/// is a day old, or, when it gives none we can read, our last post is.
fn heartbeat_due(updated_at: Option<&str>, since_last_post: Duration, now: SystemTime, every: Duration) -> bool {
    let server_age = updated_at.and_then(crate::timestamp::parse_iso8601).and_then(|t| now.duration_since(t).ok());
    match server_age {
        Some(age) => age >= every,
        None => since_last_post >= every,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn heartbeat_once_a_day() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000); // 2023-11-14T22:13:20Z
        let hour = Duration::from_secs(3600);
        const HEARTBEAT: Duration = Duration::from_secs(24 * 3600);
        assert!(
            !heartbeat_due(Some("2023-11-14T20:00:00Z"), 30 * hour, now, HEARTBEAT),
            "server heard from us 2 h ago"
        );
        assert!(heartbeat_due(Some("2023-11-13T20:00:00.123456+00:00"), hour, now, HEARTBEAT), "26 h ago");
        assert!(heartbeat_due(Some("2023-11-13 20:00:00"), hour, now, HEARTBEAT), "space separator, no zone");
        assert!(!heartbeat_due(None, hour, now, HEARTBEAT));
        assert!(heartbeat_due(Some("garbage"), 25 * hour, now, HEARTBEAT));
    }
}
