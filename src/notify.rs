//! systemd integration without libsystemd: `sd_notify` messages on the
//! `NOTIFY_SOCKET` datagram socket (`Type=notify`, the watchdog), and
//! whether stderr is the journal (`JOURNAL_STREAM`), where log lines carry
//! `<N>` priority prefixes instead of timestamps.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call here is a no-op. State
//! is process-wide: the calls come from the polling loop, the job runner
//! and the idle/phase wake-ups, which share no object.

use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::signals;

struct State {
    socket: UnixDatagram,
    target: Target,
    /// Half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises.
    watchdog_every: Option<Duration>,
    last_watchdog: Option<Instant>,
    last_status: String,
    stopping_sent: bool,
}

enum Target {
    Path(std::path::PathBuf),
    #[cfg(target_os = "linux")]
    Abstract(Vec<u8>),
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honoured only when
/// `WATCHDOG_PID`, if set, is ours). Call once at start.
pub fn init() {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET").filter(|a| !a.is_empty()) else { return };
    let addr = addr.to_string_lossy().into_owned();
    let target = match addr.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        Some(name) => Target::Abstract(name.as_bytes().to_vec()),
        #[cfg(not(target_os = "linux"))]
        Some(_) => return,
        None => Target::Path(addr.into()),
    };
    let ours = std::env::var("WATCHDOG_PID").map_or(true, |p| p.trim() == std::process::id().to_string());
    let watchdog_every = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|u| u.trim().parse::<u64>().ok())
        .filter(|&u| u > 0 && ours)
        .map(|u| Duration::from_micros(u) / 2);
    let socket = match UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("NOTIFY_SOCKET set but no socket: {e}");
            return;
        }
    };
    if let Ok(mut s) = STATE.lock() {
        *s = Some(State {
            socket,
            target,
            watchdog_every,
            last_watchdog: None,
            last_status: String::new(),
            stopping_sent: false,
        });
    }
}

fn send(state: &State, msg: &str) {
    let sent = match &state.target {
        Target::Path(p) => state.socket.send_to(msg.as_bytes(), p),
        #[cfg(target_os = "linux")]
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| state.socket.send_to_addr(msg.as_bytes(), &a))
        }
    };
    if let Err(e) = sent {
        log::debug!("sd_notify {msg:?}: {e}");
    }
}

fn with(f: impl FnOnce(&mut State)) {
    if let Ok(mut guard) = STATE.lock() {
        if let Some(state) = guard.as_mut() {
            f(state);
        }
    }
}

/// Start-up checks passed: `READY=1` with a first status.
pub fn ready(status: &str) {
    with(|s| {
        s.last_status = status.to_string();
        send(s, &format!("READY=1\nSTATUS={}", one_line(status)));
        s.last_watchdog = Some(Instant::now());
    });
}

/// `STATUS=` for `systemctl status`, sent only when it changes.
pub fn status(text: &str) {
    with(|s| {
        if s.last_status != text {
            s.last_status = text.to_string();
            send(s, &format!("STATUS={}", one_line(text)));
        }
    });
}

/// Called on every wake-up, idle or during a phase: `WATCHDOG=1` when due
/// (a hung agent stops sending it and systemd restarts it), and
/// `STOPPING=1` once a stop signal has arrived.
pub fn tick() {
    with(|s| {
        if signals::interrupted() && !s.stopping_sent {
            s.stopping_sent = true;
            send(s, "STOPPING=1\nSTATUS=stopping: winding the current job down");
        }
        if let Some(every) = s.watchdog_every {
            if s.last_watchdog.is_none_or(|t| t.elapsed() >= every) {
                s.last_watchdog = Some(Instant::now());
                send(s, "WATCHDOG=1");
            }
        }
    });
}

/// When the watchdog is next due: a wait must wake by then.
pub fn next_due() -> Option<Instant> {
    let mut due = None;
    with(|s| {
        if let Some(every) = s.watchdog_every {
            due = Some(s.last_watchdog.map_or_else(Instant::now, |t| crate::deadline::after(t, every)));
        }
    });
    due
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Whether stderr is the journal: `JOURNAL_STREAM` is `<dev>:<inode>` of
/// the stream systemd connected, compared with stderr's (a child whose
/// stderr was redirected inherits the variable but not the stream).
// The stat types are u32 on some 32-bit targets.
#[allow(clippy::useless_conversion)]
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.split_once(':') else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat on fd 2 into a properly sized, writable stat buffer.
    if unsafe { libc::fstat(2, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    u64::from(st.st_dev) == dev && u64::from(st.st_ino) == ino
}

/// The journal priority (syslog level) of a log level.
pub fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}
