//! Where a phase's bytes go: masked into `<phase>.log` first, and from
//! there, as numbered fragments, to the server.
//!
//! The log file is the source of truth for the live stream: the stream only
//! remembers how far into the file it has sent. A slow or unreachable server
//! therefore never costs memory or loses bytes; the stream catches up from
//! the file when the server is back, and the concatenation of the fragments
//! equals the log file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::{Client, ClientError};
use crate::json::Json;
use crate::mask::Masker;
use crate::timestamp::now_iso8601;

/// Largest fragment, in log bytes (the server refuses bodies over 16 MB;
/// JSON escaping can grow text, so stay far below).
const MAX_FRAGMENT: u64 = 1 << 20;
/// Pending output is sent at most this often, unless a whole fragment's
/// worth is waiting: a few requests a second at most.
const SEND_INTERVAL: Duration = Duration::from_millis(200);

/// The phase's log file, written through the secret masker.
pub struct PhaseLog {
    file: File,
    pub path: PathBuf,
    masker: Masker,
    echo: bool,
    scratch: Vec<u8>,
    /// Bytes written to the file so far.
    pub written: u64,
    failed: bool,
}

impl PhaseLog {
    /// Opens `path` for appending; `echo` also copies the output to stdout
    /// (the local `--job` mode).
    pub fn open(path: &Path, secrets: &[String], echo: bool) -> io::Result<PhaseLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(PhaseLog {
            file,
            path: path.to_path_buf(),
            masker: Masker::new(secrets.iter().map(String::as_str)),
            echo,
            scratch: Vec::new(),
            written,
            failed: false,
        })
    }

    pub fn write(&mut self, data: &[u8]) {
        self.scratch.clear();
        self.masker.feed(data, &mut self.scratch);
        self.emit();
    }

    /// Flushes what the masker held back; call when the phase has ended.
    pub fn finish(&mut self) {
        self.scratch.clear();
        self.masker.finish(&mut self.scratch);
        self.emit();
    }

    fn emit(&mut self) {
        if self.scratch.is_empty() {
            return;
        }
        match self.file.write_all(&self.scratch) {
            Ok(()) => self.written += self.scratch.len() as u64,
            Err(e) => {
                // Disk full: the phase goes on; say so once rather than per write.
                if !self.failed {
                    log::error!("cannot write {}: {e}", self.path.display());
                    self.failed = true;
                }
            }
        }
        if self.echo {
            let mut out = io::stdout().lock();
            let _ = out.write_all(&self.scratch);
            let _ = out.flush();
        }
    }
}

/// Sends a log file to `log/<kind>` as numbered fragments, catching up from
/// the file after failures.
pub struct LiveStream {
    job_id: String,
    kind: &'static str,
    phase: String,
    reader: Option<File>,
    path: PathBuf,
    /// Bytes of the file already delivered.
    pub sent: u64,
    last_send: Instant,
    retry_at: Option<Instant>,
    failures: u32,
}

impl LiveStream {
    pub fn new(job_id: &str, kind: &'static str, phase: &str, path: &Path, sent: u64) -> LiveStream {
        LiveStream {
            job_id: job_id.to_string(),
            kind,
            phase: phase.to_string(),
            reader: None,
            path: path.to_path_buf(),
            sent,
            last_send: Instant::now() - SEND_INTERVAL,
            retry_at: None,
            failures: 0,
        }
    }

    pub fn phase(&self) -> &str {
        &self.phase
    }

    /// When the next send is due, given `written` bytes in the file.
    pub fn due(&self, written: u64) -> Option<Instant> {
        if written <= self.sent {
            return None;
        }
        if let Some(t) = self.retry_at {
            return Some(t);
        }
        if written - self.sent >= MAX_FRAGMENT {
            return Some(self.last_send);
        }
        Some(self.last_send + SEND_INTERVAL)
    }

    /// Sends one fragment if one is due. Errors are logged and retried later.
    pub fn pump(&mut self, client: &mut Client, counter: &mut u64, written: u64, now: Instant) {
        if self.due(written).is_some_and(|t| now >= t) {
            let _ = self.send_one(client, counter, written, false);
        }
    }

    /// Sends everything up to `written`. Returns the error that stopped it.
    pub fn flush(&mut self, client: &mut Client, counter: &mut u64, written: u64) -> Result<(), ClientError> {
        while self.sent < written {
            self.send_one(client, counter, written, true)?;
        }
        Ok(())
    }

    fn send_one(&mut self, client: &mut Client, counter: &mut u64, written: u64, last: bool) -> Result<(), ClientError> {
        let local = |path: &Path, e: io::Error| ClientError::Local { path: path.to_path_buf(), reason: e.to_string() };
        if self.reader.is_none() {
            self.reader = Some(File::open(&self.path).map_err(|e| local(&self.path, e))?);
        }
        let Some(reader) = &self.reader else { return Ok(()) };
        let len = (written - self.sent).min(MAX_FRAGMENT) as usize;
        let mut buf = vec![0u8; len];
        reader.read_exact_at(&mut buf, self.sent).map_err(|e| local(&self.path, e))?;
        // Don't split a UTF-8 character between fragments, unless this is
        // all there will ever be.
        let at_end = self.sent + len as u64 == written;
        let cut = if at_end && last { len } else { utf8_boundary(&buf) };
        if cut == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&buf[..cut]);
        let fragment = Json::object()
            .with("fragment_number", Json::int(*counter as i64))
            .with("timestamp", Json::str(now_iso8601()))
            .with("phase", Json::str(self.phase.as_str()))
            .with("log_data", Json::str(text));
        self.last_send = Instant::now();
        match client.post_log_fragment(&self.job_id, self.kind, &fragment) {
            Ok(()) => {
                *counter += 1;
                self.sent += cut as u64;
                self.retry_at = None;
                self.failures = 0;
                Ok(())
            }
            Err(e) => {
                self.failures += 1;
                let backoff = Duration::from_millis(500 << self.failures.min(6));
                log::warn!("{} log fragment not sent, will retry in {backoff:?}: {e}", self.kind);
                self.retry_at = Some(Instant::now() + backoff);
                Err(e)
            }
        }
    }
}

/// Length of the longest prefix of `buf` that does not end inside a
/// multi-byte UTF-8 character.
fn utf8_boundary(buf: &[u8]) -> usize {
    let n = buf.len();
    for back in 1..=3.min(n) {
        let b = buf[n - back];
        if b & 0xC0 == 0x80 {
            continue; // continuation byte: look further back for the lead
        }
        let need = match b {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { n - back } else { n };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_boundary_keeps_whole_characters() {
        assert_eq!(utf8_boundary(b"abc"), 3);
        let e = "é".as_bytes();
        assert_eq!(utf8_boundary(&[b'a', e[0]]), 1);
        assert_eq!(utf8_boundary(&[b'a', e[0], e[1]]), 3);
        let emoji = "😀".as_bytes();
        assert_eq!(utf8_boundary(&emoji[..3]), 0);
        assert_eq!(utf8_boundary(emoji), 4);
    }

    #[test]
    fn phase_log_masks_secrets_on_disk() {
        let dir = std::env::temp_dir().join(format!("tf-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("test.log");
        let mut log = PhaseLog::open(&path, &["s3cret".to_string()], false).unwrap();
        log.write(b"token=s3c");
        log.write(b"ret done\n");
        log.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("token={} done\n", crate::mask::mask_for("s3cret")));
        assert_eq!(log.written, text.len() as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
