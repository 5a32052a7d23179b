//! Files and directories the agent creates, created without following
//! links: the default paths are under `/tmp/testflinger/`, where another
//! local user may plant a link before the agent starts, and a phase's
//! command (running as the agent's user) may plant one in the run dir.
//!
//! - Files are opened with `O_NOFOLLOW`, and `O_EXCL` where they must be
//!   new; a file rewritten in place must be a regular file with one link.
//! - Directories the agent makes are made one component at a time with
//!   their final mode (0700, or 0750 for logs), then opened without
//!   following links and checked: a real directory, owned by this user.
//! - A directory the operator made is used as it is, unless someone else
//!   could plant links in it (owned by another user, or writable by others
//!   without the sticky bit).
//!
//! Every refusal is one line naming the path.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Run dirs, kept results.
pub const PRIVATE_DIR: u32 = 0o700;
/// The agent's log directory: readable by the operator's group.
pub const LOG_DIR: u32 = 0o750;
/// Files in run dirs and kept results.
pub const PRIVATE_FILE: u32 = 0o600;
/// The agent's log file.
pub const LOG_FILE: u32 = 0o640;

fn euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and has no side effects.
    unsafe { libc::geteuid() }
}

/// A refusal: one line, naming the path.
fn refused(path: &Path, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("refusing {}: {why}", path.display()))
}

/// Turns the errors `O_NOFOLLOW`/`O_EXCL` give for a link into a refusal
/// that says so; other errors pass unchanged.
fn explain(path: &Path, e: io::Error) -> io::Error {
    let is_link = || fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match e.raw_os_error() {
        Some(libc::ELOOP) => refused(path, "it is a symbolic link"),
        Some(libc::EEXIST) if is_link() => refused(path, "it is a symbolic link"),
        _ => e,
    }
}

/// Creates `path`, which must not exist yet (not even as a link).
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| explain(path, e))
}

/// Writes `data` to `path`, which must be new.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    create_new(path, mode)?.write_all(data)
}

/// Opens `path` for writing at its end, creating it when missing; a link is
/// refused, and so is anything but a regular file with one name.
pub fn open_append(path: &Path, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| explain(path, e))?;
    check_plain_file(path, &file)?;
    Ok(file)
}

/// Replaces the content of `path` (created when missing) in place.
pub fn rewrite(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    // No O_TRUNC: a hard link to someone's file must be refused before
    // anything of it is lost.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| explain(path, e))?;
    check_plain_file(path, &file)?;
    file.set_len(0)?;
    file.write_all(data)
}

/// A FIFO or device would block or write elsewhere; a second hard link
/// would be written through.
fn check_plain_file(path: &Path, file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refused(path, "not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(refused(path, "it has other hard links"));
    }
    Ok(())
}

/// Makes the directory `path`, which must not exist, with `mode`, and checks
/// what was made (a directory of this user's, not a link put there in a race).
pub fn make_dir(path: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().mode(mode).create(path).map_err(|e| explain(path, e))?;
    check_own_dir(path, Some(mode))
}

