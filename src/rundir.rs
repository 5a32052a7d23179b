//! A job's run dir: its layout (every file name is spelled here once), the
//! files the agent and the device connectors exchange through it, the
//! delivery progress kept in it, and what becomes of it after the job:
//! removed, kept in `results_basedir` for a later delivery, or set aside.
//!
//! The connectors' contract (upstream's): `testflinger.json` holds the job,
//! `testflinger-outcome.json` the statuses so far, `device-info.json` and
//! `device-connector-error.json` what the connector reports back,
//! `<phase>-serial.log` its serial console, `artifacts/` what is uploaded,
//! `attachments/` what the job brought. The rest is the agent's own.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::atomic::write_atomic;
use crate::client::is_safe_id;
use crate::json::Json;
use crate::phase::{LogKind, Phase};
use crate::safe_fs;

mod state;
pub(crate) use state::{DeliveryState, PendingStream};

const JOB_FILE: &str = "testflinger.json";
const OUTCOME_FILE: &str = "testflinger-outcome.json";
const DEVICE_INFO_FILE: &str = "device-info.json";
const CONNECTOR_ERROR_FILE: &str = "device-connector-error.json";
const ARTIFACTS_DIR: &str = "artifacts";
const ATTACHMENTS_DIR: &str = "attachments";
/// The downloaded attachments, until they are unpacked.
const ATTACHMENTS_DOWNLOAD: &str = ".attachments.tar.gz";
/// The packed artifacts (beside, not in, `artifacts/`).
const ARCHIVE: &str = ".artifacts.tar.gz";
/// Present once the artifacts reached the server, so a retry skips them.
const ARCHIVE_SENT: &str = ".artifacts-sent";
/// Fragment counters and unsent output, for a later delivery.
const STATE_FILE: &str = ".delivery-state.json";
/// The job's events as they grow (see `events`).
const EVENTS_FILE: &str = ".events.json";
/// How many times an agent began to recover the job (see `recovery`).
const RECOVERY_ATTEMPTS: &str = ".recovery-attempts";
/// Marks a run dir made by `--job`: server mode never recovers nor
/// delivers it (its job id means nothing to the server).
const LOCAL_MARKER: &str = ".local-job";
/// Where jobs the server refused for good are set aside, inside
/// `results_basedir` (a name no job id can have), for an operator to look at.
const SET_ASIDE: &str = ".undeliverable";

/// The outcome file's content for these statuses: `{}` until a phase has
/// one, as upstream starts the file.
pub(crate) fn outcome_of(statuses: &[(Phase, i32)]) -> Json {
    if statuses.is_empty() {
        return Json::object();
    }
    let status = Json::Object(statuses.iter().map(|(p, c)| (p.to_string(), Json::int(i64::from(*c)))).collect());
    Json::object().with("status", status)
}

