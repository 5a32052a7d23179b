//! Attachments in: the job's attachments tarball, unpacked under
//! `<rundir>/attachments/` without ever writing outside it.
//!
//! The archive comes from whoever submitted the job, so every member is
//! checked before anything is written, and the first refusal stops the
//! whole unpacking (the job then fails in setup):
//! - paths must be relative, without `..`, and start with `provision/`,
//!   `firmware_update/` or `test/`;
//! - only regular files, directories, symlinks and hard links are accepted;
//!   device files, fifos, sparse files and unknown types are refused;
//! - a symlink's target must be relative and stay inside `attachments/`:
//!   some `..` first, then names only (`../../provision/img`), never a `..`
//!   after a name, because `a/..` means something else once `a` is a link;
//! - a hard link must name a regular file already unpacked;
//! - nothing is written through a symlink: every parent must be a real
//!   directory, and an existing directory is never replaced;
//! - setuid, setgid, sticky and group/other write bits are dropped;
//! - the total size of the files, the number of members and the size of
//!   long-name and pax records are capped, so a decompression bomb stops
//!   after at most the cap, and memory stays flat (one 64 KiB buffer).
//!
//! Together these keep every link resolving inside `attachments/`: a link
//! sits in a real directory, climbs at most to `attachments/`, then only
//! descends, and whatever links it descends through obey the same rule.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::client::ClientError;
use crate::phase::Phase;
use crate::rundir::RunDir;
use crate::server::Server;

/// Long names, long link names and pax records above this are refused.
const RECORD_MAX: u64 = 64 * 1024;

/// Caps on what one archive may unpack to.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sum of the sizes of all regular files.
    pub bytes: u64,
    /// Members, counting directories, links and extension records.
    pub entries: u64,
}

impl Default for Limits {
    /// 8 GiB (twice the download cap, room for raw disk images) and
    /// 100 000 members.
    fn default() -> Limits {
        Limits { bytes: 8 << 30, entries: 100_000 }
    }
}

#[derive(Debug)]
pub enum UnpackError {
    /// A member the rules above refuse; nothing of it was written.
    Refused { member: String, why: String },
    /// The archive unpacks to more than a limit allows.
    Limit { what: String },
    /// Not a gzip-compressed tar archive, or cut short.
    Corrupt { reason: String },
    /// Writing under `attachments/` failed (disk full...).
    Write { path: PathBuf, reason: io::Error },
}

