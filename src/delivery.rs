//! Delivering a finished job: output the server missed, the artifacts, the
//! outcome with `job_state: "complete"`. What cannot be delivered is kept in
//! `results_basedir` and sent again before the next job, also after a
//! restart: nothing a job produced is dropped because the server was down.

use std::path::Path;

use crate::client::ClientError;
use crate::json::Json;
use crate::output::LiveStream;
use crate::rundir::{self, DeliveryState, PendingStream, RunDir};
use crate::server::Server;
use crate::states::JobState;

/// Sends the output the server missed, oldest first, each log from where
/// it stopped, numbering fragments on from the state's counters; stops at
/// the first failure. Progress is saved in the run dir after each log.
pub(crate) fn send_pending(
    server: &mut dyn Server,
    rundir: &RunDir,
    job_id: &str,
    state: &mut DeliveryState,
) -> Result<(), ClientError> {
    while let Some(mut p) = state.pending.first().cloned() {
        let counter = state.fragments.next(p.kind);
        let result = send_rest(&mut p, server, rundir, job_id, counter);
        state.pending[0] = p.clone();
        if result.is_ok() {
            state.pending.remove(0);
        }
        if let Err(e) = rundir.save_state(state) {
            log::debug!("cannot save fragment progress: {e}");
        }
        if let Err(e) = result {
            if !e.is_stop() {
                log::warn!("{} {} log not fully sent, kept for later: {e}", p.phase, p.kind);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Sends the rest of this log (from `sent`) as fragments numbered from
/// `counter`; `sent` and `inflight_end` record how far it got. A serial
/// log is sent from its masked copy, never from the connector's file.
fn send_rest(
    p: &mut PendingStream,
    server: &mut dyn Server,
    rundir: &RunDir,
    job_id: &str,
    counter: &mut u64,
) -> Result<(), ClientError> {
    let path = rundir.log(p.phase, p.kind);
    let written = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    // Only flushed, which the live budget does not hold: no interval.
    let mut stream = LiveStream::new(job_id, p.kind, p.phase, &path, p.sent, std::time::Duration::ZERO);
    stream.inflight_end = p.inflight_end;
    let result = stream.flush(server, counter, written);
    p.sent = stream.sent;
    p.inflight_end = stream.inflight_end;
    result
}

/// Sends what the server still lacks of the job in `rundir`, in order:
/// missed output, artifacts, then the outcome. Each step that succeeds is
/// recorded, so a retry resumes rather than repeats.
pub(crate) fn deliver(server: &mut dyn Server, rundir: &RunDir, job_id: &str) -> Result<(), ClientError> {
    let outcome = rundir.outcome().unwrap_or_else(|| Json::object().with("status", Json::object()));
    deliver_with(server, rundir, job_id, rundir.load_state(), outcome)
}

/// `deliver`, with the delivery state and the outcome given rather than read
/// from the run dir: on a full disk the files may be stale or missing, and
/// what the agent holds in memory is the truth.
pub(crate) fn deliver_with(
    server: &mut dyn Server,
    rundir: &RunDir,
    job_id: &str,
    mut state: DeliveryState,
    mut outcome: Json,
) -> Result<(), ClientError> {
    send_pending(server, rundir, job_id, &mut state)?;

    if let Some(events) = &state.events {
        let retry = server.retry();
        match server.post_events(job_id, events, retry) {
            Ok(()) => {}
            // Refused for good: the events are the webhook's, not the
            // outcome; they must not hold the outcome back.
            Err(e) if e.is_refusal() => log::error!("job {job_id}: events refused, dropped: {e}"),
            Err(e) => return Err(e),
        }
        state.events = None;
        let _ = rundir.save_state(&state);
    }

    let archive = rundir.archive();
    if archive.exists() && !rundir.archive_sent() {
        match server.post_artifact(job_id, &archive) {
            Ok(()) => {}
            // Refused for good (a 413 from a proxy's body limit, say): the
            // outcome, exit codes and output must not wait on it forever.
            Err(e) if e.is_refusal() => {
                let size = std::fs::metadata(&archive).map(|m| m.len() >> 20).unwrap_or(0);
                log::error!(
                    "job {job_id}: the server refuses the artifacts ({size} MiB), dropped; the outcome goes without them: {e}"
                );
            }
            Err(e) => return Err(e),
        }
        rundir.mark_archive_sent();
    }

    // Upstream posts "complete" here, turning a cancelled job into a
    // completed one for the CLI and dashboards.
    let end = if state.cancelled { JobState::Cancelled } else { JobState::Complete };
    outcome.set("job_state", Json::str(end.as_str()));
    server.post_result(job_id, &outcome)
}

/// Delivers every kept job: those in `results_basedir`, and finished run
/// dirs still in `execution_basedir` because they could not be moved. Returns
/// true when none is left. A job the server refuses for good (a 4xx other
/// than 401/408/429: the job is gone, the body is refused) is set aside rather
/// than blocking every later job.
pub(crate) fn deliver_kept(server: &mut dyn Server, results_basedir: &Path, execution_basedir: &Path) -> bool {
    let mut kept = rundir::job_dirs(results_basedir);
    kept.extend(rundir::run_dirs(execution_basedir));
    let mut all = true;
    for (job_id, dir) in kept {
        match deliver(server, &dir, &job_id) {
            Ok(()) => {
                log::info!("job {job_id}: kept outcome delivered");
                dir.remove();
            }
            Err(e) if e.is_refusal() => match dir.set_aside(results_basedir, &job_id) {
                Ok(aside) => {
                    log::error!("job {job_id}: the server refuses its outcome ({e}); set aside in {}", aside.display())
                }
                Err(me) => {
                    log::error!("job {job_id}: the server refuses its outcome ({e}) and it cannot be set aside: {me}");
                    return false;
                }
            },
            Err(e) if e.is_stop() => return false,
            // The server answered (a 5xx for this one): the next may go.
            Err(e @ ClientError::Status { .. }) => {
                log::warn!("job {job_id}: kept outcome still not delivered: {e}");
                all = false;
            }
            Err(e) => {
                log::warn!("job {job_id}: kept outcome still not delivered: {e}");
                return false;
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::Phase;
    use crate::server::fake::{Call, Fake};

    /// A finished job kept in `base`: its statuses, and what `state` owes.
    fn kept(base: &Path, job_id: &str, state: &DeliveryState) -> RunDir {
        let dir = RunDir::of(base, job_id);
        dir.create(base, false, &Json::object().with("job_id", Json::str(job_id))).expect("run dir");
        dir.write_outcome(&rundir::outcome_of(&[(Phase::Setup, 0), (Phase::Cleanup, 0)])).expect("outcome");
        dir.save_state(state).expect("state");
        dir
    }

    fn base(name: &str) -> std::path::PathBuf {
        let base = std::env::temp_dir().join(format!("tf-delivery-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        base
    }

    fn outcome_posted(fake: &Fake, job_id: &str) -> Option<String> {
        fake.calls.iter().rev().find_map(|c| match c {
            Call::Result(id, body) if id == job_id => Some(body.to_string_compact()),
            _ => None,
        })
    }

    #[test]
    fn refused_artifacts_and_events_do_not_hold_the_outcome_back() {
        let base = base("refused-parts");
        let events = Json::object().with("events", Json::Array(Vec::new()));
        let dir = kept(&base, "j1", &DeliveryState { events: Some(events), ..DeliveryState::default() });
        std::fs::write(dir.archive(), b"tar.gz").expect("archive");
        let mut fake = Fake::new().refusing(|c| matches!(c, Call::Events(..) | Call::Artifact(_)));
        deliver(&mut fake, &dir, "j1").expect("delivered");
        assert_eq!(fake.calls.len(), 3, "events, artifact, outcome: {:?}", fake.calls);
        assert_eq!(
            outcome_posted(&fake, "j1").as_deref(),
            Some(r#"{"status":{"setup":0,"cleanup":0},"job_state":"complete"}"#)
        );
        // Not tried again by a later delivery.
        let mut again = Fake::new();
        deliver(&mut again, &dir, "j1").expect("delivered");
        assert_eq!(again.calls.len(), 1, "{:?}", again.calls);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_refused_job_is_set_aside_and_the_next_one_still_goes() {
        let base = base("set-aside");
        let (results, run) = (base.join("results"), base.join("run"));
        kept(&results, "ja", &DeliveryState { cancelled: true, ..DeliveryState::default() });
        kept(&results, "jb", &DeliveryState::default());
        let mut fake = Fake::new().refusing(|c| matches!(c, Call::Result(id, _) if id == "ja"));
        assert!(deliver_kept(&mut fake, &results, &run), "none left");
        assert!(results.join(".undeliverable").join("ja").is_dir());
        assert!(!results.join("jb").exists());
        assert_eq!(
            outcome_posted(&fake, "ja").as_deref(),
            Some(r#"{"status":{"setup":0,"cleanup":0},"job_state":"cancelled"}"#)
        );
        assert!(outcome_posted(&fake, "jb").is_some());
        let _ = std::fs::remove_dir_all(&base);
    }

    /// A server that answers but fails one outcome (a 500 for that one)
    /// still gets the others: one poisoned outcome does not hold back the
    /// rest. The failed one stays kept, and the round says not all went.
    #[test]
    fn an_outcome_the_server_fails_does_not_hold_back_the_next() {
        let base = base("poisoned");
        let (results, run) = (base.join("results"), base.join("run"));
        kept(&results, "ja", &DeliveryState::default());
        kept(&results, "jb", &DeliveryState::default());
        let mut server = Fake::new().erroring(|c| matches!(c, Call::Result(id, _) if id == "ja"));
        assert!(!deliver_kept(&mut server, &results, &run));
        assert!(results.join("ja").is_dir(), "the failed one is kept");
        assert!(!results.join("jb").exists(), "the next one was delivered");
        assert!(server.calls.iter().any(|c| matches!(c, Call::Result(id, _) if id == "jb")));
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn an_unreachable_server_keeps_the_job_and_stops_the_round() {
        let base = base("down");
        let (results, run) = (base.join("results"), base.join("run"));
        kept(&results, "jc", &DeliveryState::default());
        kept(&results, "jd", &DeliveryState::default());
        let mut down = Fake::new().failing(|_| true);
        assert!(!deliver_kept(&mut down, &results, &run));
        assert_eq!(down.calls.len(), 1, "the first failure ends the round: {:?}", down.calls);
        assert!(results.join("jc").is_dir() && results.join("jd").is_dir());
        let _ = std::fs::remove_dir_all(&base);
    }
}