/// One job's run dir.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub(crate) fn new(path: PathBuf) -> RunDir {
        RunDir { path }
    }

    /// The run dir of `job_id` in `base` (`execution_basedir`).
    pub(crate) fn of(base: &Path, job_id: &str) -> RunDir {
        RunDir::new(base.join(job_id))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A phase's log as the server gets it: the phase output, or the
    /// masked copy of the connector's serial log.
    pub(crate) fn log(&self, phase: Phase, kind: LogKind) -> PathBuf {
        match kind {
            LogKind::Output => self.path.join(format!("{phase}.log")),
            LogKind::Serial => self.path.join(format!(".{phase}-serial.masked.log")),
        }
    }

    /// The connector's own serial log (unmasked; never sent as it is).
    pub(crate) fn serial_raw(&self, phase: Phase) -> PathBuf {
        self.path.join(format!("{phase}-serial.log"))
    }

    pub(crate) fn artifacts(&self) -> PathBuf {
        self.path.join(ARTIFACTS_DIR)
    }

    pub(crate) fn archive(&self) -> PathBuf {
        self.path.join(ARCHIVE)
    }

    pub(crate) fn attachments(&self) -> PathBuf {
        self.path.join(ATTACHMENTS_DIR)
    }

    pub(crate) fn attachments_download(&self) -> PathBuf {
        self.path.join(ATTACHMENTS_DOWNLOAD)
    }

    pub(crate) fn events_file(&self) -> PathBuf {
        self.path.join(EVENTS_FILE)
    }

    /// Creates the run dir (0700) in `base` and the files device
    /// connectors expect (0600), none of them through a link: `job` as
    /// they read it, an empty outcome and error file. `local` marks a
    /// `--job` run (before the job file, so that no moment exists when
    /// server mode would take this run dir for one of its own).
    pub(crate) fn create(&self, base: &Path, local: bool, job: &Json) -> io::Result<()> {
        safe_fs::ensure_base_dir(base, safe_fs::PRIVATE_DIR)?;
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(io::Error::other(format!("refusing {}: it is a symbolic link", self.path.display())));
            }
            Ok(_) => fs::remove_dir_all(&self.path)?,
            Err(_) => {}
        }
        safe_fs::make_dir(&self.path, safe_fs::PRIVATE_DIR)?;
        if local {
            safe_fs::write_new(&self.path.join(LOCAL_MARKER), b"", safe_fs::PRIVATE_FILE)?;
        }
        safe_fs::write_new(&self.path.join(JOB_FILE), job.to_string_compact().as_bytes(), safe_fs::PRIVATE_FILE)?;
        self.write_outcome(&outcome_of(&[]))?;
        safe_fs::write_new(&self.path.join(CONNECTOR_ERROR_FILE), b"", safe_fs::PRIVATE_FILE)
    }

    /// The job as the run dir holds it, when it is a readable object.
    pub(crate) fn job(&self) -> Option<Json> {
        let text = safe_fs::read_own(&self.path.join(JOB_FILE)).ok()?;
        Json::parse(&text).ok().filter(|j| matches!(j, Json::Object(_)))
    }

    fn holds_job(&self) -> bool {
        self.path.join(JOB_FILE).is_file()
    }

    pub(crate) fn write_outcome(&self, outcome: &Json) -> io::Result<()> {
        safe_fs::rewrite(&self.path.join(OUTCOME_FILE), outcome.to_string_compact().as_bytes(), safe_fs::PRIVATE_FILE)
    }

    /// The outcome file, when it is a readable object.
    pub(crate) fn outcome(&self) -> Option<Json> {
        let text = safe_fs::read_own(&self.path.join(OUTCOME_FILE)).ok()?;
        Json::parse(&text).ok().filter(|j| matches!(j, Json::Object(_)))
    }

    /// The statuses the outcome file records (those that make sense).
    pub(crate) fn statuses(&self) -> Vec<(Phase, i32)> {
        let Some(outcome) = self.outcome() else { return Vec::new() };
        let status = outcome.get("status").and_then(Json::as_object).unwrap_or(&[]);
        status.iter().filter_map(|(p, c)| Some((Phase::parse(p)?, i32::try_from(c.as_i64()?).ok()?))).collect()
    }

    /// The phase's log was opened (it is, just before its command starts).
    pub(crate) fn has_log(&self, phase: Phase) -> bool {
        self.log(phase, LogKind::Output).exists()
    }

    /// Adds `text` to the phase's log (a note of the agent's own).
    pub(crate) fn append_to_log(&self, phase: Phase, text: &str) -> io::Result<()> {
        let mut f = safe_fs::open_append(&self.log(phase, LogKind::Output), safe_fs::PRIVATE_FILE)?;
        io::Write::write_all(&mut f, text.as_bytes())
    }

    /// The connector's failure detail for `phase` (unmasked), empty when
    /// it left none.
    pub(crate) fn connector_error(&self, phase: Phase) -> String {
        let Ok(text) = safe_fs::read_own(&self.path.join(CONNECTOR_ERROR_FILE)) else { return String::new() };
        let Ok(json) = Json::parse(&text) else { return String::new() };
        let Some(info) = json.get(&format!("{phase}_exception_info")) else { return String::new() };
        let field = |k: &str| info.get(k).and_then(Json::as_str).unwrap_or("").to_string();
        let mut detail = format!("{}: {}", field("exception_name"), field("exception_message"));
        let cause = field("exception_cause");
        if !cause.is_empty() {
            // Upstream's wording: webhooks and dashboards may match on it.
            detail.push_str(&format!(" caused by {cause}"));
        }
        detail
    }

    /// What the connector left in `device-info.json` (its `device_info`
    /// member, or the whole object), unmasked; `None` when there is none
    /// or it is not JSON.
    pub(crate) fn device_info(&self) -> Option<Json> {
        let text = safe_fs::read_own(&self.path.join(DEVICE_INFO_FILE)).ok()?;
        let Ok(info) = Json::parse(&text) else {
            log::warn!("{DEVICE_INFO_FILE} is not valid JSON; ignored");
            return None;
        };
        Some(info.get("device_info").cloned().unwrap_or(info))
    }

    pub(crate) fn archive_sent(&self) -> bool {
        self.path.join(ARCHIVE_SENT).exists()
    }

    pub(crate) fn mark_archive_sent(&self) {
        let _ = safe_fs::rewrite(&self.path.join(ARCHIVE_SENT), b"", safe_fs::PRIVATE_FILE);
    }

    pub(crate) fn save_state(&self, state: &DeliveryState) -> io::Result<()> {
        write_atomic(&self.path.join(STATE_FILE), state.to_json().to_string_compact().as_bytes())
    }

    /// The delivery state saved last; the default when there is none.
    pub(crate) fn load_state(&self) -> DeliveryState {
        let Ok(text) = safe_fs::read_own(&self.path.join(STATE_FILE)) else { return DeliveryState::default() };
        let Ok(json) = Json::parse(&text) else { return DeliveryState::default() };
        DeliveryState::from_json(&json)
    }

    /// How many times recovery of this job began (0 when never, or when
    /// the count is unreadable).
    pub(crate) fn recovery_attempts(&self) -> u32 {
        fs::read_to_string(self.path.join(RECOVERY_ATTEMPTS)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    }

    /// Records that recovery attempt `n` begins: written whole before the
    /// attempt does anything, so an agent that dies during it still counts it.
    pub(crate) fn set_recovery_attempts(&self, n: u32) -> io::Result<()> {
        write_atomic(&self.path.join(RECOVERY_ATTEMPTS), n.to_string().as_bytes())
    }

    /// The job is delivered: the run dir goes.
    pub(crate) fn remove(&self) {
        // Not another user's put in its place: theirs is left alone.
        if let Err(e) = safe_fs::check_own(&self.path).and_then(|_| fs::remove_dir_all(&self.path)) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }

    /// Moves the run dir into `results_basedir` (0700) to be delivered
    /// later, with only what that delivery needs. When the move fails
    /// (results_basedir full or not writable) the run dir stays where it
    /// is, and the polling loop delivers it from there.
    pub(crate) fn keep(&self, results_basedir: &Path, job_id: &str) {
        if let Err(e) = safe_fs::check_own(&self.path) {
            log::error!("job {job_id}: not keeping {}: {e}", self.path.display());
            return;
        }
        self.prune();
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
            fs::rename(&self.path, &dest)
                .or_else(|_| copy_tree(&self.path, &dest).and_then(|_| fs::remove_dir_all(&self.path)))
        });
        match moved {
            Ok(()) => log::info!("job {job_id}: kept in {} for a later delivery", dest.display()),
            Err(e) => log::error!("job {job_id}: cannot move {} to {}: {e}", self.path.display(), dest.display()),
        }
    }

    /// Moves the run dir where jobs the server refuses go, for an
    /// operator; returns where.
    pub(crate) fn set_aside(&self, results_basedir: &Path, job_id: &str) -> io::Result<PathBuf> {
        let aside = results_basedir.join(SET_ASIDE);
        let dest = aside.join(job_id);
        safe_fs::ensure_base_dir(&aside, safe_fs::PRIVATE_DIR).and_then(|_| fs::rename(&self.path, &dest))?;
        Ok(dest)
    }

    /// Brings a run dir found in `results_basedir` back to `base`
    /// (`execution_basedir`), where jobs run.
    pub(crate) fn move_to(&mut self, base: &Path, job_id: &str) -> io::Result<()> {
        let dest = base.join(job_id);
        if dest != self.path {
            safe_fs::ensure_base_dir(base, safe_fs::PRIVATE_DIR)?;
            fs::rename(&self.path, &dest)?;
            self.path = dest;
        }
        Ok(())
    }

    /// Removes what a later delivery does not need: all else in a run dir
    /// is the connector's (raw serial logs, `device-connector-error.json`,
    /// the unpacked `artifacts/`...) and may hold the job's secrets unmasked.
    fn prune(&self) {
        let Ok(dir) = fs::read_dir(&self.path) else { return };
        for entry in dir.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| self.needed_for_delivery(n)) {
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

    fn needed_for_delivery(&self, name: &str) -> bool {
        const FILES: [&str; 7] =
            [JOB_FILE, OUTCOME_FILE, STATE_FILE, EVENTS_FILE, ARCHIVE, ARCHIVE_SENT, RECOVERY_ATTEMPTS];
        let is = |path: PathBuf| path.file_name().is_some_and(|n| n == name);
        FILES.contains(&name)
            || Phase::ALL.into_iter().any(|p| is(self.log(p, LogKind::Output)) || is(self.log(p, LogKind::Serial)))
    }
}

