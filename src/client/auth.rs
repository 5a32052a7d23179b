//! The bearer token: read from the token file, exchanged for an access
//! token, refreshed on a 401, and not asked for again and again when the
//! server keeps refusing it.

use std::time::{Duration, Instant};

use super::transport::{Keep, Payload};
use super::{Answer, Client, Idle, SMALL_ANSWER, percent_encode};
use crate::json::Json;
use crate::retry::{Jitter, Schedule};

/// After a refused refresh, calls go out without a new attempt for this
/// long, doubled for each further refusal in a row up to the cap: a token
/// endpoint that fails for a moment is retried within seconds, one that
/// keeps refusing is asked every few minutes.
pub(super) const REFRESH_HOLD_OFF: Schedule =
    Schedule::new(Duration::from_secs(1), Duration::from_secs(300), Jitter::None);

impl Client {
    /// The refresh token, or why there is none (`Err(None)`: no token file).
    pub(super) fn token_file_state(&self) -> Result<String, Option<String>> {
        let path = self.token_file.as_ref().ok_or(None)?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Some(format!("token file {} does not exist: requests go without a token", path.display())));
            }
            Err(e) => return Err(Some(format!("cannot read token file {}: {e}", path.display()))),
        };
        match Json::parse(&text).ok().and_then(|j| j.get("refresh_token")?.as_str().map(String::from)) {
            Some(t) if !t.is_empty() => Ok(t),
            _ => Err(Some(format!("token file {} has no \"refresh_token\" string", path.display()))),
        }
    }

    /// Says once, at start, which token file is used and whether it can be.
    /// `named`: the operator gave the path (`--token-file`), so a missing
    /// file is a mistake worth a WARNING; upstream's default path is
    /// absent on most controllers, so that is only said (INFO). Either way
    /// the agent starts, as upstream's does (which logs an ERROR per
    /// refresh): the file is read again at each refresh, so creating it
    /// later is enough.
    pub fn log_token_file(&mut self, origin: &str, named: bool) {
        self.token_file_named = named;
        let Some(path) = self.token_file.clone() else {
            log::info!("no token file: requests go without a token");
            return;
        };
        let status = self.token_file_state().err().flatten();
        match &status {
            None => log::info!("token file {} ({origin})", path.display()),
            Some(problem) if !path.exists() && !named => log::info!("{problem} ({origin})"),
            Some(problem) => log::warn!("{problem} ({origin})"),
        }
        self.token_status = status;
    }

    fn read_refresh_token(&mut self) -> Option<String> {
        let state = self.token_file_state();
        let status = state.as_ref().err().cloned().flatten();
        if status != self.token_status {
            match &status {
                Some(problem) if !self.token_file_named && self.token_file.as_ref().is_some_and(|p| !p.exists()) => {
                    log::info!("{problem}")
                }
                Some(problem) => log::warn!("{problem}"),
                None => log::info!(
                    "token file {} read",
                    self.token_file.as_ref().map_or(String::new(), |p| p.display().to_string())
                ),
            }
            self.token_status = status;
        }
        state.ok()
    }

    /// Exchanges the refresh token for an access token. Returns whether we
    /// now hold one. `idle` runs while the server is waited on (a refresh
    /// during a phase must not stop the runner draining the child's pipe).
    pub(super) fn refresh(&mut self, idle: Option<&mut Idle>) -> bool {
        if !self.refresh_hold.ready(Instant::now()) {
            return false;
        }
        let Some(refresh_token) = self.read_refresh_token() else {
            return false;
        };
        let url = self.url("/v1/oauth2/refresh");
        let body = Json::object().with("refresh_token", Json::str(refresh_token.as_str())).to_string_compact();
        let payload = Payload::Bytes { content_type: "application/json", bytes: body.as_bytes() };
        let answer = self
            .exchange("POST", &url, payload, Keep::Memory(SMALL_ANSWER), self.retry.timeout, idle, false)
            .map(|reply| Answer { status: reply.status, body: reply.body });
        match answer {
            Ok(a) if a.status == 200 => {
                match a.json(&url).ok().and_then(|j| j.get("access_token")?.as_str().map(String::from)) {
                    Some(token) if is_token(&token) => {
                        log::debug!("got a new access token from {url}");
                        self.access_token = Some(token);
                        self.refresh_hold.succeeded();
                        self.token_refused = false;
                        true
                    }
                    // Kept, such a token would fail every request before it
                    // leaves (header check) and never be refreshed: a refusal.
                    Some(_) => self.refresh_failed(
                        &url,
                        "the answer's access_token is empty or holds bytes that are not visible ASCII",
                    ),
                    None => self.refresh_failed(&url, "the answer (HTTP 200) has no access_token string"),
                }
            }
            // The server is up and failing (or a proxy cannot reach it): not
            // a refusal. The token is kept and no hold-off begins; the next
            // call that needs a token tries again, as upstream retries it.
            Ok(a) if super::error::is_retryable(a.status) => {
                log::warn!(
                    "token refresh at {url}: HTTP {} (the server is failing); trying again with the next request",
                    a.status
                );
                false
            }
            Ok(a) => self.refresh_failed(&url, &format!("token refresh refused with HTTP {}", a.status)),
            Err(e) => {
                log::error!("token refresh failed: {e}");
                false
            }
        }
    }

    /// A refresh that got an answer but no usable token: no token until
    /// the hold-off has passed, then one more try.
    fn refresh_failed(&mut self, url: &str, why: &str) -> bool {
        let hold = self.refresh_hold.failed(Instant::now());
        log::error!("{url}: {why}; next attempt in {} at the earliest", crate::human::duration(hold));
        self.access_token = None;
        false
    }

    /// The agent's cookie and, when asked and it has one, its bearer token.
    pub(super) fn headers(&self, auth: bool) -> Vec<(String, String)> {
        let mut headers = vec![("Cookie".to_string(), format!("agent_name={}", cookie_value(&self.agent_id)))];
        if let Some(token) = self.access_token.as_ref().filter(|_| auth) {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        headers
    }
}

