//! Tar members as Python's `tarfile` writes them in its default format,
//! POSIX.1-2001 (PAX), which is what upstream's `shutil.make_archive`
//! produces: a ustar header, preceded by an extended header (`x`) with
//! `key=value` records for what ustar cannot hold (long or non-ASCII names,
//! large ids and sizes) and for the sub-second modification time, which
//! `tarfile` always records.

use std::io::{self, Read, Write};

const BLOCK: usize = 512;
/// `tarfile` pads the archive to records of 20 blocks, as tar(1) does.
const RECORD: u64 = 20 * BLOCK as u64;

pub(super) const REGULAR: u8 = b'0';
pub(super) const HARD_LINK: u8 = b'1';
pub(super) const SYMLINK: u8 = b'2';
pub(super) const DIRECTORY: u8 = b'5';
pub(super) const FIFO: u8 = b'6';
const EXTENDED: u8 = b'x';

/// One member's header fields.
pub(super) struct Member<'a> {
    /// The member's path; a directory's ends in `/`.
    pub name: &'a [u8],
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// The data's length (0 but for regular files).
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    /// A link's target (a hard link's: an earlier member's name).
    pub link: &'a [u8],
    pub uname: &'a str,
    pub gname: &'a str,
}

/// A tar stream being written: headers, data padded to blocks, and the end.
pub(super) struct PaxWriter<W: Write> {
    out: W,
    offset: u64,
    buf: Vec<u8>,
}

impl<W: Write> PaxWriter<W> {
    pub(super) fn new(out: W) -> PaxWriter<W> {
        PaxWriter { out, offset: 0, buf: vec![0; 64 * 1024] }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rest = (BLOCK as u64 - self.offset % BLOCK as u64) % BLOCK as u64;
        self.write(&[0; BLOCK][..usize::try_from(rest).unwrap_or(0)])
    }

    /// Writes `m`'s headers, then exactly `m.size` bytes read from `data`
    /// (a short read is an error: the caller pads what may shrink).
    pub(super) fn append(&mut self, m: &Member, data: &mut dyn Read) -> io::Result<()> {
        let (records, fields) = extended_records(m);
        if !records.is_empty() {
            let pax = header(&Fields {
                name: b"././@PaxHeader",
                kind: EXTENDED,
                size: records.len() as u64,
                ..Fields::default()
            });
            self.write(&pax)?;
            self.write(&records)?;
            self.pad()?;
        }
        self.write(&header(&fields))?;
        let mut left = m.size;
        while left > 0 {
            let want = usize::try_from(left).map_or(self.buf.len(), |l| l.min(self.buf.len()));
            let n = data.read(&mut self.buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "member data ended early"));
            }
            self.out.write_all(&self.buf[..n])?;
            self.offset += n as u64;
            left -= n as u64;
        }
        self.pad()
    }

    /// The end-of-archive blocks, padded to a whole record; the writer.
    pub(super) fn finish(mut self) -> io::Result<W> {
        self.write(&[0; 2 * BLOCK])?;
        let rest = (RECORD - self.offset % RECORD) % RECORD;
        let zeros = [0u8; BLOCK];
        for _ in 0..rest / BLOCK as u64 {
            self.write(&zeros)?;
        }
        Ok(self.out)
    }
}

/// What goes in the ustar header itself.
#[derive(Default)]
struct Fields<'a> {
    name: &'a [u8],
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    link: &'a [u8],
    uname: &'a [u8],
    gname: &'a [u8],
}

