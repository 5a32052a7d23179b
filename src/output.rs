//! Where a phase's bytes go: masked into `<phase>.log` first, and from
//! there, as numbered fragments, to the server.
//!
//! The log file is the source of truth for the live stream: the stream only
//! remembers how far into the file it has sent. A slow or unreachable server
//! therefore never costs memory or loses bytes; the stream catches up from
//! the file when the server is back, and the concatenation of the fragments
//! equals the log file.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::{ClientError, Idle};
use crate::json::Json;
use crate::mask::Masker;
use crate::phase::{LogKind, Phase};
use crate::retry::{Backoff, Jitter, Retry, Schedule};
use crate::rundir::PendingStream;
use crate::server::Server;
use crate::timestamp::now_iso8601;

mod bucket;
mod fragment;
mod masked_file;

pub(crate) use masked_file::MaskedFile;

/// Largest fragment body, JSON escaping included: the server refuses bodies
/// over 16 MB, and proxies in front of it may be stricter, so stay well below.
const MAX_BODY: u64 = 12 << 20;
/// A fragment the server (or a proxy's body limit: nginx's
/// `client_max_body_size` is 1 MiB unless raised) refuses with 413 is cut
/// to half and sent again under the same number, down to this size; only a
/// fragment this small that is still refused is a refusal for good.
const MIN_BODY: u64 = 16 << 10;
/// Pending output goes at once while the log's token bucket (bucket.rs,
/// one token per `output_interval`, a burst of three) has a token: output
/// whose rate fits the budget reaches the server at once, a chatty phase
/// costs the server one request per interval in the long run.
///
/// Under heavy output (a full fragment's worth waiting) fragments go at most
/// once a second: each send holds the child on a full pipe for a few tens
/// of ms, so sending less while it writes keeps it close to full speed. The
/// server still sees progress every second, and what is left goes back to
/// back in the final flush once the phase ends.
const HEAVY_INTERVAL: Duration = Duration::from_secs(1);
/// Pending output at least this large (in log bytes) counts as heavy.
const HEAVY: u64 = 8 << 20;
/// A live fragment is tried once with this timeout, upstream's for log
/// posts. A fragment whose answer is late may still be stored by the
/// server, and its retry (same number, same bytes) would then show twice
/// in the job's output: so a slow server is waited for, not given up on
/// (the child's pipe is drained meanwhile, see `Idle`). Fragments sent
/// after the phase wait at least as long, for the same reason.
const LIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// After a fragment failed while the phase runs: a random part (at least
/// 0.5 s) of 1 s, doubling to 32 s. Full jitter: a fleet whose fragments
/// failed together (an outage) sends them back spread over the last wait,
/// not in the second the server returns.
const LIVE_BACKOFF: Schedule =
    Schedule::new(Duration::from_secs(1), Duration::from_secs(32), Jitter::Full { floor: Duration::from_millis(500) });

/// The phase's log file, written through the secret masker.
pub(crate) struct PhaseLog {
    file: MaskedFile,
    pub path: PathBuf,
    echo: bool,
    failed: bool,
}

impl PhaseLog {
    /// Opens `path` for appending; `echo` also copies the output to stdout
    /// (the local `--job` mode).
    /// `masker` is the job's (`JobSecrets::stream`): nothing reaches the
    /// file, the terminal or the server without going through it.
    pub(crate) fn open(path: &Path, masker: Masker, echo: bool) -> io::Result<PhaseLog> {
        let file = MaskedFile::open(path, masker)?;
        Ok(PhaseLog { file, path: path.to_path_buf(), echo, failed: false })
    }

    /// Bytes written to the file so far.
    pub(crate) fn written(&self) -> u64 {
        self.file.written()
    }

    pub(crate) fn write(&mut self, data: &[u8]) {
        let echo = self.echo;
        let result = self.file.write_then(data, |d| echo_out(echo, d));
        self.check(result);
    }

    /// Flushes what the masker held back; call when the phase has ended.
    pub(crate) fn finish(&mut self) {
        let echo = self.echo;
        let result = self.file.finish_then(|d| echo_out(echo, d));
        self.check(result);
    }

