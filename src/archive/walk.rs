//! The walk of the artifacts folder: each entry as a tar member (links
//! kept as links, a file's second name as a hard link, names and text
//! masked when asked), with its owner's names as `tarfile` records them.

use std::ffi::CStr;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::pax::{self, PaxWriter};
use crate::outbound::JobSecrets;

/// What packing has seen so far: the members packed, the owner names
/// looked up (once per id), and the files with more links still to come.
#[derive(Default)]
pub(super) struct Packing {
    pub(super) files: u64,
    users: Vec<(u32, String)>,
    groups: Vec<(u32, String)>,
    links: HardLinks,
}

impl Packing {
    /// A member for `meta` as Python's `tarfile` (upstream's packer) makes
    /// it: the permission bits (`0o755`, not `0o40755`), the owner's user
    /// and group names, the time to the nanosecond.
    fn member<'a>(
        &'a mut self,
        name: &'a [u8],
        kind: u8,
        meta: &Metadata,
        size: u64,
        link: &'a [u8],
    ) -> pax::Member<'a> {
        let (uid, gid) = (meta.uid(), meta.gid());
        if !self.users.iter().any(|(id, _)| *id == uid) {
            self.users.push((uid, user_name(uid)));
        }
        if !self.groups.iter().any(|(id, _)| *id == gid) {
            self.groups.push((gid, group_name(gid)));
        }
        pax::Member {
            name,
            kind,
            mode: meta.mode(),
            uid: u64::from(uid),
            gid: u64::from(gid),
            size,
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            link,
            uname: self.users.iter().find(|(id, _)| *id == uid).map_or("", |(_, n)| n.as_str()),
            gname: self.groups.iter().find(|(id, _)| *id == gid).map_or("", |(_, n)| n.as_str()),
        }
    }
}

/// Bytes kept for hard links still to come (names, plus a rough cost per
/// entry): a folder of many multiply-linked files (copied with `cp -al`,
/// whose other names are outside) costs about this much memory at most;
/// past it, further ones are packed as copies.
const HARD_LINK_MEMORY: usize = 1 << 20;
const HARD_LINK_ENTRY: usize = 64;

/// Files packed whose other links may come later (`st_nlink` > 1), by
/// device and inode: the member name the later ones link to, and how many
/// links are left (the entry goes when none is, as GNU tar does).
#[derive(Default)]
struct HardLinks {
    seen: std::collections::HashMap<(u64, u64), (Vec<u8>, u64)>,
    bytes: usize,
}

impl HardLinks {
    /// The member an earlier link of this file was packed as, if any.
    fn earlier(&mut self, meta: &Metadata) -> Option<Vec<u8>> {
        let key = (meta.dev(), meta.ino());
        let (name, left) = self.seen.get_mut(&key)?;
        let name = name.clone();
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.seen.remove(&key);
            self.bytes -= name.len() + HARD_LINK_ENTRY;
        }
        Some(name)
    }

    fn packed(&mut self, meta: &Metadata, name: &[u8]) {
        let cost = name.len() + HARD_LINK_ENTRY;
        if meta.nlink() > 1 && self.bytes + cost <= HARD_LINK_MEMORY {
            self.bytes += cost;
            self.seen.insert((meta.dev(), meta.ino()), (name.to_vec(), meta.nlink() - 1));
        }
    }
}

/// The name of user `uid`, or "" when it has none (as `tarfile` leaves it).
fn user_name(uid: u32) -> String {
    lookup_name(|buf| {
        // SAFETY: a zeroed passwd is a valid out-parameter; buf outlives
        // the call.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
        (rc, if found.is_null() { std::ptr::null() } else { pwd.pw_name })
    })
}

/// The name of group `gid`, or "".
fn group_name(gid: u32) -> String {
    lookup_name(|buf| {
        // SAFETY: as in user_name.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
        (rc, if found.is_null() { std::ptr::null() } else { grp.gr_name })
    })
}

/// Runs a `get*_r` lookup that writes into `buf`, growing the buffer while
/// it is too small; the name found, or "".
fn lookup_name(mut lookup: impl FnMut(&mut [u8]) -> (libc::c_int, *const libc::c_char)) -> String {
    let mut buf = vec![0u8; 1024];
    loop {
        let (rc, name) = lookup(&mut buf);
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || name.is_null() {
            return String::new();
        }
        // SAFETY: the name points into buf, NUL-terminated by the lookup,
        // and buf is not touched until it is copied out.
        return unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
    }
}

