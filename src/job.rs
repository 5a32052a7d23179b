//! One job: its run dir, the phases in order with their skip and stop
//! rules, events, and the outcome.
//!
//! With a server (`client` is `Some`) progress is reported as it happens;
//! without one (the local `--job` mode) the same phases run and only the
//! run dir and the terminal see the output.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::archive;
use crate::attachments;
use crate::client::Client;
use crate::config::Config;
use crate::delivery::{self, PendingStream};
use crate::events::Events;
use crate::json::Json;
use crate::metrics::Metrics;
use crate::outbound::{JobSecrets, LogMasking, Masked};
use crate::output::{LiveStream, PhaseLog};
use crate::phase::{EndReason, Event, LogKind, Phase, INTERRUPTED_BY_AGENT_LOSS, NOT_RUN, RECOVERY_FAILED};
use crate::runner::{self, Limits, Stop};
use crate::safe_fs;
use crate::serial::SerialTail;
use crate::signals;

mod watcher;
use watcher::{PhaseWatcher, Progress};

/// The setup status of a job whose attachments were refused or could not
/// be fetched (no command ran; like a command that could not start).
const ATTACHMENTS_FAILED: i32 = NOT_RUN;

const DEFAULT_GLOBAL_TIMEOUT: u64 = 4 * 3600;
const DEFAULT_OUTPUT_TIMEOUT: u64 = 15 * 60;
/// How often the agent's state is re-posted while one phase (or an
/// allocation hold) lasts: reservations last days, and the server forgets
/// agents it has not heard from; twice a day keeps "at least daily".
const PHASE_HEARTBEAT: Duration = Duration::from_secs(12 * 3600);
/// One cancel check may wait this long (how often: `cancel_check_interval`).
const CANCEL_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Cleanup after the agent was told to stop must not hold the stop forever.
const CLEANUP_WHEN_INTERRUPTED: Duration = Duration::from_secs(120);

/// What became of a job, for the agent loop and the `--job` summary.
#[derive(Debug)]
pub struct Summary {
    pub job_id: String,
    pub statuses: Vec<(Phase, i32)>,
    pub recovery_failed: bool,
    pub interrupted: bool,
    /// Why the job ended.
    pub end_reason: EndReason,
    /// The outcome reached the server (always false without a server).
    pub delivered: bool,
}

impl Summary {
    fn new(job_id: &str) -> Summary {
        Summary {
            job_id: job_id.to_string(),
            statuses: Vec::new(),
            recovery_failed: false,
            interrupted: false,
            end_reason: EndReason::NormalExit,
            delivered: false,
        }
    }

    pub fn failed(&self) -> bool {
        self.statuses.iter().any(|(_, c)| *c != 0) || self.end_reason != EndReason::NormalExit
    }
}

pub struct JobRunner<'a> {
    config: &'a Config,
    client: Option<&'a mut Client>,
    echo: bool,
    job: Json,
    job_id: String,
    rundir: PathBuf,
    /// Each phase's own `secrets`: its environment gets those only.
    phase_secrets: Vec<(Phase, Vec<(String, String)>)>,
    /// The job was cancelled on the server: the outcome must not turn it
    /// back into a completed one.
    cancelled: bool,
    /// Every secret value of the job (all phases'): job text on its way
    /// out goes through them (see `outbound`).
    masks: JobSecrets,
    /// The agent's log lines are masked with `masks` while the job lives.
    _log_masking: LogMasking,
    events: Events,
    statuses: Vec<(Phase, i32)>,
    output_fragments: u64,
    serial_fragments: u64,
    /// Output not yet delivered when its phase ended (server down).
    pending: Vec<PendingStream>,
    metrics: Option<&'a mut Metrics>,
    /// The `release` label of the phase metrics: `""` until provisioning
    /// succeeds, then what the connector reported (see `device_release`).
    release: String,
}

