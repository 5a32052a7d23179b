use super::*;

fn member<'a>(name: &'a [u8], kind: u8, mode: u32, link: &'a [u8]) -> Member<'a> {
    Member {
        name,
        kind,
        mode,
        uid: 1000,
        gid: 1000,
        size: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        link,
        uname: "user",
        gname: "grp",
    }
}

/// The members `tests/fixtures/pax-members.py` gives Python's tarfile come
/// out byte for byte as it writes them: the extended records (long,
/// non-ASCII and non-UTF-8 names, a large uid, a long user name, the
/// float time), the ustar fields beside them, the padding and the end.
#[test]
fn members_are_written_byte_for_byte_as_tarfile_writes_them() {
    let long = [b"artifacts/".as_slice(), &[b'l'; 150]].concat();
    let long_user = "u".repeat(40);
    let accented_link = "\u{e9}".repeat(60);
    let mut tar = PaxWriter::new(Vec::new());
    let mut dir = member(b"artifacts/", DIRECTORY, 0o40755, b"");
    dir.mtime_nsec = 500_000_000;
    tar.append(&dir, &mut io::empty()).unwrap();
    let mut file = member(b"artifacts/a.txt", REGULAR, 0o100644, b"");
    file.size = 3;
    tar.append(&file, &mut &b"hi\n"[..]).unwrap();
    let mut hard = member(b"artifacts/hard", HARD_LINK, 0o100644, b"artifacts/a.txt");
    hard.mtime_nsec = 123_456_789;
    tar.append(&hard, &mut io::empty()).unwrap();
    tar.append(&member(b"artifacts/sym", SYMLINK, 0o120777, b"a.txt"), &mut io::empty()).unwrap();
    tar.append(&member(b"artifacts/fifo", FIFO, 0o10644, b""), &mut io::empty()).unwrap();
    let mut big = member(&long, REGULAR, 0o100600, b"");
    (big.size, big.uid, big.uname) = (1, 3_000_000, &long_user);
    tar.append(&big, &mut &b"x"[..]).unwrap();
    let mut accented = member("artifacts/\u{e9}t\u{e9}.txt".as_bytes(), SYMLINK, 0o120777, accented_link.as_bytes());
    accented.gname = "gr\u{fc}ppe";
    tar.append(&accented, &mut io::empty()).unwrap();
    let mut binary = member(b"artifacts/\xff.bin", REGULAR, 0o104755, b"");
    (binary.mtime, binary.mtime_nsec) = (-1, 250_000_000);
    tar.append(&binary, &mut io::empty()).unwrap();
    let ours = tar.finish().unwrap();
    let python = include_bytes!("../../tests/fixtures/pax-members.tar");
    assert_eq!(ours.len(), python.len());
    if let Some(at) = ours.iter().zip(python.iter()).position(|(a, b)| a != b) {
        let block = at / BLOCK * BLOCK;
        panic!(
            "differs at byte {at}:\nours   {:?}\npython {:?}",
            String::from_utf8_lossy(&ours[block..block + BLOCK]),
            String::from_utf8_lossy(&python[block..block + BLOCK])
        );
    }
}

#[test]
fn short_data_is_an_error_not_a_corrupt_archive() {
    let mut file = member(b"artifacts/a", REGULAR, 0o644, b"");
    file.size = 10;
    let err = PaxWriter::new(Vec::new()).append(&file, &mut &b"abc"[..]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn floats_print_as_python_prints_them() {
    for (f, s) in [(1_700_000_000.0, "1700000000.0"), (1_700_000_000.5, "1700000000.5"), (-0.75, "-0.75"), (0.0, "0.0")]
    {
        assert_eq!(python_float(f), s);
    }
}
