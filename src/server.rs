//! What a job needs of the Testflinger server, as a trait the job core
//! talks to: the HTTP [`Client`] is the server, [`Local`] stands in for
//! none (the `--job` mode), and the unit tests of the job core use a
//! recording fake (`server/fake.rs`).
//!
//! Each method is one endpoint; failures are the client's errors, to be
//! logged and kept for later as the client's callers always did.

use std::path::Path;

use crate::client::{BodyWriter, Client, ClientError, Idle};
use crate::json::Json;
use crate::retry::Retry;
use crate::states::{AgentState, JobState};

#[cfg(test)]
pub(crate) mod fake;

pub trait Server {
    /// No server at all (`--job`): a phase's output goes to the terminal
    /// instead of a live stream, nothing can cancel the job or release an
    /// allocation (so none is held), attachments cannot be fetched, and
    /// the outcome stays in the run dir.
    fn is_local(&self) -> bool {
        false
    }
    /// The retry policy of calls whose caller has none of its own.
    fn retry(&self) -> Retry;
    /// Where a person sees the job (the `job_start` event's detail).
    fn job_url(&self, job_id: &str) -> String;
    /// The job's `job_state`, if it can be read; `idle` runs while the
    /// request waits (the runner draining a phase's pipe).
    fn job_state(&mut self, job_id: &str, idle: Option<&mut Idle>, retry: Retry) -> Option<JobState>;
    fn post_result(&mut self, job_id: &str, data: &Json) -> Result<(), ClientError>;
    /// The operator's hold on the agent (`offline`, `maintenance`) and its
    /// comment; `Ok(None)` when there is none. A failed read is no "none".
    fn held_state(&mut self, retry: Retry) -> Result<Option<(AgentState, String)>, ClientError>;
    fn post_agent_data(&mut self, data: &Json, retry: Retry) -> Result<(), ClientError>;
    fn post_provision_log(&mut self, data: &Json) -> Result<(), ClientError>;
    fn post_events(&mut self, job_id: &str, data: &Json, retry: Retry) -> Result<(), ClientError>;
    /// One log fragment (`kind`: `output` or `serial`), a JSON body of
    /// exactly `len` bytes that `body` writes.
    fn post_log_fragment_streamed(
        &mut self,
        job_id: &str,
        kind: &str,
        len: u64,
        body: &mut BodyWriter,
        idle: Option<&mut Idle>,
        retry: Retry,
    ) -> Result<(), ClientError>;
    fn post_artifact(&mut self, job_id: &str, archive: &Path) -> Result<(), ClientError>;
    /// Downloads the job's attachments to `dest`; false when it has none.
    fn download_attachments(&mut self, job_id: &str, dest: &Path) -> Result<bool, ClientError>;
}

impl Server for Client {
    fn retry(&self) -> Retry {
        Client::retry(self)
    }

    fn job_url(&self, job_id: &str) -> String {
        self.url(&format!("/jobs/{job_id}"))
    }

    fn job_state(&mut self, job_id: &str, idle: Option<&mut Idle>, retry: Retry) -> Option<JobState> {
        self.job_state_with(job_id, idle, retry)
    }

    fn post_result(&mut self, job_id: &str, data: &Json) -> Result<(), ClientError> {
        Client::post_result(self, job_id, data)
    }

    fn held_state(&mut self, retry: Retry) -> Result<Option<(AgentState, String)>, ClientError> {
        self.held_state_with(retry)
    }

    fn post_agent_data(&mut self, data: &Json, retry: Retry) -> Result<(), ClientError> {
        self.post_agent_data_with(data, retry)
    }

    fn post_provision_log(&mut self, data: &Json) -> Result<(), ClientError> {
        Client::post_provision_log(self, data)
    }

    fn post_events(&mut self, job_id: &str, data: &Json, retry: Retry) -> Result<(), ClientError> {
        self.post_events_with(job_id, data, retry)
    }

    fn post_log_fragment_streamed(
        &mut self,
        job_id: &str,
        kind: &str,
        len: u64,
        body: &mut BodyWriter,
        idle: Option<&mut Idle>,
        retry: Retry,
    ) -> Result<(), ClientError> {
        Client::post_log_fragment_streamed(self, job_id, kind, len, body, idle, retry)
    }

    fn post_artifact(&mut self, job_id: &str, archive: &Path) -> Result<(), ClientError> {
        Client::post_artifact(self, job_id, archive)
    }

    fn download_attachments(&mut self, job_id: &str, dest: &Path) -> Result<bool, ClientError> {
        Client::download_attachments(self, job_id, dest)
    }
}

/// No server (`--job`): every post is taken and goes nowhere, no job state
/// can be read (so nothing cancels the job).
pub struct Local;

impl Server for Local {
    fn is_local(&self) -> bool {
        true
    }

    fn retry(&self) -> Retry {
        Retry::default()
    }

    fn job_url(&self, _job_id: &str) -> String {
        String::new()
    }

    fn job_state(&mut self, _job_id: &str, _idle: Option<&mut Idle>, _retry: Retry) -> Option<JobState> {
        None
    }

    fn post_result(&mut self, _job_id: &str, _data: &Json) -> Result<(), ClientError> {
        Ok(())
    }

    fn held_state(&mut self, _retry: Retry) -> Result<Option<(AgentState, String)>, ClientError> {
        Ok(None)
    }

    fn post_agent_data(&mut self, _data: &Json, _retry: Retry) -> Result<(), ClientError> {
        Ok(())
    }

    fn post_provision_log(&mut self, _data: &Json) -> Result<(), ClientError> {
        Ok(())
    }

    fn post_events(&mut self, _job_id: &str, _data: &Json, _retry: Retry) -> Result<(), ClientError> {
        Ok(())
    }

    fn post_log_fragment_streamed(
        &mut self,
        _job_id: &str,
        _kind: &str,
        _len: u64,
        _body: &mut BodyWriter,
        _idle: Option<&mut Idle>,
        _retry: Retry,
    ) -> Result<(), ClientError> {
        Ok(())
    }

    fn post_artifact(&mut self, _job_id: &str, _archive: &Path) -> Result<(), ClientError> {
        Ok(())
    }

    fn download_attachments(&mut self, _job_id: &str, _dest: &Path) -> Result<bool, ClientError> {
        Ok(false)
    }
}
