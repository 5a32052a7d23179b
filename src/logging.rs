//! Logging set-up: the terminal (unless quiet) and
//! `<logging_basedir>/testflinger-agent.log`, with Python level names.

use std::path::Path;

use crate::outbound::MaskedLines;
use crate::safe_fs;
use simplelog::{CombinedLogger, ConfigBuilder, LevelFilter, SharedLogger, WriteLogger};

/// Maps the upstream (Python) level names, and Rust's, to a filter.
pub fn parse_level(name: &str) -> Option<LevelFilter> {
    Some(match name.to_ascii_uppercase().as_str() {
        "DEBUG" => LevelFilter::Debug,
        "INFO" => LevelFilter::Info,
        "WARNING" | "WARN" => LevelFilter::Warn,
        "ERROR" | "CRITICAL" | "FATAL" => LevelFilter::Error,
        "TRACE" | "NOTSET" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Starts logging. A log file that cannot be opened is not fatal: the agent
/// keeps logging to the terminal, and says so.
pub fn init(level: LevelFilter, basedir: Option<&Path>, quiet: bool) {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .add_filter_allow_str("testflinger_agent")
        .build();
    let mut loggers: Vec<Box<dyn SharedLogger>> = Vec::new();
    let mut file_error = None;
    if let Some(dir) = basedir {
        let path = dir.join("testflinger-agent.log");
        // The logs dir (0750) and file (0640) are never opened through a
        // link: the default dir is under /tmp.
        let opened = safe_fs::ensure_base_dir(dir, safe_fs::LOG_DIR).and_then(|_| safe_fs::open_append(&path, safe_fs::LOG_FILE));
        match opened {
            Ok(file) => loggers.push(WriteLogger::new(level, config.clone(), MaskedLines::new(file))),
            Err(e) => file_error = Some(format!("cannot open log file {}: {e}", path.display())),
        }
    }
    if !quiet || loggers.is_empty() {
        loggers.push(WriteLogger::new(level, config, MaskedLines::new(std::io::stderr())));
    }
    // Only fails when a logger is already set (tests); nothing to do then.
    let _ = CombinedLogger::init(loggers);
    if let Some(e) = file_error {
        log::warn!("{e}");
    }
}
