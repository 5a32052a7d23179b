//! One log fragment's JSON body, written straight from the log file into
//! the socket.
//!
//! A fragment can be megabytes; building it as a `String` and then as a
//! `Json` value would copy it several times and hold it all in memory. Here
//! the body is sized first (one pass over the file range, escaping counted,
//! not stored) so it can be sent with a plain `Content-Length`, then written
//! in a second pass through a small buffer. Both passes walk the same chunk
//! boundaries, so the announced length is exactly what is written.
//!
//! Log bytes that are not valid UTF-8 become U+FFFD, as
//! `String::from_utf8_lossy` would do: the server stores text.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// Bytes read from the log file at a time.
const CHUNK: usize = 64 * 1024;

/// Escaped length of each byte inside a JSON string: 1 for bytes copied as
/// they are, 2 for `\n`-style escapes, 6 for `\u00XX`.
const fn escape_table() -> [u8; 256] {
    let mut t = [1u8; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = 6;
        b += 1;
    }
    t[b'\n' as usize] = 2;
    t[b'\r' as usize] = 2;
    t[b'\t' as usize] = 2;
    t[0x08] = 2;
    t[0x0c] = 2;
    t[b'"' as usize] = 2;
    t[b'\\' as usize] = 2;
    t
}
static ESCAPED_LEN: [u8; 256] = escape_table();

/// What [`plan`] decided: the log range `[start, end)` and its body length.
#[derive(Debug)]
pub(super) struct Plan {
    pub start: u64,
    pub end: u64,
    /// Boundaries of the chunks between `start` and `end`, so that [`write`]
    /// decodes exactly as [`plan`] counted.
    cuts: Vec<u64>,
    prefix: String,
    /// Total body length in bytes.
    pub len: u64,
}

/// Sizes the fragment that starts at `start`: as much of `[start, avail)`
/// as fits in `max_body` bytes of JSON. Unless `last`, a trailing partial
/// UTF-8 character is left for the next fragment. `None` when there is
/// nothing to send yet. `idle` runs between chunks (see `client::Idle`).
pub(super) fn plan(
    file: &File,
    start: u64,
    avail: u64,
    last: bool,
    prefix: String,
    max_body: u64,
    idle: &mut dyn FnMut(),
) -> io::Result<Option<Plan>> {
    const SUFFIX: u64 = 2; // `"}`
    // Small enough that one chunk, escaped (at most 6-fold), fits a
    // `max_body` cut down after 413s; 64 KiB otherwise.
    let room = max_body.saturating_sub(prefix.len() as u64 + SUFFIX) / 6;
    let chunk = usize::try_from(room).map_or(CHUNK, |c| c.clamp(1024, CHUNK));
    let mut buf = vec![0u8; chunk];
    let mut pos = start;
    let mut len = prefix.len() as u64 + SUFFIX;
    let mut cuts = Vec::new();
    while pos < avail {
        idle();
        let n = usize::try_from(avail - pos).map_or(chunk, |left| left.min(chunk));
        file.read_exact_at(&mut buf[..n], pos)?;
        let at_end = pos + n as u64 == avail;
        let cut = if at_end && last { n } else { utf8_boundary(&buf[..n]) };
        if cut == 0 {
            break;
        }
        let add = escaped_len(&buf[..cut]);
        // The first chunk always goes (it grows at most 6-fold).
        if !cuts.is_empty() && len + add > max_body {
            break;
        }
        len += add;
        pos += cut as u64;
        cuts.push(pos);
    }
    if cuts.is_empty() {
        return Ok(None);
    }
    Ok(Some(Plan { start, end: pos, cuts, prefix, len }))
}

/// Writes the body `plan` sized: the prefix, the escaped log text, `"}`.
pub(super) fn write(file: &File, plan: &Plan, w: &mut dyn Write) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut escaped = Vec::with_capacity(CHUNK * 2);
    w.write_all(plan.prefix.as_bytes())?;
    let mut pos = plan.start;
    for &cut in &plan.cuts {
        let n = usize::try_from(cut - pos).map_err(io::Error::other)?;
        file.read_exact_at(&mut buf[..n], pos)?;
        escape_into(&buf[..n], &mut escaped);
        w.write_all(&escaped)?;
        pos = cut;
    }
    w.write_all(b"\"}")
}

/// Calls `f` on each valid UTF-8 run of `data` and on `None` for each
/// replacement character, as `from_utf8_lossy` splits it.
fn lossy_pieces(mut data: &[u8], f: &mut dyn FnMut(Option<&[u8]>) -> io::Result<()>) -> io::Result<()> {
    loop {
        match std::str::from_utf8(data) {
            Ok(s) => return f(Some(s.as_bytes())),
            Err(e) => {
                let (valid, rest) = data.split_at(e.valid_up_to());
                f(Some(valid))?;
                f(None)?;
                data = &rest[e.error_len().unwrap_or(rest.len())..];
            }
        }
    }
}

