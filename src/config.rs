//! The agent's YAML config file: the upstream keys, their defaults, and
//! validation that names the offending key.
//!
//! Upstream validates with a voluptuous schema that refuses unknown keys; we
//! do the same so that a typo (`test_comand`) is caught at start rather than
//! silently leaving a phase unconfigured.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::json::Json;
use crate::phase::Phase;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent_id: String,
    pub server_address: String,
    pub job_queues: Vec<String>,
    #[serde(default)]
    pub identifier: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
    /// Seconds between polls. Upstream takes an integer; fractions are
    /// accepted too (handy for tests).
    #[serde(default = "default_polling_interval")]
    pub polling_interval: f64,
    #[serde(default = "default_execution_basedir")]
    pub execution_basedir: PathBuf,
    #[serde(default = "default_logging_basedir")]
    pub logging_basedir: PathBuf,
    #[serde(default = "default_results_basedir")]
    pub results_basedir: PathBuf,
    #[serde(default = "default_logging_level")]
    pub logging_level: String,
    #[serde(default)]
    pub logging_quiet: bool,
    #[serde(default)]
    pub setup_command: String,
    #[serde(default)]
    pub provision_command: String,
    #[serde(default)]
    pub firmware_update_command: String,
    #[serde(default)]
    pub test_command: String,
    #[serde(default)]
    pub allocate_command: String,
    #[serde(default)]
    pub reserve_command: String,
    #[serde(default)]
    pub cleanup_command: String,
    #[serde(default)]
    pub provision_type: Option<String>,
    #[serde(default)]
    pub global_timeout: Option<u64>,
    #[serde(default)]
    pub output_timeout: Option<u64>,
    #[serde(default)]
    pub advertised_queues: Option<serde_yaml_ng::Mapping>,
    #[serde(default)]
    pub advertised_images: Option<serde_yaml_ng::Mapping>,
    /// Accepted for compatibility with upstream configs; the agent itself
    /// does not use them (device connectors may read them from the env).
    #[serde(default)]
    pub links: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub control_host: Option<BTreeMap<String, String>>,
    #[serde(default = "default_output_bytes")]
    pub output_bytes: u64,
    /// Where to keep a copy of the metrics for node_exporter's textfile
    /// collector (a `*.prom` file in its directory); none by default.
    #[serde(default)]
    pub metrics_textfile: Option<PathBuf>,
    /// The address `--metrics_port` listens on: all (`0.0.0.0`, as
    /// upstream) unless set, e.g. to 127.0.0.1. Not an upstream key.
    #[serde(default)]
    pub metrics_address: Option<String>,
    /// Seconds one request to the server may take (connect, send, answer)
    /// before it counts as failed and is retried; at least 1. Not an
    /// upstream key.
    #[serde(default = "default_server_timeout")]
    pub server_timeout: u64,
    /// A PEM file of CA certificates trusted for an https server on top of
    /// the system store (a lab's own CA). Not an upstream key.
    #[serde(default)]
    pub server_ca_file: Option<PathBuf>,
    /// Mask the job's secrets inside text files under `artifacts/` while
    /// packing them (binary files are left alone). Off by default: it
    /// reads every text artifact twice. Not an upstream key.
    #[serde(default)]
    pub mask_artifacts: bool,
    /// Seconds: while a phase keeps printing, at most one fragment per log
    /// this often (the first output after a quiet spell goes at once).
    /// Not an upstream key (upstream sends one per 10 s).
    #[serde(default = "default_output_interval")]
    pub output_interval: f64,
    /// Seconds between two checks of whether the running job was
    /// cancelled. Not an upstream key.
    #[serde(default = "default_cancel_check_interval")]
    pub cancel_check_interval: f64,
    /// Seconds a stopped phase (timeout, cancel, agent stop) gets between
    /// SIGTERM and SIGKILL. Not an upstream key.
    #[serde(default = "default_kill_grace")]
    pub kill_grace: f64,
    /// MiB that must be free under `execution_basedir` for a job to be
    /// taken; 0 turns the guard off. Not an upstream key.
    #[serde(default = "default_min_free_mb")]
    pub min_free_mb: u64,

    /// What phase commands get in their environment from the config, as
    /// upstream exports it: see [`phase_env`]; `token_file` is added by
    /// [`Config::export_token_file`].
    #[serde(skip)]
    pub string_env: Vec<(String, String)>,
}

/// The upstream keys whose default is a string, with that default: upstream
/// fills them in before it exports the config, so a phase sees them even
/// when the file leaves them out.
const STRING_DEFAULTS: [(&str, &str); 11] = [
    ("execution_basedir", "/tmp/testflinger/run"),
    ("logging_basedir", "/tmp/testflinger/logs"),
    ("results_basedir", "/tmp/testflinger/results"),
    ("logging_level", "INFO"),
    ("setup_command", ""),
    ("provision_command", ""),
    ("firmware_update_command", ""),
    ("test_command", ""),
    ("allocate_command", ""),
    ("reserve_command", ""),
    ("cleanup_command", ""),
];

