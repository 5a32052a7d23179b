//! Runs one phase command: its own process group, one pipe for stdout and
//! stderr, one loop waiting in `wait`, stop conditions, and no orphans.
//!
//! The runner knows nothing of HTTP or jobs: it hands bytes to a [`Watcher`]
//! and asks it, whenever it wakes, whether to stop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::deadline;
use crate::phase::{EndReason, NOT_RUN};
use crate::wait::{self, Ends, Woke};

mod procs;
pub use procs::{become_subreaper, cloexec_inherited_fds};
use procs::{cloexec_above_stderr, kill_descendants, signal_group};

/// Why a phase was stopped before it ended by itself.
#[derive(Clone, Debug, PartialEq)]
pub enum Stop {
    GlobalTimeout(u64),
    OutputTimeout(u64),
    Cancelled,
    /// The agent itself was asked to stop (SIGTERM/SIGINT).
    Interrupted,
}

impl Stop {
    /// The line written into the phase output, as upstream words it.
    pub fn message(&self) -> String {
        match self {
            Stop::GlobalTimeout(s) => format!("\nERROR: Global timeout reached! ({s}s)\n"),
            Stop::OutputTimeout(s) => format!("\nERROR: Output timeout reached! ({s}s)\n"),
            Stop::Cancelled => "\nJob cancellation was requested, exiting.\n".into(),
            Stop::Interrupted => "\nERROR: The agent was stopped; ending the phase.\n".into(),
        }
    }

    /// Why the phase ended, also the name of its event.
    pub fn reason(&self) -> EndReason {
        match self {
            Stop::GlobalTimeout(_) => EndReason::GlobalTimeout,
            Stop::OutputTimeout(_) => EndReason::OutputTimeout,
            Stop::Cancelled => EndReason::Cancelled,
            Stop::Interrupted => EndReason::AgentInterrupted,
        }
    }
}

/// What the runner reports to, and asks of, its caller.
pub trait Watcher {
    /// Bytes the command wrote (stdout and stderr merged, in order).
    fn output(&mut self, data: &[u8]);
    /// Called on every wake-up; returning `Some` stops the phase. A
    /// watcher that blocks in here (sending output to a slow server) calls
    /// `drain` meanwhile, so the child does not wait on a full pipe: it hands
    /// what the pipe holds to its argument, which must take it as `output`
    /// would. The runner's own stops (timeouts, the agent's stop) are acted
    /// on inside `drain` too, so a slow server does not hold them.
    fn check(&mut self, now: Instant, drain: &mut Drain) -> Option<Stop>;
    /// When the watcher next needs `check` without new output.
    fn next_wake(&self, now: Instant) -> Instant;
    /// What the watcher serves while the runner waits (the metrics endpoint).
    fn source(&mut self) -> Option<&mut dyn wait::Source> {
        None
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub global: Option<Duration>,
    pub output: Option<Duration>,
    /// Between SIGTERM and SIGKILL when the phase is stopped (`kill_grace`);
    /// `None`: [`GRACE`].
    pub kill_grace: Option<Duration>,
    /// The agent's own stop request (SIGTERM/SIGINT) ends the phase.
    pub on_agent_stop: bool,
}

impl Limits {
    /// The timeout that has run out at `now` for a phase started at `start`
    /// whose output last arrived at `last_output`, if one has.
    pub fn expired(&self, start: Instant, last_output: Instant, now: Instant) -> Option<Stop> {
        if let Some(g) = self.global.filter(|g| now.saturating_duration_since(start) >= *g) {
            Some(Stop::GlobalTimeout(g.as_secs()))
        } else {
            self.output
                .filter(|o| now.saturating_duration_since(last_output) >= *o)
                .map(|o| Stop::OutputTimeout(o.as_secs()))
        }
    }

