//! The gzip stream of the archive, [`AdaptiveGz`]: blocks that look
//! incompressible are stored, the rest deflated.

use std::io::{self, Write};

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

/// Deflate level for compressible data. Measured on 256 MiB of logs
/// (bench/archive.sh): miniz_oxide level 5 is about twice as fast as
/// level 6 for 7% more bytes on text, and level 6 is no faster than
/// Python's zlib level 9; see docs/measured.md for the figures.
const TEXT_LEVEL: u32 = 5;
/// Input is classified and compressed in blocks of this size.
pub(super) const BLOCK: usize = 256 * 1024;
/// Bytes of each block whose byte entropy is measured.
const SAMPLE: usize = 32 * 1024;
/// Bits per byte above which a sample counts as incompressible: random
/// and compressed data measure 7.98-8.0 on 32 KiB, text 4-6, executables
/// and raw disk images 5-7.
const INCOMPRESSIBLE_ENTROPY: f64 = 7.9;

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
    pub(super) fn flush_block(&mut self) -> io::Result<()> {
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
