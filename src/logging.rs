//! The agent's own log: the terminal (unless quiet) and
//! `<logging_basedir>/testflinger-agent.log`, in upstream's layout and with
//! upstream's level names (`WARNING`, not `WARN`), the file rotated at local
//! midnight with 6 days kept, as upstream's `TimedRotatingFileHandler` does.
//!
//! Written by hand rather than with simplelog: simplelog can neither rename
//! levels nor rotate, and the whole logger is not much code.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub use log::LevelFilter;

use crate::outbound;
use crate::safe_fs;

/// The log file's name in `logging_basedir`; rotated copies get `.YYYY-MM-DD`.
pub const FILE_NAME: &str = "testflinger-agent.log";
/// Rotated files kept, as upstream (`backupCount=6`).
const KEEP: usize = 6;

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

/// Python's name for a level: log scrapers written for the upstream agent
/// look for `WARNING`.
pub fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "ERROR",
        log::Level::Warn => "WARNING",
        log::Level::Info => "INFO",
        log::Level::Debug | log::Level::Trace => "DEBUG",
    }
}

unsafe extern "C" {
    // In every libc the agent builds against (glibc, musl); the libc crate
    // does not declare it for unix.
    fn tzset();
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

// libc deprecates `time_t` on musl (it will follow musl 1.2's 64-bit
// time_t); the value is whatever the linked localtime_r takes either way.
#[allow(deprecated)]
fn local_tm(t: i64) -> libc::tm {
    // SAFETY: tm is plain data; localtime_r fills it from a valid time_t.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        let tt = t as libc::time_t;
        libc::localtime_r(&tt, &mut tm);
        tm
    }
}

/// The first local midnight after `t` (DST-aware through mktime).
fn next_midnight(t: i64) -> i64 {
    let mut tm = local_tm(t);
    tm.tm_hour = 0;
    tm.tm_min = 0;
    tm.tm_sec = 0;
    tm.tm_mday += 1;
    tm.tm_isdst = -1;
    // SAFETY: mktime normalises the fields of a valid tm.
    let m = unsafe { libc::mktime(&mut tm) } as i64;
    if m > t { m } else { t + 86_400 }
}

