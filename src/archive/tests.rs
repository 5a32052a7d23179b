use super::gzip::BLOCK;
use super::*;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
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
    pack_artifacts(&src, &dest, None).unwrap();

    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(File::open(&dest).unwrap()));
    let mut seen = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let mut body = Vec::new();
        e.read_to_end(&mut body).unwrap();
        seen.push((p, e.header().entry_type(), e.header().mode().unwrap() & 0o777, body));
    }
    let find =
        |n: &str| seen.iter().find(|s| s.0.trim_end_matches('/') == n).unwrap_or_else(|| panic!("{n} in {seen:?}"));
    assert_eq!(find("artifacts/sub/a.txt").3, b"hello");
    assert_eq!(find("artifacts/run.sh").2, 0o755);
    let leak = find("artifacts/leak");
    assert!(leak.1.is_symlink());
    assert!(leak.3.is_empty());
    fs::remove_dir_all(&base).unwrap();
}

#[test]
fn masked_text_gets_its_masked_size_and_binary_is_left_alone() {
    let base = std::env::temp_dir().join(format!("tf-arch-mask-{}", std::process::id()));
    let src = base.join("artifacts");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("log.txt"), b"key=hunter2-XYZ\nagain hunter2-XYZ\n").unwrap();
    fs::write(src.join("after.txt"), b"next member intact\n").unwrap();
    fs::write(src.join("name-hunter2-XYZ.txt"), b"x").unwrap();
    fs::write(src.join("core.bin"), b"\0\x01hunter2-XYZ\0").unwrap();
    let dest = base.join("a.tar.gz");
    let secrets = JobSecrets::new(["hunter2-XYZ".to_string()]);
    pack_artifacts(&src, &dest, Some(&secrets)).unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(File::open(&dest).unwrap()));
    let mut seen = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut body = Vec::new();
        e.read_to_end(&mut body).unwrap();
        assert_eq!(e.header().size().unwrap(), body.len() as u64);
        seen.push((e.path().unwrap().to_string_lossy().into_owned(), body));
    }
    let m = crate::mask::mask_for("hunter2-XYZ");
    let body = |n: &str| seen.iter().find(|s| s.0 == n).map(|s| s.1.clone()).unwrap_or_else(|| panic!("{n}"));
    assert_eq!(body("artifacts/log.txt"), format!("key={m}\nagain {m}\n").into_bytes());
    assert_eq!(body("artifacts/after.txt"), b"next member intact\n");
    assert_eq!(body("artifacts/core.bin"), b"\0\x01hunter2-XYZ\0");
    assert_eq!(body(&format!("artifacts/name-{m}.txt")), b"x");
    fs::remove_dir_all(&base).unwrap();
}

/// Deterministic bytes that deflate cannot shrink.
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

#[test]
fn adaptive_gzip_round_trips_mixed_text_and_noise() {
    let text: Vec<u8> = (0..40_000).flat_map(|i| format!("line {i} of a test log\n").into_bytes()).collect();
    let mut input = Vec::new();
    for round in 0..3 {
        input.extend_from_slice(&text);
        input.extend_from_slice(&noise(700_000 + round * 1234, 7 + round as u64));
    }
    input.extend_from_slice(&text[..1000]);
    let mut gz = AdaptiveGz::new(Vec::new()).unwrap();
    // Odd-sized writes cross block boundaries.
    for chunk in input.chunks(77_777) {
        gz.write_all(chunk).unwrap();
    }
    assert!(gz.stored_bytes > 1_500_000 && gz.deflated_bytes > 2_000_000, "{} {}", gz.stored_bytes, gz.deflated_bytes);
    let out = gz.finish().unwrap();
    assert_eq!(gunzip(&out), input);
    let noise_total = 3 * 700_000 + 1234 * 3;
    assert!(out.len() < noise_total + (input.len() - noise_total) / 5, "{} of {}", out.len(), input.len());
}

#[test]
fn adaptive_gzip_of_nothing_is_a_valid_empty_member() {
    let out = AdaptiveGz::new(Vec::new()).unwrap().finish().unwrap();
    assert!(gunzip(&out).is_empty());
    let only_noise = noise(BLOCK * 2 + 5, 3);
    let mut gz = AdaptiveGz::new(Vec::new()).unwrap();
    gz.write_all(&only_noise).unwrap();
    let out = gz.finish().unwrap();
    assert_eq!(gunzip(&out), only_noise);
}

/// Every member of the packed tree, as the `tar` crate reads it: (name,
/// type, link target, body).
fn members(archive: &Path) -> Vec<(String, tar::EntryType, String, Vec<u8>)> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(File::open(archive).unwrap()));
    let mut seen = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let link = e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
        let mut body = Vec::new();
        e.read_to_end(&mut body).unwrap();
        seen.push((name, e.header().entry_type(), link, body));
    }
    seen
}

