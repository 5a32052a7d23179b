//! A job's events (`job_start`, `<phase>_start/_success/_fail`, ...), posted
//! to `/v1/job/<id>/events` with the whole list each time, only when the job
//! has a `job_status_webhook`. A failed post is logged, never fatal, and holds
//! the next posts back for a while (each carries the whole list); what the
//! server missed at the end is delivered with the outcome (`owed`).
//!
//! The list is also kept in the run dir as it grows, so that a job resumed
//! after the agent died posts the events from before the crash too: the
//! webhook sees the whole list each time, and a shorter one would drop them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::atomic::write_atomic;
use crate::json::Json;
use crate::outbound::Masked;
use crate::phase::Event;
use crate::retry::{Backoff, Jitter, Retry, Schedule};
use crate::server::Server;
use crate::timestamp::now_iso8601;

/// After a failed post, events wait (a second doubling to a minute) before the
/// next try: each post carries the whole list, so the ones in between lose
/// nothing, and a job is not held by a server that refuses them. A random
/// part of the hold: jobs whose posts failed together post again apart.
const HOLD: Schedule =
    Schedule::new(Duration::from_secs(1), Duration::from_secs(60), Jitter::Full { floor: Duration::from_millis(500) });

/// The job's events, posted whole each time when the job has a webhook.
pub(crate) struct Events {
    list: Vec<Json>,
    header: Option<Json>,
    /// The last post failed: the whole list is owed to the server.
    unsent: bool,
    /// Where the list is kept as it grows.
    file: Option<PathBuf>,
    /// After a failed post: no new try before the hold is over.
    hold: Backoff,
}

impl Events {
    /// Events are posted only when the job has a `webhook`.
    pub(crate) fn new(webhook: Option<&str>, job_queue: &str, agent_id: &str) -> Events {
        let header = webhook.map(|w| {
            Json::object()
                .with("agent_id", Json::str(agent_id))
                .with("job_queue", Json::str(job_queue))
                .with("job_status_webhook", Json::str(w))
        });
        Events { list: Vec::new(), header, unsent: false, file: None, hold: Backoff::new(HOLD) }
    }

    /// Keeps the list in `file` (in the run dir) from now on.
    pub(crate) fn keep_in(&mut self, file: PathBuf) {
        self.file = Some(file);
    }

    /// Takes back the list an earlier run of the agent kept in `file`,
    /// and keeps it there from now on.
    pub(crate) fn restore(&mut self, file: PathBuf) {
        self.keep_in(file);
        let Some(file) = &self.file else { return };
        let Ok(text) = crate::safe_fs::read_own(file) else { return };
        match Json::parse(&text) {
            Ok(Json::Array(list)) => self.list = list,
            _ => log::warn!("{}: not an events list, starting a new one", file.display()),
        }
    }

    /// `detail` went through the job's secrets: it reaches the agent's
    /// log, `.events.json`, the server and the webhook.
    pub(crate) fn emit(&mut self, server: &mut dyn Server, job_id: &str, event: Event, detail: &Masked) {
        let name = event.to_string();
        let detail = detail.as_str();
        if detail.is_empty() {
            log::info!("job {job_id}: event {name}");
        } else {
            log::info!("job {job_id}: event {name}: {detail}");
        }
        let Some(header) = &self.header else { return };
        self.list.push(
            Json::object()
                .with("event_name", Json::str(name.as_str()))
                .with("timestamp", Json::str(now_iso8601()))
                .with("detail", Json::str(detail)),
        );
        if let Some(file) = &self.file {
            if let Err(e) = write_atomic(file, Json::Array(self.list.clone()).to_string_compact().as_bytes()) {
                log::debug!("cannot keep the events in {}: {e}", file.display());
            }
        }
        if !self.hold.ready(Instant::now()) {
            log::debug!("event {name} held back; the whole list goes with the next post");
            self.unsent = true;
            return;
        }
        let body = header.clone().with("events", Json::Array(self.list.clone()));
        // While holding back after a failure one attempt is enough: the
        // hold is the retry schedule.
        let retry = server.retry();
        let retry = if self.hold.next().is_some() { Retry::once(retry.timeout) } else { retry };
        match server.post_events(job_id, &body, retry) {
            Ok(()) => {
                self.unsent = false;
                self.hold.succeeded();
            }
            Err(e) => {
                let wait = self.hold.failed(Instant::now());
                if !e.is_stop() {
                    log::warn!(
                        "event {name} not posted, holding events back for {}: {e}",
                        crate::human::duration(wait)
                    );
                }
                self.unsent = true;
            }
        }
    }

