//! The server's endpoints the agent calls, one method each (the file
//! transfers are in `files.rs`).

use std::time::Instant;

use crate::json::Json;
use crate::retry::Retry;
use crate::states::{AgentState, JobState};

use super::error::is_retryable;
use super::transport::{Keep, Payload};
use super::{Answer, BodyWriter, Client, ClientError, Idle, SMALL_ANSWER, is_safe_id, url_encode};

/// Cap on a job: jobs carry scripts and data, but not megabytes of it.
const JOB_ANSWER: usize = 16 << 20;

impl Client {
    /// Any answer below 500 means the server is up (a 404 on `/v1` too).
    pub fn is_reachable(&mut self) -> bool {
        self.reachability().is_ok()
    }

    /// `Err` says why the server cannot be reached, for the log. Not held
    /// back by an outage, but counted in it like any call: a probe that
    /// ends one starts the hold that spreads the return (see `Outage`).
    pub fn reachability(&mut self) -> Result<(), String> {
        let answer = self.send_once("GET", &self.url("/v1/"), None, SMALL_ANSWER, false, self.retry.timeout);
        let failed = match &answer {
            Ok(a) => is_retryable(a.status),
            Err(e) => matches!(e, ClientError::Connection { .. }),
        };
        if failed {
            let now = Instant::now();
            self.outage.attempt_failed(now);
            self.outage.call_failed(now);
        }
        let reachable = match answer {
            // Only a proxy asks for its own credentials: the server was not reached.
            Ok(a) if a.status == 407 => {
                Err("the proxy answered HTTP 407 (Proxy Authentication Required): give user:password@ in http_proxy"
                    .into())
            }
            Ok(a) if a.status < 500 => Ok(()),
            Ok(a) => Err(format!("HTTP {}", a.status)),
            Err(ClientError::Connection { reason, .. }) => Err(reason),
            Err(e) => Err(e.to_string()),
        };
        if reachable.is_ok() {
            self.outage_ended();
        }
        reachable
    }

    pub fn post_agent_data(&mut self, data: &Json) -> Result<(), ClientError> {
        self.post_agent_data_with(data, self.retry)
    }

    pub fn post_agent_data_with(&mut self, data: &Json, retry: Retry) -> Result<(), ClientError> {
        let path = format!("/v1/agents/data/{}", url_encode(&self.agent_id));
        self.call_ok("POST", &path, Some(data), SMALL_ANSWER, retry).map(drop)
    }

    /// The agent's own record on the server; `None` when it has none yet.
    pub fn get_agent_data(&mut self) -> Result<Option<Json>, ClientError> {
        self.agent_data(self.retry)
    }

    fn agent_data(&mut self, retry: Retry) -> Result<Option<Json>, ClientError> {
        let path = format!("/v1/agents/data/{}", url_encode(&self.agent_id));
        let a = self.call("GET", &path, None, SMALL_ANSWER, retry)?;
        match a.status {
            200 => a.json(&self.url(&path)).map(Some),
            404 | 204 => Ok(None),
            status => Err(ClientError::Status { url: self.url(&path), status, body: String::new() }),
        }
    }

    /// The state the agent is held in on the server (`offline` or
    /// `maintenance`) and its comment; `Ok(None)` when it is not held (or
    /// has no record). Posting a state over it would undo an operator, so
    /// a failed read (`Err`) must not be taken for "not held".
    pub fn held_state(&mut self) -> Result<Option<(AgentState, String)>, ClientError> {
        self.held_state_with(self.retry)
    }

    pub fn held_state_with(&mut self, retry: Retry) -> Result<Option<(AgentState, String)>, ClientError> {
        let Some(data) = self.agent_data(retry)? else { return Ok(None) };
        let (state, comment) = AgentState::of(&data);
        Ok(state.is_hold().then_some((state, comment)))
    }