/// A folder with a second name of a file, a fifo, a socket and a name too
/// long for ustar, packed in `base`.
fn special_tree(base: &Path) -> PathBuf {
    let src = base.join("artifacts");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("a.txt"), b"hello").unwrap();
    fs::hard_link(src.join("a.txt"), src.join("sub/again.txt")).unwrap();
    let fifo = std::ffi::CString::new(src.join("pipe").as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let _socket = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    fs::write(src.join("n".repeat(150)), b"long").unwrap();
    let dest = base.join("a.tar.gz");
    pack_artifacts(&src, &dest, None).unwrap();
    dest
}

#[test]
fn hard_links_and_fifos_are_kept_as_tarfile_keeps_them_and_sockets_skipped() {
    let base = std::env::temp_dir().join(format!("tf-arch-special-{}", std::process::id()));
    let dest = special_tree(&base);
    let seen = members(&dest);
    let find =
        |n: &str| seen.iter().find(|s| s.0.trim_end_matches('/') == n).unwrap_or_else(|| panic!("{n} in {seen:?}"));
    assert_eq!(find("artifacts/a.txt").3, b"hello");
    // The second name is a link to the first, the content stored once.
    let again = find("artifacts/sub/again.txt");
    assert_eq!((again.1, again.2.as_str(), again.3.len()), (tar::EntryType::Link, "artifacts/a.txt", 0));
    assert_eq!(find("artifacts/pipe").1, tar::EntryType::Fifo);
    assert_eq!(find(&format!("artifacts/{}", "n".repeat(150))).3, b"long");
    assert!(seen.iter().all(|s| !s.0.contains("sock")), "{seen:?}");
    // PAX: ustar headers, each after an extended header with the time.
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(File::open(&dest).unwrap()).read_to_end(&mut raw).unwrap();
    assert_eq!(&raw[257..265], b"ustar\x0000");
    assert_eq!(raw[156], b'x');
    assert_eq!(raw.len() % (20 * 512), 0);
    fs::remove_dir_all(&base).unwrap();
}

/// The archive unpacks with Python's tarfile (what upstream's tooling
/// reads it with) and GNU tar, links and fifo included. Skipped, saying
/// so, on a machine without python3 or tar.
#[test]
fn unpacks_with_python_tarfile_and_gnu_tar() {
    // A phase ending in another test reaps every child of this process.
    let _serial = crate::runner::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let base = std::env::temp_dir().join(format!("tf-arch-unpack-{}", std::process::id()));
    let dest = special_tree(&base);
    let script = "import sys, tarfile\n\
        t = tarfile.open(sys.argv[1])\n\
        kw = {'filter': 'tar'} if hasattr(tarfile, 'tar_filter') else {}\n\
        t.extractall(sys.argv[2], **kw)\n\
        print(' '.join(f'{m.name}:{m.type.decode()}' for m in t.getmembers()))\n";
    let py_out = base.join("py");
    match std::process::Command::new("python3").arg("-c").arg(script).arg(&dest).arg(&py_out).output() {
        Ok(out) => {
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let listed = String::from_utf8_lossy(&out.stdout);
            assert!(listed.contains("artifacts/sub/again.txt:1") && listed.contains("artifacts/pipe:6"), "{listed}");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => eprintln!("no python3: tarfile check skipped"),
        Err(e) => panic!("python3: {e}"),
    }
    let tar_out = base.join("gnu");
    fs::create_dir_all(&tar_out).unwrap();
    match std::process::Command::new("tar").arg("-xzf").arg(&dest).arg("-C").arg(&tar_out).output() {
        Ok(out) => assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => eprintln!("no tar: GNU tar check skipped"),
        Err(e) => panic!("tar: {e}"),
    }
    for root in [&py_out, &tar_out].into_iter().filter(|r| r.join("artifacts").exists()) {
        let a = root.join("artifacts");
        assert_eq!(fs::read(a.join("sub/again.txt")).unwrap(), b"hello", "{}", root.display());
        assert_eq!(fs::metadata(a.join("a.txt")).unwrap().ino(), fs::metadata(a.join("sub/again.txt")).unwrap().ino());
        assert!(fs::symlink_metadata(a.join("pipe")).unwrap().file_type().is_fifo());
        assert_eq!(fs::read(a.join("n".repeat(150))).unwrap(), b"long");
    }
    fs::remove_dir_all(&base).unwrap();
}

/// A test phase that makes `artifacts` a link to a folder outside (`ln -s
/// /etc artifacts`) uploads the link, not the folder's files.
#[test]
fn artifacts_itself_a_link_is_packed_as_the_link() {
    let base = std::env::temp_dir().join(format!("tf-arch-rootlink-{}", std::process::id()));
    let outside = base.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("shadow"), b"secret").unwrap();
    symlink(&outside, base.join("artifacts")).unwrap();
    let dest = base.join("a.tar.gz");
    pack_artifacts(&base.join("artifacts"), &dest, None).unwrap();
    let seen = members(&dest);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].0.as_str(), seen[0].1), ("artifacts", tar::EntryType::Symlink));
    assert_eq!(seen[0].2, outside.to_string_lossy());
    fs::remove_dir_all(&base).unwrap();
}
