//! A log file written through the job's masker: the phase's log
//! ([`super::PhaseLog`]) and the masked copy of a connector's serial log
//! (`serial.rs`) are each one. The masker holds back a possible partial
//! secret at the end of each write, so a secret split across two writes is
//! still caught; [`MaskedFile::finish`] lets it go when the input ends (or
//! starts over).

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use crate::mask::Masker;
use crate::safe_fs;

pub(crate) struct MaskedFile {
    file: File,
    masker: Masker,
    /// The masked bytes of the last write; kept for its allocation.
    scratch: Vec<u8>,
    /// Bytes in the file, what it held when opened included.
    written: u64,
}

impl MaskedFile {
    /// Opens `path` for appending (created private, never through a link):
    /// a phase run again after a crash adds to what its first run wrote.
    pub(crate) fn open(path: &Path, masker: Masker) -> io::Result<MaskedFile> {
        let mut file = safe_fs::open_append(path, safe_fs::PRIVATE_FILE)?;
        let written = file.seek(SeekFrom::End(0))?;
        Ok(MaskedFile { file, masker, scratch: Vec::new(), written })
    }

    /// Bytes in the file: how far a stream reading it may go.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Masks `data` and appends it.
    pub(crate) fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_then(data, |_| {})
    }

    /// Masks `data` and appends it; `then` gets the masked bytes (when there
    /// are any) whether or not the file took them.
    pub(crate) fn write_then(&mut self, data: &[u8], then: impl FnOnce(&[u8])) -> io::Result<()> {
        if self.masker.is_empty() {
            // Nothing to mask: no copy on the way to the file.
            return append(&mut self.file, &mut self.written, data, then);
        }
        let mut masked = std::mem::take(&mut self.scratch);
        masked.clear();
        self.masker.feed(data, &mut masked);
        let result = append(&mut self.file, &mut self.written, &masked, then);
        self.scratch = masked;
        result
    }

    /// Appends what the masker held back: the input has ended, or starts
    /// over from its beginning (later writes are masked afresh).
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        self.finish_then(|_| {})
    }

    /// [`MaskedFile::finish`], `then` getting the bytes let go.
    pub(crate) fn finish_then(&mut self, then: impl FnOnce(&[u8])) -> io::Result<()> {
        let mut rest = std::mem::take(&mut self.scratch);
        rest.clear();
        self.masker.finish(&mut rest);
        let result = append(&mut self.file, &mut self.written, &rest, then);
        self.scratch = rest;
        result
    }
}

fn append(file: &mut File, written: &mut u64, data: &[u8], then: impl FnOnce(&[u8])) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let result = file.write_all(data);
    if result.is_ok() {
        *written += data.len() as u64;
    }
    then(data);
    result
}

#[cfg(test)]
mod tests;
