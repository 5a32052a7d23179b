//! Signals the agent reacts to, turned into flags its one loop reads, and a
//! wake-up for whoever is waiting (see `wait`).
//!
//! SIGTERM and SIGINT ask the agent to stop: the running phase is ended,
//! cleanup runs, the outcome is delivered or kept, then the agent exits.
//! SIGUSR1 asks for a restart once the current job is done and no operator
//! holds the agent (`offline`, `maintenance`).
//!
//! Each handler also writes one byte to a self-pipe, so a wait that began
//! just before the signal still ends at once (a flag alone would be seen
//! only at the wait's deadline).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static RESTART: AtomicBool = AtomicBool::new(false);
/// The self-pipe's ends; -1 until `install`.
static WAKE_READ: AtomicI32 = AtomicI32::new(-1);
static WAKE_WRITE: AtomicI32 = AtomicI32::new(-1);

fn wake() {
    let fd = WAKE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; errno is kept for the
        // interrupted code. A full pipe already holds a wake-up.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, [1u8].as_ptr().cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

extern "C" fn on_stop(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    wake();
}

extern "C" fn on_restart(_: libc::c_int) {
    RESTART.store(true, Ordering::SeqCst);
    wake();
}

pub fn install() {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints. Both ends non-blocking: the
    // handler must never block, the waiter reads until empty.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } == 0 {
        WAKE_READ.store(fds[0], Ordering::SeqCst);
        WAKE_WRITE.store(fds[1], Ordering::SeqCst);
    }
    let handlers: [(libc::c_int, extern "C" fn(libc::c_int)); 3] =
        [(libc::SIGTERM, on_stop), (libc::SIGINT, on_stop), (libc::SIGUSR1, on_restart)];
    for (sig, handler) in handlers {
        // SAFETY: a zeroed sigaction with a handler that only stores to an
        // atomic and writes to a pipe is async-signal-safe. No SA_RESTART,
        // so poll/sleep wake up.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn restart_requested() -> bool {
    RESTART.load(Ordering::SeqCst)
}

/// The self-pipe's read end, readable once a signal arrived; `None`
/// before `install` (unit tests).
pub(crate) fn wake_fd() -> Option<RawFd> {
    Some(WAKE_READ.load(Ordering::SeqCst)).filter(|fd| *fd >= 0)
}

/// Empties the self-pipe after a wake-up.
pub(crate) fn drain_wake() {
    let Some(fd) = wake_fd() else { return };
    let mut buf = [0u8; 64];
    // SAFETY: read into a valid buffer from our own non-blocking pipe.
    while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}