/// The extended header's records for `m` (empty when none is needed) and
/// the ustar fields, with what did not fit replaced as `tarfile` does.
fn extended_records<'a>(m: &'a Member<'a>) -> (Vec<u8>, Fields<'a>) {
    let mut records: Vec<(&str, Vec<u8>)> = Vec::new();
    for (key, value, limit) in [
        ("path", m.name, 100),
        ("linkpath", m.link, 100),
        ("uname", m.uname.as_bytes(), 32),
        ("gname", m.gname.as_bytes(), 32),
    ] {
        if !value.is_ascii() || value.len() > limit {
            records.push((key, value.to_vec()));
        }
    }
    let mut fits = |key: &'static str, v: u64, digits: u32| {
        if v < 8u64.pow(digits - 1) {
            v
        } else {
            records.push((key, v.to_string().into_bytes()));
            0
        }
    };
    let (uid, gid, size) = (fits("uid", m.uid, 8), fits("gid", m.gid, 8), fits("size", m.size, 12));
    // The time as Python's float `st_mtime`: the rounded seconds in the
    // header, the float as Python prints it in a record.
    let float = m.mtime as f64 + m.mtime_nsec as f64 * 1e-9;
    let rounded = float.round_ties_even();
    #[allow(clippy::cast_possible_truncation)] // whole, and checked to fit the 11-digit octal field
    let mtime = if (0.0..8f64.powi(11)).contains(&rounded) { rounded as u64 } else { 0 };
    records.push(("mtime", python_float(float).into_bytes()));

    let mut out = Vec::new();
    // Names that are not UTF-8 are stored as their bytes, flagged first.
    if records.iter().any(|(_, v)| std::str::from_utf8(v).is_err()) {
        out.extend_from_slice(b"21 hdrcharset=BINARY\n");
    }
    for (key, value) in &records {
        // The record's length counts its own digits.
        let body = key.len() + value.len() + 3;
        let mut len = body;
        loop {
            let total = body + len.to_string().len();
            if total == len {
                break;
            }
            len = total;
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    let fields = Fields {
        name: m.name,
        kind: m.kind,
        mode: m.mode & 0o7777,
        uid,
        gid,
        size,
        mtime,
        link: m.link,
        uname: m.uname.as_bytes(),
        gname: m.gname.as_bytes(),
    };
    (out, fields)
}

/// `str()` of a Python float in the range file times take: the shortest
/// digits that read back the same, with `.0` when whole.
fn python_float(f: f64) -> String {
    let s = format!("{f}");
    if f.is_finite() && !s.contains('.') { format!("{s}.0") } else { s }
}

/// A text field as `tarfile` writes it into ustar: ASCII, each other
/// character (or byte that is not UTF-8) as `?`, cut to the field.
fn ascii_field(field: &mut [u8], value: &[u8]) {
    let mut ascii = Vec::with_capacity(value.len().min(field.len()));
    for chunk in value.utf8_chunks() {
        ascii.extend(chunk.valid().chars().map(|c| if c.is_ascii() { c as u8 } else { b'?' }));
        ascii.extend(std::iter::repeat_n(b'?', chunk.invalid().len()));
        if ascii.len() >= field.len() {
            break;
        }
    }
    let n = ascii.len().min(field.len());
    field[..n].copy_from_slice(&ascii[..n]);
}

/// An octal number field: digits, then a NUL.
fn octal_field(field: &mut [u8], v: u64) {
    let width = field.len() - 1;
    field[..width].copy_from_slice(format!("{v:0width$o}").as_bytes());
}

fn header(f: &Fields) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    ascii_field(&mut h[0..100], f.name);
    octal_field(&mut h[100..108], u64::from(f.mode));
    octal_field(&mut h[108..116], f.uid);
    octal_field(&mut h[116..124], f.gid);
    octal_field(&mut h[124..136], f.size);
    octal_field(&mut h[136..148], f.mtime);
    h[148..156].fill(b' ');
    h[156] = f.kind;
    ascii_field(&mut h[157..257], f.link);
    h[257..265].copy_from_slice(b"ustar\x0000");
    ascii_field(&mut h[265..297], f.uname);
    ascii_field(&mut h[297..329], f.gname);
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

#[cfg(test)]
#[path = "pax_tests.rs"]
mod tests;