    pub fn post_queues(&mut self, queues: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", "/v1/agents/queues", Some(queues), SMALL_ANSWER, self.retry).map(drop)
    }

    pub fn post_images(&mut self, images: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", "/v1/agents/images", Some(images), SMALL_ANSWER, self.retry).map(drop)
    }

    /// Asks for a job on `queues`; `None` when there is none (204).
    pub fn get_job(&mut self, queues: &[String]) -> Result<Option<Json>, ClientError> {
        let query: Vec<String> = queues.iter().map(|q| format!("queue={}", url_encode(q))).collect();
        let path = format!("/v1/job?{}", query.join("&"));
        let a = self.call_ok("GET", &path, None, JOB_ANSWER, self.retry)?;
        if a.status == 204 || a.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let job = a.json(&self.url(&path))?;
        match job.get("job_id").and_then(Json::as_str) {
            Some(id) if is_safe_id(id) => Ok(Some(job)),
            _ => Err(ClientError::BadAnswer { url: self.url(&path), reason: "job without a valid job_id".into() }),
        }
    }

    /// The job's `job_state` on the server, if it can be read. `idle`, when
    /// given (the runner draining a phase's pipe), runs while the request
    /// waits on the server.
    pub fn job_state(&mut self, job_id: &str, idle: Option<&mut Idle>) -> Option<JobState> {
        self.job_state_with(job_id, idle, self.retry)
    }

    pub fn job_state_with(&mut self, job_id: &str, idle: Option<&mut Idle>, retry: Retry) -> Option<JobState> {
        let url = self.url(&format!("/v1/result/{job_id}"));
        let answer = self.with_retries("GET", &url, retry, idle, &mut |c, idle| {
            let reply = c.exchange("GET", &url, Payload::None, Keep::Memory(JOB_ANSWER), retry.timeout, idle, true)?;
            Ok(Answer { status: reply.status, body: reply.body })
        });
        let result = answer
            .and_then(|a| a.ok(&url))
            .and_then(|a| if a.body.is_empty() { Ok(None) } else { a.json(&url).map(Some) });
        match result {
            Ok(Some(r)) => r.get("job_state").and_then(Json::as_str).map(JobState::parse),
            Ok(None) => None,
            Err(e) if e.is_stop() => None,
            Err(e) => {
                log::warn!("cannot read the job state: {e}");
                None
            }
        }
    }

    pub fn post_result(&mut self, job_id: &str, data: &Json) -> Result<(), ClientError> {
        self.call_ok("POST", &format!("/v1/result/{job_id}"), Some(data), SMALL_ANSWER, self.retry).map(drop)
    }

    /// Posts one log fragment (`kind` is `output` or `serial`) whose JSON body, exactly `len` bytes, `body`
    /// writes straight into the socket (fragments can be megabytes).
    pub fn post_log_fragment_streamed(
        &mut self,
        job_id: &str,
        kind: &str,
        len: u64,
        body: &mut BodyWriter,
        idle: Option<&mut Idle>,
        retry: Retry,
    ) -> Result<(), ClientError> {
        self.call_streaming(&format!("/v1/result/{job_id}/log/{kind}"), "application/json", len, body, idle, retry)
    }

    pub fn post_provision_log(&mut self, data: &Json) -> Result<(), ClientError> {
        let path = format!("/v1/agents/provision_logs/{}", url_encode(&self.agent_id));
        self.call_ok("POST", &path, Some(data), SMALL_ANSWER, self.retry).map(drop)
    }

    pub fn post_events(&mut self, job_id: &str, data: &Json) -> Result<(), ClientError> {
        self.post_events_with(job_id, data, self.retry)
    }

    pub fn post_events_with(&mut self, job_id: &str, data: &Json, retry: Retry) -> Result<(), ClientError> {
        self.call_ok("POST", &format!("/v1/job/{job_id}/events"), Some(data), SMALL_ANSWER, retry).map(drop)
    }
}
