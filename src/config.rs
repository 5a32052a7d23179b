//! The agent's config file, parsed once at start into checked, typed
//! settings (ripgrep's `HiArgs` is the model): the YAML keys as written
//! live in `raw.rs`; [`Config`] holds what they mean (durations, paths, a
//! log level, JSON for the server), and every schedule the keys drive is
//! derived in `schedules.rs`. Whoever needs a setting is handed the
//! `Config` (or the value); there is no global.
//!
//! A malformed file names the key at fault (`main` exits 2 on it).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::json::Json;
use crate::logging::LevelFilter;
use crate::phase::Phase;

mod raw;
mod schedules;

use raw::RawConfig;
pub use schedules::Schedules;

/// The checked settings. Built only by [`Config::parse`], so every value
/// is within its range.
#[derive(Debug, Clone)]
pub struct Config {
    agent_id: String,
    server_address: String,
    job_queues: Vec<String>,
    identifier: Option<String>,
    location: Option<String>,
    provision_type: Option<String>,
    execution_basedir: PathBuf,
    logging_basedir: PathBuf,
    results_basedir: PathBuf,
    logging_level: LevelFilter,
    logging_quiet: bool,
    commands: Commands,
    global_timeout: Option<u64>,
    output_timeout: Option<u64>,
    advertised_queues: Option<Json>,
    advertised_images: Option<Json>,
    metrics_textfile: Option<PathBuf>,
    metrics_ip: IpAddr,
    server_timeout: Duration,
    server_ca_file: Option<PathBuf>,
    mask_artifacts: bool,
    kill_grace: Duration,
    min_free_mb: u64,
    schedules: Schedules,
    /// What phase commands get in their environment from the config, as
    /// upstream exports it: see `raw::phase_env`; `token_file` is added by
    /// [`Config::export_token_file`].
    phase_env: Vec<(String, String)>,
}

/// The seven phase commands as configured; empty means none.
#[derive(Debug, Clone)]
struct Commands {
    setup: String,
    provision: String,
    firmware_update: String,
    test: String,
    allocate: String,
    reserve: String,
    cleanup: String,
}

/// Why a config file was refused; `Display` is the one line `main` prints.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    /// Always one line: keys and YAML excerpts from a broken file may hold
    /// line breaks and other control characters, which are escaped.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "config {}", one_line(&self.file.display().to_string()))?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{}`", one_line(key))?;
        }
        write!(f, ": {}", one_line(&crate::human::without_os_error(&self.reason)))
    }
}

fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            key: None,
            line: None,
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks the file's text; `path` is for the errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        // Some editors start a file with a byte order mark; PyYAML skips it.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let err = |key: Option<&str>, line: Option<usize>, reason: String| ConfigError {
            file: path.to_path_buf(),
            key: key.map(str::to_string),
            line,
            reason,
        };
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| {
            let (key, reason) = raw::describe_yaml_error(&e.to_string());
            let mut line = e.location().map(|l| l.line());
            if let (Some(k), true) = (&key, reason.starts_with("written twice")) {
                // serde places it at the mapping's start: say the second writing.
                let at = format!("{k}:");
                line = text.lines().enumerate().filter(|(_, l)| l.starts_with(&at)).nth(1).map(|(i, _)| i + 1);
            }
            ConfigError { file: path.to_path_buf(), key, line, reason }
        })?;
        // Parsed a second time as a plain mapping to find the string keys;
        // it parsed above, so this only fails on something very odd.
        let mapping: serde_yaml_ng::Mapping =
            serde_yaml_ng::from_str(text).map_err(|e| err(None, None, e.to_string()))?;
        Config::check(raw, raw::phase_env(&mapping)).map_err(|(key, reason)| err(Some(key), None, reason))
    }

    /// Raw values in, checked and typed values out, or (the key, why not).
    fn check(raw: RawConfig, phase_env: Vec<(String, String)>) -> Result<Config, (&'static str, String)> {
        for (key, value) in [("agent_id", &raw.agent_id), ("server_address", &raw.server_address)] {
            if value.trim().is_empty() {
                return Err((key, "must not be empty".into()));
            }
        }
        check_server_address(&raw.server_address).map_err(|r| ("server_address", r))?;
        check_agent_id(&raw.agent_id).map_err(|r| ("agent_id", r))?;
        if raw.job_queues.is_empty() {
            return Err(("job_queues", "must list at least one queue".into()));
        }
        let durations = Durations::of(&raw)?;
        let metrics_ip = match &raw.metrics_address {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(address) => address.trim().parse().map_err(|_| {
                ("metrics_address", format!("{address:?} is not an IP address (such as 127.0.0.1, 0.0.0.0 or ::1)"))
            })?,
        };
        if let Some(ca) = &raw.server_ca_file {
            check_ca_file(ca).map_err(|reason| ("server_ca_file", reason))?;
        }
        let logging_level = crate::logging::parse_level(&raw.logging_level).ok_or_else(|| {
            let reason = format!("unknown level {:?}; use DEBUG, INFO, WARNING, ERROR or CRITICAL", raw.logging_level);
            ("logging_level", reason)
        })?;
        let as_json = |m: Option<serde_yaml_ng::Mapping>| m.map(|m| yaml_to_json(&serde_yaml_ng::Value::Mapping(m)));
        Ok(Config {
            agent_id: raw.agent_id,
            server_address: raw.server_address,
            job_queues: raw.job_queues,
            identifier: raw.identifier,
            location: raw.location,
            provision_type: raw.provision_type,
            execution_basedir: raw.execution_basedir,
            logging_basedir: raw.logging_basedir,
            results_basedir: raw.results_basedir,
            logging_level,
            logging_quiet: raw.logging_quiet,
            commands: Commands {
                setup: raw.setup_command,
                provision: raw.provision_command,
                firmware_update: raw.firmware_update_command,
                test: raw.test_command,
                allocate: raw.allocate_command,
                reserve: raw.reserve_command,
                cleanup: raw.cleanup_command,
            },
            global_timeout: raw.global_timeout,
            output_timeout: raw.output_timeout,
            advertised_queues: as_json(raw.advertised_queues),
            advertised_images: as_json(raw.advertised_images),
            metrics_textfile: raw.metrics_textfile,
            metrics_ip,
            server_timeout: durations.server_timeout,
            server_ca_file: raw.server_ca_file,
            mask_artifacts: raw.mask_artifacts,
            kill_grace: durations.kill_grace,
            min_free_mb: raw.min_free_mb,
            schedules: Schedules::new(durations.polling_interval, durations.output_interval, durations.cancel_check),
            phase_env,
        })
    }

    /// Creates the three base directories if need be and checks that the
    /// agent can use them, so that a misconfigured agent stops at start
    /// rather than taking jobs from the server and failing each of them.
    /// `file` is the config file, for the error.
    pub fn prepare_dirs(&self, file: &Path) -> Result<(), ConfigError> {
        let dirs = [
            ("execution_basedir", &self.execution_basedir, crate::safe_fs::PRIVATE_DIR),
            ("results_basedir", &self.results_basedir, crate::safe_fs::PRIVATE_DIR),
            ("logging_basedir", &self.logging_basedir, crate::safe_fs::LOG_DIR),
        ];
        for (key, dir, mode) in dirs {
            usable_dir(dir, mode).map_err(|reason| ConfigError {
                file: file.to_path_buf(),
                key: Some(key.into()),
                line: None,
                reason: format!("{}: {reason}", dir.display()),
            })?;
        }
        if let Some(path) = self.metrics_textfile.as_deref() {
            let text = path.as_os_str().to_string_lossy();
            if path.file_name().is_none()
                || text.ends_with('/')
                || path.parent().is_none_or(|p| p.as_os_str().is_empty())
            {
                return Err(ConfigError {
                    file: file.to_path_buf(),
                    key: Some("metrics_textfile".into()),
                    line: None,
                    reason: format!(
                        "{text:?} must name a file in a directory (node_exporter's textfile directory, e.g. /var/lib/node_exporter/textfile_collector/testflinger_agent.prom)"
                    ),
                });
            }
        }
        // Its directory is node_exporter's, not made by the agent; but the
        // agent renames files into it, so it must not be another user's.
        if let Some(dir) = self.metrics_textfile.as_deref().and_then(Path::parent) {
            crate::safe_fs::check_path(dir).map_err(|e| ConfigError {
                file: file.to_path_buf(),
                key: Some("metrics_textfile".into()),
                line: None,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Exports the token file (given or upstream's default) to phase
    /// commands as `token_file`, as upstream adds it to its config.
    pub fn export_token_file(&mut self, path: &Path) {
        self.phase_env.retain(|(k, _)| k != "token_file");
        self.phase_env.push(("token_file".into(), path.display().to_string()));
    }

    /// What phase commands get in their environment from the config.
    pub fn phase_env(&self) -> &[(String, String)] {
        &self.phase_env
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// As written (checked): the client adds `http://` when it has no scheme.
    pub fn server_address(&self) -> &str {
        &self.server_address
    }

    pub fn job_queues(&self) -> &[String] {
        &self.job_queues
    }

    pub fn identifier(&self) -> Option<&str> {
        self.identifier.as_deref()
    }

    pub fn location(&self) -> Option<&str> {
        self.location.as_deref()
    }

    pub fn provision_type(&self) -> Option<&str> {
        self.provision_type.as_deref()
    }

    pub fn execution_basedir(&self) -> &Path {
        &self.execution_basedir
    }

    pub fn logging_basedir(&self) -> &Path {
        &self.logging_basedir
    }

    pub fn results_basedir(&self) -> &Path {
        &self.results_basedir
    }

    pub fn logging_level(&self) -> LevelFilter {
        self.logging_level
    }

    pub fn logging_quiet(&self) -> bool {
        self.logging_quiet
    }

    /// The command configured for `phase`, if any (empty means none).
    pub fn command(&self, phase: Phase) -> &str {
        let c = &self.commands;
        match phase {
            Phase::Setup => &c.setup,
            Phase::Provision => &c.provision,
            Phase::FirmwareUpdate => &c.firmware_update,
            Phase::Test => &c.test,
            Phase::Allocate => &c.allocate,
            Phase::Reserve => &c.reserve,
            Phase::Cleanup => &c.cleanup,
        }
    }

    /// `global_timeout` in whole seconds (1 to [`MAX_JOB_TIMEOUT`]), as a
    /// job gives it: the plan takes the smaller of the two.
    pub fn global_timeout(&self) -> Option<u64> {
        self.global_timeout
    }

    /// `output_timeout`, as [`Config::global_timeout`].
    pub fn output_timeout(&self) -> Option<u64> {
        self.output_timeout
    }

    pub fn advertised_queues(&self) -> Option<&Json> {
        self.advertised_queues.as_ref()
    }

    pub fn advertised_images(&self) -> Option<&Json> {
        self.advertised_images.as_ref()
    }

    pub fn metrics_textfile(&self) -> Option<&Path> {
        self.metrics_textfile.as_deref()
    }

    /// Where the metrics endpoint listens: all addresses unless set.
    pub fn metrics_ip(&self) -> IpAddr {
        self.metrics_ip
    }

    /// The longest one request to the server may take (at least 1 s).
    pub fn server_timeout(&self) -> Duration {
        self.server_timeout
    }

    pub fn server_ca_file(&self) -> Option<&Path> {
        self.server_ca_file.as_deref()
    }

    pub fn mask_artifacts(&self) -> bool {
        self.mask_artifacts
    }

    pub fn kill_grace(&self) -> Duration {
        self.kill_grace
    }

    /// The disk guard's minimum in MiB; 0 when off.
    pub fn min_free_mb(&self) -> u64 {
        self.min_free_mb
    }

    /// Every schedule the keys drive (see `schedules.rs`).
    pub fn schedules(&self) -> &Schedules {
        &self.schedules
    }
}

/// A CA file must be there and hold a PEM certificate: found at start, not
/// at the first https request.
fn check_ca_file(path: &Path) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !text.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display()));
    }
    Ok(())
}

/// The longest a job may hold the device (`global_timeout`,
/// `output_timeout`), in the config or in a job: a year. Upstream sets no
/// bound; one is needed so that no sum of an instant and a limit overflows.
pub const MAX_JOB_TIMEOUT: u64 = 365 * 86_400;
/// The longest of every other duration key: a day.
const MAX_INTERVAL_SECS: u64 = 86_400;
const MAX_INTERVAL: f64 = MAX_INTERVAL_SECS as f64;

/// The duration keys, checked and typed.
struct Durations {
    polling_interval: Duration,
    output_interval: Duration,
    cancel_check: Duration,
    kill_grace: Duration,
    server_timeout: Duration,
}

impl Durations {
    /// Every duration key within its range, or (the key, its range): a
    /// value out of range would stop the agent later, in the middle of a job.
    fn of(c: &RawConfig) -> Result<Durations, (&'static str, String)> {
        let whole = [
            ("global_timeout", c.global_timeout, 1, MAX_JOB_TIMEOUT),
            ("output_timeout", c.output_timeout, 1, MAX_JOB_TIMEOUT),
            ("server_timeout", Some(c.server_timeout), 1, MAX_INTERVAL_SECS),
        ];
        for (key, value, lo, hi) in whole {
            if value.is_some_and(|v| !(lo..=hi).contains(&v)) {
                return Err((key, format!("must be a whole number of seconds from {lo} to {hi}")));
            }
        }
        let fractional = |key: &'static str, value: f64| {
            if value.is_finite() && (0.0..=MAX_INTERVAL).contains(&value) {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err((key, format!("must be a number of seconds from 0 to {MAX_INTERVAL}")))
            }
        };
        Ok(Durations {
            polling_interval: fractional("polling_interval", c.polling_interval)?,
            output_interval: fractional("output_interval", c.output_interval)?,
            cancel_check: fractional("cancel_check_interval", c.cancel_check_interval)?,
            kill_grace: fractional("kill_grace", c.kill_grace)?,
            server_timeout: Duration::from_secs(c.server_timeout),
        })
    }
}