    /// The whole events body, when the server has not had all of it yet.
    pub(crate) fn owed(&self) -> Option<Json> {
        let header = self.header.as_ref().filter(|_| self.unsent)?;
        Some(header.clone().with("events", Json::Array(self.list.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::Phase;
    use crate::server::fake::{Call, Fake};

    fn none() -> Masked {
        Masked::agent("")
    }

    #[test]
    fn without_a_webhook_nothing_is_posted_or_owed() {
        let mut events = Events::new(None, "q", "a");
        let mut fake = Fake::new();
        events.emit(&mut fake, "j", Event::JobStart, &none());
        assert!(fake.calls.is_empty());
        assert!(events.owed().is_none());
    }

    #[test]
    fn each_post_carries_the_whole_list_with_the_header() {
        let mut events = Events::new(Some("http://hook"), "q", "a");
        let mut fake = Fake::new();
        events.emit(&mut fake, "j", Event::JobStart, &none());
        events.emit(&mut fake, "j", Event::Start(Phase::Setup), &Masked::agent("detail"));
        assert_eq!(fake.calls.len(), 2);
        let Some(Call::Events(job, body)) = fake.calls.last() else { panic!("{:?}", fake.calls) };
        assert_eq!(job, "j");
        assert_eq!(body.get("job_status_webhook").and_then(Json::as_str), Some("http://hook"));
        assert_eq!(
            (body.get("agent_id").and_then(Json::as_str), body.get("job_queue").and_then(Json::as_str)),
            (Some("a"), Some("q"))
        );
        assert_eq!(fake.last_events(), ["job_start", "setup_start"]);
        assert!(events.owed().is_none(), "the server has them all");
    }

    #[test]
    fn a_failed_post_holds_the_next_ones_back_and_owes_the_whole_list() {
        let mut events = Events::new(Some("http://hook"), "q", "a");
        let mut down = Fake::new().failing(|c| matches!(c, Call::Events(..)));
        events.emit(&mut down, "j", Event::JobStart, &none());
        // Within the hold (a second) the next event is not tried.
        events.emit(&mut down, "j", Event::JobEnd, &none());
        assert_eq!(down.calls.len(), 1, "{:?}", down.calls);
        let owed = events.owed().expect("owed after a failure");
        let names: Vec<&str> = owed
            .get("events")
            .and_then(Json::as_array)
            .unwrap_or(&[])
            .iter()
            .filter_map(|e| e.get("event_name")?.as_str())
            .collect();
        assert_eq!(names, ["job_start", "job_end"]);
    }

    #[test]
    fn the_hold_doubles_from_a_second_to_a_minute_and_is_a_random_part_of_it() {
        let nominal: Vec<u64> = (1..=8).map(|n| HOLD.nominal(n).as_secs()).collect();
        assert_eq!(nominal, [1, 2, 4, 8, 16, 32, 60, 60]);
        let waits: Vec<Duration> = (0..200).map(|_| HOLD.wait(7)).collect();
        assert!(waits.iter().all(|w| *w >= Duration::from_millis(500) && *w <= Duration::from_secs(60)), "{waits:?}");
        assert!(waits.iter().any(|w| *w < Duration::from_secs(30)), "not spread: {waits:?}");
    }

    #[test]
    fn the_list_kept_in_the_run_dir_is_taken_back() {
        let dir = std::env::temp_dir().join(format!("tf-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("events.json");
        let mut first = Events::new(Some("http://hook"), "q", "a");
        first.keep_in(file.clone());
        first.emit(&mut crate::server::Local, "j", Event::JobStart, &none());
        let mut again = Events::new(Some("http://hook"), "q", "a");
        again.restore(file);
        let mut fake = Fake::new();
        again.emit(&mut fake, "j", Event::JobEnd, &none());
        assert_eq!(fake.last_events(), ["job_start", "job_end"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
