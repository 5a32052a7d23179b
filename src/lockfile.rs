//! One agent per `execution_basedir`: an `flock` on the directory itself,
//! held for the process's life and released by the kernel when it dies
//! (however it dies). Upstream agents orphaned by a supervisor crash keep
//! working in the same directories as their replacement; ours refuses.
//!
//! The directory, not a lock file in it: the run dir then holds nothing but
//! run dirs (recovery, delivery and operators count on that), and the
//! holder's pid comes from `/proc/locks`, so no stale pid file can mislead.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::safe_fs;

/// Held for the agent's life; dropping it releases the lock.
#[derive(Debug)]
pub struct Lock {
    _dir: File,
}

#[derive(Debug)]
pub enum LockError {
    /// Another live process holds the lock; its pid when it could be found.
    Busy {
        dir: PathBuf,
        pid: Option<u32>,
    },
    Io {
        path: PathBuf,
        reason: String,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            LockError::Busy { dir, pid: Some(pid) } => {
                write!(f, "execution_basedir {} is in use by another agent (pid {pid}); exiting", dir.display())
            }
            LockError::Busy { dir, pid: None } => {
                write!(f, "execution_basedir {} is in use by another agent (pid unknown); exiting", dir.display())
            }
            LockError::Io { path, reason } => write!(f, "cannot lock {}: {reason}", path.display()),
        }
    }
}

/// Takes the lock on `dir` (created when missing) or says who holds it.
pub fn acquire(dir: &Path) -> Result<Lock, LockError> {
    let io = |e: std::io::Error| LockError::Io { path: dir.to_path_buf(), reason: e.to_string() };
    safe_fs::ensure_base_dir(dir, safe_fs::PRIVATE_DIR).map_err(io)?;
    let file = OpenOptions::new()
        .read(true)
        // Close-on-exec so that phase commands (and what they leave
        // running) do not hold the lock after we die.
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(io)?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let pid = file.metadata().ok().and_then(|m| holder(m.dev(), m.ino()));
            return Err(LockError::Busy { dir: dir.to_path_buf(), pid });
        }
        return Err(io(e));
    }
    Ok(Lock { _dir: file })
}

/// The pid holding an flock on the inode `(dev, ino)`, from `/proc/locks`
/// (lines like `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`, the
/// device as hex major:minor).
fn holder(dev: u64, ino: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "->" marks a waiter (blocked request), which is not the holder.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str())).then(|| f.get(4)?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder_and_drop_releases() {
        let dir = std::env::temp_dir().join(format!("tf-lock-{}", std::process::id()));
        let first = acquire(&dir).unwrap();
        // flock locks belong to the open file: a second open conflicts even
        // within one process.
        match acquire(&dir) {
            Err(LockError::Busy { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing created in the dir");
        drop(first);
        // Another test's fork may hold a copy of the descriptor until its
        // exec closes it (the test binary is threaded; the agent is not).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while acquire(&dir).is_err() {
            assert!(std::time::Instant::now() < deadline, "the lock outlived its drop");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
