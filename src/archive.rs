//! Artifacts out: the run dir's `artifacts/` folder as a tar.gz, streamed to
//! a file in constant memory.
//!
//! The gzip stream is written by [`AdaptiveGz`]: blocks that look
//! incompressible (compressed logs, images, core dumps) are stored, the rest
//! deflated. A test phase's artifacts are often half already-compressed
//! data, and deflating that spends most of the packing time for nothing.

use std::ffi::CStr;
use std::fs::{self, File, Metadata};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

use crate::outbound::JobSecrets;
use crate::safe_fs;
use pax::PaxWriter;

mod pax;

/// Deflate level for compressible data. Measured on 256 MiB of logs
/// (bench/archive.sh): miniz_oxide level 5 is about twice as fast as
/// level 6 for 7% more bytes on text, and level 6 is no faster than
/// Python's zlib level 9; see docs/measured.md for the figures.
const TEXT_LEVEL: u32 = 5;
/// Input is classified and compressed in blocks of this size.
const BLOCK: usize = 256 * 1024;
/// Bytes of each block whose byte entropy is measured.
const SAMPLE: usize = 32 * 1024;
/// Bits per byte above which a sample counts as incompressible: random
/// and compressed data measure 7.98-8.0 on 32 KiB, text 4-6, executables
/// and raw disk images 5-7.
const INCOMPRESSIBLE_ENTROPY: f64 = 7.9;

#[derive(Debug)]
pub(crate) struct ArchiveError {
    pub path: PathBuf,
    pub reason: io::Error,
}

impl std::fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for ArchiveError {}

/// True when `dir` exists and holds at least one entry.
pub(crate) fn has_content(dir: &Path) -> bool {
    fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false)
}

/// Packs `src` (the artifacts folder) into `dest` as tar.gz, members under
/// `artifacts/`, in the PAX format Python's `tarfile` writes. Symlinks are
/// stored as links and never followed; a file's second name is a hard link
/// to its first; fifos are kept; device nodes and sockets are logged and
/// skipped; modes are kept; files that cannot be read are logged and
/// skipped. Only an error
/// writing `dest` (disk full) fails the whole archive. With `mask`
/// (`mask_artifacts: true`), text files are packed with the job's secrets
/// masked. `dest` is created new, never through a link.
pub(crate) fn pack_artifacts(src: &Path, dest: &Path, mask: Option<&JobSecrets>) -> Result<u64, ArchiveError> {
    let werr = |e: io::Error| ArchiveError { path: dest.to_path_buf(), reason: e };
    let started = Instant::now();
    // A leftover of an earlier attempt; remove_file never follows a link.
    let _ = fs::remove_file(dest);
    let out = safe_fs::create_new(dest, safe_fs::PRIVATE_FILE).map_err(werr)?;
    let gz = AdaptiveGz::new(BufWriter::with_capacity(128 * 1024, out)).map_err(werr)?;
    let mut tar = PaxWriter::new(gz);
    let mask = mask.filter(|m| !m.is_empty());
    let mut packing = Packing::default();
    add_dir(&mut tar, src, Path::new("artifacts"), mask, &mut packing).map_err(werr)?;
    let mut gz = tar.finish().map_err(werr)?;
    // The last, partial block is counted once it is compressed.
    gz.flush_block().map_err(werr)?;
    let (stored, deflated) = (gz.stored_bytes, gz.deflated_bytes);
    let mut buf = gz.finish().map_err(werr)?;
    buf.flush().map_err(werr)?;
    let file = buf.into_inner().map_err(|e| werr(e.into_error()))?;
    // The archive must be whole on disk before it counts as packed: a
    // crash between here and the upload resends it from results_basedir.
    file.sync_all().map_err(werr)?;
    let size = file.metadata().map_err(werr)?.len();
    log::info!(
        "artifacts packed: {} files, {} bytes from {} in {:.2}s ({} deflated, {} stored)",
        packing.files,
        size,
        deflated + stored,
        started.elapsed().as_secs_f64(),
        deflated,
        stored
    );
    Ok(size)
}

