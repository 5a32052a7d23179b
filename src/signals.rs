//! Signals the agent reacts to, turned into flags its one loop reads.
//!
//! SIGTERM and SIGINT ask the agent to stop: the running phase is ended,
//! cleanup runs, the outcome is delivered or kept, then the agent exits.
//! SIGUSR1 asks for a restart once the current job is done.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static RESTART: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

extern "C" fn on_restart(_: libc::c_int) {
    RESTART.store(true, Ordering::SeqCst);
}

pub fn install() {
    let handlers: [(libc::c_int, extern "C" fn(libc::c_int)); 3] =
        [(libc::SIGTERM, on_stop), (libc::SIGINT, on_stop), (libc::SIGUSR1, on_restart)];
    for (sig, handler) in handlers {
        // SAFETY: a zeroed sigaction with a handler that only stores to an
        // atomic is async-signal-safe. No SA_RESTART, so poll/sleep wake up.
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

/// Sleeps up to `d`, waking early when the agent is asked to stop.
pub fn sleep(d: std::time::Duration) {
    let end = std::time::Instant::now() + d;
    while !interrupted() {
        let now = std::time::Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(std::time::Duration::from_millis(100)));
    }
}
