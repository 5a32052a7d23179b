//! How far a job's delivery got, kept in the run dir
//! (`.delivery-state.json`) as it goes: the next fragment number of each
//! log kind, the logs the server has only part of, the events it missed,
//! and whether the job was cancelled. A job resumed after a crash, or
//! delivered later, continues from here.

use crate::json::Json;
use crate::phase::{LogKind, Phase};

/// A phase log (or serial log) the server has only part of.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PendingStream {
    pub kind: LogKind,
    pub phase: Phase,
    pub sent: u64,
    /// End of a fragment sent but not acknowledged (see `LiveStream::inflight_end`).
    pub inflight_end: Option<u64>,
}

/// The next fragment number of each log kind (each numbers its own).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Fragments {
    pub output: u64,
    pub serial: u64,
}

impl Fragments {
    pub(crate) fn next(&mut self, kind: LogKind) -> &mut u64 {
        match kind {
            LogKind::Output => &mut self.output,
            LogKind::Serial => &mut self.serial,
        }
    }
}

/// A job's delivery progress (not its `job_state` on the server, see
/// `states`).
#[derive(Clone, Debug, Default)]
pub(crate) struct DeliveryState {
    pub fragments: Fragments,
    pub pending: Vec<PendingStream>,
    /// The job's events body whose last post failed: the webhook must still
    /// hear how the job ended (each post carries the whole list).
    pub events: Option<Json>,
    /// The job was cancelled: the outcome is posted with `job_state:
    /// "cancelled"`, not `"complete"`, so it stays cancelled on the server.
    pub cancelled: bool,
}

impl DeliveryState {
    pub(super) fn to_json(&self) -> Json {
        let pending = self
            .pending
            .iter()
            .map(|p| {
                Json::object()
                    .with("kind", Json::str(p.kind.as_str()))
                    .with("phase", Json::str(p.phase.as_str()))
                    .with("sent", Json::int(p.sent as i64))
                    .with("inflight_end", p.inflight_end.map_or(Json::Null, |e| Json::int(e as i64)))
            })
            .collect();
        Json::object()
            .with("output_next", Json::int(self.fragments.output as i64))
            .with("serial_next", Json::int(self.fragments.serial as i64))
            .with("pending", Json::Array(pending))
            .with("events", self.events.clone().unwrap_or(Json::Null))
            .with("cancelled", Json::Bool(self.cancelled))
    }

    /// What of `json` makes sense; the rest is left at its default.
    pub(super) fn from_json(json: &Json) -> DeliveryState {
        let num = |k: &str| json.get(k).and_then(Json::as_i64).unwrap_or(0).max(0) as u64;
        let pending = json
            .get("pending")
            .and_then(Json::as_array)
            .unwrap_or(&[])
            .iter()
            .filter_map(|p| {
                Some(PendingStream {
                    kind: LogKind::parse(p.get("kind")?.as_str()?)?,
                    phase: Phase::parse(p.get("phase")?.as_str()?)?,
                    sent: p.get("sent")?.as_i64()?.max(0) as u64,
                    inflight_end: p.get("inflight_end").and_then(Json::as_i64).map(|e| e.max(0) as u64),
                })
            })
            .collect();
        DeliveryState {
            fragments: Fragments { output: num("output_next"), serial: num("serial_next") },
            pending,
            events: json.get("events").filter(|e| matches!(e, Json::Object(_))).cloned(),
            cancelled: json.get("cancelled").and_then(Json::as_bool).unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_what_it_does_not_know() {
        let state = DeliveryState {
            fragments: Fragments { output: 7, serial: 2 },
            pending: vec![PendingStream {
                kind: LogKind::Serial,
                phase: Phase::Test,
                sent: 10,
                inflight_end: Some(20),
            }],
            events: Some(Json::object().with("events", Json::Array(vec![]))),
            cancelled: true,
        };
        let back = DeliveryState::from_json(&state.to_json());
        assert_eq!((back.fragments, &back.pending, back.cancelled), (state.fragments, &state.pending, true));
        assert!(back.events.is_some());
        let odd = Json::parse(r#"{"output_next":-4,"pending":[{"kind":"stderr","phase":"test","sent":1},{"kind":"output","phase":"test","sent":3}]}"#).unwrap();
        let back = DeliveryState::from_json(&odd);
        assert_eq!(back.fragments, Fragments::default());
        assert_eq!(
            back.pending,
            [PendingStream { kind: LogKind::Output, phase: Phase::Test, sent: 3, inflight_end: None }]
        );
    }
}