    /// When the first timeout runs out if nothing changes (`None`: never).
    /// Checked sums: a limit may be as long as the config and job allow.
    pub fn next_due(&self, start: Instant, last_output: Instant) -> Option<Instant> {
        let global = self.global.map(|g| deadline::after(start, g));
        let output = self.output.map(|o| deadline::after(last_output, o));
        global.into_iter().chain(output).min()
    }
}

#[derive(Debug, PartialEq)]
pub struct Outcome {
    /// The exit status modulo 256; 100 when the command could not start.
    pub code: i32,
    /// Set when the command died of a signal.
    pub signal: Option<i32>,
    pub stopped: Option<Stop>,
}

/// `run` reaps every descendant of this process when a phase ends: the
/// unit tests that run phases (here and in `job`) take this lock, so that
/// none of them runs beside another.
#[cfg(test)]
pub(crate) static TEST_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long a stopped phase gets between SIGTERM and SIGKILL by default.
pub const GRACE: Duration = Duration::from_millis(1500);
/// Output of a command that exited, still arriving from a leftover process
/// holding the pipe open, is read for at most this long.
const DRAIN: Duration = Duration::from_millis(200);
const READ_BUF: usize = 64 * 1024;
/// The default `pipe-max-size`: what an unprivileged process may ask for.
#[cfg(target_os = "linux")]
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Reads what the child's pipe holds now and hands it, in order, to the
/// sink it is given.
pub type Drain<'a> = dyn FnMut(&mut dyn FnMut(&[u8])) + 'a;

/// The read end of the phase's pipe (non-blocking) and what was seen on it.
struct Pipe {
    fd: OwnedFd,
    buf: Vec<u8>,
    open: bool,
    /// When output last arrived.
    last_output: Instant,
}

impl Pipe {
    /// Reads until the pipe is empty, 1 MiB at most (so a child that writes
    /// faster than we read does not keep us here), into `sink`.
    fn drain(&mut self, sink: &mut dyn FnMut(&[u8])) {
        for _ in 0..16 {
            if !self.open {
                return;
            }
            // SAFETY: buf is a valid writable buffer of buf.len() bytes.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if r > 0 {
                sink(&self.buf[..r as usize]);
                self.last_output = Instant::now();
                if (r as usize) < self.buf.len() {
                    return;
                }
            } else if r == 0 {
                self.open = false;
            } else {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return,
                    _ => self.open = false,
                }
            }
        }
    }
}

/// The runner's own stop conditions and the signals sent for a stop.
/// Ticked from the loop and from inside the watcher's blocking calls
/// (through `drain`): a fragment waiting up to a minute on a slow server
/// must not hold a timeout or the agent's stop, and the call itself is left
/// to finish, since abandoning it could store the fragment twice.
struct Stopping {
    pgid: i32,
    start: Instant,
    limits: Limits,
    stopped: Option<Stop>,
    term_sent: Option<Instant>,
}

impl Stopping {
    fn grace(&self) -> Duration {
        self.limits.kill_grace.unwrap_or(GRACE)
    }

    /// A stop of the runner's own that is due now.
    fn due(&self, now: Instant, last_output: Instant) -> Option<Stop> {
        if let Some(stop) = self.limits.expired(self.start, last_output, now) {
            Some(stop)
        } else if self.limits.on_agent_stop && crate::signals::interrupted() {
            Some(Stop::Interrupted)
        } else {
            None
        }
    }

    /// Stops the phase: its message goes to `out` (as output would), then
    /// SIGTERM to its group.
    fn stop(&mut self, now: Instant, reason: Stop, out: &mut dyn FnMut(&[u8])) {
        log::info!("stopping the phase: {}", reason.reason());
        out(reason.message().as_bytes());
        signal_group(self.pgid, libc::SIGTERM);
        self.term_sent = Some(now);
        self.stopped = Some(reason);
    }