/// A gzip writer that stores incompressible blocks and deflates the rest.
///
/// A deflate stream is a sequence of blocks; after a sync flush the output
/// ends on a byte boundary, and a freshly reset compressor can continue the
/// stream with blocks that refer to nothing before them. So the stream
/// switches between two compressors, resetting the one switched to. The
/// result is one ordinary gzip member any gunzip reads. Memory: two
/// compressors (about 300 KiB each in miniz_oxide) and two buffers.
pub(crate) struct AdaptiveGz<W: Write> {
    out: W,
    /// Level [`TEXT_LEVEL`] and level 0 (stored blocks).
    deflate: Compress,
    store: Compress,
    /// Which compressor produced the last output; `None` before any.
    current: Option<bool>,
    block: Vec<u8>,
    scratch: Vec<u8>,
    crc: Crc,
    pub stored_bytes: u64,
    pub deflated_bytes: u64,
}

impl<W: Write> AdaptiveGz<W> {
    pub(crate) fn new(mut out: W) -> io::Result<AdaptiveGz<W>> {
        // Magic, deflate, no flags, no mtime, no extra flags, OS = Unix.
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])?;
        Ok(AdaptiveGz {
            out,
            deflate: Compress::new(Compression::new(TEXT_LEVEL), false),
            store: Compress::new(Compression::none(), false),
            current: None,
            block: Vec::with_capacity(BLOCK),
            scratch: vec![0; 64 * 1024],
            crc: Crc::new(),
            stored_bytes: 0,
            deflated_bytes: 0,
        })
    }

    /// Compresses the buffered block with the compressor it calls for.
    fn flush_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let store = looks_incompressible(&self.block[..self.block.len().min(SAMPLE)]);
        if self.current != Some(store) {
            if let Some(was) = self.current {
                self.run(was, None, FlushCompress::Sync)?;
            }
            if store {
                self.store.reset()
            } else {
                self.deflate.reset()
            }
            self.current = Some(store);
        }
        let block = std::mem::take(&mut self.block);
        self.crc.update(&block);
        if store {
            self.stored_bytes += block.len() as u64;
        } else {
            self.deflated_bytes += block.len() as u64;
        }
        let result = self.run(store, Some(&block), FlushCompress::None);
        self.block = block;
        self.block.clear();
        result
    }

    /// Feeds `input` (or nothing) to one compressor and writes what comes out.
    fn run(&mut self, store: bool, input: Option<&[u8]>, flush: FlushCompress) -> io::Result<()> {
        let input = input.unwrap_or(&[]);
        let c = if store { &mut self.store } else { &mut self.deflate };
        let mut pos = 0;
        loop {
            let (in0, out0) = (c.total_in(), c.total_out());
            let status = c.compress(&input[pos..], &mut self.scratch, flush).map_err(io::Error::other)?;
            // What one call took and gave: at most the input and the scratch buffer.
            pos += usize::try_from(c.total_in() - in0).map_err(io::Error::other)?;
            let produced = usize::try_from(c.total_out() - out0).map_err(io::Error::other)?;
            self.out.write_all(&self.scratch[..produced])?;
            let done = match flush {
                FlushCompress::Finish => status == Status::StreamEnd,
                // More may be pending while the output buffer came back full.
                _ => pos == input.len() && produced < self.scratch.len(),
            };
            if done {
                return Ok(());
            }
            if produced == 0 && pos == input.len() && status == Status::BufError {
                return Ok(());
            }
        }
    }

    /// Ends the stream (last block, CRC, length) and returns the writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.flush_block()?;
        let last = self.current.unwrap_or(false);
        if self.current.is_none() {
            self.deflate.reset();
        }
        self.run(last, None, FlushCompress::Finish)?;
        self.out.write_all(&self.crc.sum().to_le_bytes())?;
        self.out.write_all(&self.crc.amount().to_le_bytes())?;
        Ok(self.out)
    }
}

impl<W: Write> Write for AdaptiveGz<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == BLOCK {
            self.flush_block()?;
        }
        Ok(n)
    }

    /// Buffered data stays buffered: flushing mid-stream would cost a sync
    /// block per call, and nothing reads the archive before `finish`.
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// True when the sample's byte entropy says deflate would not shrink it.
fn looks_incompressible(sample: &[u8]) -> bool {
    if sample.len() < 4096 {
        return false;
    }
    let mut counts = [0u32; 256];
    for &b in sample {
        counts[b as usize] += 1;
    }
    let n = sample.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    entropy > INCOMPRESSIBLE_ENTROPY
}

/// What packing has seen so far: the members packed, the owner names
/// looked up (once per id), and the files with more links still to come.
#[derive(Default)]
struct Packing {
    files: u64,
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
fn add_dir<W: Write>(
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

#[cfg(test)]
mod tests;