/// rename(2) fails across file systems; copy instead, links as links.
fn copy_tree(src: &Path, dest: &Path) -> io::Result<()> {
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
            io::copy(&mut input, &mut safe_fs::create_new(&to, safe_fs::PRIVATE_FILE)?)?;
        }
    }
    Ok(())
}

/// Job dirs in `base` (directories named like a job id; so not
/// `.undeliverable`; and not those of local `--job` runs), oldest first.
pub(crate) fn job_dirs(base: &Path) -> Vec<(String, RunDir)> {
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
    jobs.into_iter().map(|(_, n, p)| (n, RunDir::new(p))).collect()
}

/// Run dirs in `base` (job dirs holding a job), oldest first.
pub(crate) fn run_dirs(base: &Path) -> Vec<(String, RunDir)> {
    job_dirs(base).into_iter().filter(|(_, dir)| dir.holds_job()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_run_dir_holds_only_what_its_delivery_needs() {
        let base = std::env::temp_dir().join(format!("tf-rundir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (exec, results) = (base.join("run"), base.join("results"));
        let dir = RunDir::of(&exec, "job1");
        dir.create(&exec, false, &Json::object().with("job_id", Json::str("job1"))).unwrap();
        assert_eq!(dir.job().and_then(|j| j.get("job_id").cloned()), Some(Json::str("job1")));
        dir.write_outcome(&outcome_of(&[(Phase::Setup, 0), (Phase::Test, 1)])).unwrap();
        assert_eq!(dir.statuses(), [(Phase::Setup, 0), (Phase::Test, 1)]);
        dir.append_to_log(Phase::Test, "out\n").unwrap();
        assert!(dir.has_log(Phase::Test) && !dir.has_log(Phase::Cleanup));
        for raw in
            [dir.serial_raw(Phase::Test), dir.log(Phase::Test, LogKind::Serial), dir.path().join(DEVICE_INFO_FILE)]
        {
            fs::write(raw, "x").unwrap();
        }
        fs::create_dir_all(dir.artifacts()).unwrap();
        dir.save_state(&DeliveryState { cancelled: true, ..DeliveryState::default() }).unwrap();
        assert_eq!(run_dirs(&exec), [("job1".to_string(), dir.clone())]);

        dir.keep(&results, "job1");
        let kept = RunDir::of(&results, "job1");
        let mut names: Vec<_> =
            fs::read_dir(kept.path()).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".delivery-state.json",
                ".test-serial.masked.log",
                "test.log",
                "testflinger-outcome.json",
                "testflinger.json"
            ]
        );
        assert!(kept.load_state().cancelled);
        assert_eq!(kept.recovery_attempts(), 0);
        kept.set_recovery_attempts(2).unwrap();
        assert_eq!(kept.recovery_attempts(), 2);
        assert!(job_dirs(&exec).is_empty());

        // A --job run dir is never one of the server's.
        let local = RunDir::of(&exec, "local");
        local.create(&exec, true, &Json::object()).unwrap();
        assert!(run_dirs(&exec).is_empty());
        let aside = kept.set_aside(&results, "job1").unwrap();
        assert!(aside.ends_with(".undeliverable/job1") && job_dirs(&results).is_empty());
        let _ = fs::remove_dir_all(&base);
    }
}
