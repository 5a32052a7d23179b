//! What a call to the server can end in, and the answer it reads.

use std::fmt;
use std::path::PathBuf;

use crate::json::Json;

#[derive(Debug)]
pub enum ClientError {
    /// No answer: connection refused, reset, timed out, TLS failure.
    Connection { url: String, reason: String },
    /// The server answered with a status the caller cannot use.
    Status { url: String, status: u16, body: String },
    /// The answer was larger than the cap for that endpoint.
    TooLarge { url: String, limit: usize },
    /// The answer was not what the API promises (bad JSON...).
    BadAnswer { url: String, reason: String },
    /// A local file the request needed could not be used.
    Local { path: PathBuf, reason: String },
    /// Abandoned because the agent is stopping; `request_sent`: the server
    /// had the whole request and may have acted on it.
    Stopped { url: String, request_sent: bool },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ClientError::Connection { url, reason } if reason.starts_with("no answer") => write!(f, "{url}: {reason}"),
            ClientError::Connection { url, reason } => write!(f, "{url}: no answer: {reason}"),
            ClientError::Status { url, status, body } => write!(f, "{url}: HTTP {status} {body}"),
            ClientError::TooLarge { url, limit } => write!(f, "{url}: answer larger than {limit} bytes"),
            ClientError::BadAnswer { url, reason } => write!(f, "{url}: bad answer: {reason}"),
            ClientError::Local { path, reason } => write!(f, "{}: {reason}", path.display()),
            ClientError::Stopped { url, .. } => write!(f, "{url}: not waited for, the agent is stopping"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// The call was abandoned for the agent's stop: nothing to report.
    pub fn is_stop(&self) -> bool {
        matches!(self, ClientError::Stopped { .. })
    }

    /// The server refuses this request for good: trying again cannot help.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Status { status, .. } if (400..500).contains(status) && !matches!(status, 401 | 408 | 429))
    }
}

pub(super) fn is_retryable(status: u16) -> bool {
    matches!(status, 500 | 502 | 503 | 504)
}

/// A server answer, body already read (and capped).
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub(super) fn json(&self, url: &str) -> Result<Json, ClientError> {
        Json::parse_bytes(&self.body)
            .map_err(|e| ClientError::BadAnswer { url: url.to_string(), reason: e.to_string() })
    }

    /// Only a 2xx is a success; anything else is an error quoting the start
    /// of the answer.
    pub(super) fn ok(self, url: &str) -> Result<Answer, ClientError> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            Err(ClientError::Status { url: url.to_string(), status: self.status, body: body_snippet(&self.body) })
        }
    }
}

/// The start of an error answer for a log line: one line (runs of white
/// space and control characters become one space), at most 200 characters.
fn body_snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let words: Vec<&str> =
        text.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()).collect();
    words.join(" ").chars().take(200).collect()
}

/// An I/O error in words for a log line: without the ` (os error N)` the
/// OS adds, and a read or write that timed out said as such (the OS says
/// "Resource temporarily unavailable") with the time waited.
pub(super) fn net_reason(e: &std::io::Error, waited: std::time::Duration) -> String {
    use std::io::ErrorKind;
    if e.raw_os_error().is_some() && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        return format!("no answer within {}", crate::human::duration(waited));
    }
    // The transport's own "<step>: no answer within N": the wait first, as
    // the line that says the server is not reachable reads it.
    let text = e.to_string();
    if let Some((step, wait)) = text.split_once(": no answer within ") {
        return format!("no answer within {wait} ({step})");
    }
    crate::human::without_os_error(&e.to_string())
}

/// Why the server cannot be reached, for the one line that says so: the
/// kind, and the reason when it says more than the kind does.
pub fn unreachable_text(reason: &str) -> String {
    let kind = unreachable_kind(reason);
    let reason = crate::human::without_os_error(reason);
    if reason.eq_ignore_ascii_case(kind) {
        kind.to_string()
    } else if reason.starts_with("no answer within") {
        // Already says the kind, and how long was waited.
        reason
    } else {
        format!("{kind} ({reason})")
    }
}

