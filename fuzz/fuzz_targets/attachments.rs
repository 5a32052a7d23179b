//! Attachment extraction: any bytes as the archive. Never panics, and
//! never writes outside the destination folder, whatever it accepts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use testflinger_agent::attachments::{Limits, unpack};

fn all_paths(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.path());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                all_paths(&e.path(), out);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let base = std::env::temp_dir().join(format!("tf-fuzz-att-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let dest = base.join("run/attachments");
    std::fs::create_dir_all(&dest).expect("temp dir");
    let archive = base.join("a.tar.gz");
    // Half the inputs as raw gzip bytes, half gzipped here so the fuzzer
    // reaches the tar parser quickly.
    let bytes = if data.first().is_some_and(|b| b & 1 == 1) {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data[1..]).expect("in memory");
        gz.finish().expect("in memory")
    } else {
        data.to_vec()
    };
    std::fs::write(&archive, &bytes).expect("temp file");
    let limits = Limits { bytes: 1 << 20, entries: 1000 };
    let _ = unpack(&archive, &dest, limits);
    // Only the archive and the attachments tree may exist under base.
    let mut found = Vec::new();
    all_paths(&base, &mut found);
    for p in &found {
        let allowed = p == &archive || p == &base.join("run") || p.starts_with(&dest);
        assert!(allowed, "wrote outside: {}", p.display());
        // A symlink that was accepted must stay inside.
        if let Ok(target) = std::fs::read_link(p) {
            assert!(target.is_relative(), "absolute link {} -> {}", p.display(), target.display());
        }
    }
    let _ = std::fs::remove_dir_all(&base);
});
