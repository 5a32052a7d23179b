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
//! - A directory the operator made is used as it is, unless another user
//!   could alter it or the path to it: it and every directory above it
//!   must be owned by root or this user, and not writable by group or
//!   others without the sticky bit (sshd's StrictModes rule); a link on
//!   the way must be root's or this user's.
//! - Files the agent writes to or reads back from a run dir must be this
//!   user's own, so a directory swapped in by someone else is noticed.
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

/// Opens the file `path` through its directory, opened first and checked
/// (not alterable by another user, see `alterable_by_others`): the file is
/// found or made in the directory judged, whatever happens to the path
/// meanwhile (a run dir swapped for someone else's). Links on the way to
/// the directory are followed (base dirs may be the operator's links; their
/// path is checked at start); the file itself is never opened through one.
fn open_in_dir(path: &Path, flags: libc::c_int, mode: u32) -> io::Result<File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else {
        return Err(refused(path, "not a file name"));
    };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let dir = OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(parent)?;
    if let Some(why) = alterable_by_others(&dir.metadata()?) {
        return Err(refused(parent, &format!("{why}; it holds {}", path.display())));
    }
    let name = std::ffi::CString::new(name.as_bytes()).map_err(|_| refused(path, "holds a NUL byte"))?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: openat(2) on a directory descriptor we hold and a
    // NUL-terminated name; a descriptor it returns is ours alone.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(explain(path, io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor owned by no one else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Creates `path`, which must not exist yet (not even as a link).
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    open_in_dir(path, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, mode)
}

/// Writes `data` to `path`, which must be new.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    create_new(path, mode)?.write_all(data)
}

/// Opens `path` for writing at its end, creating it when missing; a link is
/// refused, and so is anything but a regular file of this user's with one name.
pub fn open_append(path: &Path, mode: u32) -> io::Result<File> {
    let file = open_in_dir(path, libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NONBLOCK, mode)?;
    check_plain_file(path, &file)?;
    Ok(file)
}

/// Opens `path` for writing from its start (created when missing, emptied
/// when there), under the same rules as `open_append`.
pub fn create_truncate(path: &Path, mode: u32) -> io::Result<File> {
    // No O_TRUNC: a hard link to someone's file must be refused before
    // anything of it is lost.
    let file = open_in_dir(path, libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK, mode)?;
    check_plain_file(path, &file)?;
    file.set_len(0)?;
    Ok(file)
}

/// Replaces the content of `path` (created when missing) in place.
pub fn rewrite(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    create_truncate(path, mode)?.write_all(data)
}

/// Opens `path` for reading: a regular file of this user's, not a link.
/// What a run dir holds is read back only when the agent or its job wrote it.
pub fn open_own(path: &Path) -> io::Result<File> {
    let file = open_in_dir(path, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refused(path, "not a regular file"));
    }
    check_owner(path, &meta)?;
    Ok(file)
}

/// The text of `path`, opened as `open_own` does.
pub fn read_own(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    io::Read::read_to_string(&mut open_own(path)?, &mut text)?;
    Ok(text)
}

/// A FIFO or device would block or write elsewhere; a second hard link
/// would be written through; another user's file is not the agent's to write.
fn check_plain_file(path: &Path, file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refused(path, "not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(refused(path, "it has other hard links"));
    }
    check_owner(path, &meta)
}

fn check_owner(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let me = euid();
    if meta.uid() != me {
        return Err(refused(path, &format!("owned by uid {}, not by this agent's user (uid {me})", meta.uid())));
    }
    Ok(())
}

/// Opens the directory `path` (a run dir) without following a link, for
/// working relative to it: a phase's command starts in the directory opened
/// here even if the path is swapped meanwhile. Refused when another user
/// could alter it (see `alterable_by_others`).
pub fn open_dir(path: &Path) -> io::Result<File> {
    let dir = open_dir_nofollow(path)?;
    let meta = dir.metadata()?;
    if let Some(why) = alterable_by_others(&meta) {
        return Err(refused(path, &why));
    }
    Ok(dir)
}

/// Opens the directory `path` itself, never what a link there points to.
fn open_dir_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused(path, "it is a symbolic link"),
            Some(libc::ENOTDIR) => refused(path, "not a directory"),
            _ => e,
        })
}

/// Makes the directory `path`, which must not exist, with `mode`, and checks
/// what was made (a directory of this user's, not a link put there in a race).
pub fn make_dir(path: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().mode(mode).create(path).map_err(|e| explain(path, e))?;
    check_own_dir(path, Some(mode))
}

/// Refused unless `path` is a directory of this user's (not a link): one the
/// agent made, before it removes or moves it with all it holds.
pub fn check_own(path: &Path) -> io::Result<()> {
    check_own_dir(path, None)
}

/// Opens `path` as a directory without following a link, checks it is this
/// user's, and (when `mode` is given) sets exactly that mode: `mkdir`
/// applies the umask, which may narrow the logs dir's group access.
fn check_own_dir(path: &Path, mode: Option<u32>) -> io::Result<()> {
    let dir = open_dir_nofollow(path)?;
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
/// directory is the operator's and keeps its mode. Refused when another
/// user could alter the path (see `check_path`), before anything is made.
pub fn ensure_base_dir(path: &Path, mode: u32) -> io::Result<()> {
    check_path(path)?;
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
    if !fs::metadata(path)?.is_dir() {
        return Err(refused(path, "not a directory"));
    }
    check_path(path)
}

/// Why another user could alter the directory (or link) `meta` describes,
/// or `None`: it must be owned by root or this user, and a directory must
/// not be writable by group or others unless it has the sticky bit (then
/// they may add entries but not rename or remove this user's).
fn alterable_by_others(meta: &fs::Metadata) -> Option<String> {
    let (me, uid, mode) = (euid(), meta.uid(), meta.mode() & 0o7777);
    if uid != me && uid != 0 {
        return Some(format!("owned by uid {uid} (mode {mode:04o}), neither root nor this agent's user (uid {me})"));
    }
    if meta.is_dir() && mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Some(format!("mode {mode:04o} (owner uid {uid}): writable by group or others without the sticky bit"));
    }
    None
}

