//! The one place where a job's text becomes outbound text.
//!
//! Rule: every byte that leaves the agent (server, webhook, metrics labels)
//! or lands on disk outside the phase command's own files, and that can
//! hold text the job controls (its commands' output, the connector's files,
//! names from the job), goes through the job's [`JobSecrets`] first. Phase
//! output and serial logs stream through [`JobSecrets::stream`]; a piece
//! of text through [`JobSecrets::text`], which gives a [`Masked`]; a JSON
//! value through [`JobSecrets::json`].
//!
//! [`Masked`] is what the outbound side takes (events, the provision log
//! detail), so text that skipped the masker does not type-check there. Text
//! the agent composed from its own words and values no job controls (phase
//! names, exit codes, ids already checked) may be marked with
//! [`Masked::agent`], which names that choice where it is made.

use std::io::{self, Read};
use std::sync::Mutex;

use crate::json::Json;
use crate::mask::Masker;

/// The secret values of one job. They live in memory only: a job resumed
/// after a crash has none (its `testflinger.json` never held them), so what
/// it sends must come from files masked while it first ran.
#[derive(Clone, Debug, Default)]
pub(crate) struct JobSecrets {
    values: Vec<String>,
}

/// Text that went through a job's secrets (or is the agent's own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Masked(String);

impl Masked {
    /// Text the agent wrote itself from values no job controls.
    pub(crate) fn agent(text: impl Into<String>) -> Masked {
        Masked(text.into())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends more masked text.
    pub(crate) fn push(&mut self, more: &Masked) {
        self.0.push_str(&more.0);
    }
}

impl std::fmt::Display for Masked {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl JobSecrets {
    pub(crate) fn new(values: impl IntoIterator<Item = String>) -> JobSecrets {
        JobSecrets { values: values.into_iter().filter(|v| !v.is_empty()).collect() }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// A masker for one stream (a phase's output, a serial log, a file).
    pub(crate) fn stream(&self) -> Masker {
        Masker::new(self.values.iter().map(String::as_str))
    }

    /// Masks a whole piece of text.
    pub(crate) fn text(&self, text: &str) -> Masked {
        if self.values.is_empty() {
            return Masked(text.to_string());
        }
        Masked(String::from_utf8_lossy(&self.bytes(text.as_bytes())).into_owned())
    }

    /// Masks a whole buffer.
    pub(crate) fn bytes(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let mut m = self.stream();
        m.feed(data, &mut out);
        m.finish(&mut out);
        out
    }

    /// `inner`, read through a masker of its own.
    pub(crate) fn reader<R: Read>(&self, inner: R) -> MaskedRead<R> {
        MaskedRead { inner, masker: self.stream(), out: Vec::new(), pos: 0, done: false, buf: vec![0; 64 * 1024] }
    }

    /// How many bytes `inner` gives once masked (read to its end).
    pub(crate) fn masked_len(&self, inner: impl Read) -> io::Result<u64> {
        io::copy(&mut self.reader(inner), &mut io::sink())
    }

    /// Masks every string and key in `value`. Numbers and literals are left
    /// alone: masking one would change its type for the reader.
    pub(crate) fn json(&self, value: &Json) -> Json {
        if self.values.is_empty() {
            return value.clone();
        }
        match value {
            Json::Str(s) => Json::Str(self.text(s).0),
            Json::Array(items) => Json::Array(items.iter().map(|v| self.json(v)).collect()),
            Json::Object(members) => {
                Json::Object(members.iter().map(|(k, v)| (self.text(k).0, self.json(v))).collect())
            }
            other => other.clone(),
        }
    }
}

/// The secrets of the job that runs now: the agent's own log lines are
/// masked with them whatever module writes the line (a client error quoting
/// a body, an artifact's file name), so no log call can forget.
static LOG_SECRETS: Mutex<Option<JobSecrets>> = Mutex::new(None);

fn log_secrets() -> std::sync::MutexGuard<'static, Option<JobSecrets>> {
    LOG_SECRETS.lock().unwrap_or_else(|e| e.into_inner())
}

/// While this lives, the agent's log lines are masked with one job's
/// secrets (see [`JobSecrets::mask_log_lines`]).
pub(crate) struct LogMasking(());

impl Drop for LogMasking {
    fn drop(&mut self) {
        *log_secrets() = None;
    }
}

impl JobSecrets {
    /// Masks the agent's log lines with these secrets until the guard drops.
    pub(crate) fn mask_log_lines(&self) -> LogMasking {
        *log_secrets() = (!self.is_empty()).then(|| self.clone());
        LogMasking(())
    }
}

/// One of the agent's log lines, masked with the running job's secrets
/// (the logger formats a whole line before writing it, so a secret is
/// never split between writes). A secret that itself holds a line break is
/// still caught: the whole record is masked at once.
pub(crate) fn mask_log_line(line: String) -> Vec<u8> {
    match log_secrets().as_ref() {
        Some(secrets) => secrets.bytes(line.as_bytes()),
        None => line.into_bytes(),
    }
}

/// A reader that masks what it reads (see [`JobSecrets::reader`]).
pub(crate) struct MaskedRead<R> {
    inner: R,
    masker: Masker,
    out: Vec<u8>,
    pos: usize,
    done: bool,
    buf: Vec<u8>,
}

impl<R: Read> Read for MaskedRead<R> {
    fn read(&mut self, dest: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            if self.done {
                return Ok(0);
            }
            self.out.clear();
            self.pos = 0;
            let n = self.inner.read(&mut self.buf)?;
            if n == 0 {
                self.masker.finish(&mut self.out);
                self.done = true;
            } else {
                self.masker.feed(&self.buf[..n], &mut self.out);
            }
        }
        let n = dest.len().min(self.out.len() - self.pos);
        dest[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::mask_for;

    #[test]
    fn text_and_json_are_masked_whole() {
        let s = JobSecrets::new(["hunter2".to_string(), String::new()]);
        let m = mask_for("hunter2");
        assert_eq!(s.text("pw hunter2 and hunter2").as_str(), format!("pw {m} and {m}"));
        let j = Json::parse(r#"{"k":"xhunter2","hunter2":[1,"hunter2",{"a":"hunter2"}],"n":7}"#).unwrap();
        let expected = format!(r#"{{"k":"x{m}","{m}":[1,"{m}",{{"a":"{m}"}}],"n":7}}"#);
        assert_eq!(s.json(&j).to_string_compact(), expected);
        assert_eq!(JobSecrets::default().text("hunter2").as_str(), "hunter2");
    }

    #[test]
    fn log_lines_are_masked_while_a_job_runs_and_only_then() {
        let s = JobSecrets::new(["hunter2".to_string()]);
        let masked = {
            let _guard = s.mask_log_lines();
            mask_log_line("[INFO] error: hunter2 said\n".to_string())
        };
        let after = mask_log_line("after hunter2\n".to_string());
        assert_eq!(String::from_utf8(masked).unwrap(), format!("[INFO] error: {} said\n", mask_for("hunter2")));
        assert_eq!(String::from_utf8(after).unwrap(), "after hunter2\n");
    }

    #[test]
    fn reader_masks_across_its_reads_and_counts_the_masked_length() {
        let s = JobSecrets::new(["hunter2".to_string()]);
        let text = "a hunter2 b ".repeat(20_000);
        let expected = text.replace("hunter2", &mask_for("hunter2"));
        let mut got = String::new();
        s.reader(text.as_bytes()).read_to_string(&mut got).unwrap();
        assert_eq!(got, expected);
        assert_eq!(s.masked_len(text.as_bytes()).unwrap(), expected.len() as u64);
    }
}
