//! Delivering a finished job: output the server missed, the artifacts, the
//! outcome with `job_state: "complete"`. What cannot be delivered is kept in
//! `results_basedir` and sent again before the next job, also after a
//! restart: nothing a job produced is dropped because the server was down.

use std::fs;
use std::path::{Path, PathBuf};

use crate::atomic::write_atomic;
use crate::client::{Client, ClientError, is_safe_id};
use crate::json::Json;
use crate::output::LiveStream;
use crate::phase::{LogKind, Phase};
use crate::safe_fs;
use crate::serial;

/// The packed artifacts, inside the run dir (beside, not in, `artifacts/`).
pub const ARCHIVE_NAME: &str = ".artifacts.tar.gz";
/// Present once the artifacts reached the server, so a retry skips them.
const ARCHIVE_SENT: &str = ".artifacts-sent";
/// Fragment counters and unsent output, for a later delivery.
const STATE_FILE: &str = ".delivery-state.json";
/// Marks a run dir made by `--job`: server mode never recovers nor
/// delivers it (its job id means nothing to the server).
pub const LOCAL_MARKER: &str = ".local-job";

/// A phase log (or serial log) the server has only part of.
#[derive(Clone, Debug)]
pub struct PendingStream {
    pub kind: LogKind,
    pub phase: Phase,
    pub sent: u64,
    /// End of a fragment sent but not acknowledged (see `LiveStream::inflight_end`).
    pub inflight_end: Option<u64>,
}

impl PendingStream {
    /// Sends the rest of this log (from `sent`) as fragments numbered from
    /// `counter`; `sent` and `inflight_end` record how far it got. A serial
    /// log is sent from its masked copy, never from the connector's file.
    pub fn send_rest(&mut self, client: &mut Client, rundir: &Path, job_id: &str, counter: &mut u64) -> Result<(), ClientError> {
        let log_name = match self.kind {
            LogKind::Serial => serial::masked_name(self.phase),
            LogKind::Output => format!("{}.log", self.phase),
        };
        let path = rundir.join(log_name);
        let written = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut stream = LiveStream::new(job_id, self.kind, self.phase, &path, self.sent);
        stream.inflight_end = self.inflight_end;
        let result = stream.flush(client, counter, written);
        self.sent = stream.sent;
        self.inflight_end = stream.inflight_end;
        result
    }
}

#[derive(Debug, Default)]
pub struct JobState {
    pub output_next: u64,
    pub serial_next: u64,
    pub pending: Vec<PendingStream>,
    /// The job's events body whose last post failed: the webhook must still
    /// hear how the job ended (each post carries the whole list).
    pub events: Option<Json>,
    /// The job was cancelled: the outcome is posted with `job_state:
    /// "cancelled"`, not `"complete"`, so it stays cancelled on the server.
    pub cancelled: bool,
}

impl JobState {
    pub fn save(&self, rundir: &Path) -> std::io::Result<()> {
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
        let json = Json::object()
            .with("output_next", Json::int(self.output_next as i64))
            .with("serial_next", Json::int(self.serial_next as i64))
            .with("pending", Json::Array(pending))
            .with("events", self.events.clone().unwrap_or(Json::Null))
            .with("cancelled", Json::Bool(self.cancelled));
        write_atomic(&rundir.join(STATE_FILE), json.to_string_compact().as_bytes())
    }

    pub fn load(rundir: &Path) -> JobState {
        let Ok(text) = fs::read_to_string(rundir.join(STATE_FILE)) else { return JobState::default() };
        let Ok(json) = Json::parse(&text) else { return JobState::default() };
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
        let events = json.get("events").filter(|e| matches!(e, Json::Object(_))).cloned();
        let cancelled = json.get("cancelled").and_then(Json::as_bool).unwrap_or(false);
        JobState { output_next: num("output_next"), serial_next: num("serial_next"), pending, events, cancelled }
    }
}