/// A bearer token as it may go into a header: visible ASCII, not empty.
fn is_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

/// A cookie value (RFC 6265 cookie-octet): bytes outside it, and `%`, are
/// percent-encoded, so an `agent_id` holding `;` or a space cannot add a
/// cookie or break the header. Ordinary names go as they are.
fn cookie_value(value: &str) -> String {
    percent_encode(value, |b| b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'\\' | b'%'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_hold_off_doubles_up_to_five_minutes() {
        let refresh_hold_off = |n| REFRESH_HOLD_OFF.wait(n);
        assert_eq!(refresh_hold_off(1), Duration::from_secs(1));
        assert_eq!(refresh_hold_off(2), Duration::from_secs(2));
        assert_eq!(refresh_hold_off(4), Duration::from_secs(8));
        assert_eq!(refresh_hold_off(20), Duration::from_secs(300));
        assert_eq!(refresh_hold_off(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn tokens_must_be_visible_ascii() {
        assert!(is_token("eyJhbGciOi.J9-_x~+/="));
        for bad in ["", "tok\r\nX-Evil: 1", "tok en", "t\u{f6}k", "tok\t"] {
            assert!(!is_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn agent_id_cannot_add_a_cookie() {
        assert_eq!(cookie_value("lab-rpi4_01.x:y@z"), "lab-rpi4_01.x:y@z");
        assert_eq!(cookie_value("a; admin=1"), "a%3B%20admin=1");
        assert_eq!(cookie_value("50%\"q\",\\"), "50%25%22q%22%2C%5C");
        let mut client = Client::new("http://h", "x;y", None);
        client.access_token = Some("t".into());
        assert_eq!(
            client.headers(true),
            vec![("Cookie".into(), "agent_name=x%3By".into()), ("Authorization".into(), "Bearer t".into())]
        );
    }
}
