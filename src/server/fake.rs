//! A server for unit tests: it records every call in order, answers job
//! states from a script, and fails the calls a test names.

use std::path::Path;
use std::time::Duration;

use super::Server;
use crate::client::{BodyWriter, ClientError, Idle};
use crate::json::Json;
use crate::retry::{Jitter, Retry, Schedule};
use crate::states::{AgentState, JobState};

/// One call the job made, with what it sent.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Call {
    Result(String, Json),
    AgentData(Json),
    JobState(String),
    HeldState,
    ProvisionLog(Json),
    Events(String, Json),
    /// A log fragment: its kind and body.
    Fragment(String, Json),
    Artifact(String),
    Attachments(String),
}

type States = Box<dyn FnMut(&str) -> Option<JobState>>;

pub(crate) struct Fake {
    pub(crate) calls: Vec<Call>,
    /// The answer to a job-state read of a job id (default: none).
    pub(crate) states: States,
    /// Calls that fail (with a connection error); they are still recorded.
    pub(crate) fails: fn(&Call) -> bool,
    /// Calls refused for good (HTTP 413); recorded too.
    pub(crate) refuses: fn(&Call) -> bool,
    pub(crate) held: Option<(AgentState, String)>,
    /// Calls the server answers with a 500 (it is up, this one fails).
    pub(crate) errors: fn(&Call) -> bool,
}

impl Fake {
    pub(crate) fn new() -> Fake {
        Fake {
            calls: Vec::new(),
            states: Box::new(|_| None),
            fails: |_| false,
            refuses: |_| false,
            held: None,
            errors: |_| false,
        }
    }

    /// Answers job-state reads with `states`.
    pub(crate) fn with_states(mut self, states: impl FnMut(&str) -> Option<JobState> + 'static) -> Fake {
        self.states = Box::new(states);
        self
    }

    pub(crate) fn failing(mut self, fails: fn(&Call) -> bool) -> Fake {
        self.fails = fails;
        self
    }

    pub(crate) fn refusing(mut self, refuses: fn(&Call) -> bool) -> Fake {
        self.refuses = refuses;
        self
    }

    pub(crate) fn erroring(mut self, errors: fn(&Call) -> bool) -> Fake {
        self.errors = errors;
        self
    }

    fn record(&mut self, call: Call) -> Result<(), ClientError> {
        let (fails, refuses, errors) = ((self.fails)(&call), (self.refuses)(&call), (self.errors)(&call));
        self.calls.push(call);
        if errors {
            return Err(ClientError::Status { url: "fake".into(), status: 500, body: String::new() });
        }
        if fails {
            return Err(ClientError::Connection { url: "fake".into(), reason: "failed by the test".into() });
        }
        if refuses {
            return Err(ClientError::Status { url: "fake".into(), status: 413, body: String::new() });
        }
        Ok(())
    }

    /// The `job_state`s posted as results, in order.
    pub(crate) fn job_states_posted(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Result(_, data) => data.get("job_state").and_then(Json::as_str).map(String::from),
                _ => None,
            })
            .collect()
    }

    /// The agent states posted, in order.
    pub(crate) fn agent_states_posted(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::AgentData(data) => data.get("state").and_then(Json::as_str).map(String::from),
                _ => None,
            })
            .collect()
    }

    /// The event names of the last events post.
    pub(crate) fn last_events(&self) -> Vec<String> {
        let last = self.calls.iter().rev().find_map(|c| match c {
            Call::Events(_, body) => body.get("events").and_then(Json::as_array),
            _ => None,
        });
        last.unwrap_or(&[])
            .iter()
            .filter_map(|e| e.get("event_name").and_then(Json::as_str).map(String::from))
            .collect()
    }

    /// The concatenated `log_data` of the `kind` fragments.
    pub(crate) fn log(&self, kind: &str) -> String {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Fragment(k, body) if k == kind => body.get("log_data").and_then(Json::as_str),
                _ => None,
            })
            .collect()
    }
}

impl Server for Fake {
    fn retry(&self) -> Retry {
        Retry {
            attempts: 1,
            timeout: Duration::from_secs(1),
            between: Schedule::new(Duration::ZERO, Duration::ZERO, Jitter::None),
            later: false,
        }
    }

    fn job_url(&self, job_id: &str) -> String {
        format!("fake:/jobs/{job_id}")
    }

    fn job_state(&mut self, job_id: &str, _idle: Option<&mut Idle>, _retry: Retry) -> Option<JobState> {
        self.record(Call::JobState(job_id.to_string())).ok()?;
        (self.states)(job_id)
    }

    fn post_result(&mut self, job_id: &str, data: &Json) -> Result<(), ClientError> {
        self.record(Call::Result(job_id.to_string(), data.clone()))
    }

    fn held_state(&mut self, _retry: Retry) -> Result<Option<(AgentState, String)>, ClientError> {
        self.record(Call::HeldState)?;
        Ok(self.held.clone())
    }

    fn post_agent_data(&mut self, data: &Json, _retry: Retry) -> Result<(), ClientError> {
        self.record(Call::AgentData(data.clone()))
    }

    fn post_provision_log(&mut self, data: &Json) -> Result<(), ClientError> {
        self.record(Call::ProvisionLog(data.clone()))
    }

    fn post_events(&mut self, job_id: &str, data: &Json, _retry: Retry) -> Result<(), ClientError> {
        self.record(Call::Events(job_id.to_string(), data.clone()))
    }

    fn post_log_fragment_streamed(
        &mut self,
        _job_id: &str,
        kind: &str,
        len: u64,
        body: &mut BodyWriter,
        _idle: Option<&mut Idle>,
        _retry: Retry,
    ) -> Result<(), ClientError> {
        let mut bytes = Vec::new();
        let local = |e: std::io::Error| ClientError::Local { path: "fake".into(), reason: e.to_string() };
        body(&mut bytes).map_err(local)?;
        assert_eq!(bytes.len() as u64, len, "a fragment's body is as long as announced");
        let text = String::from_utf8(bytes).map_err(|e| local(std::io::Error::other(e)))?;
        let json = Json::parse(&text).map_err(|e| local(std::io::Error::other(e.to_string())))?;
        self.record(Call::Fragment(kind.to_string(), json))
    }

    fn post_artifact(&mut self, job_id: &str, _archive: &Path) -> Result<(), ClientError> {
        self.record(Call::Artifact(job_id.to_string()))
    }

    fn download_attachments(&mut self, job_id: &str, _dest: &Path) -> Result<bool, ClientError> {
        self.record(Call::Attachments(job_id.to_string()))?;
        Ok(false)
    }
}
