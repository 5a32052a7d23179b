//! Artifacts out: the run dir's `artifacts/` folder as a tar.gz, streamed to
//! a file in constant memory.
//!
//! The gzip stream is written by [`AdaptiveGz`]: blocks that look
//! incompressible (compressed logs, images, core dumps) are stored, the rest
//! deflated. A test phase's artifacts are often half already-compressed
//! data, and deflating that spends most of the packing time for nothing.
//!
//! Here: the packing of one folder into one file. The walk that makes
//! the members is `walk.rs`, the gzip stream `gzip.rs`, the tar headers
//! `pax.rs`.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::outbound::JobSecrets;
use crate::safe_fs;
use gzip::AdaptiveGz;
use pax::PaxWriter;
use walk::{Packing, add_dir};

mod gzip;
mod pax;
mod walk;

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

#[cfg(test)]
mod tests;