    fn check(&mut self, result: io::Result<()>) {
        // Disk full: the phase goes on; say so once rather than per write.
        if let Err(e) = result {
            if !self.failed {
                log::error!("cannot write {}: {e}", self.path.display());
                self.failed = true;
            }
        }
    }
}

fn echo_out(echo: bool, data: &[u8]) {
    if echo {
        let mut out = io::stdout().lock();
        let _ = out.write_all(data);
        let _ = out.flush();
    }
}

/// Sends a log file to `log/<kind>` as numbered fragments, catching up from
/// the file after failures.
///
/// While the phase runs, [`LiveStream::pump`] makes at most one attempt per
/// call, draining the child's pipe while it waits, and backs off on its own
/// after a failure: the runner's one thread has the phase to look after. The
/// final [`LiveStream::flush`] uses the client's full retry policy.
pub(crate) struct LiveStream {
    job_id: String,
    kind: LogKind,
    phase: Phase,
    reader: Option<File>,
    path: PathBuf,
    /// Bytes of the file already delivered.
    pub sent: u64,
    /// End of a fragment that was sent but not acknowledged (timeout,
    /// reset): the server may hold it under its number, so the retry sends
    /// the same bytes under the same number, never more.
    pub inflight_end: Option<u64>,
    /// When the last fragment went; `None` before the first.
    last_send: Option<Instant>,
    interval: Duration,
    /// The live fragments' budget; the final flush is not held by it.
    bucket: bucket::Bucket,
    /// After a failed fragment: when the next attempt is due.
    backoff: Backoff,
    /// The largest fragment body to send: [`MAX_BODY`], halved at each 413.
    max_body: u64,
}

impl LiveStream {
    /// `interval` is the config's `output_interval`.
    pub(crate) fn new(
        job_id: &str,
        kind: LogKind,
        phase: Phase,
        path: &Path,
        sent: u64,
        interval: Duration,
    ) -> LiveStream {
        LiveStream {
            job_id: job_id.to_string(),
            kind,
            phase,
            reader: None,
            path: path.to_path_buf(),
            sent,
            inflight_end: None,
            last_send: None,
            interval,
            // A start counts as after a quiet spell: the first output goes at once.
            bucket: bucket::Bucket::new(interval, Instant::now()),
            backoff: Backoff::new(LIVE_BACKOFF),
            max_body: MAX_BODY,
        }
    }

    /// When the next send is due, given `written` bytes in the file.
    pub(crate) fn due(&self, written: u64) -> Option<Instant> {
        if written <= self.sent {
            return None;
        }
        let ready = self.bucket.ready();
        if let Some(t) = self.backoff.next() {
            return Some(t.max(ready));
        }
        match self.last_send {
            Some(last) if written - self.sent >= HEAVY => {
                Some(ready.max(crate::deadline::after(last, HEAVY_INTERVAL.max(self.interval))))
            }
            _ => Some(ready),
        }
    }

    /// Sends one fragment if one is due: a single attempt (timeout
    /// [`LIVE_TIMEOUT`]), doing `idle` (the runner draining the child's pipe) while
    /// it waits. Failures are logged and retried later with backoff.
    pub(crate) fn pump(
        &mut self,
        client: &mut dyn Server,
        counter: &mut u64,
        written: u64,
        now: Instant,
        idle: &mut Idle,
    ) {
        if self.due(written).is_some_and(|t| now >= t) && self.bucket.take(now) {
            let _ = self.send_one(client, counter, written, false, Some(idle), Retry::once(LIVE_TIMEOUT));
        }
    }

    /// Where this stream stands, to be sent on later from there.
    pub(crate) fn unsent(&self) -> PendingStream {
        PendingStream { kind: self.kind, phase: self.phase, sent: self.sent, inflight_end: self.inflight_end }
    }

    /// Sends everything up to `written`. Returns the error that stopped it.
    pub(crate) fn flush(
        &mut self,
        client: &mut dyn Server,
        counter: &mut u64,
        written: u64,
    ) -> Result<(), ClientError> {
        let retry = client.retry();
        // A `server_timeout` shorter than a slow server's answer would send
        // the same fragment again, and the server would show it twice.
        let retry = Retry { timeout: retry.timeout.max(LIVE_TIMEOUT), ..retry };
        while self.sent < written {
            self.send_one(client, counter, written, true, None, retry)?;
        }
        Ok(())
    }

