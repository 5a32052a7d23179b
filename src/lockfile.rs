//! One agent per `execution_basedir`: an `flock` on a lock file there,
//! held for the process's life and released by the kernel when it dies
//! (however it dies). Upstream agents orphaned by a supervisor crash keep
//! working in the same directories as their replacement; ours refuses.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::safe_fs;

/// The lock file's name inside `execution_basedir`; it holds the pid of the
/// agent that has the lock.
pub const NAME: &str = ".testflinger-agent.lock";

/// Held for the agent's life; dropping it releases the lock.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

#[derive(Debug)]
pub enum LockError {
    /// Another live process holds the lock; its pid when it wrote one.
    Busy { dir: PathBuf, pid: Option<u32> },
    Io { path: PathBuf, reason: String },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            LockError::Busy { dir, pid: Some(pid) } => {
                write!(f, "execution_basedir {} is in use by another agent (pid {pid}); exiting", dir.display())
            }
            LockError::Busy { dir, pid: None } => {
                write!(f, "execution_basedir {} is in use by another agent (pid not yet written); exiting", dir.display())
            }
            LockError::Io { path, reason } => write!(f, "cannot lock {}: {reason}", path.display()),
        }
    }
}

/// Takes the lock on `dir` (created when missing) or says who holds it.
pub fn acquire(dir: &Path) -> Result<Lock, LockError> {
    let path = dir.join(NAME);
    let io = |e: std::io::Error| LockError::Io { path: path.clone(), reason: e.to_string() };
    safe_fs::ensure_base_dir(dir, safe_fs::PRIVATE_DIR).map_err(io)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(safe_fs::PRIVATE_FILE)
        // Never through a link; close-on-exec so that phase commands (and
        // what they leave running) do not hold the lock after we die.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(LockError::Busy { dir: dir.to_path_buf(), pid: text.trim().parse().ok() });
        }
        return Err(io(e));
    }
    file.set_len(0).and_then(|_| file.seek(SeekFrom::Start(0))).map_err(io)?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io)?;
    Ok(Lock { _file: file })
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
        drop(first);
        assert!(acquire(&dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
