//! One exchange through the transport: its failures as [`ClientError`]s,
//! redirects followed on the server's origin and refused elsewhere.

use std::time::Duration;

use super::error::net_reason;
use super::transport::{self, Failure, Keep, Payload, Reply};
use super::wire::Url;
use super::{Answer, Client, ClientError, Idle};

/// Same-origin redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

impl Client {
    /// One JSON (or empty) exchange, no retries.
    pub(super) fn send_once(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        cap: usize,
        auth: bool,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let payload = match body {
            Some(bytes) => Payload::Bytes { content_type: "application/json", bytes },
            None => Payload::None,
        };
        let reply = self.exchange(method, url, payload, Keep::Memory(cap), timeout, None, auth)?;
        Ok(Answer { status: reply.status, body: reply.body })
    }

    /// One exchange through the transport, following redirects that stay
    /// on the server's origin and refusing the others.
    // The transport's `Request` fields plus `auth`, as the endpoint methods
    // have them; the `Request` itself is built per hop (its URL changes).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn exchange(
        &self,
        method: &str,
        url: &str,
        mut payload: Payload,
        keep: Keep,
        timeout: Duration,
        mut idle: Option<&mut Idle>,
        auth: bool,
    ) -> Result<Reply, ClientError> {
        let origin =
            Url::parse(url).map_err(|e| ClientError::Connection { url: url.to_string(), reason: e.to_string() })?;
        let headers = self.headers(auth);
        let mut target = origin.clone();
        let mut method = method;
        for hop in 0..=MAX_REDIRECTS {
            let request = transport::Request {
                method,
                url: &target,
                headers: &headers,
                payload: payload.reborrow(),
                keep,
                timeout,
                // Written out: the closure's lifetime shortens only here.
                idle: match idle.as_deref_mut() {
                    Some(f) => Some(f),
                    None => None,
                },
            };
            let reply = transport::exchange(&self.net, request).map_err(|f| match f {
                Failure::Net(e) => ClientError::Connection { url: target.to_string(), reason: net_reason(&e, timeout) },
                Failure::TooLarge(limit) => ClientError::TooLarge {
                    url: target.to_string(),
                    limit: usize::try_from(limit).unwrap_or(usize::MAX),
                },
                Failure::Local(path, e) => ClientError::Local { path, reason: net_reason(&e, timeout) },
                Failure::Stopped { request_sent } => ClientError::Stopped { url: target.to_string(), request_sent },
            })?;
            let status = reply.status;
            let location = match (&reply.location, status) {
                (Some(l), 301 | 302 | 303 | 307 | 308) => l,
                _ => return Ok(reply),
            };
            let refuse = |why: String| {
                log::error!(
                    "{method} {target}: HTTP {status} redirect refused: {why}; the token, cookie and body were not sent there"
                );
                Err(ClientError::Status { url: target.to_string(), status, body: format!("redirect refused: {why}") })
            };
            let next = match target.join(location) {
                Ok(next) => next,
                Err(e) => return refuse(e.to_string()),
            };
            if !origin.same_origin(&next) {
                let why =
                    if origin.https && !next.https { "a downgrade from https to http" } else { "on another origin" };
                return refuse(format!(
                    "{next} is {why} (the server is {}://{})",
                    origin.scheme(),
                    origin.host_header()
                ));
            }
            if hop == MAX_REDIRECTS {
                return refuse(format!("more than {MAX_REDIRECTS} redirects"));
            }
            // As browsers and requests do: 303 always, and 301/302 after a
            // POST, become a GET without the body.
            if status == 303 || (matches!(status, 301 | 302) && method == "POST") {
                if matches!(payload, Payload::Stream { .. }) {
                    return refuse(format!("HTTP {status} would drop the upload"));
                }
                method = "GET";
                payload = Payload::None;
            }
            log::info!("{method} {target}: following HTTP {status} to {next} (same server)");
            target = next;
        }
        unreachable!("the loop returns on its last hop")
    }
}