    fn send_one(
        &mut self,
        client: &mut dyn Server,
        counter: &mut u64,
        written: u64,
        last: bool,
        mut idle: Option<&mut Idle>,
        retry: Retry,
    ) -> Result<(), ClientError> {
        let local = |path: &Path, e: io::Error| ClientError::Local { path: path.to_path_buf(), reason: e.to_string() };
        if self.reader.is_none() {
            self.reader = Some(crate::safe_fs::open_own(&self.path).map_err(|e| local(&self.path, e))?);
        }
        let Some(reader) = &self.reader else { return Ok(()) };
        let prefix = format!(
            "{{\"fragment_number\":{},\"timestamp\":{},\"phase\":{},\"log_data\":\"",
            *counter,
            Json::str(now_iso8601()).to_string_compact(),
            Json::str(self.phase.as_str()).to_string_compact()
        );
        // A retry covers exactly the unacknowledged fragment's bytes.
        let (avail, last) = match self.inflight_end {
            Some(end) if end > self.sent && end <= written => (end, true),
            _ => (written, last),
        };
        let mut no_idle = || {};
        let plan_idle: &mut dyn FnMut() = match idle.as_deref_mut() {
            Some(f) => f,
            None => &mut no_idle,
        };
        let plan = match fragment::plan(reader, self.sent, avail, last, prefix, self.max_body, plan_idle) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(e) => return Err(local(&self.path, e)),
        };
        self.last_send = Some(Instant::now());
        let mut body = |w: &mut dyn Write| fragment::write(reader, &plan, w);
        match client.post_log_fragment_streamed(&self.job_id, self.kind.as_str(), plan.len, &mut body, idle, retry) {
            Ok(()) => {
                *counter += 1;
                self.sent = plan.end;
                self.inflight_end = None;
                self.backoff.succeeded();
                Ok(())
            }
            // The server had the whole fragment and may have stored it: sent
            // again at the next start, it could show twice. Never twice is
            // the rule; this fragment may be missing instead, and the log
            // says which bytes.
            Err(ClientError::Stopped { request_sent: true, .. }) => {
                log::warn!(
                    "{} log fragment {} (bytes {}..{} of {}) may be missing on the server: the agent stopped before the server answered",
                    self.kind,
                    *counter,
                    self.sent,
                    plan.end,
                    self.phase
                );
                *counter += 1;
                self.sent = plan.end;
                self.inflight_end = None;
                Ok(())
            }
            // Too large for the server: it stored nothing, so the same
            // number goes again at once with half the bytes.
            Err(ClientError::Status { status: 413, .. }) if self.max_body > MIN_BODY => {
                self.max_body = (self.max_body / 2).max(MIN_BODY);
                self.inflight_end = None;
                log::warn!(
                    "{} log fragment {} of {} bytes refused as too large (HTTP 413); sending fragments of at most {} bytes",
                    self.kind,
                    *counter,
                    plan.len,
                    self.max_body
                );
                Ok(())
            }
            Err(e) => {
                self.inflight_end = Some(plan.end);
                if e.is_stop() {
                    return Err(e);
                }
                let backoff = self.backoff.failed(Instant::now());
                log::warn!(
                    "{} log fragment not sent, will retry in {}: {e}",
                    self.kind,
                    crate::human::duration(backoff)
                );
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_retries_are_spread_over_the_whole_wait() {
        let waits: Vec<Duration> = (0..1000).map(|_| LIVE_BACKOFF.wait(6)).collect();
        assert!(waits.iter().all(|w| *w >= Duration::from_millis(500) && *w <= Duration::from_secs(32)));
        assert!(
            waits.iter().any(|w| *w < Duration::from_secs(4)) && waits.iter().any(|w| *w > Duration::from_secs(28))
        );
    }

    #[test]
    fn phase_log_masks_secrets_on_disk() {
        let dir = std::env::temp_dir().join(format!("tf-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("test.log");
        let mut log = PhaseLog::open(&path, Masker::new(["s3cret"]), false).unwrap();
        log.write(b"token=s3c");
        log.write(b"ret done\n");
        log.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("token={} done\n", crate::mask::mask_for("s3cret")));
        assert_eq!(log.written(), text.len() as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