/// Opens `path` as a directory without following a link, checks it is this
/// user's, and (when `mode` is given) sets exactly that mode: `mkdir`
/// applies the umask, which may narrow the logs dir's group access.
fn check_own_dir(path: &Path, mode: Option<u32>) -> io::Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused(path, "it is a symbolic link"),
            Some(libc::ENOTDIR) => refused(path, "not a directory"),
            _ => e,
        })?;
    let meta = dir.metadata()?;
    if meta.uid() != euid() {
        return Err(refused(path, &format!("owned by uid {}, not by this agent's user", meta.uid())));
    }
    if let Some(mode) = mode {
        if meta.mode() & 0o7777 != mode {
            dir.set_permissions(fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// Makes sure the base directory `path` (`execution_basedir`,
/// `results_basedir`, `logging_basedir`) exists and is safe to create files
/// in. Missing components are made with `mode` and checked; an existing
/// directory is the operator's and keeps its mode, but is refused when
/// another user could plant links in it.
pub fn ensure_base_dir(path: &Path, mode: u32) -> io::Result<()> {
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut p = Some(path);
    while let Some(dir) = p {
        if dir.as_os_str().is_empty() || fs::symlink_metadata(dir).is_ok() {
            break;
        }
        missing.push(dir.to_path_buf());
        p = dir.parent();
    }
    for dir in missing.iter().rev() {
        match DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => check_own_dir(dir, Some(mode))?,
            // Made meanwhile by someone else: judged like any existing one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    check_existing_base(path)
}

/// An existing base directory: a link is followed only when this user or
/// root made it (the operator's layout); the directory itself must not let
/// other users plant links in it.
fn check_existing_base(path: &Path) -> io::Result<()> {
    let me = euid();
    let link = fs::symlink_metadata(path)?;
    if link.file_type().is_symlink() && link.uid() != me && link.uid() != 0 {
        return Err(refused(path, &format!("a symbolic link owned by uid {}", link.uid())));
    }
    let meta = fs::metadata(path)?;
    if !meta.is_dir() {
        return Err(refused(path, "not a directory"));
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(refused(path, &format!("owned by uid {}, who could plant links in it", meta.uid())));
    }
    if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
        return Err(refused(path, "writable by all users without the sticky bit"));
    }
    Ok(())
}

/// The warning for a secret file (the refresh token) that users other than
/// the agent's may read or change, or `None` when it is private.
pub fn exposed_secret_warning(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    let mode = meta.mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "token file {} is readable or writable by group or others (mode {mode:03o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tf-safefs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn links_are_refused_and_their_targets_untouched() {
        let dir = scratch("links");
        let victim = dir.join("victim");
        fs::write(&victim, "keep").unwrap();
        let link = dir.join("link");
        symlink(&victim, &link).unwrap();
        for result in [
            create_new(&link, PRIVATE_FILE).map(drop),
            open_append(&link, PRIVATE_FILE).map(drop),
            rewrite(&link, b"x", PRIVATE_FILE),
            make_dir(&link, PRIVATE_DIR),
        ] {
            let e = result.expect_err("a link must be refused");
            assert_eq!(e.to_string(), format!("refusing {}: it is a symbolic link", link.display()));
        }
        let hard = dir.join("hard");
        fs::hard_link(&victim, &hard).unwrap();
        assert!(rewrite(&hard, b"x", PRIVATE_FILE).unwrap_err().to_string().contains("hard links"));
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn made_dirs_and_files_get_their_modes_whatever_the_umask() {
        let dir = scratch("modes");
        let base = dir.join("a/b/logs");
        ensure_base_dir(&base, LOG_DIR).unwrap();
        for d in [dir.join("a"), dir.join("a/b"), base.clone()] {
            assert_eq!(fs::metadata(&d).unwrap().mode() & 0o7777, LOG_DIR, "{}", d.display());
        }
        make_dir(&base.join("run"), PRIVATE_DIR).unwrap();
        assert_eq!(fs::metadata(base.join("run")).unwrap().mode() & 0o7777, PRIVATE_DIR);
        write_new(&base.join("f"), b"x", PRIVATE_FILE).unwrap();
        assert_eq!(fs::metadata(base.join("f")).unwrap().mode() & 0o777, PRIVATE_FILE);
        assert!(write_new(&base.join("f"), b"x", PRIVATE_FILE).is_err(), "must be new");
        // A world-writable directory without the sticky bit is refused.
        let open = dir.join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(ensure_base_dir(&open, PRIVATE_DIR).unwrap_err().to_string().contains("sticky"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exposed_token_file_is_named_with_the_fix() {
        let dir = scratch("token");
        let token = dir.join("token");
        fs::write(&token, "{}").unwrap();
        fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposed_secret_warning(&token), None);
        fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
        let w = exposed_secret_warning(&token).expect("warning");
        assert!(w.contains(&token.display().to_string()) && w.contains("chmod 600"), "{w}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