/// The config as upstream hands it to phase commands: every key whose value
/// is a string, written or left at a string default, as written; keys
/// holding numbers, booleans, lists or mappings are not exported (upstream
/// keeps only `str` values).
fn phase_env(raw: &serde_yaml_ng::Mapping) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = STRING_DEFAULTS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    for (k, v) in raw {
        let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else { continue };
        match env.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => env.push((k.to_string(), v.to_string())),
        }
    }
    env
}

fn default_polling_interval() -> f64 {
    10.0
}
fn default_execution_basedir() -> PathBuf {
    "/tmp/testflinger/run".into()
}
fn default_logging_basedir() -> PathBuf {
    "/tmp/testflinger/logs".into()
}
fn default_results_basedir() -> PathBuf {
    "/tmp/testflinger/results".into()
}
fn default_logging_level() -> String {
    "INFO".into()
}
fn default_server_timeout() -> u64 {
    30
}
fn default_output_interval() -> f64 {
    crate::budget::DEFAULT_OUTPUT_INTERVAL.as_secs_f64()
}
fn default_cancel_check_interval() -> f64 {
    crate::budget::DEFAULT_CANCEL_INTERVAL.as_secs_f64()
}
/// 1 GiB: a job's logs, serial log, artifacts tarball and what connectors
/// download (images are often several hundred MB) fit, and an SD card agent
/// stops before a phase dies of ENOSPC mid-way and its output is lost.
fn default_min_free_mb() -> u64 {
    1024
}
fn default_kill_grace() -> f64 {
    crate::runner::GRACE.as_secs_f64()
}
fn default_output_bytes() -> u64 {
    10 * 1024 * 1024
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

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let err = |key: Option<String>, line: Option<usize>, reason: String| ConfigError {
            file: path.to_path_buf(),
            key,
            line,
            reason,
        };
        let mut config: Config = serde_yaml_ng::from_str(text).map_err(|e| {
            let (key, reason) = describe_yaml_error(&e.to_string());
            err(key, e.location().map(|l| l.line()), reason)
        })?;
        // Parsed a second time as a plain mapping to find the string keys;
        // it parsed above, so this only fails on something very odd.
        let raw: serde_yaml_ng::Mapping = serde_yaml_ng::from_str(text).map_err(|e| err(None, None, e.to_string()))?;
        config.string_env = phase_env(&raw);

        let required = [("agent_id", &config.agent_id), ("server_address", &config.server_address)];
        for (key, value) in required {
            if value.trim().is_empty() {
                return Err(err(Some(key.into()), None, "must not be empty".into()));
            }
        }
        check_server_address(&config.server_address).map_err(|r| err(Some("server_address".into()), None, r))?;
        check_agent_id(&config.agent_id).map_err(|r| err(Some("agent_id".into()), None, r))?;
        if config.job_queues.is_empty() {
            return Err(err(Some("job_queues".into()), None, "must list at least one queue".into()));
        }
        check_durations(&config).map_err(|(key, reason)| err(Some(key.into()), None, reason))?;
        if let Some(address) = &config.metrics_address {
            if address.trim().parse::<std::net::IpAddr>().is_err() {
                let reason = format!("{address:?} is not an IP address (such as 127.0.0.1, 0.0.0.0 or ::1)");
                return Err(err(Some("metrics_address".into()), None, reason));
            }
        }
        if let Some(ca) = &config.server_ca_file {
            check_ca_file(ca).map_err(|reason| err(Some("server_ca_file".into()), None, reason))?;
        }
        if crate::logging::parse_level(&config.logging_level).is_none() {
            return Err(err(
                Some("logging_level".into()),
                None,
                format!("unknown level {:?}; use DEBUG, INFO, WARNING, ERROR or CRITICAL", config.logging_level),
            ));
        }
        Ok(config)
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
        self.string_env.retain(|(k, _)| k != "token_file");
        self.string_env.push(("token_file".into(), path.display().to_string()));
    }

    /// The request budget these keys set (see `budget.rs`).
    pub fn budget(&self) -> crate::budget::Budget {
        crate::budget::Budget {
            output_interval: std::time::Duration::from_secs_f64(self.output_interval),
            cancel_interval: std::time::Duration::from_secs_f64(self.cancel_check_interval),
        }
    }

    /// Where the metrics endpoint listens (checked by `parse`).
    pub fn metrics_ip(&self) -> std::net::IpAddr {
        let all = std::net::IpAddr::from([0, 0, 0, 0]);
        self.metrics_address.as_deref().and_then(|a| a.trim().parse().ok()).unwrap_or(all)
    }

    pub fn kill_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.kill_grace)
    }

    /// The command configured for `phase`, if any (empty means none).
    pub fn command(&self, phase: Phase) -> &str {
        match phase {
            Phase::Setup => &self.setup_command,
            Phase::Provision => &self.provision_command,
            Phase::FirmwareUpdate => &self.firmware_update_command,
            Phase::Test => &self.test_command,
            Phase::Allocate => &self.allocate_command,
            Phase::Reserve => &self.reserve_command,
            Phase::Cleanup => &self.cleanup_command,
        }
    }

    pub fn advertised_queues_json(&self) -> Option<Json> {
        self.advertised_queues.as_ref().map(|m| yaml_to_json(&serde_yaml_ng::Value::Mapping(m.clone())))
    }

    pub fn advertised_images_json(&self) -> Option<Json> {
        self.advertised_images.as_ref().map(|m| yaml_to_json(&serde_yaml_ng::Value::Mapping(m.clone())))
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

/// Every duration key within its range, or (the key, its range): a value
/// out of range would stop the agent later, in the middle of a job.
fn check_durations(c: &Config) -> Result<(), (&'static str, String)> {
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
    let fractional = [
        ("polling_interval", c.polling_interval),
        ("output_interval", c.output_interval),
        ("cancel_check_interval", c.cancel_check_interval),
        ("kill_grace", c.kill_grace),
    ];
    for (key, value) in fractional {
        if !(value.is_finite() && (0.0..=MAX_INTERVAL).contains(&value)) {
            return Err((key, format!("must be a number of seconds from 0 to {MAX_INTERVAL}")));
        }
    }
    Ok(())
}

/// Turns serde's messages ("unknown field `x`, expected one of ...",
/// "missing field `x`", "job_queues: invalid type: ...") into (key, reason).
fn describe_yaml_error(msg: &str) -> (Option<String>, String) {
    // Drop serde_yaml's " at line N column M" tail: the line is reported apart.
    let msg = match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    for (prefix, reason) in [("unknown field `", "unknown key"), ("missing field `", "required key is missing")] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            if let Some(end) = rest.find('`') {
                return (Some(rest[..end].to_string()), reason.to_string());
            }
        }
    }
    // "key: invalid type: ..." for a wrongly typed value.
    if let Some((key, reason)) = msg.split_once(": ") {
        if !key.contains(' ') && !key.is_empty() {
            let key = key.split(['[', '.']).next().unwrap_or(key);
            return (Some(key.to_string()), plain_types(reason));
        }
    }
    (None, plain_types(msg))
}