/// Adds `dir` and everything under it. Errors reading the source are logged
/// and skipped; errors writing the archive are returned.
pub(super) fn add_dir<W: Write>(
    tar: &mut PaxWriter<W>,
    dir: &Path,
    name: &Path,
    mask: Option<&JobSecrets>,
    packing: &mut Packing,
) -> io::Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) => {
            log::warn!("artifacts: skipping {}: {e}", dir.display());
            return Ok(());
        }
    };
    // `artifacts` itself a link (`ln -s /etc artifacts`): stored as the
    // link, as tarfile stores it, never followed into what it points at.
    if meta.file_type().is_symlink() {
        let target = fs::read_link(dir).map(|t| masked_name(t.as_os_str(), mask)).unwrap_or_default();
        tar.append(
            &packing.member(name.as_os_str().as_bytes(), pax::SYMLINK, &meta, 0, target.as_bytes()),
            &mut io::empty(),
        )?;
        packing.files += 1;
        return Ok(());
    }
    let mut dir_name = name.as_os_str().as_bytes().to_vec();
    dir_name.push(b'/');
    tar.append(&packing.member(&dir_name, pax::DIRECTORY, &meta, 0, b""), &mut io::empty())?;
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(d) => d.filter_map(Result::ok).collect(),
        Err(e) => {
            log::warn!("artifacts: cannot list {}: {e}", dir.display());
            return Ok(());
        }
    };
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let member = name.join(masked_name(&entry.file_name(), mask));
        let member_bytes = member.as_os_str().as_bytes();
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("artifacts: skipping {}: {e}", path.display());
                continue;
            }
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            add_dir(tar, &path, &member, mask, packing)?;
        } else if ft.is_symlink() {
            let target = match fs::read_link(&path) {
                Ok(t) => t,
                Err(e) => {
                    log::warn!("artifacts: skipping link {}: {e}", path.display());
                    continue;
                }
            };
            let target = masked_name(target.as_os_str(), mask);
            tar.append(&packing.member(member_bytes, pax::SYMLINK, &meta, 0, target.as_bytes()), &mut io::empty())?;
            packing.files += 1;
        } else if ft.is_file() {
            // A second name of a file already packed is a link to it, as
            // tarfile stores it: the content once.
            if let Some(first) = packing.links.earlier(&meta) {
                tar.append(&packing.member(member_bytes, pax::HARD_LINK, &meta, 0, &first), &mut io::empty())?;
                packing.files += 1;
                continue;
            }
            let mut f = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    log::warn!("artifacts: skipping unreadable {}: {e}", path.display());
                    continue;
                }
            };
            if let Some(secrets) = mask {
                match masked_size(&mut f, secrets) {
                    Ok(Some(len)) => {
                        // The header's size is the masked content's.
                        let mut exact = secrets.reader(&mut f).chain(io::repeat(0)).take(len);
                        tar.append(&packing.member(member_bytes, pax::REGULAR, &meta, len, b""), &mut exact)?;
                        packing.links.packed(&meta, member_bytes);
                        packing.files += 1;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        log::warn!("artifacts: skipping unreadable {}: {e}", path.display());
                        continue;
                    }
                }
            }
            // Exactly the header's size is copied; a file that shrinks
            // meanwhile would corrupt the archive, so pad/trim.
            let mut exact = (&mut f).chain(io::repeat(0)).take(meta.len());
            tar.append(&packing.member(member_bytes, pax::REGULAR, &meta, meta.len(), b""), &mut exact)?;
            packing.links.packed(&meta, member_bytes);
            packing.files += 1;
        } else if ft.is_fifo() {
            // Kept, as tarfile keeps it: only its name and mode.
            tar.append(&packing.member(member_bytes, pax::FIFO, &meta, 0, b""), &mut io::empty())?;
            packing.files += 1;
        } else if ft.is_socket() {
            log::warn!("artifacts: skipping {} (a socket: a tar archive cannot hold one)", path.display());
        } else {
            // tarfile would store it, and whoever unpacks the archive as
            // root would get a live device node a test left behind.
            log::warn!("artifacts: skipping {} (a device node: not packed, by design)", path.display());
        }
    }
    Ok(())
}

/// A member's name (or a link's target) with the secrets masked, when
/// masking; names are job text too.
fn masked_name(name: &std::ffi::OsStr, mask: Option<&JobSecrets>) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    match mask {
        Some(secrets) => std::ffi::OsString::from_vec(secrets.bytes(name.as_bytes())),
        None => name.to_os_string(),
    }
}

/// Bytes of text that are looked at to tell text from binary.
const TEXT_SNIFF: u64 = 8192;

/// For a text file (no NUL byte in its first 8 KiB, as grep and git
/// decide), its size once masked, with `f` rewound; `None` for a binary
/// file, which is packed as it is.
fn masked_size(f: &mut File, secrets: &JobSecrets) -> io::Result<Option<u64>> {
    let mut head = Vec::new();
    (&mut *f).take(TEXT_SNIFF).read_to_end(&mut head)?;
    f.rewind()?;
    if head.contains(&0) {
        return Ok(None);
    }
    let len = secrets.masked_len(&mut *f)?;
    f.rewind()?;
    Ok(Some(len))
}