    /// Does what is due: a stop of the runner's own, or SIGKILL once the
    /// grace period after SIGTERM is over.
    fn tick(&mut self, now: Instant, last_output: Instant, out: &mut dyn FnMut(&[u8])) {
        if self.stopped.is_none() {
            if let Some(reason) = self.due(now, last_output) {
                self.stop(now, reason, out);
            }
        } else if self.term_sent.is_some_and(|t| now.duration_since(t) >= self.grace()) {
            log::info!(
                "the phase did not end within {} of SIGTERM; sending SIGKILL",
                crate::human::duration(self.grace())
            );
            signal_group(self.pgid, libc::SIGKILL);
            kill_descendants();
            self.term_sent = None;
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl on a descriptor we own. Only our end is non-blocking:
    // the loop reads until the pipe is empty, and a blocking read there
    // would hold it past every deadline once the child goes quiet. The
    // child's end stays blocking, as programs expect of their stdout.
    unsafe {
        let flags = libc::fcntl(fds[0], libc::F_GETFL);
        libc::fcntl(fds[0], libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    #[cfg(target_os = "linux")]
    // SAFETY: fcntl on a descriptor we own. A larger pipe lets the child keep
    // writing while the agent is in a call that does not drain it (the state
    // re-posted every 12 h of a long phase); failure (a lower pipe-max-size)
    // just keeps the default 64 KiB.
    unsafe {
        libc::fcntl(fds[0], libc::F_SETPIPE_SZ, PIPE_SIZE);
    }
    // SAFETY: pipe2 just returned these two fresh descriptors, owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Runs `cmd` through `/bin/sh -c` in `cwd` with `env` added.
pub fn run(cmd: &str, cwd: &Path, env: &[(String, String)], limits: Limits, watcher: &mut dyn Watcher) -> Outcome {
    let spawned = pipe().and_then(|(read, write)| {
        let write2 = write.try_clone()?;
        // The command starts in the directory checked here, not in whatever
        // the path names by the time it is spawned.
        let dir = crate::safe_fs::open_dir(cwd)?;
        let dir_fd = dir.as_raw_fd();
        let mut command = Command::new("/bin/sh");
        // SAFETY: the hooks make raw system calls only, async-signal-safe;
        // `dir` outlives the spawn.
        unsafe {
            command.pre_exec(move || if libc::fchdir(dir_fd) == 0 { Ok(()) } else { Err(io::Error::last_os_error()) });
            command.pre_exec(cloexec_above_stderr);
        }
        let child = command
            .arg("-c")
            .arg(cmd)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(write2))
            .process_group(0)
            .spawn()?;
        Ok((read, child))
    });
    // The Command (and our copies of the write end) are dropped here, so EOF
    // on the read end means every process of the phase closed its output.
    let (read, child) = match spawned {
        Ok(x) => x,
        Err(e) => {
            watcher.output(format!("ERROR: cannot start the command: {e}\n").as_bytes());
            return Outcome { code: NOT_RUN, signal: None, stopped: None };
        }
    };
    supervise(read, child, limits, watcher)
}

fn supervise(read: OwnedFd, mut child: Child, limits: Limits, watcher: &mut dyn Watcher) -> Outcome {
    let start = Instant::now();
    let mut stopping = Stopping { pgid: child.id() as i32, start, limits, stopped: None, term_sent: None };
    let mut pipe = Pipe { fd: read, buf: vec![0u8; READ_BUF], open: true, last_output: start };
    let mut status = None;
    let mut exited_at: Option<Instant> = None;

    loop {
        let now = Instant::now();
        if status.is_none() {
            status = match child.try_wait() {
                Ok(s) => s,
                // Reaped by kill_descendants after the grace period: it
                // died of that SIGKILL (or just before; the code is lost).
                Err(_) => Some(std::process::ExitStatus::from_raw(libc::SIGKILL)),
            };
            if status.is_some() {
                exited_at = Some(now);
            }
        }
        // Done: the shell exited and the pipe is closed, or the shell exited a
        // while ago and a leftover holds the pipe (it gets killed below).
        if let Some(at) = exited_at {
            if !pipe.open || now.duration_since(at) >= DRAIN {
                break;
            }
        }
        stopping.tick(now, pipe.last_output, &mut |data| watcher.output(data));
        // The watcher's own work (sending output, and while no stop is
        // under way, the checks that may stop the phase), with the pipe
        // drained and the runner's stops acted on inside its calls.
        let mut drain = |sink: &mut dyn FnMut(&[u8])| {
            pipe.drain(sink);
            stopping.tick(Instant::now(), pipe.last_output, sink);
        };
        let asked = watcher.check(now, &mut drain);
        if let (Some(reason), None) = (asked, &stopping.stopped) {
            stopping.stop(now, reason, &mut |data| watcher.output(data));
        }

        // Wait until output arrives or the next thing to check is due.
        let mut wake = watcher.next_wake(now).min(deadline::after(now, Duration::from_secs(1)));
        if status.is_none() {
            // Exit is noticed by polling try_wait; 100 ms keeps the idle cost
            // far below 1% of a core while ending phases promptly.
            wake = wake.min(deadline::after(now, Duration::from_millis(100)));
        }
        if let Some(at) = exited_at {
            wake = wake.min(deadline::after(at, DRAIN));
        }
        if let Some(due) = limits.next_due(start, pipe.last_output) {
            wake = wake.min(due);
        }
        if let Some(t) = stopping.term_sent {
            wake = wake.min(deadline::after(t, stopping.grace()));
        }
        if !pipe.open && status.is_none() {
            // The output has ended, so the shell is about to exit.
            wake = wake.min(deadline::after(now, Duration::from_millis(5)));
        }
        // Output, a signal (the watcher decides what it means), or the
        // next deadline; the metrics endpoint is served meanwhile.
        let fd = pipe.open.then(|| pipe.fd.as_raw_fd());
        if wait::until(wake, watcher.source(), fd, Ends::AnySignal) == Woke::Ready {
            pipe.drain(&mut |data| watcher.output(data));
        }
    }

    // The phase is over: nothing of it may outlive it.
    signal_group(stopping.pgid, libc::SIGKILL);
    kill_descendants();
    let status = match status {
        Some(s) => s,
        None => child.wait().unwrap_or_else(|_| std::process::ExitStatus::from_raw(0)),
    };
    let (code, signal) = match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff, None),
        (None, Some(sig)) => (128 + sig, Some(sig)),
        (None, None) => (1, None),
    };
    Outcome { code, signal, stopped: stopping.stopped }
}

#[cfg(test)]
mod tests;