impl fmt::Display for UnpackError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            UnpackError::Refused { member, why } => write!(f, "attachment {member:?} refused: {why}"),
            UnpackError::Limit { what } => write!(f, "attachments refused: {what}"),
            UnpackError::Corrupt { reason } => write!(f, "attachments archive unreadable: {reason}"),
            UnpackError::Write { path, reason } => write!(f, "cannot write attachment {}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for UnpackError {}

/// What an unpacking wrote.
#[derive(Debug, Default, PartialEq)]
pub struct Unpacked {
    pub files: u64,
    pub bytes: u64,
}

/// Downloads the job's attachments (streaming, to a file in the run dir)
/// and unpacks them under `<rundir>/attachments/`. The error is one line
/// saying why, for the log and the `setup_fail` event.
pub(crate) fn fetch(client: &mut dyn Server, job_id: &str, rundir: &RunDir) -> Result<Unpacked, String> {
    let archive = rundir.attachments_download();
    let got = client.download_attachments(job_id, &archive);
    let result = match got {
        Ok(true) => unpack(&archive, &rundir.attachments(), Limits::default()).map_err(|e| e.to_string()),
        // attachments_status said complete, yet the server has none: the
        // phases will say what they miss, better than refusing the job.
        Ok(false) => {
            log::warn!("job {job_id}: attachments_status is complete but the server has no attachments");
            Ok(Unpacked::default())
        }
        Err(e @ ClientError::TooLarge { .. }) => Err(format!("attachments archive too large: {e}")),
        Err(e) => Err(format!("cannot download attachments: {e}")),
    };
    // The archive has served its purpose; the run dir is not its store.
    let _ = fs::remove_file(&archive);
    result
}

/// Unpacks the tar.gz `archive` into `dest` (created if missing) under the
/// rules of this module. On error, what was unpacked before stays.
pub fn unpack(archive: &Path, dest: &Path, limits: Limits) -> Result<Unpacked, UnpackError> {
    let corrupt = |e: io::Error| UnpackError::Corrupt { reason: e.to_string() };
    let file = crate::safe_fs::open_own(archive).map_err(corrupt)?;
    fs::create_dir_all(dest).map_err(|e| UnpackError::Write { path: dest.to_path_buf(), reason: e })?;
    let gz = flate2::read::GzDecoder::new(io::BufReader::with_capacity(64 * 1024, file));
    let mut ar = tar::Archive::new(gz);
    // Raw entries: long names and pax records come to us with their size,
    // instead of being read whole into memory by the tar crate.
    let entries = ar.entries().map_err(corrupt)?.raw(true);
    let mut u =
        Unpacker { dest, limits, seen: 0, done: Unpacked::default(), long_name: None, long_link: None, pax: None };
    for entry in entries {
        let entry = entry.map_err(corrupt)?;
        u.entry(entry)?;
    }
    Ok(u.done)
}

struct Unpacker<'a> {
    dest: &'a Path,
    limits: Limits,
    seen: u64,
    done: Unpacked,
    /// Extension records that apply to the next real member.
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<PaxPaths>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<R>) -> Result<(), UnpackError> {
        self.seen += 1;
        if self.seen > self.limits.entries {
            return Err(UnpackError::Limit { what: format!("more than {} members", self.limits.entries) });
        }
        let header_name = String::from_utf8_lossy(&entry.header().path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::GNULongName => {
                self.long_name = Some(read_record(&mut entry, &header_name)?);
                return Ok(());
            }
            tar::EntryType::GNULongLink => {
                self.long_link = Some(read_record(&mut entry, &header_name)?);
                return Ok(());
            }
            tar::EntryType::XHeader => {
                let record = read_record(&mut entry, &header_name)?;
                self.pax = Some(parse_pax(&record, &header_name)?);
                return Ok(());
            }
            // Global pax records carry defaults (comments, mtimes) that
            // change nothing we honour.
            tar::EntryType::XGlobalHeader => {
                read_record(&mut entry, &header_name)?;
                return Ok(());
            }
            _ => {}
        }
        let (pax_path, pax_link) = self.pax.take().unwrap_or((None, None));
        let name_bytes = self.long_name.take().or(pax_path).unwrap_or_else(|| entry.header().path_bytes().into_owned());
        let link_bytes =
            self.long_link.take().or(pax_link).or_else(|| entry.header().link_name_bytes().map(|l| l.into_owned()));
        let name = String::from_utf8_lossy(trim_nul(&name_bytes)).into_owned();
        let refuse = |why: &str| UnpackError::Refused { member: name.clone(), why: why.to_string() };

        let rel = member_path(trim_nul(&name_bytes)).map_err(refuse)?;
        let is_top = rel.components().count() == 1;
        let mode = entry.header().mode().unwrap_or(0o644);
        match kind {
            tar::EntryType::Directory => {
                let path = self.make_parents(&rel, &name)?;
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(refuse("a file or link of that name is already unpacked")),
                    Err(_) => fs::create_dir(&path).map_err(|e| self.write_err(&path, e))?,
                }
                // The owner keeps rwx so later members can be written inside.
                let perm = fs::Permissions::from_mode((mode & 0o755) | 0o700);
                fs::set_permissions(&path, perm).map_err(|e| self.write_err(&path, e))?;
            }
            _ if is_top => return Err(refuse("only a directory may be named like a phase folder")),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(|e| UnpackError::Corrupt { reason: e.to_string() })?;
                if self.done.bytes.saturating_add(size) > self.limits.bytes {
                    return Err(UnpackError::Limit {
                        what: format!("{name:?} would take the unpacked size over {} bytes", self.limits.bytes),
                    });
                }
                let path = self.make_parents(&rel, &name)?;
                self.clear(&path, &name)?;
                // New, not through a link, in the directory checked (safe_fs).
                let mut out =
                    crate::safe_fs::create_new(&path, (mode & 0o755) | 0o600).map_err(|e| self.write_err(&path, e))?;
                let copied = copy(&mut entry, &mut out).map_err(|e| match e {
                    CopyError::Read(e) => UnpackError::Corrupt { reason: format!("{name:?}: {e}") },
                    CopyError::Write(e) => self.write_err(&path, e),
                })?;
                if copied != size {
                    return Err(UnpackError::Corrupt { reason: format!("{name:?} is cut short") });
                }
                // create_new applied the umask; the archive's bits, minus
                // the dropped ones, are what the phase expects.
                let perm = fs::Permissions::from_mode((mode & 0o755) | 0o600);
                fs::set_permissions(&path, perm).map_err(|e| self.write_err(&path, e))?;
                self.done.files += 1;
                self.done.bytes += size;
            }
            tar::EntryType::Symlink => {
                let target = link_bytes.ok_or_else(|| refuse("a symlink without a target"))?;
                let target = symlink_target(trim_nul(&target), &rel).map_err(|why| refuse(&why))?;
                let path = self.make_parents(&rel, &name)?;
                self.clear(&path, &name)?;
                std::os::unix::fs::symlink(&target, &path).map_err(|e| self.write_err(&path, e))?;
            }
            tar::EntryType::Link => {
                let target = link_bytes.ok_or_else(|| refuse("a hard link without a target"))?;
                let target_rel =
                    member_path(trim_nul(&target)).map_err(|why| refuse(&format!("hard link target: {why}")))?;
                let source = self
                    .make_parents_checked(&target_rel)
                    .ok_or_else(|| refuse("hard link target is not inside the attachments"))?;
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.is_file() => {}
                    _ => return Err(refuse("hard link target is not a file unpacked before it")),
                }
                let path = self.make_parents(&rel, &name)?;
                if path == source {
                    return Err(refuse("hard link to itself"));
                }
                self.clear(&path, &name)?;
                fs::hard_link(&source, &path).map_err(|e| self.write_err(&path, e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => return Err(refuse("device files are not accepted")),
            tar::EntryType::Fifo => return Err(refuse("fifos are not accepted")),
            tar::EntryType::GNUSparse => return Err(refuse("sparse files are not accepted")),
            other => return Err(refuse(&format!("entry type {:?} is not accepted", other.as_byte() as char))),
        }
        Ok(())
    }

    fn write_err(&self, path: &Path, reason: io::Error) -> UnpackError {
        UnpackError::Write { path: path.to_path_buf(), reason }
    }

    /// Creates the parent directories of `rel` under `dest` as real
    /// directories and returns the member's full path. A parent that is a
    /// symlink or a file is refused: nothing is written through a link.
    fn make_parents(&self, rel: &Path, name: &str) -> Result<PathBuf, UnpackError> {
        let mut dir = self.dest.to_path_buf();
        let parent = rel.parent().unwrap_or(Path::new(""));
        for part in parent.components() {
            dir.push(part);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::Refused {
                        member: name.to_string(),
                        why: "a parent folder is a link or a file".into(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&dir).map_err(|e| self.write_err(&dir, e))?;
                }
                Err(e) => return Err(self.write_err(&dir, e)),
            }
        }
        Ok(self.dest.join(rel))
    }

    /// Like `make_parents` without creating anything: the full path of
    /// `rel` when all its parents are real directories.
    fn make_parents_checked(&self, rel: &Path) -> Option<PathBuf> {
        let mut dir = self.dest.to_path_buf();
        for part in rel.parent()?.components() {
            dir.push(part);
            if !fs::symlink_metadata(&dir).ok()?.is_dir() {
                return None;
            }
        }
        Some(self.dest.join(rel))
    }

    /// Makes room for a non-directory member: a file or link of the same
    /// name goes (later members win, as with tar); a directory is refused,
    /// since what was unpacked under it may be relied on by links.
    fn clear(&self, path: &Path, name: &str) -> Result<(), UnpackError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Err(UnpackError::Refused {
                member: name.to_string(),
                why: "a folder of that name is already unpacked".into(),
            }),
            Ok(_) => fs::remove_file(path).map_err(|e| self.write_err(path, e)),
            Err(_) => Ok(()),
        }
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// Reads an extension record (long name, pax), refusing large ones.
fn read_record<R: Read>(entry: &mut tar::Entry<R>, name: &str) -> Result<Vec<u8>, UnpackError> {
    let size = entry.header().size().map_err(|e| UnpackError::Corrupt { reason: e.to_string() })?;
    if size > RECORD_MAX {
        return Err(UnpackError::Refused {
            member: name.to_string(),
            why: format!("an extension record of {size} bytes (at most {RECORD_MAX})"),
        });
    }
    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    entry.take(RECORD_MAX).read_to_end(&mut buf).map_err(|e| UnpackError::Corrupt { reason: e.to_string() })?;
    Ok(buf)
}

