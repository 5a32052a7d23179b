//! The states the server keeps: a job's `job_state` and an agent's
//! `state`, each spelled (written and read) here only. What the server
//! sends that is not known here is kept as it came (`Other`), so that an
//! unknown state is neither lost nor taken for a known one.

use std::fmt;

use crate::json::Json;
use crate::phase::Phase;

/// A job's `job_state` on the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Queued, no agent has it yet.
    Waiting,
    /// The phase the agent is in (posted before each phase).
    Phase(Phase),
    /// The allocate phase published the device; the job holds it.
    Allocated,
    /// The agent's final outcome.
    Complete,
    /// The server's own word for a finished job (a parent's, say).
    Completed,
    Cancelled,
    Other(String),
}

impl JobState {
    pub fn parse(s: &str) -> JobState {
        match s {
            "waiting" => JobState::Waiting,
            "allocated" => JobState::Allocated,
            "complete" => JobState::Complete,
            "completed" => JobState::Completed,
            "cancelled" => JobState::Cancelled,
            other => Phase::parse(other).map_or_else(|| JobState::Other(other.to_string()), JobState::Phase),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Phase(p) => p.as_str(),
            JobState::Allocated => "allocated",
            JobState::Complete => "complete",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Other(s) => s,
        }
    }

    /// The job is over: an allocation made for it (or for a child of it)
    /// is released.
    pub fn is_over(&self) -> bool {
        matches!(self, JobState::Complete | JobState::Completed | JobState::Cancelled)
    }

    /// The `{"job_state": ...}` body of a result post.
    pub fn post(&self) -> Json {
        Json::object().with("job_state", Json::str(self.as_str()))
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An agent's `state` on the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentState {
    Waiting,
    /// Running a job, in this phase.
    Busy(Phase),
    /// Set by an operator (or by the agent after a failed recovery, or
    /// before a restart): no job is taken.
    Offline,
    /// Set by an operator: no job is taken.
    Maintenance,
    /// Asked by an operator: the agent exits when idle.
    Restart,
    /// Anything else, the empty state (no record yet) included.
    Other(String),
}

impl AgentState {
    pub fn parse(s: &str) -> AgentState {
        match s {
            "waiting" => AgentState::Waiting,
            "offline" => AgentState::Offline,
            "maintenance" => AgentState::Maintenance,
            "restart" => AgentState::Restart,
            other => Phase::parse(other).map_or_else(|| AgentState::Other(other.to_string()), AgentState::Busy),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            AgentState::Waiting => "waiting",
            AgentState::Busy(p) => p.as_str(),
            AgentState::Offline => "offline",
            AgentState::Maintenance => "maintenance",
            AgentState::Restart => "restart",
            AgentState::Other(s) => s,
        }
    }

    /// An operator's hold: the agent takes no job and posts no state over it.
    pub fn is_hold(&self) -> bool {
        matches!(self, AgentState::Offline | AgentState::Maintenance)
    }

    /// The agent-data body that sets this state. Always with a comment,
    /// as upstream posts a state: the server keeps the last one otherwise.
    pub fn post(&self, comment: &str) -> Json {
        let mut data = Json::object();
        self.set_in(&mut data, comment);
        data
    }

    /// Sets this state and `comment` in an agent-data body.
    pub fn set_in(&self, data: &mut Json, comment: &str) {
        data.set("state", Json::str(self.as_str()));
        data.set("comment", Json::str(comment));
    }

    /// The state and comment in the agent's record on the server (empty
    /// when missing).
    pub fn of(data: &Json) -> (AgentState, String) {
        let text = |key| data.get(key).and_then(Json::as_str).unwrap_or("");
        (AgentState::parse(text("state")), text("comment").to_string())
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_as_written() {
        for s in ["waiting", "setup", "allocate", "allocated", "complete", "completed", "cancelled", "odd", ""] {
            assert_eq!(JobState::parse(s).as_str(), s);
        }
        for s in ["waiting", "test", "offline", "maintenance", "restart", "busy", ""] {
            assert_eq!(AgentState::parse(s).as_str(), s);
        }
        assert_eq!(JobState::parse("reserve"), JobState::Phase(Phase::Reserve));
        assert_eq!(AgentState::parse("provision"), AgentState::Busy(Phase::Provision));
    }

    #[test]
    fn only_finished_jobs_release_and_only_operator_states_hold() {
        let over: Vec<&str> = ["waiting", "test", "allocated", "complete", "completed", "cancelled", "x"]
            .into_iter()
            .filter(|s| JobState::parse(s).is_over())
            .collect();
        assert_eq!(over, ["complete", "completed", "cancelled"]);
        let held: Vec<&str> = ["waiting", "test", "offline", "maintenance", "restart", ""]
            .into_iter()
            .filter(|s| AgentState::parse(s).is_hold())
            .collect();
        assert_eq!(held, ["offline", "maintenance"]);
    }

    #[test]
    fn a_state_post_always_carries_a_comment() {
        assert_eq!(AgentState::Busy(Phase::Test).post("").to_string_compact(), r#"{"state":"test","comment":""}"#);
        assert_eq!(JobState::Allocated.post().to_string_compact(), r#"{"job_state":"allocated"}"#);
    }
}
