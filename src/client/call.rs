//! The retry and outage machinery every call goes through: the token,
//! the 401 refresh and replay, retries with backoff, and calls held back
//! while the server has been failing.

use std::time::{Duration, Instant};

use crate::json::Json;
use crate::retry::{OUTAGE_HOLD, Retry};

use super::error::is_retryable;
use super::transport::{Keep, Payload};
use super::{Answer, BodyWriter, Client, ClientError, Idle, SMALL_ANSWER};

/// One try of a call's request, given the idle work to do while it waits.
type TryOnce<'s> = dyn FnMut(&Client, Option<&mut Idle>) -> Result<Answer, ClientError> + 's;

impl Client {
    /// One call with auth, the 401 refresh-and-replay, and retries.
    pub(super) fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Json>,
        cap: usize,
        retry: Retry,
    ) -> Result<Answer, ClientError> {
        let url = self.url(path);
        let body_text = body.map(|b| b.to_string_compact());
        let body = body_text.as_deref().map(str::as_bytes);
        self.with_retries(method, &url, retry, None, &mut |c, _| {
            c.send_once(method, &url, body, cap, true, retry.timeout)
        })
    }

    /// The one retry mechanism every call goes through: a token first when
    /// there is a token file and no token yet; on a 401 one refresh and one
    /// replay; connection errors and 500/502/503/504 retried with doubling
    /// backoff up to `retry.attempts`. What `send` answers last is returned.
    /// During an outage (see [`Outage`]), and after its end for the calls
    /// tried again later anyway (`retry.later`), a call is not tried until its hold
    /// is over: it fails at once with a connection error saying so.
    /// `idle` (the runner draining a phase's pipe) runs while `send` or a
    /// token refresh waits on the server.
    pub(super) fn with_retries(
        &mut self,
        method: &str,
        url: &str,
        retry: Retry,
        mut idle: Option<&mut Idle>,
        send: &mut TryOnce,
    ) -> Result<Answer, ClientError> {
        if self.access_token.is_none() && self.token_file.is_some() {
            self.refresh(idle.as_deref_mut());
        }
        let now = Instant::now();
        if let Some(left) =
            if retry.later || self.all_later { self.outage.held_later(now) } else { self.outage.held(now) }
        {
            let reason =
                format!("not tried: held back since the server failed, next try in {:.1} s", left.as_secs_f64());
            return Err(ClientError::Connection { url: url.to_string(), reason });
        }
        let mut refreshed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Spread (±20 %) so that agents failing together retry apart.
            let backoff = retry.between.wait(attempt);
            let answer = send(self, idle.as_deref_mut());
            let failed = match &answer {
                Ok(a) => is_retryable(a.status),
                Err(e) => matches!(e, ClientError::Connection { .. }),
            };
            if failed {
                self.outage.attempt_failed(Instant::now());
            } else if answer.is_ok() {
                self.outage_ended();
            }
            if answer.as_ref().is_ok_and(|a| a.status != 401) {
                self.token_refused = false;
            }
            match answer {
                // Without a token file (the default path is usually absent)
                // a 401 has nothing to refresh: it is the answer.
                Ok(a) if a.status == 401 && !refreshed && self.token_file.as_ref().is_some_and(|p| p.exists()) => {
                    refreshed = true;
                    // Said once per hold-off, not on every refused call.
                    if !self.refresh_hold.ready(Instant::now()) {
                        log::debug!("{method} {url}: HTTP 401; the token refresh is held off");
                        self.token_refused = true;
                        return Ok(a);
                    }
                    log::info!("{method} {url}: HTTP 401, refreshing the access token");
                    if !self.refresh(idle.as_deref_mut()) {
                        self.token_refused = true;
                        return Ok(a);
                    }
                    continue;
                }
                Ok(a) if is_retryable(a.status) && attempt < retry.attempts => {
                    log::warn!(
                        "{method} {url}: HTTP {} (attempt {attempt}), retrying in {}",
                        a.status,
                        crate::human::duration(backoff)
                    );
                }
                Err(e @ ClientError::Connection { .. }) if attempt < retry.attempts => {
                    log::warn!("{method} {e} (attempt {attempt}), retrying in {}", crate::human::duration(backoff));
                }
                other => {
                    if failed {
                        self.outage_began();
                    }
                    return other;
                }
            }
            crate::wait::sleep(backoff, None);
        }
    }

    /// An answer: when it ends an outage, the other calls wait a random
    /// part of the outage's length (see [`Outage::answered`]).
    pub(super) fn outage_ended(&mut self) {
        if let Some(hold) = self.outage.answered(Instant::now()) {
            log::info!(
                "server {} answering again; requests held back {:.1} s more (a random part of the outage, so that agents back from it do not all come at once)",
                self.base,
                hold.as_secs_f64()
            );
        }
    }

    /// A call gave up: when that makes an outage, calls are held back.
    fn outage_began(&mut self) {
        match self.outage.call_failed(Instant::now()) {
            Some((hold, true)) => log::warn!(
                "server {} failing for {} s or more: requests held back for {:.1} s, then for a random part of the outage so far (at most a minute) while it still fails",
                self.base,
                crate::retry::OUTAGE_AFTER.as_secs(),
                hold.as_secs_f64()
            ),
            Some((hold, false)) => {
                log::debug!("server {} still failing: requests held back for {:.1} s", self.base, hold.as_secs_f64())
            }
            None => {}
        }
    }

    /// A call whose only success is a 2xx; anything else becomes an error.
    pub(super) fn call_ok(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Json>,
        cap: usize,
        retry: Retry,
    ) -> Result<Answer, ClientError> {
        self.call(method, path, body, cap, retry)?.ok(&self.url(path))
    }

    /// POST with a body written by `body` (exactly `len` bytes), retried
    /// like `call`, including the 401 refresh. Only a 2xx is a success.
    pub(super) fn call_streaming(
        &mut self,
        path: &str,
        content_type: &str,
        len: u64,
        body: &mut BodyWriter,
        idle: Option<&mut Idle>,
        retry: Retry,
    ) -> Result<(), ClientError> {
        let url = self.url(path);
        let a = self.with_retries("POST", &url, retry, idle, &mut |c, idle| {
            let payload = Payload::Stream { content_type, len, write: &mut *body };
            let reply = c.exchange("POST", &url, payload, Keep::Drop(SMALL_ANSWER), retry.timeout, idle, true)?;
            Ok(Answer { status: reply.status, body: Vec::new() })
        })?;
        if (200..300).contains(&a.status) {
            Ok(())
        } else {
            Err(ClientError::Status { url, status: a.status, body: String::new() })
        }
    }
}

/// The outage hold schedule. For tests: `TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX=SECONDS`
/// caps each hold, so that a test whose faults make an outage does not wait
/// out minute-long random holds (they grow with the outage's age). Read in
/// release builds too (the cross builds run the suite under qemu): it can
/// only shorten a hold, never lengthen one or add a request.
pub(super) fn outage_hold() -> crate::retry::Schedule {
    let mut hold = OUTAGE_HOLD;
    if let Some(s) = std::env::var("TESTFLINGER_AGENT_TEST_OUTAGE_HOLD_MAX").ok().and_then(|s| s.parse::<f64>().ok()) {
        if s.is_finite() && s > 0.0 {
            hold.max = hold.max.min(Duration::from_secs_f64(s.min(3600.0)));
            hold.first = hold.first.min(hold.max);
        }
    }
    hold
}
