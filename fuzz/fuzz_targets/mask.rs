//! The masking stream: however the output is cut into reads, the result is
//! the same as masking it in one piece, and no secret survives unless the
//! masks themselves happen to spell it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use testflinger_agent::mask::Masker;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // First byte: number of secrets (0..4); next bytes: their lengths; then
    // the secrets; the rest is the stream, cut at positions from its bytes.
    let n = (data[0] % 4) as usize;
    let mut i = 1;
    let mut secrets = Vec::new();
    for _ in 0..n {
        let Some(&len) = data.get(i) else { return };
        let len = (len % 8 + 1) as usize;
        i += 1;
        let Some(s) = data.get(i..i + len) else { return };
        i += len;
        // Secrets come from JSON strings, so they are valid UTF-8.
        if let Ok(s) = std::str::from_utf8(s) {
            secrets.push(s.to_string());
        }
    }
    let stream = &data[i..];
    let whole = {
        let mut m = Masker::new(secrets.iter().map(String::as_str));
        let mut out = Vec::new();
        m.feed(stream, &mut out);
        m.finish(&mut out);
        out
    };
    let pieces = {
        let mut m = Masker::new(secrets.iter().map(String::as_str));
        let mut out = Vec::new();
        let mut rest = stream;
        let mut k = 0usize;
        while !rest.is_empty() {
            let cut = (rest[0] as usize % 7 + k % 3).min(rest.len()).max(1);
            m.feed(&rest[..cut], &mut out);
            rest = &rest[cut..];
            k += 1;
        }
        m.finish(&mut out);
        out
    };
    assert_eq!(whole, pieces, "chunking changed the result");
    // A secret made only of hex digits may occur inside a mask, and one
    // with '*' may be formed by a mask's edge and the text beside it.
    for s in &secrets {
        if s.is_empty() || s.contains('*') || s.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        assert!(!whole.windows(s.len()).any(|w| w == s.as_bytes()), "secret {s:?} leaked");
    }
});