impl<'a> JobRunner<'a> {
    /// `job` must have a safe `job_id` (checked by the caller).
    pub fn new(config: &'a Config, client: Option<&'a mut Client>, mut job: Json, echo: bool) -> JobRunner<'a> {
        let job_id = job.get("job_id").and_then(Json::as_str).unwrap_or("local-job").to_string();
        let rundir = config.execution_basedir.join(&job_id);
        // Secrets go to their own phase's environment only: never to disk.
        let mut secrets = Vec::new();
        let mut phase_secrets = Vec::new();
        for phase in Phase::ALL {
            if let Some(data) = job.get_mut(&phase.data_key()) {
                if let Some(Json::Object(map)) = data.remove("secrets") {
                    let mut own = Vec::new();
                    for (k, v) in map {
                        let value = match v {
                            Json::Str(s) => s,
                            Json::Null => String::new(),
                            other => other.to_string_compact(),
                        };
                        secrets.push((k.clone(), value.clone()));
                        own.push((k, value));
                    }
                    phase_secrets.push((phase, own));
                }
            }
        }
        let events = Events::new(&job, &config.agent_id);
        let masks = JobSecrets::new(secrets.iter().map(|(_, v)| v.clone()));
        JobRunner {
            config,
            client,
            echo,
            job,
            job_id,
            rundir,
            phase_secrets,
            cancelled: false,
            _log_masking: masks.mask_log_lines(),
            masks,
            events,
            statuses: Vec::new(),
            output_fragments: 0,
            serial_fragments: 0,
            pending: Vec::new(),
            metrics: None,
            release: String::new(),
        }
    }

    /// Counts this job in `metrics` and serves them while phases run.
    pub fn with_metrics(mut self, metrics: &'a mut Metrics) -> JobRunner<'a> {
        self.metrics = Some(metrics);
        self
    }

    /// Sleeps, answering metrics scrapes meanwhile.
    fn pause(metrics: Option<&mut Metrics>, d: Duration) {
        match metrics {
            Some(m) => m.idle(d),
            None => signals::sleep(d),
        }
    }

    fn save_progress(&self) {
        let state = delivery::JobState {
            output_next: self.output_fragments,
            serial_next: self.serial_fragments,
            pending: self.pending.clone(),
            events: None,
            cancelled: self.cancelled,
        };
        if let Err(e) = state.save(&self.rundir) {
            log::debug!("cannot save fragment progress: {e}");
        }
    }

    /// Emits an event; its detail goes through the job's secrets.
    fn emit(&mut self, event: Event, detail: &str) {
        let detail = self.masks.text(detail);
        self.emit_masked(event, &detail);
    }

    fn emit_masked(&mut self, event: Event, detail: &Masked) {
        self.events.emit(self.client.as_deref_mut(), &self.job_id, event, detail);
    }

    fn post_result(&mut self, data: Json) {
        if let Some(client) = self.client.as_deref_mut() {
            if let Err(e) = client.post_result(&self.job_id, &data) {
                log::warn!("result update not posted: {e}");
            }
        }
    }

    /// Posts the agent's state for a phase; there is none for cleanup
    /// (upstream posts none, and dashboards show the last phase).
    fn post_agent_state(&mut self, state: Phase) {
        if let Some(client) = self.client.as_deref_mut() {
            post_state_unless_held(client, state);
        }
    }

    fn is_cancelled(&mut self) -> bool {
        match self.client.as_deref_mut() {
            Some(client) => client.job_state(&self.job_id, None).as_deref() == Some("cancelled"),
            None => false,
        }
    }

    /// Creates the run dir (0700) and the files device connectors expect
    /// (0600), none of them through a link.
    fn prepare(&mut self) -> std::io::Result<()> {
        safe_fs::ensure_base_dir(&self.config.execution_basedir, safe_fs::PRIVATE_DIR)?;
        match fs::symlink_metadata(&self.rundir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(std::io::Error::other(format!("refusing {}: it is a symbolic link", self.rundir.display())));
            }
            Ok(_) => fs::remove_dir_all(&self.rundir)?,
            Err(_) => {}
        }
        safe_fs::make_dir(&self.rundir, safe_fs::PRIVATE_DIR)?;
        if self.client.is_none() {
            // Before testflinger.json, so that no moment exists when server
            // mode would take this run dir for one of its own.
            safe_fs::write_new(&self.rundir.join(delivery::LOCAL_MARKER), b"", safe_fs::PRIVATE_FILE)?;
        }
        // The job as the connectors read it, secrets removed. Not masked:
        // it is the phase commands' input, and the server holds it as is.
        safe_fs::write_new(&self.rundir.join("testflinger.json"), self.job.to_string_compact().as_bytes(), safe_fs::PRIVATE_FILE)?;
        self.write_outcome()?;
        safe_fs::write_new(&self.rundir.join("device-connector-error.json"), b"", safe_fs::PRIVATE_FILE)?;
        Ok(())
    }

    /// `{}` until a phase has a status, as upstream starts the file.
    fn outcome(&self) -> Json {
        if self.statuses.is_empty() {
            return Json::object();
        }
        let status = Json::Object(self.statuses.iter().map(|(p, c)| (p.to_string(), Json::int(i64::from(*c)))).collect());
        Json::object().with("status", status)
    }

    fn write_outcome(&self) -> std::io::Result<()> {
        let path = self.rundir.join("testflinger-outcome.json");
        safe_fs::rewrite(&path, self.outcome().to_string_compact().as_bytes(), safe_fs::PRIVATE_FILE)
    }

    /// Why `phase` does not run, or `None` when it does.
    fn skip_reason(&self, phase: Phase) -> Option<String> {
        if self.config.command(phase).trim().is_empty() {
            return Some(format!("no {phase}_command configured"));
        }
        if !phase.needs_data() {
            return None;
        }
        let data = self.job.get(&phase.data_key());
        match data {
            None => Some(format!("no {phase}_data in the job")),
            Some(d) if d.is_empty_like() => Some(format!("empty {phase}_data in the job")),
            Some(d) if !matches!(d, Json::Object(_)) => Some(format!("{phase}_data is not a mapping")),
            Some(d) if d.get("skip").and_then(Json::as_bool) == Some(true) => Some(format!("{phase}_data has skip: true")),
            Some(_) => None,
        }
    }

    fn timeout_from_job(&self, key: &str) -> Option<u64> {
        self.job.get(key).and_then(Json::as_i64).filter(|t| *t > 0).map(|t| t as u64)
    }

    fn limits(&self, phase: Phase) -> Limits {
        let pick = |job: Option<u64>, conf: Option<u64>, default: u64| match (job, conf) {
            (Some(j), Some(c)) => j.min(c),
            (Some(j), None) => j,
            (None, Some(c)) => c,
            (None, None) => default,
        };
        if phase == Phase::Reserve {
            // The connector's reserve command waits out the reservation's
            // timeout itself, after its own start-up: a limit here would
            // always end it first. Only a cancel ends it early (upstream too).
            return Limits { global: None, output: None, kill_grace: Some(self.config.kill_grace()) };
        }
        let global = pick(self.timeout_from_job("global_timeout"), self.config.global_timeout, DEFAULT_GLOBAL_TIMEOUT);
        let output = (phase == Phase::Test)
            .then(|| pick(self.timeout_from_job("output_timeout"), self.config.output_timeout, DEFAULT_OUTPUT_TIMEOUT));
        Limits {
            global: Some(Duration::from_secs(global)),
            output: output.map(Duration::from_secs),
            kill_grace: Some(self.config.kill_grace()),
        }
    }

    /// Typed job fields holding the wrong type, each with what is used
    /// instead: a job no server validated (`--job`) still runs, and the
    /// operator learns why it ran otherwise than written.
    fn field_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let timeouts = [
            ("global_timeout", self.config.global_timeout, DEFAULT_GLOBAL_TIMEOUT),
            ("output_timeout", self.config.output_timeout, DEFAULT_OUTPUT_TIMEOUT),
        ];
        for (key, conf, default) in timeouts {
            let Some(v) = self.job.get(key).filter(|v| !matches!(v, Json::Null)) else { continue };
            if self.timeout_from_job(key).is_some() {
                continue;
            }
            let mut shown = v.to_string_compact();
            if shown.len() > 40 {
                shown = format!("{}...", shown.chars().take(40).collect::<String>());
            }
            let used = match conf {
                Some(c) => format!("the config's, {c} s"),
                None => format!("the default, {default} s"),
            };
            warnings.push(format!("{key}: {shown} is not a positive number of seconds; using {used}"));
        }
        for phase in Phase::BEFORE_CLEANUP {
            let key = phase.data_key();
            match self.job.get(&key) {
                None | Some(Json::Object(_)) => {}
                // Absent in upstream's eyes too: skipped without a word.
                Some(v) if v.is_empty_like() => {}
                Some(v) => warnings.push(format!("{key}: {}, not a mapping; the {phase} phase is skipped", kind_of(v))),
            }
        }
        warnings
    }

    /// The config's strings, and `phase`'s own secrets (no other phase's).
    fn env(&self, phase: Phase) -> Vec<(String, String)> {
        let mut env = self.config.string_env.clone();
        if let Some((_, own)) = self.phase_secrets.iter().find(|(p, _)| *p == phase) {
            env.extend(own.iter().cloned());
        }
        env
    }

    /// Runs one phase's command; returns its exit code, stop reason, and
    /// the signal that killed it, if one did.
    fn run_phase(&mut self, phase: Phase) -> (i32, Option<Stop>, Option<i32>) {
        let log_path = self.rundir.join(format!("{phase}.log"));
        let mut log = match PhaseLog::open(&log_path, self.masks.stream(), self.echo) {
            Ok(l) => l,
            Err(e) => {
                log::error!("cannot open {}: {e}", log_path.display());
                return (NOT_RUN, None, None);
            }
        };
        let start_offset = log.written;
        let banner_line = format!("* Starting testflinger {phase} phase on {} *", self.config.agent_id);
        let stars = "*".repeat(banner_line.len());
        log.write(format!("{stars}\n{banner_line}\n{stars}\n").as_bytes());

        let mut limits = self.limits(phase);
        let interrupted_cleanup = phase == Phase::Cleanup && signals::interrupted();
        if interrupted_cleanup {
            limits.global = Some(limits.global.map_or(CLEANUP_WHEN_INTERRUPTED, |g| g.min(CLEANUP_WHEN_INTERRUPTED)));
        }
        let env = self.env(phase);
        let cmd = self.config.command(phase).to_string();
        let job_id = self.job_id.clone();
        let live = self.client.as_deref_mut().map(|c| {
            (LiveStream::new(&job_id, LogKind::Output, phase, &log_path, start_offset), c, &mut self.output_fragments)
        });
        let has_live = live.is_some();
        let serial_next = self.serial_fragments;
        // The connector's serial log, masked and sent as it is written.
        let serial = has_live.then(|| (SerialTail::new(&self.rundir, phase, &job_id, &self.masks), &mut self.serial_fragments));
        let mut progress = Progress {
            rundir: &self.rundir,
            phase,
            earlier: &self.pending,
            saved_output_next: u64::MAX,
            cancelled: self.cancelled,
            saved_serial_next: serial_next,
        };
        if let Some((_, _, counter)) = &live {
            progress.save(**counter, start_offset, None);
        }
        let mut watcher = PhaseWatcher {
            log,
            live,
            serial,
            job_id: &job_id,
            next_cancel_check: (phase.can_cancel() && has_live).then(|| Instant::now() + crate::budget::get().cancel_interval),
            honour_interrupt: phase != Phase::Cleanup,
            metrics: self.metrics.as_deref_mut(),
            progress,
            next_heartbeat: Instant::now() + crate::jitter::early(PHASE_HEARTBEAT),
        };
        crate::notify::status(&format!("job {job_id}: {phase}"));
        let outcome = runner::run(&cmd, &self.rundir, &env, limits, &mut watcher);
        if let Some(sig) = outcome.signal {
            watcher.log.write(format!("\nThe {phase} command was killed by signal {sig}\n").as_bytes());
        }
        watcher.log.finish();
        let written = watcher.log.written;
        let serial = watcher.serial.take();
        let mut pending = Vec::new();
        if let Some((mut stream, client, counter)) = watcher.live.take() {
            if let Err(e) = stream.flush(client, counter, written) {
                log::warn!("{phase} output not fully sent, kept for later: {e}");
                pending.push(PendingStream { kind: LogKind::Output, phase, sent: stream.sent, inflight_end: stream.inflight_end });
            }
            if let Some((mut tail, serial_counter)) = serial {
                tail.finish();
                if tail.started() {
                    if let Err(e) = tail.stream.flush(client, serial_counter, tail.written) {
                        log::warn!("{phase} serial log not fully sent, kept for later: {e}");
                        let s = &tail.stream;
                        pending.push(PendingStream { kind: LogKind::Serial, phase, sent: s.sent, inflight_end: s.inflight_end });
                    }
                }
            }
        }
        self.pending.extend(pending);
        (outcome.code, outcome.stopped, outcome.signal)
    }

    /// Text of the connector's failure detail for `phase`, if it left one,
    /// masked: it goes to the log, the events and the provision log.
    fn connector_error(&self, phase: Phase) -> Masked {
        self.masks.text(&self.connector_error_raw(phase))
    }

    fn connector_error_raw(&self, phase: Phase) -> String {
        let Ok(text) = fs::read_to_string(self.rundir.join("device-connector-error.json")) else {
            return String::new();
        };
        let Ok(json) = Json::parse(&text) else { return String::new() };
        let Some(info) = json.get(&format!("{phase}_exception_info")) else { return String::new() };
        let field = |k: &str| info.get(k).and_then(Json::as_str).unwrap_or("").to_string();
        let mut detail = format!("{}: {}", field("exception_name"), field("exception_message"));
        let cause = field("exception_cause");
        if !cause.is_empty() {
            detail.push_str(&format!(" (caused by {cause})"));
        }
        detail
    }

    /// What the connector left in `device-info.json` (its `device_info`
    /// member, or the whole object), masked; `None` when there is none or
    /// it is not JSON.
    fn device_info(&self) -> Option<Json> {
        let text = fs::read_to_string(self.rundir.join("device-info.json")).ok()?;
        let Ok(info) = Json::parse(&text) else {
            log::warn!("device-info.json is not valid JSON; ignored");
            return None;
        };
        Some(self.masks.json(info.get("device_info").unwrap_or(&info)))
    }

    fn post_device_info(&mut self) -> bool {
        let Some(info) = self.device_info() else { return true };
        match self.client.as_deref_mut() {
            Some(client) => match client.post_result(&self.job_id, &Json::object().with("device_info", info)) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("device info not posted: {e}");
                    false
                }
            },
            None => true,
        }
    }

    /// After the allocate command: publish the device, then hold it until
    /// this job or its parent is over.
    fn hold_allocation(&mut self) {
        while !self.post_device_info() {
            if signals::interrupted() {
                return;
            }
            Self::pause(self.metrics.as_deref_mut(), Duration::from_secs(2));
        }
        self.post_result(Json::object().with("job_state", Json::str("allocated")));
        let parent = self.job.get("parent_job_id").and_then(Json::as_str).map(String::from);
        let interval = Duration::from_secs_f64(self.config.polling_interval.clamp(0.1, 10.0));
        let Some(client) = self.client.as_deref_mut() else { return };
        let over = |s: Option<String>| matches!(s.as_deref(), Some("complete" | "completed" | "cancelled"));
        let mut next_heartbeat = Instant::now() + crate::jitter::early(PHASE_HEARTBEAT);
        loop {
            if Instant::now() >= next_heartbeat {
                next_heartbeat = Instant::now() + crate::jitter::early(PHASE_HEARTBEAT);
                post_state_unless_held(client, Phase::Allocate);
            }
            if over(client.job_state(&self.job_id, None)) || parent.as_deref().is_some_and(|p| over(client.job_state(p, None))) {
                return;
            }
            if signals::interrupted() {
                return;
            }
            Self::pause(self.metrics.as_deref_mut(), interval);
        }
    }

    /// Unpacks the job's attachments into the run dir, when it has some,
    /// and drops the `attachments` entries from the phase data (the
    /// connectors still find them in `testflinger.json`). Without a server
    /// (`--job`) they are skipped: there is nothing to download from.
    fn fetch_attachments(&mut self) -> Result<(), String> {
        attachments::strip_from_job(&mut self.job);
        if !attachments::wanted(&self.job) {
            return Ok(());
        }
        let Some(client) = self.client.as_deref_mut() else {
            log::warn!("job {}: attachments are not fetched without a server", self.job_id);
            return Ok(());
        };
        let done = attachments::fetch(client, &self.job_id, &self.rundir)?;
        log::info!("job {}: attachments unpacked: {} files, {} bytes", self.job_id, done.files, done.bytes);
        Ok(())
    }

    /// Runs the whole job and delivers (or keeps) its outcome.
    pub fn run(mut self) -> Summary {
        let mut summary = Summary::new(&self.job_id);
        if let Some(client) = self.client.as_deref_mut() {
            let _ = client.post_agent_data(&Json::object().with("job_id", Json::str(self.job_id.as_str())));
        }
        let job_url = self.client.as_deref().map(|c| c.url(&format!("/jobs/{}", self.job_id))).unwrap_or_default();
        self.emit(Event::JobStart, &job_url);
        for warning in self.field_warnings() {
            log::warn!("job {}: {warning}", self.job_id);
        }
        if let Some(m) = self.metrics.as_deref_mut() {
            m.job_started();
        }
        if let Err(e) = self.prepare() {
            log::error!("cannot prepare run dir {}: {e}", self.rundir.display());
            self.statuses.push((Phase::Setup, NOT_RUN));
            summary.end_reason = EndReason::Fail(Phase::Setup);
            summary.statuses = self.statuses.clone();
            self.emit(Event::JobEnd, &format!("cannot prepare the run dir: {e}"));
            self.finish_without_rundir();
            return summary;
        }
        self.events.keep_in(&self.rundir);

        let mut end_reason = EndReason::NormalExit;
        if let Err(why) = self.fetch_attachments() {
            let why = self.masks.text(&why);
            log::error!("job {}: setup failed: {why}", self.job_id);
            self.statuses.push((Phase::Setup, ATTACHMENTS_FAILED));
            if let Err(e) = self.write_outcome() {
                log::error!("cannot write the outcome file: {e}");
            }
            self.post_result(self.outcome());
            end_reason = EndReason::Fail(Phase::Setup);
            self.emit_masked(Event::Ended(end_reason), &why);
        }
        for phase in Phase::BEFORE_CLEANUP {
            if end_reason == EndReason::Fail(Phase::Setup) {
                break;
            }
            if signals::interrupted() {
                end_reason = EndReason::AgentInterrupted;
                break;
            }
            if self.is_cancelled() {
                self.emit(Event::Ended(EndReason::Cancelled), &format!("before {phase}"));
                end_reason = EndReason::Cancelled;
                self.cancelled = true;
                break;
            }
            // A skipped phase is still announced and succeeds, as upstream
            // reports it: dashboards and webhooks see every phase.
            self.post_result(Json::object().with("job_state", Json::str(phase.as_str())));
            self.post_agent_state(phase);
            self.emit(Event::Start(phase), "");
            if let Some(why) = self.skip_reason(phase) {
                log::info!("job {}: skipping {phase}: {why}", self.job_id);
                self.emit(Event::Success(phase), "");
                continue;
            }
            self.post_device_info();
            log::info!("job {}: running {phase}", self.job_id);
            let started = Instant::now();
            let (code, stopped, signal) = self.run_phase(phase);
            log::info!("job {}: {phase} exited with {code}", self.job_id);
            if phase == Phase::Provision && code == 0 {
                self.release = self.device_release();
            }
            let release = self.release.clone();
            if let Some(m) = self.metrics.as_deref_mut() {
                m.phase_ended(phase.as_str(), started.elapsed().as_secs_f64(), code, &release);
            }
            self.statuses.push((phase, code));
            if let Err(e) = self.write_outcome() {
                log::error!("cannot write the outcome file: {e}");
            }
            self.save_progress();
            self.post_result(self.outcome());
            if let Some(stop) = &stopped {
                self.emit(Event::Ended(stop.reason()), stop.message().trim());
            }
            let mut detail = self.connector_error(phase);
            if let Some(sig) = signal {
                // Distinct from an exit code of 128+N chosen by the command.
                let sep = if detail.is_empty() { "" } else { "; " };
                detail.push(&Masked::agent(format!("{sep}killed by signal {sig}")));
            }
            if phase == Phase::Provision {
                // The detail is the exit event's name, as upstream sends it;
                // the connector's own detail goes with the event.
                let exit_event = match code {
                    0 => Event::Success(phase),
                    RECOVERY_FAILED => Event::Ended(EndReason::RecoveryFail),
                    _ => Event::Ended(EndReason::Fail(phase)),
                };
                if let Some(client) = self.client.as_deref_mut() {
                    let body = Json::object()
                        .with("job_id", Json::str(self.job_id.as_str()))
                        .with("exit_code", Json::int(i64::from(code)))
                        .with("detail", Json::str(exit_event.to_string()));
                    if let Err(e) = client.post_provision_log(&body) {
                        log::warn!("provision log not posted: {e}");
                    }
                }
            }
            if code == RECOVERY_FAILED {
                summary.recovery_failed = true;
                self.emit(Event::Ended(EndReason::RecoveryFail), &format!("{phase} exited with 46: device recovery failed"));
            }
            if code == 0 {
                self.emit(Event::Success(phase), "");
            } else {
                self.emit_masked(Event::Ended(EndReason::Fail(phase)), &detail);
            }
            if phase == Phase::Allocate && code == 0 {
                self.hold_allocation();
            }
            match stopped {
                Some(Stop::Cancelled) => {
                    end_reason = EndReason::Cancelled;
                    self.cancelled = true;
                    break;
                }
                Some(Stop::Interrupted) => {
                    end_reason = EndReason::AgentInterrupted;
                    break;
                }
                _ => {}
            }
            if code != 0 && phase != Phase::Test {
                end_reason = EndReason::Fail(phase);
                break;
            }
        }

        self.run_cleanup();
        // A cancel can also land while a phase that cannot be cancelled
        // (provision, cleanup) runs, or after the last check: the outcome
        // must still not turn the job back into a completed one.
        if !self.cancelled && self.is_cancelled() {
            self.cancelled = true;
        }
        summary.interrupted = signals::interrupted();
        summary.statuses = self.statuses.clone();
        summary.end_reason = end_reason;
        self.emit(Event::JobEnd, &end_reason.to_string());
        summary.delivered = self.finish();
        summary
    }

    /// Cleanup runs whatever happened before, so the device is left sane.
    /// Without a cleanup command the events still say it succeeded, as
    /// upstream's do; no agent state or job state is posted for cleanup.
    fn run_cleanup(&mut self) {
        self.emit(Event::Start(Phase::Cleanup), "");
        if self.skip_reason(Phase::Cleanup).is_some() {
            self.emit(Event::Success(Phase::Cleanup), "");
            return;
        }
        self.post_device_info();
        let (code, _, _) = self.run_phase(Phase::Cleanup);
        self.statuses.retain(|(p, _)| *p != Phase::Cleanup);
        self.statuses.push((Phase::Cleanup, code));
        let _ = self.write_outcome();
        self.save_progress();
        self.emit(if code == 0 { Event::Success(Phase::Cleanup) } else { Event::Ended(EndReason::Fail(Phase::Cleanup)) }, "");
    }

    /// The release label for metrics after a successful provision: the
    /// `release` the connector put in `device-info.json`'s `device_info`,
    /// else `unknown` (upstream asks the device over SSH, which would block
    /// this single-threaded agent for up to half a minute).
    fn device_release(&self) -> String {
        let info = self.device_info();
        let release = info.as_ref().and_then(|i| i.get("release")).and_then(Json::as_str).filter(|r| !r.is_empty());
        release.unwrap_or("unknown").to_string()
    }

    /// Finishes a job whose agent was killed (or lost power) while it ran,
    /// from what its run dir recorded: the phases that ended keep their
    /// codes; `interrupted`, the phase that was running, gets
    /// [`INTERRUPTED_BY_AGENT_LOSS`] and a `<phase>_fail` event; cleanup
    /// runs (again, when it was the interrupted one); then artifacts and
    /// outcome are delivered or kept like any job's.
    pub fn resume(mut self, interrupted: Option<Phase>) -> Summary {
        let outcome_text = fs::read_to_string(self.rundir.join("testflinger-outcome.json")).unwrap_or_default();
        if let Ok(outcome) = Json::parse(&outcome_text) {
            for (phase, code) in outcome.get("status").and_then(Json::as_object).unwrap_or(&[]) {
                if let (Some(p), Some(c)) = (Phase::parse(phase), code.as_i64()) {
                    self.statuses.push((p, c as i32));
                }
            }
        }
        self.events.restore(&self.rundir);
        let saved = delivery::JobState::load(&self.rundir);
        self.output_fragments = saved.output_next;
        self.serial_fragments = saved.serial_next;
        self.pending = saved.pending;
        self.cancelled = saved.cancelled;
        if let Some(client) = self.client.as_deref_mut() {
            let _ = client.post_agent_data(&Json::object().with("job_id", Json::str(self.job_id.as_str())));
        }
        let mut end_reason = EndReason::NormalExit;
        if let Some(phase) = interrupted {
            let detail = format!(
                "the agent stopped (killed or lost power) while {phase} ran; status {INTERRUPTED_BY_AGENT_LOSS} means its real exit status is unknown"
            );
            log::warn!("job {}: {detail}", self.job_id);
            let line = format!("\nERROR: {detail}\n");
            let log_path = self.rundir.join(format!("{phase}.log"));
            if let Err(e) = safe_fs::open_append(&log_path, safe_fs::PRIVATE_FILE).and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes())) {
                log::warn!("cannot note the interruption in {}: {e}", log_path.display());
            }
            if phase != Phase::Cleanup {
                self.statuses.push((phase, INTERRUPTED_BY_AGENT_LOSS));
                end_reason = EndReason::Fail(phase);
                if let Some(m) = self.metrics.as_deref_mut() {
                    m.phase_ended(phase.as_str(), 0.0, INTERRUPTED_BY_AGENT_LOSS, "");
                }
            }
            let _ = self.write_outcome();
            self.post_result(self.outcome());
            self.emit(Event::Ended(EndReason::Fail(phase)), &detail);
        }
        // The output the server missed goes before cleanup's, in order.
        self.flush_pending();
        if !self.statuses.iter().any(|(p, _)| *p == Phase::Cleanup) {
            self.run_cleanup();
        }
        let summary = Summary { statuses: self.statuses.clone(), end_reason, ..Summary::new(&self.job_id) };
        self.emit(Event::JobEnd, &end_reason.to_string());
        let delivered = self.finish();
        Summary { delivered, interrupted: signals::interrupted(), ..summary }
    }

    fn flush_pending(&mut self) {
        let Some(client) = self.client.as_deref_mut() else { return };
        let mut left = Vec::new();
        for mut p in std::mem::take(&mut self.pending) {
            let counter = if p.kind == LogKind::Serial { &mut self.serial_fragments } else { &mut self.output_fragments };
            if let Err(e) = p.send_rest(client, &self.rundir, &self.job_id, counter) {
                log::warn!("{} {} log not fully sent, kept for later: {e}", p.phase, p.kind);
                left.push(p);
            }
        }
        self.pending = left;
        self.save_progress();
    }

    /// Packs artifacts, delivers the outcome, and removes the run dir, or
    /// moves it to `results_basedir` to be delivered later.
    fn finish(&mut self) -> bool {
        let artifacts = self.rundir.join("artifacts");
        if archive::has_content(&artifacts) {
            let dest = self.rundir.join(delivery::ARCHIVE_NAME);
            let mask = self.config.mask_artifacts.then_some(&self.masks);
            match archive::pack_artifacts(&artifacts, &dest, mask) {
                // pack_artifacts logs the size and the time it took.
                Ok(_) => {}
                Err(e) => {
                    log::error!("cannot pack artifacts (the outcome is still delivered): {e}");
                    let _ = fs::remove_file(&dest);
                }
            }
        }
        let state = delivery::JobState {
            output_next: self.output_fragments,
            serial_next: self.serial_fragments,
            pending: std::mem::take(&mut self.pending),
            events: self.events.owed(),
            cancelled: self.cancelled,
        };
        if let Err(e) = state.save(&self.rundir) {
            log::error!("cannot save delivery state in {}: {e}", self.rundir.display());
        }
        // Delivered from memory: on a full disk the outcome file may be stale.
        let outcome = self.outcome();
        let Some(client) = self.client.as_deref_mut() else {
            return false;
        };
        match delivery::deliver_with(client, &self.rundir, &self.job_id, state, outcome) {
            Ok(()) => {
                if let Err(e) = fs::remove_dir_all(&self.rundir) {
                    log::warn!("cannot remove {}: {e}", self.rundir.display());
                }
                true
            }
            Err(e) => {
                log::error!("job {}: outcome not delivered, keeping it for later: {e}", self.job_id);
                delivery::keep(&self.config.results_basedir, &self.rundir, &self.job_id);
                false
            }
        }
    }

    /// The run dir could not be made: report the failure without one.
    fn finish_without_rundir(&mut self) {
        let outcome = self.outcome().with("job_state", Json::str("complete"));
        self.post_result(outcome);
    }
}

