//! A small tmpfs for the tests that fill a disk, and the one switch that
//! lets tests needing privileges skip.
//!
//! As root the tmpfs is mounted in place. Where that is refused (root
//! without CAP_SYS_ADMIN, in a container) an `unshare -Urm` child mounts
//! it in a user and mount namespace of its own and stays alive: the test
//! reaches the tmpfs through `/proc/<child>/root`, the agent is started
//! inside with `nsenter`. Where neither works the test fails, unless
//! `TF_TESTS_UNPRIVILEGED=1` says skipping is expected (CI never sets it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::harness::AgentSetup;

/// Returns (the caller then skips) only when `TF_TESTS_UNPRIVILEGED` is
/// set; otherwise the test fails, naming what was missing.
pub fn skip_or_fail(missing: &str) {
    if std::env::var_os("TF_TESTS_UNPRIVILEGED").is_some_and(|v| !v.is_empty()) {
        eprintln!("skipped ({missing}): TF_TESTS_UNPRIVILEGED is set");
        return;
    }
    panic!("{missing}; set TF_TESTS_UNPRIVILEGED=1 to skip such tests on purpose");
}

pub struct SmallDisk {
    /// Where the test reads and writes the tmpfs.
    path: PathBuf,
    /// The `unshare` child holding the namespace, when not mounted in place.
    holder: Option<Child>,
}

impl SmallDisk {
    /// A tmpfs of `mb` MiB at `dir` (an empty directory); `None` only when
    /// neither way can mount and skipping is allowed.
    pub fn mount(dir: &Path, mb: u32) -> Option<SmallDisk> {
        // The agent refuses directories under ones owned by neither root
        // nor itself: in a namespace an ordinary user makes, `/` and `/tmp`
        // show as owned by nobody. So the namespace is for root without
        // CAP_SYS_ADMIN (a container), not for ordinary users.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip_or_fail("cannot mount a small tmpfs: not root");
            return None;
        }
        let size = format!("size={mb}m");
        let direct = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if direct {
            return Some(SmallDisk { path: dir.to_path_buf(), holder: None });
        }
        let script = format!("mount -t tmpfs -o {size} tmpfs \"$1\" && echo mounted && exec cat");
        let holder = Command::new("unshare")
            .args(["-Urm", "sh", "-c", &script, "sh"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(mut holder) = holder {
            let mut line = String::new();
            let read = holder.stdout.take().map(|o| BufReader::new(o).read_line(&mut line));
            if read.is_some_and(|r| r.is_ok()) && line.trim() == "mounted" {
                let root = PathBuf::from(format!("/proc/{}/root", holder.id()));
                let path = root.join(dir.strip_prefix("/").unwrap_or(dir));
                return Some(SmallDisk { path, holder: Some(holder) });
            }
            let _ = holder.kill();
            let _ = holder.wait();
        }
        skip_or_fail("cannot mount a small tmpfs: neither in place nor in a user namespace");
        None
    }

    /// Where the test reads and writes the tmpfs (the agent uses the
    /// directory given to `mount`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `agent`, started where it sees the tmpfs at the directory given to
    /// `mount`: inside the namespace when there is one.
    pub fn enter(&self, agent: AgentSetup) -> AgentSetup {
        match &self.holder {
            Some(h) => {
                let pid = h.id().to_string();
                let prefix = ["nsenter", "-t", &pid, "-U", "-m", "--preserve-credentials", "--"];
                agent.run_under(&prefix.map(String::from))
            }
            None => agent,
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        match &mut self.holder {
            // The mount goes with the namespace's last process.
            Some(h) => {
                let _ = h.kill();
                let _ = h.wait();
            }
            None => {
                let _ = Command::new("umount").arg("-l").arg(&self.path).status();
            }
        }
    }
}
