//! Artifacts out: the run dir's `artifacts/` folder as a tar.gz, streamed to
//! a file in constant memory.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

#[derive(Debug)]
pub struct ArchiveError {
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
pub fn has_content(dir: &Path) -> bool {
    fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false)
}

/// Packs `src` (the artifacts folder) into `dest` as tar.gz, members under
/// `artifacts/`. Symlinks are stored as links and never followed; modes are
/// kept; files that cannot be read are logged and skipped. Only an error
/// writing `dest` (disk full) fails the whole archive.
pub fn pack_artifacts(src: &Path, dest: &Path) -> Result<u64, ArchiveError> {
    let werr = |e: io::Error| ArchiveError { path: dest.to_path_buf(), reason: e };
    let out = File::create(dest).map_err(werr)?;
    let gz = GzEncoder::new(BufWriter::with_capacity(128 * 1024, out), Compression::new(6));
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    add_dir(&mut tar, src, Path::new("artifacts")).map_err(werr)?;
    let gz = tar.into_inner().map_err(werr)?;
    let mut buf = gz.finish().map_err(werr)?;
    buf.flush().map_err(werr)?;
    let file = buf.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)?;
    Ok(file.metadata().map_err(werr)?.len())
}

/// Adds `dir` and everything under it. Errors reading the source are logged
/// and skipped; errors writing the archive are returned.
fn add_dir<W: Write>(tar: &mut tar::Builder<W>, dir: &Path, name: &Path) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    match fs::symlink_metadata(dir) {
        Ok(meta) => header.set_metadata(&meta),
        Err(e) => {
            log::warn!("artifacts: skipping {}: {e}", dir.display());
            return Ok(());
        }
    }
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    tar.append_data(&mut header, name, io::empty())?;
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
        let member = name.join(entry.file_name());
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("artifacts: skipping {}: {e}", path.display());
                continue;
            }
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            add_dir(tar, &path, &member)?;
        } else if ft.is_symlink() {
            let target = match fs::read_link(&path) {
                Ok(t) => t,
                Err(e) => {
                    log::warn!("artifacts: skipping link {}: {e}", path.display());
                    continue;
                }
            };
            let mut h = tar::Header::new_gnu();
            h.set_metadata(&meta);
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            tar.append_link(&mut h, &member, &target)?;
        } else if ft.is_file() {
            let mut f = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    log::warn!("artifacts: skipping unreadable {}: {e}", path.display());
                    continue;
                }
            };
            let mut h = tar::Header::new_gnu();
            h.set_metadata(&meta);
            // append_data copies exactly the header's size; a file that
            // shrinks meanwhile would corrupt the archive, so pad/trim.
            let mut exact = (&mut f).chain(io::repeat(0)).take(meta.len());
            tar.append_data(&mut h, &member, &mut exact)?;
        } else {
            log::warn!("artifacts: skipping {} (not a file, directory or link)", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn packs_under_artifacts_keeps_links_and_modes() {
        let base = std::env::temp_dir().join(format!("tf-arch-{}", std::process::id()));
        let src = base.join("artifacts");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/a.txt"), b"hello").unwrap();
        fs::write(src.join("run.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("/etc/passwd", src.join("leak")).unwrap();
        let dest = base.join("a.tar.gz");
        pack_artifacts(&src, &dest).unwrap();

        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(File::open(&dest).unwrap()));
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            seen.push((p, e.header().entry_type(), e.header().mode().unwrap() & 0o777, body));
        }
        let find = |n: &str| seen.iter().find(|s| s.0.trim_end_matches('/') == n).unwrap_or_else(|| panic!("{n} in {seen:?}"));
        assert_eq!(find("artifacts/sub/a.txt").3, b"hello");
        assert_eq!(find("artifacts/run.sh").2, 0o755);
        let leak = find("artifacts/leak");
        assert!(leak.1.is_symlink());
        assert!(leak.3.is_empty());
        fs::remove_dir_all(&base).unwrap();
    }
}
