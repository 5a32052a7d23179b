//! Secret masking on a byte stream.
//!
//! Each secret is matched as a literal byte string (never a pattern) and
//! replaced by `**` + the first 6 hex digits of its SHA-256 + `**`, the mask
//! the upstream agent prints, so masks match across agents. Unlike upstream,
//! a secret split across two reads is still caught: bytes that could be the
//! start of a secret are held back until the next read decides. Where secrets
//! overlap, the leftmost match wins, and among those the longest.

pub struct Masker {
    secrets: Vec<(Vec<u8>, Vec<u8>)>,
    /// `first[b]` is true when some secret starts with byte `b`.
    first: [bool; 256],
    /// The distinct first bytes, each repeated over a word, when there are
    /// few enough to look for eight bytes at a time.
    first_words: Vec<u64>,
    held: Vec<u8>,
}

/// Up to this many distinct first bytes are searched a word at a time.
const WORD_SEARCH_MAX: usize = 4;
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

impl Masker {
    /// Empty values are ignored (they would match everywhere).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Masker {
        let mut secrets: Vec<(Vec<u8>, Vec<u8>)> = values
            .into_iter()
            .filter(|v| !v.is_empty())
            .map(|v| (v.as_bytes().to_vec(), mask_for(v).into_bytes()))
            .collect();
        // Longest first, so the first full match found is the longest; equal
        // values side by side, so dedup removes every repeat.
        secrets.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        secrets.dedup_by(|a, b| a.0 == b.0);
        let mut first = [false; 256];
        for (s, _) in &secrets {
            first[s[0] as usize] = true;
        }
        let starts: Vec<u64> = (0..=255u8).filter(|&b| first[b as usize]).map(|b| ONES * u64::from(b)).collect();
        let first_words = if starts.len() <= WORD_SEARCH_MAX { starts } else { Vec::new() };
        Masker { secrets, first, first_words, held: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Masks `data` into `out`, holding back a possible partial secret.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.secrets.is_empty() {
            out.extend_from_slice(data);
            return;
        }
        if self.held.is_empty() {
            // The usual case: scan the read in place, keep only its
            // undecided tail.
            let consumed = self.scan(data, out, false);
            self.held.extend_from_slice(&data[consumed..]);
            return;
        }
        let mut held = std::mem::take(&mut self.held);
        held.extend_from_slice(data);
        let consumed = self.scan(&held, out, false);
        held.drain(..consumed);
        self.held = held;
    }

    /// Flushes what was held back: the stream has ended.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let held = std::mem::take(&mut self.held);
        self.scan(&held, out, true);
    }

    /// The index of the first byte at or after `i` that starts a secret,
    /// or `buf.len()`. Output is mostly bytes that start none, so with few
    /// first bytes the search goes a word at a time.
    fn next_candidate(&self, buf: &[u8], mut i: usize) -> usize {
        if !self.first_words.is_empty() {
            while let Some(bytes) = buf.get(i..i + 8) {
                let mut word = [0u8; 8];
                word.copy_from_slice(bytes);
                let w = u64::from_le_bytes(word);
                // A zero byte in w ^ pattern is a byte equal to that start.
                if self.first_words.iter().any(|p| {
                    let x = w ^ p;
                    x.wrapping_sub(ONES) & !x & HIGHS != 0
                }) {
                    break;
                }
                i += 8;
            }
        }
        while i < buf.len() && !self.first[buf[i] as usize] {
            i += 1;
        }
        i
    }

    fn scan(&self, buf: &[u8], out: &mut Vec<u8>, at_end: bool) -> usize {
        let mut i = 0;
        let mut plain_from = 0;
        loop {
            i = self.next_candidate(buf, i);
            if i >= buf.len() {
                break;
            }
            let rest = &buf[i..];
            // A longer secret may still be arriving: wait for it.
            if !at_end && self.secrets.iter().any(|(s, _)| rest.len() < s.len() && s.starts_with(rest)) {
                break;
            }
            if let Some((s, mask)) = self.secrets.iter().find(|(s, _)| rest.starts_with(s)) {
                out.extend_from_slice(&buf[plain_from..i]);
                out.extend_from_slice(mask);
                i += s.len();
                plain_from = i;
            } else {
                i += 1;
            }
        }
        out.extend_from_slice(&buf[plain_from..i]);
        i
    }
}

