use super::*;
use crate::mask::mask_for;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tf-masked-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_secret_split_across_writes_is_masked_and_written_counts_the_file() {
    let dir = temp_dir("split");
    let path = dir.join("x.log");
    let mut f = MaskedFile::open(&path, Masker::new(["s3cret"])).unwrap();
    f.write(b"a s3").unwrap();
    // The possible start of the secret is held back, not counted.
    assert_eq!(f.written(), 2);
    f.write(b"cret b\n").unwrap();
    f.finish().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, format!("a {} b\n", mask_for("s3cret")));
    assert_eq!(f.written(), text.len() as u64);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reopened_it_appends_and_counts_what_it_held() {
    let dir = temp_dir("reopen");
    let path = dir.join("x.log");
    std::fs::write(&path, "earlier\n").unwrap();
    let mut f = MaskedFile::open(&path, Masker::new(["s3cret"])).unwrap();
    assert_eq!(f.written(), 8);
    f.write(b"later\n").unwrap();
    f.finish().unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "earlier\nlater\n");
    assert_eq!(f.written(), 14);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn finish_lets_the_held_bytes_go_and_later_writes_start_afresh() {
    let dir = temp_dir("finish");
    let path = dir.join("x.log");
    let mut f = MaskedFile::open(&path, Masker::new(["s3cret"])).unwrap();
    f.write(b"end: s3c").unwrap();
    f.finish().unwrap();
    // Not joined with what was held: the input started over.
    f.write(b"ret\ns3cret\n").unwrap();
    f.finish().unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("end: s3cret\n{}\n", mask_for("s3cret")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn then_sees_exactly_the_bytes_the_file_got() {
    let dir = temp_dir("then");
    for secrets in [vec!["s3cret"], vec![]] {
        let path = dir.join(format!("x{}.log", secrets.len()));
        let mut f = MaskedFile::open(&path, Masker::new(secrets)).unwrap();
        let mut seen = Vec::new();
        let mut empty = 0;
        let mut see = |d: &[u8]| {
            empty += usize::from(d.is_empty());
            seen.extend_from_slice(d);
        };
        for chunk in [&b"one s3"[..], b"", b"cret two s3", b"c"] {
            f.write_then(chunk, &mut see).unwrap();
        }
        f.finish_then(&mut see).unwrap();
        assert_eq!(seen, std::fs::read(&path).unwrap());
        // Nothing masked out (an empty write, a held-back tail): no call.
        assert_eq!(empty, 0);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