/// Sends what the server still lacks of the job in `rundir`, in order:
/// missed output, artifacts, then the outcome. Each step that succeeds is
/// recorded, so a retry resumes rather than repeats.
pub fn deliver(client: &mut Client, rundir: &Path, job_id: &str) -> Result<(), ClientError> {
    let outcome_text = fs::read_to_string(rundir.join("testflinger-outcome.json")).unwrap_or_default();
    let outcome = match Json::parse(&outcome_text) {
        Ok(j @ Json::Object(_)) => j,
        _ => Json::object().with("status", Json::object()),
    };
    deliver_with(client, rundir, job_id, JobState::load(rundir), outcome)
}

/// `deliver`, with the delivery state and the outcome given rather than read
/// from the run dir: on a full disk the files may be stale or missing, and
/// what the agent holds in memory is the truth.
pub fn deliver_with(client: &mut Client, rundir: &Path, job_id: &str, mut state: JobState, mut outcome: Json) -> Result<(), ClientError> {
    while let Some(mut p) = state.pending.first().cloned() {
        let counter = if p.kind == LogKind::Serial { &mut state.serial_next } else { &mut state.output_next };
        let result = p.send_rest(client, rundir, job_id, counter);
        state.pending[0] = p;
        if let Err(e) = result {
            let _ = state.save(rundir);
            return Err(e);
        }
        state.pending.remove(0);
        let _ = state.save(rundir);
    }

    if let Some(events) = &state.events {
        match client.post_events(job_id, events) {
            Ok(()) => {}
            // Refused for good: the events are the webhook's, not the
            // outcome; they must not hold the outcome back.
            Err(e) if e.is_refusal() => log::error!("job {job_id}: events refused, dropped: {e}"),
            Err(e) => return Err(e),
        }
        state.events = None;
        let _ = state.save(rundir);
    }

    let archive = rundir.join(ARCHIVE_NAME);
    if archive.exists() && !rundir.join(ARCHIVE_SENT).exists() {
        client.post_artifact(job_id, &archive)?;
        let _ = safe_fs::rewrite(&rundir.join(ARCHIVE_SENT), b"", safe_fs::PRIVATE_FILE);
    }

    // Upstream posts "complete" here, turning a cancelled job into a
    // completed one for the CLI and dashboards.
    outcome.set("job_state", Json::str(if state.cancelled { "cancelled" } else { "complete" }));
    client.post_result(job_id, &outcome)
}

/// The files of a run dir a later delivery needs; all else in it is the
/// connector's (raw serial logs, `device-connector-error.json`, the
/// unpacked `artifacts/`...), may hold the job's secrets unmasked, and is
/// not kept.
fn needed_for_delivery(name: &str) -> bool {
    const FILES: [&str; 6] = ["testflinger.json", "testflinger-outcome.json", STATE_FILE, ".events.json", ARCHIVE_NAME, ARCHIVE_SENT];
    FILES.contains(&name) || Phase::ALL.into_iter().any(|p| name == format!("{p}.log") || name == serial::masked_name(p))
}

/// Removes from `rundir` what a later delivery does not need.
fn prune(rundir: &Path) {
    let Ok(dir) = fs::read_dir(rundir) else { return };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if name.to_str().is_some_and(needed_for_delivery) {
            continue;
        }
        let path = entry.path();
        // Neither call follows a link.
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        if let Err(e) = gone {
            log::warn!("cannot remove {} from the kept job: {e}", path.display());
        }
    }
}

/// Moves `rundir` into `results_basedir` (0700) to be delivered later,
/// with only what that delivery needs. When the move fails
/// (results_basedir full or not writable) the run dir stays where it is,
/// and the polling loop delivers it from there.
pub fn keep(results_basedir: &Path, rundir: &Path, job_id: &str) {
    prune(rundir);
    let dest = results_basedir.join(job_id);
    let moved = safe_fs::ensure_base_dir(results_basedir, safe_fs::PRIVATE_DIR).and_then(|_| {
        match fs::symlink_metadata(&dest) {
            // remove_dir_all would only unlink it; still, say so.
            Ok(m) if m.file_type().is_symlink() => {
                log::warn!("{}: a symbolic link where a kept job goes; removed", dest.display());
                fs::remove_file(&dest)?;
            }
            Ok(_) => fs::remove_dir_all(&dest)?,
            Err(_) => {}
        }
        fs::rename(rundir, &dest).or_else(|_| copy_tree(rundir, &dest).and_then(|_| fs::remove_dir_all(rundir)))
    });
    match moved {
        Ok(()) => log::info!("job {job_id}: kept in {} for a later delivery", dest.display()),
        Err(e) => log::error!("job {job_id}: cannot move {} to {}: {e}", rundir.display(), dest.display()),
    }
}

