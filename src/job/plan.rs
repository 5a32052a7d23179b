//! The job as the agent runs it, read once from the server's JSON and the
//! config: which phases run (or why not), with which command, secrets and
//! time limits. A pure function: nothing here touches the disk or the
//! server, so every rule is unit-tested below as a table.

use std::time::Duration;

use crate::config::{Config, MAX_JOB_TIMEOUT};
use crate::json::Json;
use crate::phase::Phase;
use crate::runner::Limits;

const DEFAULT_GLOBAL_TIMEOUT: u64 = 4 * 3600;
const DEFAULT_OUTPUT_TIMEOUT: u64 = 15 * 60;
/// The job id of a `--job` run whose file names none.
const LOCAL_JOB_ID: &str = "local-job";

/// One phase as it will run.
#[derive(Debug)]
pub struct PhasePlan {
    pub phase: Phase,
    /// The config's `<phase>_command` (empty: none).
    pub command: String,
    /// Why the phase does not run, or `None` when it does. A skipped phase
    /// is still announced and succeeds, as upstream reports it.
    pub skip: Option<String>,
    /// This phase's own `secrets` (its environment gets those only).
    pub secrets: Vec<(String, String)>,
    pub limits: Limits,
}

/// The job, typed.
#[derive(Debug)]
pub struct JobPlan {
    pub job_id: String,
    /// The job as connectors read it (`testflinger.json`): as the server
    /// sent it, less the secrets. Not masked: it is the phases' input.
    pub document: Json,
    /// Every phase, in order, cleanup last.
    pub phases: Vec<PhasePlan>,
    /// The server holds attachments for the job (`attachments_status`).
    pub attachments: bool,
    /// An allocation is held until this job, or this parent, is over.
    pub parent_job_id: Option<String>,
    pub webhook: Option<String>,
    pub job_queue: String,
    /// Typed fields holding the wrong type, each with what is used instead.
    pub warnings: Vec<String>,
}

impl JobPlan {
    pub fn new(config: &Config, mut job: Json) -> JobPlan {
        let text = |job: &Json, key: &str| job.get(key).and_then(Json::as_str).map(String::from);
        let job_id = text(&job, "job_id").unwrap_or_else(|| LOCAL_JOB_ID.to_string());
        // Secrets go to their own phase's environment only: never to disk.
        let secrets: Vec<_> = Phase::ALL.into_iter().map(|p| take_secrets(&mut job, p)).collect();
        let stripped = without_attachments(&job);
        let phases = Phase::ALL
            .into_iter()
            .zip(secrets)
            .map(|(phase, secrets)| PhasePlan {
                phase,
                command: config.command(phase).to_string(),
                skip: skip_reason(config, &stripped, phase),
                secrets,
                limits: limits(config, &job, phase),
            })
            .collect();
        JobPlan {
            warnings: [field_warnings(config, &job), unknown_key_warnings(&job)].concat(),
            attachments: text(&job, "attachments_status").as_deref() == Some("complete"),
            parent_job_id: text(&job, "parent_job_id"),
            webhook: text(&job, "job_status_webhook").filter(|w| !w.is_empty()),
            job_queue: text(&job, "job_queue").unwrap_or_default(),
            job_id,
            phases,
            document: job,
        }
    }

    pub fn phase(&self, phase: Phase) -> &PhasePlan {
        // `phases` holds every phase in `Phase::ALL` order.
        &self.phases[Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0)]
    }

    /// Every secret value of the job, all phases': job text on its way out
    /// goes through them.
    pub fn secret_values(&self) -> impl Iterator<Item = String> + '_ {
        self.phases.iter().flat_map(|p| p.secrets.iter().map(|(_, v)| v.clone()))
    }
}

/// Removes `phase`'s `secrets` from the job; their values as strings.
fn take_secrets(job: &mut Json, phase: Phase) -> Vec<(String, String)> {
    let Some(Json::Object(map)) = job.get_mut(&phase.data_key()).and_then(|d| d.remove("secrets")) else {
        return Vec::new();
    };
    let value = |v: Json| match v {
        Json::Str(s) => s,
        Json::Null => String::new(),
        other => other.to_string_compact(),
    };
    map.into_iter().map(|(k, v)| (k, value(v))).collect()
}

/// The job with each phase's `attachments` entry removed, and the phase's
/// data itself when nothing else is left in it: a block holding only
/// attachments does not make a phase run (as upstream does). The document
/// keeps them: the connectors find them in `testflinger.json`.
fn without_attachments(job: &Json) -> Json {
    let mut job = job.clone();
    for phase in Phase::ALL.into_iter().filter(|p| p.takes_attachments()) {
        let key = phase.data_key();
        let Some(data) = job.get_mut(&key) else { continue };
        if data.remove("attachments").is_some() && data.is_empty_like() {
            job.remove(&key);
        }
    }
    job
}

/// Why `phase` does not run, or `None` when it does.
fn skip_reason(config: &Config, job: &Json, phase: Phase) -> Option<String> {
    if config.command(phase).trim().is_empty() {
        return Some(format!("no {phase}_command configured"));
    }
    if !phase.needs_data() {
        return None;
    }
    match job.get(&phase.data_key()) {
        None => Some(format!("no {phase}_data in the job")),
        Some(d) if d.is_empty_like() => Some(format!("empty {phase}_data in the job")),
        Some(d) if !matches!(d, Json::Object(_)) => Some(format!("{phase}_data is not a mapping")),
        Some(d) if d.get("skip").and_then(Json::as_bool) == Some(true) => Some(format!("{phase}_data has skip: true")),
        Some(_) => None,
    }
}