/// Posts the agent's `state` (a phase name), unless an operator holds the
/// agent offline or in maintenance: an operator may put the agent in
/// maintenance while a job runs, and a phase name must not overwrite that
/// (upstream's does). Also the heartbeat of long phases.
fn post_state_unless_held(client: &mut Client, state: Phase) {
    if let Some((held, _)) = client.held_state() {
        log::info!("agent is {held} on the server; not posting state {state}");
        return;
    }
    // Always with a comment, as upstream posts a state.
    let data = Json::object().with("state", Json::str(state.as_str())).with("comment", Json::str(""));
    if let Err(e) = client.post_agent_data(&data) {
        log::warn!("agent state {state} not posted: {e}");
    }
}

/// What kind of JSON value `v` is, for a warning.
fn kind_of(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::Str(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!("agent_id: a\nserver_address: x\njob_queues: [q]\n{extra}");
        Config::parse(&text, std::path::Path::new("t.conf")).expect("test config")
    }

    #[test]
    fn wrong_typed_fields_are_named_with_what_is_used() {
        let job = Json::parse(
            r#"{"job_id":"j","global_timeout":"soon","output_timeout":-3,"test_data":"a string","provision_data":{"url":"u"},"reserve_data":""}"#,
        )
        .unwrap();
        let conf = config("output_timeout: 60\n");
        let warnings = JobRunner::new(&conf, None, job, false).field_warnings();
        assert_eq!(
            warnings,
            [
                r#"global_timeout: "soon" is not a positive number of seconds; using the default, 14400 s"#,
                "output_timeout: -3 is not a positive number of seconds; using the config's, 60 s",
                "test_data: a string, not a mapping; the test phase is skipped",
            ]
        );
        let fine = Json::parse(r#"{"job_id":"j","global_timeout":30,"output_timeout":30.0,"test_data":{}}"#).unwrap();
        assert!(JobRunner::new(&conf, None, fine, false).field_warnings().is_empty());
    }
}