/// A pax record's `path` and `linkpath`, when it sets them.
type PaxPaths = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The `path` and `linkpath` of a pax record. A `size` other than the
/// header's is refused: in raw mode the tar crate frames members by the
/// header's size, and sizes that need pax are beyond the limit anyway.
fn parse_pax(record: &[u8], name: &str) -> Result<PaxPaths, UnpackError> {
    let (mut path, mut link) = (None, None);
    for ext in tar::PaxExtensions::new(record) {
        let ext = ext.map_err(|e| UnpackError::Corrupt { reason: format!("pax record {name:?}: {e}") })?;
        match ext.key_bytes() {
            b"path" => path = Some(ext.value_bytes().to_vec()),
            b"linkpath" => link = Some(ext.value_bytes().to_vec()),
            b"size" | b"GNU.sparse.size" | b"GNU.sparse.map" | b"GNU.sparse.major" => {
                return Err(UnpackError::Refused {
                    member: name.to_string(),
                    why: "pax sizes and sparse maps are not accepted".into(),
                });
            }
            _ => {}
        }
    }
    Ok((path, link))
}

/// The member's path, relative, checked: no absolute path, no `..`, under
/// one of the phase folders. `.` components and repeated slashes go.
fn member_path(raw: &[u8]) -> Result<PathBuf, &'static str> {
    use std::os::unix::ffi::OsStrExt;
    if raw.is_empty() {
        return Err("an empty name");
    }
    if raw[0] == b'/' {
        return Err("an absolute path");
    }
    let mut out = PathBuf::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => continue,
            b".." => return Err("a path with `..`"),
            _ => out.push(std::ffi::OsStr::from_bytes(part)),
        }
    }
    let first = out.components().next().and_then(|c| c.as_os_str().to_str());
    match first {
        None => Err("an empty name"),
        // The folders of the phases that take attachments.
        Some(f) if Phase::parse(f).is_some_and(Phase::takes_attachments) => Ok(out),
        Some(_) => Err("not under provision/, firmware_update/ or test/"),
    }
}