/// A job's timeout is a whole number of seconds from 1 to
/// [`MAX_JOB_TIMEOUT`]; anything else is ignored (with a warning, see
/// `field_warnings`) and the config's value or the default is used.
fn timeout_from_job(job: &Json, key: &str) -> Option<u64> {
    job.get(key)
        .and_then(Json::as_i64)
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| (1..=MAX_JOB_TIMEOUT).contains(t))
}

/// The job's timeout capped by the config's, as upstream caps it: an absent
/// one counts as the default, so an unconfigured device still holds a job
/// to 4 h (15 min without output).
fn pick(job: Option<u64>, conf: Option<u64>, default: u64) -> u64 {
    job.unwrap_or(default).min(conf.unwrap_or(default))
}

fn limits(config: &Config, job: &Json, phase: Phase) -> Limits {
    let kill_grace = Some(config.kill_grace());
    // Cleanup still runs when the agent is told to stop, so the device is
    // left sane (bounded to two minutes then, see `job::execute`); every
    // other phase ends.
    let on_agent_stop = phase != Phase::Cleanup;
    if phase == Phase::Reserve {
        // The connector's reserve command waits out the reservation's
        // timeout itself, after its own start-up: a limit here would
        // always end it first. Only a cancel ends it early (upstream too).
        return Limits { global: None, output: None, kill_grace, on_agent_stop };
    }
    let global = pick(timeout_from_job(job, "global_timeout"), config.global_timeout(), DEFAULT_GLOBAL_TIMEOUT);
    let output = (phase == Phase::Test)
        .then(|| pick(timeout_from_job(job, "output_timeout"), config.output_timeout(), DEFAULT_OUTPUT_TIMEOUT));
    Limits {
        global: Some(Duration::from_secs(global)),
        output: output.map(Duration::from_secs),
        kill_grace,
        on_agent_stop,
    }
}

/// Typed job fields holding the wrong type, each with what is used
/// instead: a job no server validated (`--job`) still runs, and the
/// operator learns why it ran otherwise than written.
fn field_warnings(config: &Config, job: &Json) -> Vec<String> {
    let mut warnings = Vec::new();
    let timeouts = [
        ("global_timeout", config.global_timeout(), DEFAULT_GLOBAL_TIMEOUT),
        ("output_timeout", config.output_timeout(), DEFAULT_OUTPUT_TIMEOUT),
    ];
    for (key, conf, default) in timeouts {
        let Some(v) = job.get(key).filter(|v| !matches!(v, Json::Null)) else { continue };
        if timeout_from_job(job, key).is_some() {
            continue;
        }
        let mut shown = v.to_string_compact();
        if shown.len() > 40 {
            shown = format!("{}...", shown.chars().take(40).collect::<String>());
        }
        let used = match conf {
            Some(c) if c < default => format!("the config's, {c} s"),
            _ => format!("the default, {default} s"),
        };
        let why = match v {
            Json::Number(n) if n.parse::<f64>().is_ok_and(|f| f > MAX_JOB_TIMEOUT as f64) => {
                format!("is more than the longest allowed, {MAX_JOB_TIMEOUT} s")
            }
            _ => "is not a positive number of seconds".to_string(),
        };
        warnings.push(format!("{key}: {shown} {why}; using {used}"));
    }
    for phase in Phase::BEFORE_CLEANUP {
        let key = phase.data_key();
        match job.get(&key) {
            None | Some(Json::Object(_)) => {}
            // Absent in upstream's eyes too: skipped without a word.
            Some(v) if v.is_empty_like() => {}
            Some(v) => warnings.push(format!("{key}: {}, not a mapping; the {phase} phase is skipped", kind_of(v))),
        }
    }
    warnings
}

/// The top-level keys of upstream's job schema (the server's `Job`, which
/// refuses others at submission), those the server adds when it hands the
/// job out, and the `<phase>_data` of the phases the agent reads secrets
/// from (setup and cleanup too).
const JOB_KEYS: [&str; 20] = [
    "job_id",
    "parent_job_id",
    "name",
    "tags",
    "job_queue",
    "global_timeout",
    "output_timeout",
    "allocation_timeout",
    "provision_data",
    "firmware_update_data",
    "test_data",
    "allocate_data",
    "reserve_data",
    "job_status_webhook",
    "job_priority",
    "exclude_agents",
    "debug",
    "attachments_status",
    "client_id",
    "started_at",
];

/// A warning per top-level key the job schema does not know, naming the
/// nearest known key when one is close: a typo (`tset_data`) would
/// otherwise leave its phase skipped without a word above INFO.
fn unknown_key_warnings(job: &Json) -> Vec<String> {
    let Json::Object(fields) = job else { return Vec::new() };
    let data_keys: Vec<String> = Phase::ALL.iter().map(|p| p.data_key()).collect();
    let known = || JOB_KEYS.iter().copied().chain(data_keys.iter().map(String::as_str));
    let mut warnings = Vec::new();
    for (key, _) in fields {
        if known().any(|k| k == key) {
            continue;
        }
        let shown: String = key.chars().take(60).flat_map(char::escape_default).collect();
        let nearest = known().map(|k| (edit_distance(key, k), k)).min();
        let hint = match nearest {
            Some((d, k)) if d <= 3 && d * 3 <= key.chars().count() => format!(" (did you mean {k}?)"),
            _ => String::new(),
        };
        warnings.push(format!("unknown job key {shown}{hint}: ignored"));
    }
    warnings
}

/// Edits (insert, delete, replace, swap two neighbours) from `a` to `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().take(64).collect(), b.chars().collect());
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1).min(rows[i][j - 1] + 1).min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
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
mod tests;