/// Refuses `path` when a user other than root and this one could alter it
/// or swap it for something of theirs, as sshd's StrictModes does: `path`
/// and every directory above it, both as written (each link on the way is
/// judged by its owner) and as the links lead. Components that do not
/// exist yet are not judged (the agent makes them).
pub fn check_path(path: &Path) -> io::Result<()> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let judge = |at: &Path, meta: &fs::Metadata| match alterable_by_others(meta) {
        None => Ok(()),
        Some(why) if at == abs => Err(refused(path, &why)),
        Some(why) => Err(refused(at, &format!("{why}; it leads to {}", path.display()))),
    };
    let mut deepest = None;
    let prefixes: Vec<&Path> = abs.ancestors().collect();
    for at in prefixes.into_iter().rev() {
        let Ok(meta) = fs::symlink_metadata(at) else { break };
        judge(at, &meta)?;
        deepest = Some(at);
    }
    let Some(deepest) = deepest else { return Ok(()) };
    // Where the links lead: every real directory on the way.
    let real = fs::canonicalize(deepest)?;
    for at in real.ancestors() {
        judge(at, &fs::metadata(at)?)?;
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

    /// A uid that is neither root nor this process's (tests run as root
    /// here; as another user, chown to someone else is not allowed).
    const OTHER: u32 = 65534;

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
    }

    #[test]
    fn a_base_dir_whose_parents_another_user_can_alter_is_refused() {
        if euid() != 0 {
            return; // chown to another uid needs root
        }
        let dir = scratch("parents");
        // Sticky and world-writable, like /tmp: fine.
        let sticky = dir.join("sticky");
        fs::create_dir(&sticky).unwrap();
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_base_dir(&sticky.join("tf/run"), PRIVATE_DIR).unwrap();
        // Owned by another user, or writable by others without the sticky bit.
        let theirs = dir.join("theirs");
        fs::create_dir(&theirs).unwrap();
        chown(&theirs, OTHER);
        let open = dir.join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let group = dir.join("group");
        fs::create_dir(&group).unwrap();
        fs::set_permissions(&group, fs::Permissions::from_mode(0o775)).unwrap();
        for (parent, fault) in
            [(&theirs, "owned by uid 65534 (mode 0755)"), (&open, "mode 0777"), (&group, "mode 0775")]
        {
            for base in [parent.join("run"), parent.join("a/b/run")] {
                let e = ensure_base_dir(&base, PRIVATE_DIR).expect_err("refused");
                let e = e.to_string();
                assert!(e.starts_with(&format!("refusing {}: {fault}", parent.display())), "{e}");
                assert!(e.ends_with(&format!("it leads to {}", base.display())), "{e}");
                assert!(
                    !parent.join("run").exists() && !parent.join("a").exists(),
                    "nothing made under {}",
                    parent.display()
                );
            }
        }
        // The same, reached through a link of ours: judged where it leads.
        let via = dir.join("via");
        symlink(&open, &via).unwrap();
        assert!(ensure_base_dir(&via.join("run"), PRIVATE_DIR).unwrap_err().to_string().contains("mode 0777"));
        // A link of someone else's on the way is refused even to a safe place.
        let their_link = dir.join("their-link");
        symlink(&sticky, &their_link).unwrap();
        chown(&their_link, OTHER);
        let e = ensure_base_dir(&their_link.join("tf/run"), PRIVATE_DIR).unwrap_err().to_string();
        assert!(e.starts_with(&format!("refusing {}: owned by uid 65534", their_link.display())), "{e}");
        // The base dir itself.
        let base = dir.join("base");
        fs::create_dir(&base).unwrap();
        chown(&base, OTHER);
        let e = ensure_base_dir(&base, PRIVATE_DIR).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "refusing {}: owned by uid 65534 (mode 0755), neither root nor this agent's user (uid 0)",
                base.display()
            )
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_of_another_user_are_neither_written_nor_read_back() {
        if euid() != 0 {
            return; // chown to another uid needs root
        }
        let dir = scratch("owner");
        let log = dir.join("test.log");
        fs::write(&log, "theirs\n").unwrap();
        fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).unwrap();
        chown(&log, OTHER);
        for e in [
            open_append(&log, PRIVATE_FILE).map(drop).unwrap_err(),
            create_truncate(&log, PRIVATE_FILE).map(drop).unwrap_err(),
            read_own(&log).map(drop).unwrap_err(),
        ] {
            assert_eq!(
                e.to_string(),
                format!("refusing {}: owned by uid 65534, not by this agent's user (uid 0)", log.display())
            );
        }
        assert_eq!(fs::read_to_string(&log).unwrap(), "theirs\n");
        chown(&log, 0);
        assert_eq!(read_own(&log).unwrap(), "theirs\n");
        open_append(&log, PRIVATE_FILE).unwrap().write_all(b"ours\n").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "theirs\nours\n");
        // A directory of theirs is not a phase's working directory.
        let run = dir.join("run");
        fs::create_dir(&run).unwrap();
        open_dir(&run).unwrap();
        chown(&run, OTHER);
        assert!(open_dir(&run).unwrap_err().to_string().contains("owned by uid 65534"));
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