/// rename(2) fails across file systems; copy instead, links as links.
fn copy_tree(src: &Path, dest: &Path) -> std::io::Result<()> {
    safe_fs::make_dir(dest, safe_fs::PRIVATE_DIR)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dest.join(entry.file_name()));
        let ft = entry.file_type()?;
        if ft.is_dir() {
            copy_tree(&from, &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else {
            let mut input = fs::File::open(&from)?;
            std::io::copy(&mut input, &mut safe_fs::create_new(&to, safe_fs::PRIVATE_FILE)?)?;
        }
    }
    Ok(())
}

/// Job dirs in `base` (directories named like a job id; so not
/// `.undeliverable`; and not those of local `--job` runs), oldest first.
pub fn job_dirs(base: &Path) -> Vec<(String, PathBuf)> {
    let Ok(dir) = fs::read_dir(base) else { return Vec::new() };
    let mut jobs: Vec<_> = dir
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if e.path().join(LOCAL_MARKER).exists() {
                log::debug!("{}: a local --job run, left alone", e.path().display());
                return None;
            }
            let mtime = e.metadata().and_then(|m| m.modified()).ok();
            is_safe_id(&name).then(|| (mtime, name, e.path()))
        })
        .collect();
    jobs.sort();
    jobs.into_iter().map(|(_, n, p)| (n, p)).collect()
}

/// Run dirs in `base` (job dirs holding a job), oldest first.
pub fn run_dirs(base: &Path) -> Vec<(String, PathBuf)> {
    job_dirs(base).into_iter().filter(|(_, dir)| dir.join("testflinger.json").is_file()).collect()
}

/// Where jobs the server refused for good are set aside, inside
/// `results_basedir` (a name no job id can have), for an operator to look at.
pub const SET_ASIDE: &str = ".undeliverable";

/// Delivers every kept job: those in `results_basedir`, and finished run
/// dirs still in `execution_basedir` because they could not be moved. Returns
/// true when none is left. A job the server refuses for good (a 4xx other
/// than 401/408/429: the job is gone, the body is refused) is set aside rather
/// than blocking every later job.
pub fn deliver_kept(client: &mut Client, results_basedir: &Path, execution_basedir: &Path) -> bool {
    let mut kept = job_dirs(results_basedir);
    kept.extend(run_dirs(execution_basedir));
    for (job_id, dir) in kept {
        match deliver(client, &dir, &job_id) {
            Ok(()) => {
                log::info!("job {job_id}: kept outcome delivered");
                if let Err(e) = fs::remove_dir_all(&dir) {
                    log::warn!("cannot remove {}: {e}", dir.display());
                }
            }
            Err(e) if e.is_refusal() => {
                let aside = results_basedir.join(SET_ASIDE).join(&job_id);
                let moved = safe_fs::ensure_base_dir(&results_basedir.join(SET_ASIDE), safe_fs::PRIVATE_DIR).and_then(|_| fs::rename(&dir, &aside));
                match moved {
                    Ok(()) => log::error!("job {job_id}: the server refuses its outcome ({e}); set aside in {}", aside.display()),
                    Err(me) => {
                        log::error!("job {job_id}: the server refuses its outcome ({e}) and it cannot be set aside: {me}");
                        return false;
                    }
                }
            }
            Err(e) => {
                log::warn!("job {job_id}: kept outcome still not delivered: {e}");
                return false;
            }
        }
    }
    true
}