/// The kind of reason the server cannot be reached, from the error's text
/// (the HTTP crates give no finer types): what an operator acts on.
pub fn unreachable_kind(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| r.contains(w));
    if has(&["refused connect to", "the proxy answered"]) {
        // The proxy answered, with something other than a tunnel or the
        // server's answer: not a refused connection (the reason says what
        // it answered).
        "the proxy did not pass the request on"
    } else if has(&["certificate", "unknownissuer", "invalidcert", "notvalidforname"]) {
        "TLS certificate not accepted"
    } else if has(&["tls", "handshake", "rustls", "corrupt message", "invalidcontenttype", "invalidmessage"]) {
        "TLS failure"
    } else if has(&[
        "lookup",
        "looking up",
        "resolve",
        "name or service",
        "nodename nor servname",
        "name resolution",
        "no address",
    ]) {
        "host name not resolved"
    } else if has(&["refused"]) {
        "connection refused"
    } else if has(&["timed out", "timeout", "would block", "no answer within"]) {
        "no answer in time"
    } else if has(&["network is unreachable", "no route", "host is unreachable"]) {
        "network unreachable"
    } else if has(&["reset", "broken pipe", "cut off", "closed"]) {
        "connection dropped"
    } else if reason.starts_with("HTTP 5") {
        "server error"
    } else {
        "other error"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_become_one_short_line() {
        let html = format!("<html>\r\n  <body>\n\tBad\x00 gateway {}</body>\n", "x".repeat(500));
        let line = body_snippet(html.as_bytes());
        assert!(line.starts_with("<html> <body> Bad gateway xxx"), "{line}");
        assert_eq!(line.chars().count(), 200);
        assert_eq!(body_snippet("é".repeat(300).as_bytes()).chars().count(), 200);
    }

    #[test]
    fn unreachable_reasons_are_told_apart() {
        let cases = [
            ("http://x/v1/: no answer: Connection refused (os error 111)", "connection refused"),
            ("no answer: failed to lookup address information: Name or service not known", "host name not resolved"),
            ("no answer: invalid peer certificate: UnknownIssuer", "TLS certificate not accepted"),
            ("no answer: received corrupt message of type InvalidContentType", "TLS failure"),
            ("no answer: Resource temporarily unavailable: timed out", "no answer in time"),
            ("HTTP 503", "server error"),
            ("no answer: Connection reset by peer (os error 104)", "connection dropped"),
            (
                "proxy 127.0.0.1:3128 refused CONNECT to tf:443: HTTP 407 Proxy Authentication Required",
                "the proxy did not pass the request on",
            ),
        ];
        for (reason, kind) in cases {
            assert_eq!(unreachable_kind(reason), kind, "{reason}");
        }
    }

    /// Issue 22: `connection refused (Connection refused (os error 111))`.
    #[test]
    fn reasons_are_said_once_without_the_os_error_number() {
        assert_eq!(unreachable_text("Connection refused (os error 111)"), "connection refused");
        assert_eq!(
            unreachable_text("proxy p:3128: Connection refused (os error 111)"),
            "connection refused (proxy p:3128: Connection refused)"
        );
        assert_eq!(crate::human::without_os_error("a (os error x) b (os error 12)"), "a (os error x) b");
        assert_eq!(unreachable_text("no answer within 2 s"), "no answer within 2 s");
        let timed_out = std::io::Error::from_raw_os_error(11);
        assert_eq!(net_reason(&timed_out, std::time::Duration::from_secs(30)), "no answer within 30 s");
        let refused = std::io::Error::from_raw_os_error(111);
        assert_eq!(net_reason(&refused, std::time::Duration::from_secs(30)), "Connection refused");
    }
}