fn usable_dir(dir: &Path, mode: u32) -> Result<(), String> {
    // Made private and without following planted links, like every
    // directory the agent makes.
    crate::safe_fs::ensure_base_dir(dir, mode).map_err(|e| {
        let e = e.to_string();
        // A refusal names the path and the owner or mode at fault.
        if e.starts_with("refusing ") { e } else { format!("cannot create the directory: {e}") }
    })?;
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| "holds a NUL byte".to_string())?;
    // SAFETY: access(2) on a NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK | libc::X_OK) } != 0 {
        return Err(format!("not usable: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `server_address`, read as the client will read it (`client/wire.rs`);
/// a query or fragment is refused, as request paths are appended to it.
fn check_server_address(address: &str) -> Result<(), String> {
    let address = address.trim();
    if address.contains(['?', '#']) {
        return Err(format!("{address:?}: must not hold a query or fragment"));
    }
    let url = crate::client::wire::Url::parse(&crate::client::wire::server_base(address)).map_err(|e| e.to_string())?;
    if url.https && !cfg!(feature = "tls") {
        return Err(format!("{address:?}: this build has no TLS (built without the `tls` feature)"));
    }
    Ok(())
}

/// `agent_id` names the agent in URL paths (`/v1/agents/data/<agent_id>`):
/// what could leave that path segment is refused; the client
/// percent-encodes anything else that is not plain.
fn check_agent_id(id: &str) -> Result<(), String> {
    if id == "." || id == ".." || id.contains(['/', '\\']) || id.chars().any(char::is_control) {
        return Err(format!("{id:?} cannot be used in a URL path (no `/`, `\\`, control characters, `.` or `..`)"));
    }
    Ok(())
}

/// YAML values as JSON for the server (advertised queues and images).
pub fn yaml_to_json(v: &serde_yaml_ng::Value) -> Json {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Null => Json::Null,
        Y::Bool(b) => Json::Bool(*b),
        Y::Number(n) => Json::Number(n.to_string()),
        Y::String(s) => Json::Str(s.clone()),
        Y::Sequence(s) => Json::Array(s.iter().map(yaml_to_json).collect()),
        Y::Mapping(m) => Json::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s.clone(),
                        other => serde_yaml_ng::to_string(other).unwrap_or_default().trim().to_string(),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(t) => yaml_to_json(&t.value),
    }
}

#[cfg(test)]
mod tests;