/// Checks a symlink target for the link at `rel` (relative to
/// `attachments/`): relative, leading `..` only, not climbing above
/// `attachments/`. Returns it with `.` and empty components removed.
fn symlink_target(raw: &[u8], rel: &Path) -> Result<PathBuf, String> {
    use std::os::unix::ffi::OsStrExt;
    if raw.is_empty() {
        return Err("a symlink with an empty target".into());
    }
    if raw[0] == b'/' {
        return Err("a symlink to an absolute path".into());
    }
    let depth = rel.parent().map_or(0, |p| p.components().count());
    let (mut ups, mut names) = (0usize, 0usize);
    let mut out = PathBuf::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => continue,
            b".." if names > 0 => return Err("a symlink target with `..` after a name".into()),
            b".." => ups += 1,
            _ => names += 1,
        }
        out.push(std::ffi::OsStr::from_bytes(part));
    }
    if ups > depth {
        return Err("a symlink that leaves the attachments folder".into());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Ok(out)
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// `io::copy` that tells a broken archive from a full disk.
fn copy(from: &mut impl Read, to: &mut File) -> Result<u64, CopyError> {
    use std::io::Write;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_paths() {
        assert_eq!(member_path(b"test/a/b.txt"), Ok(PathBuf::from("test/a/b.txt")));
        assert_eq!(member_path(b"./provision//img"), Ok(PathBuf::from("provision/img")));
        assert!(member_path(b"/etc/passwd").is_err());
        assert!(member_path(b"test/../../x").is_err());
        assert!(member_path(b"other/x").is_err());
        assert!(member_path(b"").is_err());
        assert!(member_path(b"./").is_err());
    }

    #[test]
    fn symlink_targets() {
        let at = |t: &str, link: &str| symlink_target(t.as_bytes(), Path::new(link));
        assert_eq!(at("data.bin", "test/l").unwrap(), PathBuf::from("data.bin"));
        assert_eq!(at("../provision/img", "test/l").unwrap(), PathBuf::from("../provision/img"));
        assert_eq!(at("../../x", "test/sub/l").unwrap(), PathBuf::from("../../x"));
        assert!(at("../../x", "test/l").is_err(), "climbs above attachments/");
        assert!(at("/etc/shadow", "test/l").is_err());
        assert!(at("a/../../..", "test/l").is_err(), "`..` after a name");
        assert!(at("", "test/l").is_err());
    }
}
