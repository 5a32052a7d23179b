//! Files that readers (and a restarted agent) see whole or not at all.

use std::fs;
use std::io;
use std::path::Path;

use crate::safe_fs;

/// Writes beside `path` under a hidden temporary name, then renames: a
/// reader (node_exporter's textfile collector, which reads only `*.prom`;
/// the agent after a crash) never sees a half-written file.
/// The file is private (0600); see [`write_atomic_mode`].
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, data, safe_fs::PRIVATE_FILE)
}

/// [`write_atomic`] with the file's mode. The temporary is created new and
/// never through a link; the rename replaces a link at `path`, never
/// writes through it.
pub(crate) fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    // A leftover of an earlier agent with the same pid (or a planted link).
    let _ = fs::remove_file(&tmp);
    safe_fs::write_new(&tmp, data, mode)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("tf-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        assert!(write_atomic(&dir.join("missing/x"), b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