const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();

fn escaped_len(data: &[u8]) -> u64 {
    let mut n = 0u64;
    let _ = lossy_pieces(data, &mut |piece| {
        n += match piece {
            Some(s) => s.iter().map(|&b| u64::from(ESCAPED_LEN[b as usize])).sum::<u64>(),
            None => REPLACEMENT.len() as u64,
        };
        Ok(())
    });
    n
}

/// Escapes `data` into `out` (cleared first): one `write_all` per chunk
/// rather than one per line keeps the send fast.
fn escape_into(data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let _ = lossy_pieces(data, &mut |piece| {
        let Some(s) = piece else {
            out.extend_from_slice(REPLACEMENT);
            return Ok(());
        };
        let mut plain = 0;
        for (i, &b) in s.iter().enumerate() {
            if ESCAPED_LEN[b as usize] == 1 {
                continue;
            }
            out.extend_from_slice(&s[plain..i]);
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
                }
            }
            plain = i + 1;
        }
        out.extend_from_slice(&s[plain..]);
        Ok(())
    });
}

/// Length of the longest prefix of `buf` that does not end inside a
/// multi-byte UTF-8 character.
pub(super) fn utf8_boundary(buf: &[u8]) -> usize {
    let n = buf.len();
    for back in 1..=3.min(n) {
        let b = buf[n - back];
        if b & 0xC0 == 0x80 {
            continue; // continuation byte: look further back for the lead
        }
        let need = match b {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { n - back } else { n };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::Json;

    fn file_with(bytes: &[u8]) -> (File, std::path::PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("tf-frag-{}-{n}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        (File::open(&path).unwrap(), path)
    }

    /// Plans and writes every fragment of `bytes`; returns (bodies, data).
    fn fragments(bytes: &[u8], max_body: u64) -> (Vec<Vec<u8>>, String) {
        let (f, path) = file_with(bytes);
        let (mut pos, mut bodies, mut data) = (0u64, Vec::new(), String::new());
        while let Some(p) =
            plan(&f, pos, bytes.len() as u64, true, "{\"log_data\":\"".into(), max_body, &mut || {}).unwrap()
        {
            let mut body = Vec::new();
            write(&f, &p, &mut body).unwrap();
            assert_eq!(body.len() as u64, p.len, "announced length is exact");
            let v = Json::parse_bytes(&body).unwrap();
            data.push_str(v.get("log_data").and_then(Json::as_str).unwrap());
            pos = p.end;
            bodies.push(body);
        }
        std::fs::remove_file(path).unwrap();
        (bodies, data)
    }

    #[test]
    fn bodies_are_json_and_concatenate_to_the_log() {
        let mut text = String::new();
        for i in 0..40_000 {
            text.push_str(&format!("line {i} \"q\" \\ tab\t é 😀 \u{1}\r\n"));
        }
        let (bodies, data) = fragments(text.as_bytes(), 200_000);
        assert!(bodies.len() > 5, "split into several fragments");
        assert!(bodies.iter().all(|b| b.len() <= 200_000), "each under the cap");
        assert_eq!(data, text);
    }

    /// Cut down after 413s, fragments stay under a small limit even when
    /// every byte escapes six-fold, and still concatenate to the log.
    #[test]
    fn a_small_limit_holds_even_for_bytes_that_escape_sixfold() {
        let text: String = (0..200_000u32).map(|i| if i % 7 == 0 { 'x' } else { '\u{1}' }).collect();
        let (bodies, data) = fragments(text.as_bytes(), 16 << 10);
        assert!(bodies.len() > 20, "split into many fragments: {}", bodies.len());
        assert!(bodies.iter().all(|b| b.len() <= 16 << 10), "each under the limit");
        assert_eq!(data, text);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_like_lossy() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let (_, data) = fragments(&bytes, 1 << 20);
        assert_eq!(data, String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn partial_character_waits_unless_last() {
        let e = "é".as_bytes();
        let (f, path) = file_with(&[b'a', e[0]]);
        let p = plan(&f, 0, 2, false, String::new(), 100, &mut || {}).unwrap().unwrap();
        assert_eq!(p.end, 1);
        assert!(plan(&f, 1, 2, false, String::new(), 100, &mut || {}).unwrap().is_none());
        assert_eq!(plan(&f, 1, 2, true, String::new(), 100, &mut || {}).unwrap().unwrap().end, 2);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn utf8_boundary_keeps_whole_characters() {
        assert_eq!(utf8_boundary(b"abc"), 3);
        let e = "é".as_bytes();
        assert_eq!(utf8_boundary(&[b'a', e[0]]), 1);
        assert_eq!(utf8_boundary(&[b'a', e[0], e[1]]), 3);
        let emoji = "😀".as_bytes();
        assert_eq!(utf8_boundary(&emoji[..3]), 0);
        assert_eq!(utf8_boundary(emoji), 4);
    }
}