/// `YYYY-MM-DD` of `t` in local time.
fn local_date(t: i64) -> String {
    let tm = local_tm(t);
    format!("{:04}-{:02}-{:02}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday)
}

/// `[YY-MM-DD HH:MM:SS]`, local time, as upstream's lines begin.
fn stamp(t: i64) -> String {
    let tm = local_tm(t);
    format!(
        "[{:02}-{:02}-{:02} {:02}:{:02}:{:02}]",
        (tm.tm_year + 1900) % 100,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The log file, rotated at the first write after local midnight.
struct DailyFile {
    path: PathBuf,
    file: File,
    rollover_at: i64,
}

impl DailyFile {
    fn open(path: PathBuf) -> io::Result<DailyFile> {
        // Never opened through a link (0640): the default dir is under /tmp.
        let file = safe_fs::open_append(&path, safe_fs::LOG_FILE)?;
        // Like upstream, a file last written on an earlier day is rotated
        // at the first line of today, also across restarts.
        let written = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or_else(now_secs, |d| d.as_secs() as i64);
        Ok(DailyFile { path, file, rollover_at: next_midnight(written) })
    }

    fn write(&mut self, line: &[u8], now: i64) {
        if now >= self.rollover_at {
            self.rotate(now);
        }
        // Nowhere to report a failed log write; the terminal still has it.
        let _ = self.file.write_all(line);
    }

    fn rotate(&mut self, now: i64) {
        // Named for the day the file's last lines were written.
        let rotated = with_suffix(&self.path, &local_date(self.rollover_at - 1));
        self.rollover_at = next_midnight(now);
        if std::fs::rename(&self.path, &rotated).is_err() {
            return; // keep writing to the current file
        }
        if let Ok(file) = safe_fs::open_append(&self.path, safe_fs::LOG_FILE) {
            self.file = file;
        }
        prune(&self.path);
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// Removes rotated copies (`<name>.YYYY-MM-DD`) beyond the newest `KEEP`.
fn prune(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else { return };
    let prefix = format!("{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut rotated: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.strip_prefix(&prefix).is_some_and(is_date))
        .collect();
    rotated.sort();
    let excess = rotated.len().saturating_sub(KEEP);
    for old in &rotated[..excess] {
        let _ = std::fs::remove_file(dir.join(old));
    }
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

/// `text` with its control characters escaped (`\n`, `\r`, `\u{1b}`...):
/// one record, one line, in the file and in the journal.
fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(char::is_control) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

struct Logger {
    level: LevelFilter,
    terminal: bool,
    /// stderr is the journal: `<N>message` lines (N the syslog priority, so
    /// `journalctl -p warning` works), no timestamp (the journal has its own).
    journal: bool,
    file: Mutex<Option<DailyFile>>,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        // Only the agent's own lines: not those of the HTTP and TLS crates.
        metadata.level() <= self.level && metadata.target().starts_with("testflinger_agent")
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = now_secs();
        let file = record.file().map_or("?", |f| f.rsplit('/').next().unwrap_or(f));
        // Masked whole (a secret may hold a line break), then made one line:
        // text from the server or a job must not forge records of its own.
        let masked = outbound::mask_log_line(record.args().to_string());
        let masked = String::from_utf8_lossy(&masked);
        let text = one_line(&masked);
        if self.terminal && self.journal {
            let entry = format!("<{}>{text}\n", crate::notify::priority(record.level()));
            let _ = io::stderr().write_all(entry.as_bytes());
        }
        let line = format!(
            "{} {:>7}: ({}:{})| {text}\n",
            stamp(now),
            level_name(record.level()),
            file,
            record.line().unwrap_or(0),
        );
        if self.terminal && !self.journal {
            let _ = io::stderr().write_all(line.as_bytes());
        }
        if let Ok(mut guard) = self.file.lock() {
            if let Some(f) = guard.as_mut() {
                f.write(line.as_bytes(), now);
            }
        }
    }

    fn flush(&self) {}
}

/// Starts logging. A log file that cannot be opened is not fatal (the
/// start-up checks have found the directory usable): the agent keeps
/// logging to the terminal, and says so.
pub fn init(level: LevelFilter, basedir: Option<&Path>, quiet: bool) {
    // SAFETY: tzset reads TZ and /etc/localtime once, before any other
    // thread exists; localtime_r relies on it.
    unsafe { tzset() };
    let mut file_error = None;
    let file = basedir.and_then(|dir| {
        let path = dir.join(FILE_NAME);
        // The logs dir is 0750 and checked not to be a planted link.
        match safe_fs::ensure_base_dir(dir, safe_fs::LOG_DIR).and_then(|_| DailyFile::open(path.clone())) {
            Ok(f) => Some(f),
            Err(e) => {
                file_error = Some(format!("cannot open log file {}: {e}", path.display()));
                None
            }
        }
    });
    let terminal = !quiet || file.is_none();
    let journal = crate::notify::stderr_is_journal();
    let logger = Box::leak(Box::new(Logger { level, terminal, journal, file: Mutex::new(file) }));
    // Only fails when a logger is already set (tests); nothing to do then.
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
    if let Some(e) = file_error {
        log::warn!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_level_names() {
        assert_eq!(level_name(log::Level::Warn), "WARNING");
        assert_eq!(level_name(log::Level::Error), "ERROR");
        assert_eq!(parse_level("warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("CRITICAL"), Some(LevelFilter::Error));
        assert_eq!(parse_level("chatty"), None);
    }

    #[test]
    fn control_characters_are_escaped_so_a_record_stays_one_line() {
        let forged = "offline\n<3>[25-01-01 00:00:00]   ERROR: (x.rs:1)| FORGED\r\x1b[2J\u{85}";
        let line = one_line(forged);
        assert_eq!(line, "offline\\n<3>[25-01-01 00:00:00]   ERROR: (x.rs:1)| FORGED\\r\\u{1b}[2J\\u{85}");
        assert!(!line.contains(char::is_control));
        assert_eq!(one_line("plain text, ünïcode"), "plain text, ünïcode");
    }

    #[test]
    fn dates_and_midnights() {
        assert!(is_date("2024-03-10"));
        for bad in ["2024-3-10", "2024-03-10.gz", "abcd-ef-gh", ""] {
            assert!(!is_date(bad), "{bad}");
        }
        let t = 1_710_072_000; // 2024-03-10T12:00:00Z
        let m = next_midnight(t);
        assert!(m > t && m - t <= 25 * 3600, "{m}");
        assert_eq!(local_tm(m).tm_hour, 0);
        assert_ne!(local_date(m), local_date(m - 1));
    }

    #[test]
    fn rotation_keeps_six_and_names_the_day() {
        let dir = std::env::temp_dir().join(format!("tf-log-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for day in 1..=8 {
            std::fs::write(dir.join(format!("{FILE_NAME}.2020-01-{day:02}")), "old\n").unwrap();
        }
        std::fs::write(dir.join(format!("{FILE_NAME}.keep-me")), "not a rotated file\n").unwrap();
        let mut f = DailyFile::open(dir.join(FILE_NAME)).unwrap();
        let late = f.rollover_at - 3600;
        f.write(b"before\n", late);
        let day = local_date(late);
        f.write(b"after\n", f.rollover_at + 60);
        assert_eq!(std::fs::read_to_string(dir.join(format!("{FILE_NAME}.{day}"))).unwrap(), "before\n");
        assert_eq!(std::fs::read_to_string(dir.join(FILE_NAME)).unwrap(), "after\n");
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names.len(), 1 + 1 + KEEP, "{names:?}");
        assert!(!names.contains(&format!("{FILE_NAME}.2020-01-02")), "{names:?}");
        assert!(names.contains(&format!("{FILE_NAME}.2020-01-04")), "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
