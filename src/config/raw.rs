//! The config file as written: the YAML keys under upstream's names (and
//! ours), their defaults, and serde's errors turned into the key they name.
//! Nothing here is used past [`Config::parse`](super::Config::parse), which
//! checks these values and turns them into typed settings.
//!
//! Upstream validates with a voluptuous schema that refuses unknown keys; we
//! do the same so that a typo (`test_comand`) is caught at start rather than
//! silently leaving a phase unconfigured.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) agent_id: String,
    pub(super) server_address: String,
    pub(super) job_queues: Vec<String>,
    #[serde(default)]
    pub(super) identifier: Option<String>,
    #[serde(default)]
    pub(super) location: Option<String>,
    /// Seconds between polls. Upstream takes an integer; fractions are
    /// accepted too (handy for tests).
    #[serde(default = "default_polling_interval")]
    pub(super) polling_interval: f64,
    #[serde(default = "default_execution_basedir")]
    pub(super) execution_basedir: PathBuf,
    #[serde(default = "default_logging_basedir")]
    pub(super) logging_basedir: PathBuf,
    #[serde(default = "default_results_basedir")]
    pub(super) results_basedir: PathBuf,
    #[serde(default = "default_logging_level")]
    pub(super) logging_level: String,
    #[serde(default, deserialize_with = "yaml11_bool")]
    pub(super) logging_quiet: bool,
    #[serde(default)]
    pub(super) setup_command: String,
    #[serde(default)]
    pub(super) provision_command: String,
    #[serde(default)]
    pub(super) firmware_update_command: String,
    #[serde(default)]
    pub(super) test_command: String,
    #[serde(default)]
    pub(super) allocate_command: String,
    #[serde(default)]
    pub(super) reserve_command: String,
    #[serde(default)]
    pub(super) cleanup_command: String,
    #[serde(default)]
    pub(super) provision_type: Option<String>,
    #[serde(default)]
    pub(super) global_timeout: Option<u64>,
    #[serde(default)]
    pub(super) output_timeout: Option<u64>,
    #[serde(default)]
    pub(super) advertised_queues: Option<serde_yaml_ng::Mapping>,
    #[serde(default)]
    pub(super) advertised_images: Option<serde_yaml_ng::Mapping>,
    /// Accepted for compatibility with upstream configs (their types are
    /// checked); the agent itself does not use them (device connectors may
    /// read them from the env), hence the allows.
    #[serde(default)]
    #[allow(dead_code)]
    pub(super) links: Option<BTreeMap<String, String>>,
    #[serde(default)]
    #[allow(dead_code)]
    pub(super) control_host: Option<BTreeMap<String, String>>,
    /// Accepted (and typed) as upstream does; the agent does not use it.
    #[serde(default = "default_output_bytes")]
    #[allow(dead_code)]
    pub(super) output_bytes: u64,
    /// Where to keep a copy of the metrics for node_exporter's textfile
    /// collector (a `*.prom` file in its directory); none by default.
    #[serde(default)]
    pub(super) metrics_textfile: Option<PathBuf>,
    /// The address `--metrics_port` listens on: all (`0.0.0.0`, as
    /// upstream) unless set, e.g. to 127.0.0.1. Not an upstream key.
    #[serde(default)]
    pub(super) metrics_address: Option<String>,
    /// Seconds one request to the server may take (connect, send, answer)
    /// before it counts as failed and is retried; at least 1. Not an
    /// upstream key.
    #[serde(default = "default_server_timeout")]
    pub(super) server_timeout: u64,
    /// A PEM file of CA certificates trusted for an https server on top of
    /// the system store (a lab's own CA). Not an upstream key.
    #[serde(default)]
    pub(super) server_ca_file: Option<PathBuf>,
    /// Mask the job's secrets inside text files under `artifacts/` while
    /// packing them (binary files are left alone). Off by default: it
    /// reads every text artifact twice. Not an upstream key.
    #[serde(default, deserialize_with = "yaml11_bool")]
    pub(super) mask_artifacts: bool,
    /// Seconds: while a phase keeps printing, at most one fragment per log
    /// this often (the first output after a quiet spell goes at once).
    /// Not an upstream key (upstream sends one per 10 s).
    #[serde(default = "default_output_interval")]
    pub(super) output_interval: f64,
    /// Seconds between two checks of whether the running job was
    /// cancelled. Not an upstream key.
    #[serde(default = "default_cancel_check_interval")]
    pub(super) cancel_check_interval: f64,
    /// Seconds a stopped phase (timeout, cancel, agent stop) gets between
    /// SIGTERM and SIGKILL. Not an upstream key.
    #[serde(default = "default_kill_grace")]
    pub(super) kill_grace: f64,
    /// MiB that must be free under `execution_basedir` for a job to be
    /// taken; 0 turns the guard off. Not an upstream key.
    #[serde(default = "default_min_free_mb")]
    pub(super) min_free_mb: u64,
}

/// A boolean as upstream's PyYAML reads one (YAML 1.1): `true`/`false`,
/// and also `yes`/`no`/`on`/`off`, each in lower, Title or UPPER case, so
/// that an upstream config loads unchanged.
fn yaml11_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct Yaml11Bool;
    impl serde::de::Visitor<'_> for Yaml11Bool {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a boolean")
        }
        fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<bool, E> {
            Ok(b)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<bool, E> {
            let cases = |w: &str| {
                [w.to_string(), w.to_ascii_uppercase(), format!("{}{}", &w[..1].to_ascii_uppercase(), &w[1..])]
            };
            if ["yes", "on"].iter().any(|w| cases(w).iter().any(|c| c == s)) {
                Ok(true)
            } else if ["no", "off"].iter().any(|w| cases(w).iter().any(|c| c == s)) {
                Ok(false)
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Str(s), &self))
            }
        }
    }
    d.deserialize_any(Yaml11Bool)
}

/// `output_interval`'s default: one live fragment per log a second.
pub(super) const DEFAULT_OUTPUT_INTERVAL: Duration = Duration::from_secs(1);
/// `cancel_check_interval`'s default.
pub(super) const DEFAULT_CANCEL_INTERVAL: Duration = Duration::from_secs(3);

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
    DEFAULT_OUTPUT_INTERVAL.as_secs_f64()
}
fn default_cancel_check_interval() -> f64 {
    DEFAULT_CANCEL_INTERVAL.as_secs_f64()
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
pub(super) fn phase_env(raw: &serde_yaml_ng::Mapping) -> Vec<(String, String)> {
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

/// Turns serde's messages ("unknown field `x`, expected one of ...",
/// "missing field `x`", "job_queues: invalid type: ...") into (key, reason).
pub(super) fn describe_yaml_error(msg: &str) -> (Option<String>, String) {
    // Drop serde_yaml's " at line N column M" tail: the line is reported apart.
    let msg = match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    for (prefix, reason) in [
        ("unknown field `", "unknown key"),
        ("missing field `", "required key is missing"),
        ("duplicate field `", "written twice; keep one"),
    ] {
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
        "a map" | "struct RawConfig" => "a mapping (key: value lines)",
        "a boolean" => "true or false",
        _ => return reason,
    };
    format!("{head}{plain}")
}
