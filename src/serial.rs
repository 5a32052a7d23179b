//! A connector's serial log, `<phase>-serial.log`, on its way to the
//! server's `log/serial`.
//!
//! The connector writes that file itself, so the agent cannot mask it in
//! place. Instead it tails it while the phase runs, through the job's masker
//! (which holds back a possible partial secret at each read's end), into
//! [`masked_name`] beside it, and streams the masked copy with the same
//! [`LiveStream`] as phase output: fragments go as the connector writes,
//! and what the server missed is sent from the copy later. The raw file is
//! never sent.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::mask::Masker;
use crate::outbound::JobSecrets;
use crate::output::{LiveStream, MaskedFile};
use crate::phase::{LogKind, Phase};
use crate::rundir::RunDir;

/// How often the connector's file is looked at while the phase runs.
pub(crate) const POLL: Duration = Duration::from_millis(250);
/// Bytes read from it per look: the agent's one thread must get back to the
/// phase's pipe; serial lines come slowly anyway.
const STEP: usize = 256 * 1024;

pub(crate) struct SerialTail {
    raw_path: PathBuf,
    raw: Option<File>,
    /// Bytes of the raw file consumed.
    read: u64,
    /// The job's masker, until the copy is opened with it.
    masker: Option<Masker>,
    masked_path: PathBuf,
    out: Option<MaskedFile>,
    /// Bytes in the masked copy before it is opened (a cleanup run again
    /// after a crash appends to its earlier copy).
    earlier: u64,
    pub stream: LiveStream,
    next_look: Instant,
    failed: bool,
    buf: Vec<u8>,
}

impl SerialTail {
    /// `interval` is the live stream's (the config's `output_interval`).
    pub(crate) fn new(
        rundir: &RunDir,
        phase: Phase,
        job_id: &str,
        secrets: &JobSecrets,
        interval: Duration,
    ) -> SerialTail {
        let masked_path = rundir.log(phase, LogKind::Serial);
        let earlier = std::fs::symlink_metadata(&masked_path).map(|m| m.len()).unwrap_or(0);
        SerialTail {
            raw_path: rundir.serial_raw(phase),
            raw: None,
            read: 0,
            masker: Some(secrets.stream()),
            stream: LiveStream::new(job_id, LogKind::Serial, phase, &masked_path, earlier, interval),
            masked_path,
            out: None,
            earlier,
            next_look: Instant::now(),
            failed: false,
            buf: Vec::new(),
        }
    }

    /// Bytes in the masked copy.
    pub(crate) fn written(&self) -> u64 {
        self.out.as_ref().map_or(self.earlier, MaskedFile::written)
    }

    /// True once the connector's file existed (there is a copy to send).
    pub(crate) fn started(&self) -> bool {
        self.out.is_some()
    }

    /// When the file should next be looked at.
    pub(crate) fn next_look(&self) -> Instant {
        self.next_look
    }

    /// Masks what the connector added since the last look, at most one step
    /// of it, when a look is due.
    pub(crate) fn look(&mut self, now: Instant) {
        if now < self.next_look {
            return;
        }
        self.next_look = crate::deadline::after(now, POLL);
        if let Err(e) = self.catch_up(Some(STEP)) {
            self.fail(&e);
        }
    }

    /// The phase has ended: masks the rest of the file, and what the masker
    /// held back.
    pub(crate) fn finish(&mut self) {
        if let Err(e) = self.catch_up(None) {
            self.fail(&e);
        }
        if let Some(out) = &mut self.out {
            if let Err(e) = out.finish() {
                self.fail(&e);
            }
        }
    }

    fn fail(&mut self, e: &io::Error) {
        if !self.failed {
            log::error!("serial log {}: {e}", self.raw_path.display());
            self.failed = true;
        }
    }

    fn catch_up(&mut self, limit: Option<usize>) -> io::Result<()> {
        if self.failed {
            return Ok(());
        }
        if self.raw.is_none() {
            // O_NONBLOCK: a FIFO there must not hold the agent.
            let raw = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&self.raw_path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            let meta = raw.metadata()?;
            if !meta.is_file() {
                return Err(io::Error::other("not a regular file; not sent"));
            }
            // The connector runs as this user: another user's file here means
            // the run dir is not the one the phase ran in.
            // SAFETY: geteuid(2) cannot fail and has no side effects.
            let me = unsafe { libc::geteuid() };
            if std::os::unix::fs::MetadataExt::uid(&meta) != me {
                return Err(io::Error::other(format!(
                    "owned by uid {}, not by this agent's user (uid {me}); not sent",
                    std::os::unix::fs::MetadataExt::uid(&meta)
                )));
            }
            let Some(masker) = self.masker.take() else { return Ok(()) };
            self.out = Some(MaskedFile::open(&self.masked_path, masker)?);
            self.raw = Some(raw);
        }
        let (Some(mut raw), Some(out)) = (self.raw.take(), self.out.as_mut()) else { return Ok(()) };
        if raw.metadata().map(|m| m.len() < self.read).unwrap_or(false) {
            // Truncated and written anew: what was sent stays sent, the new
            // content follows it from its start.
            let appended = out.finish();
            self.read = 0;
            let rewound = std::io::Seek::rewind(&mut raw);
            self.raw = Some(raw);
            appended?;
            rewound?;
            return self.catch_up(limit);
        }
        let mut budget = limit.unwrap_or(usize::MAX);
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(64 * 1024, 0);
        let result = loop {
            if budget == 0 {
                break Ok(());
            }
            let want = buf.len().min(budget);
            let n = match raw.read(&mut buf[..want]) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            budget -= n;
            self.read += n as u64;
            if let Err(e) = out.write(&buf[..n]) {
                break Err(e);
            }
        };
        self.buf = buf;
        self.raw = Some(raw);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::mask_for;
    use std::io::Write;

    #[test]
    fn the_copy_is_masked_across_the_connectors_writes() {
        let dir = std::env::temp_dir().join(format!("tf-serial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let secrets = JobSecrets::new(["hunter2-XYZ".to_string()]);
        let rundir = RunDir::new(dir.clone());
        let mut tail = SerialTail::new(&rundir, Phase::Test, "job", &secrets, Duration::from_secs(1));
        let now = Instant::now();
        tail.look(now);
        assert!(!tail.started(), "no file yet, no copy");
        let raw = dir.join("test-serial.log");
        let mut w = OpenOptions::new().create(true).append(true).open(&raw).unwrap();
        w.write_all(b"boot: hunter").unwrap();
        tail.look(now + POLL);
        assert!(tail.started());
        w.write_all(b"2-XYZ ok\n").unwrap();
        tail.look(now + POLL * 2);
        tail.finish();
        let copy = std::fs::read_to_string(dir.join(rundir.log(Phase::Test, LogKind::Serial))).unwrap();
        assert_eq!(copy, format!("boot: {} ok\n", mask_for("hunter2-XYZ")));
        assert_eq!(tail.written(), copy.len() as u64);

        // Rewritten from its start: the new content follows.
        let mut tail = SerialTail::new(&rundir, Phase::Cleanup, "job", &secrets, Duration::from_secs(1));
        let raw = dir.join("cleanup-serial.log");
        std::fs::write(&raw, "first run, long line\n").unwrap();
        tail.look(Instant::now());
        std::fs::write(&raw, "again\n").unwrap();
        tail.finish();
        let copy = std::fs::read_to_string(dir.join(rundir.log(Phase::Cleanup, LogKind::Serial))).unwrap();
        assert_eq!(copy, "first run, long line\nagain\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