/// serde names Rust types (`expected f64`, `integer \`-1\`, expected u64`):
/// said as what to write in the file instead.
fn plain_types(reason: &str) -> String {
    let reason = reason
        .replace("invalid type: sequence,", "invalid type: a list,")
        .replace("invalid type: map,", "invalid type: a mapping,");
    let Some(at) = reason.rfind("expected ") else { return reason };
    let (head, ty) = reason.split_at(at + "expected ".len());
    let plain = match ty {
        "f64" | "f32" => "a number",
        "u64" | "u32" | "usize" => "a whole number, 0 or more",
        "u16" => "a whole number from 0 to 65535",
        "u8" => "a whole number from 0 to 255",
        "i64" | "i32" | "isize" => "a whole number",
        "a sequence" => "a list",
        "a map" => "a mapping (key: value lines)",
        "a boolean" => "true or false",
        _ => return reason,
    };
    format!("{head}{plain}")
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

/// `server_address` as upstream takes it: `http://` or `https://`, or a bare
/// `host[:port]` meaning http; a host, and a port in 1..=65535 if one is given.
fn check_server_address(address: &str) -> Result<(), String> {
    let address = address.trim();
    let rest = match address.split_once("://") {
        Some((scheme, rest)) => {
            let scheme = scheme.to_ascii_lowercase();
            if scheme == "https" && !cfg!(feature = "tls") {
                return Err(format!("{address:?}: this build has no TLS (built without the `tls` feature)"));
            }
            if scheme != "http" && scheme != "https" {
                return Err(format!("{address:?}: the scheme must be http or https, not {scheme:?}"));
            }
            rest
        }
        None => address,
    };
    if rest.contains(['?', '#']) {
        return Err(format!("{address:?}: must not hold a query or fragment"));
    }
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, tail)) if h.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') => {
                (h, if tail.is_empty() { None } else { Some(tail.strip_prefix(':').unwrap_or(tail)) })
            }
            _ => return Err(format!("{address:?}: bad IPv6 address")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{address:?}: no host"));
    }
    if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b)) {
        return Err(format!("{address:?}: {host:?} is not a host name"));
    }
    if let Some(port) = port {
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(format!("{address:?}: bad port {port:?} (a number from 1 to 65535)"));
        }
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
