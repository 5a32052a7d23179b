//! The processes around a phase: what the agent sets up once so that none
//! escapes (subreaper, close-on-exec descriptors), and the kill at a
//! phase's end that leaves no descendant behind.

use std::fs;
use std::io;
use std::time::{Duration, Instant};

/// Makes the agent a child subreaper, so that descendants that leave the
/// phase's process group (a daemon calling `setsid`) are re-parented to us
/// and can be found and killed. Linux only; elsewhere a no-op.
pub fn become_subreaper() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every descriptor above 2 that the agent inherited close-on-exec,
/// so that phase commands get only stdin, stdout and stderr, as upstream's
/// (Python's `close_fds`). Everything the agent opens itself is already
/// close-on-exec. Linux lists them in /proc; elsewhere a no-op (the
/// `pre_exec` of `run` still covers Linux ≥ 5.11 and nothing else).
pub fn cloexec_inherited_fds() {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> =
        dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).filter(|&fd| fd > 2).collect();
    for fd in fds {
        // SAFETY: fcntl on a descriptor number; EBADF (the directory's own,
        // closed by now) is harmless.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// In the child, between fork and exec: every descriptor above 2
/// close-on-exec, in one system call (Linux ≥ 5.11; ENOSYS is ignored, the
/// start-up pass above has done the work). Only async-signal-safe calls.
pub(super) fn cloexec_above_stderr() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it only
    // sets a flag, so std's own exec-error pipe keeps working.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC);
    }
    Ok(())
}

pub(super) fn signal_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill with a negative pid signals the group; harmless if gone.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

/// SIGKILLs every descendant of the agent and reaps them, until none is
/// left (or 2 s pass). Descendants that escaped the process group were
/// re-parented to us, the subreaper, so walking /proc from our pid finds
/// them all.
pub(super) fn kill_descendants() {
    let deadline = crate::deadline::from_now(Duration::from_secs(2));
    loop {
        let pids = descendants(std::process::id() as i32);
        for &pid in &pids {
            // SAFETY: plain kill(2) on a pid we just saw as our descendant.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        reap();
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reaps every exited child without blocking.
pub(super) fn reap() {
    loop {
        let mut st = 0;
        // SAFETY: waitpid with WNOHANG and a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}

/// Pids of all live (non-zombie) descendants of `root`, from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The command name may hold spaces and parens; fields follow the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().and_then(|p| p.parse::<i32>().ok()).unwrap_or(0);
        if state != "Z" && state != "X" {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}