/// The upstream mask for a secret value.
pub fn mask_for(secret: &str) -> String {
    let d = sha256(secret.as_bytes());
    format!("**{:02x}{:02x}{:02x}**", d[0], d[1], d[2])
}

/// SHA-256 (FIPS 180-4). Small enough to keep here rather than pull a crate
/// for six hex digits per secret.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for (t, word) in block.chunks(4).enumerate() {
            w[t] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for t in 16..64 {
            let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
            let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16].wrapping_add(s0).wrapping_add(w[t - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for t in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[t]).wrapping_add(w[t]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, word) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secrets: &[&str], chunks: &[&str]) -> String {
        let mut m = Masker::new(secrets.iter().copied());
        let mut out = Vec::new();
        for c in chunks {
            m.feed(c.as_bytes(), &mut out);
        }
        m.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn sha256_known_answers() {
        let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(sha256(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(hex(sha256(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let long = vec![b'a'; 1000];
        assert_eq!(hex(sha256(&long)), "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3");
    }

    #[test]
    fn mask_is_upstream_format() {
        assert_eq!(mask_for("abc"), "**ba7816**");
    }

    #[test]
    fn masks_literal_secret_split_across_reads() {
        let m = mask_for("hunter2");
        assert_eq!(run(&["hunter2"], &["pass=hun", "ter2 ok"]), format!("pass={m} ok"));
        assert_eq!(run(&["hunter2"], &["h", "u", "n", "t", "e", "r", "2"]), m);
        assert_eq!(run(&["hunter2"], &["hunter"]), "hunter");
    }

    #[test]
    fn regex_metacharacters_are_literal() {
        let m = mask_for("a.*b");
        assert_eq!(run(&["a.*b"], &["axxb a.*b"]), format!("axxb {m}"));
    }

    #[test]
    fn overlapping_secrets_leftmost_longest() {
        let (short, long) = (mask_for("abc"), mask_for("abcdef"));
        assert_eq!(run(&["abc", "abcdef"], &["xabcdefy abcx"]), format!("x{long}y {short}x"));
        assert_eq!(run(&["abc", "abcdef"], &["xabc", "def"]), format!("x{long}"));
        assert_eq!(run(&["bcd", "abc"], &["abcd"]), format!("{}d", mask_for("abc")));
    }

    /// Leftmost, then longest, match at each position, on the whole stream.
    fn reference(secrets: &[&str], stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < stream.len() {
            let hit = secrets
                .iter()
                .filter(|s| !s.is_empty() && stream[i..].starts_with(s.as_bytes()))
                .max_by_key(|s| s.len());
            match hit {
                Some(s) => {
                    out.extend_from_slice(mask_for(s).as_bytes());
                    i += s.len();
                }
                None => {
                    out.push(stream[i]);
                    i += 1;
                }
            }
        }
        out
    }

    #[test]
    fn word_search_agrees_with_the_reference_whatever_the_reads() {
        // Few first bytes (word-at-a-time search) and many (table only).
        let sets: [&[&str]; 3] = [&["ab"], &["ab", "b", "bab", "ca"], &["a", "b", "c", "d", "e", "abc"]];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for secrets in sets {
            for _ in 0..300 {
                let len = (next() % 200) as usize;
                // Mostly bytes that start no secret, some that do.
                let stream: Vec<u8> = (0..len).map(|_| b"abcdexyz........"[(next() % 16) as usize]).collect();
                let mut m = Masker::new(secrets.iter().copied());
                let mut out = Vec::new();
                let mut rest = &stream[..];
                while !rest.is_empty() {
                    let cut = ((next() % 20) as usize + 1).min(rest.len());
                    m.feed(&rest[..cut], &mut out);
                    rest = &rest[cut..];
                }
                m.finish(&mut out);
                assert_eq!(out, reference(secrets, &stream), "{secrets:?} {:?}", String::from_utf8_lossy(&stream));
            }
        }
    }

    #[test]
    fn empty_secret_is_ignored() {
        assert_eq!(run(&[""], &["hello"]), "hello");
    }
}
