//! Artifacts out and attachments in, through the real binary: safe
//! unpacking of hostile attachment archives, links never followed when
//! packing, an upload cut half way, a full disk.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use crate::fake_server::FakeServer;
use crate::harness::{Agent, AgentSetup, QUEUE, job_json, unique_id, yaml_str};
use crate::json::Json;
use crate::small_disk::SmallDisk;

const T: Duration = Duration::from_secs(60);

// ---- tarballs written by hand ------------------------------------------------
// tar::Builder refuses `..` and absolute names, so headers are made here.

const REG: u8 = b'0';
const HARD: u8 = b'1';
const SYM: u8 = b'2';
const CHR: u8 = b'3';
const DIR: u8 = b'5';
const FIFO: u8 = b'6';

struct Member<'a> {
    name: &'a str,
    kind: u8,
    mode: u32,
    link: &'a str,
    data: &'a [u8],
    /// Announced size, when it is not `data.len()` (a bomb).
    size: Option<u64>,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Member<'a> {
    Member { name, kind: REG, mode: 0o644, link: "", data, size: None }
}

fn dir(name: &str) -> Member<'_> {
    Member { name, kind: DIR, mode: 0o755, link: "", data: b"", size: None }
}

fn link<'a>(kind: u8, name: &'a str, target: &'a str) -> Member<'a> {
    Member { name, kind, mode: 0o777, link: target, data: b"", size: None }
}

fn octal(field: &mut [u8], v: u64) {
    // All digits when the value needs the whole field (sizes of 8 GiB+).
    let digits = format!("{v:o}");
    let width = if digits.len() >= field.len() { field.len() } else { field.len() - 1 };
    let text = format!("{v:0width$o}");
    field[..text.len()].copy_from_slice(text.as_bytes());
}

fn header(m: &Member) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..m.name.len()].copy_from_slice(m.name.as_bytes());
    octal(&mut h[100..108], u64::from(m.mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], m.size.unwrap_or(m.data.len() as u64));
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = m.kind;
    h[157..157 + m.link.len()].copy_from_slice(m.link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    if m.kind == CHR {
        octal(&mut h[329..337], 1);
        octal(&mut h[337..345], 3);
    }
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

/// The members as a tar.gz; `end` false leaves the archive cut short.
fn tar_gz(members: &[Member], end: bool) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for m in members {
        gz.write_all(&header(m)).unwrap();
        gz.write_all(m.data).unwrap();
        let pad = (512 - m.data.len() % 512) % 512;
        if m.size.is_none() {
            gz.write_all(&vec![0u8; pad]).unwrap();
        }
    }
    if end {
        gz.write_all(&[0u8; 1024]).unwrap();
    }
    gz.finish().unwrap()
}

// ---- attachments ---------------------------------------------------------------

fn attachments_job(server: &FakeServer, job: &str, archive: Vec<u8>, extra: &str) {
    let fields = format!(
        r#"{{"attachments_status":"complete","job_status_webhook":"http://hook.example/x","test_data":{{"test_cmds":"x","attachments":[{{"agent":"t"}}]}}{extra}}}"#
    );
    server.push_job(&job_json(job, QUEUE, &fields));
    server.set_attachments(job, archive);
}

fn event_detail(server: &FakeServer, job: &str, name: &str) -> Option<String> {
    let posts = server.event_posts(job);
    let last = posts.last()?;
    last["events"]
        .as_array()?
        .iter()
        .find(|e| e["event_name"].as_str() == Some(name))
        .and_then(|e| e["detail"].as_str().map(str::to_string))
}

fn status_of(server: &FakeServer, job: &str, phase: &str) -> Option<i64> {
    server.result(job).and_then(|r| r.get("status").and_then(|s| s.get(phase)).and_then(Json::as_i64))
}

/// Every path under `root` whose name contains `needle`.
fn find_named(root: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir(root) else { return found };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(needle) {
            found.push(p.display().to_string());
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            found.extend(find_named(&p, needle));
        }
    }
    found
}

fn refusing_agent(server: &FakeServer) -> AgentSetup {
    Agent::new(server)
        .command("setup", "echo SETUP_RAN")
        .command("test", "echo TEST_RAN")
        // Lists the run dir while it still exists: what was unpacked where.
        .command("cleanup", "echo CLEANUP_RAN; find . | sort")
}

/// Runs a job whose attachments must be refused and checks the job failed
/// in setup, said why, ran cleanup, and wrote nothing named PWNED outside
/// `attachments/`.
fn assert_refused(members: &[Member], end: bool, why: &str) {
    assert_refused_within(members, end, why, T);
}

fn assert_refused_within(members: &[Member], end: bool, why: &str, deadline: Duration) {
    let server = FakeServer::start();
    let job = unique_id();
    attachments_job(&server, &job, tar_gz(members, end), "");
    let agent = refusing_agent(&server);
    let out = agent.run_once(deadline);
    assert!(out.status.success());

    let setup = status_of(&server, &job, "setup");
    assert!(setup.is_some_and(|c| c != 0), "setup status {setup:?}");
    assert_eq!(status_of(&server, &job, "cleanup"), Some(0));
    assert_eq!(status_of(&server, &job, "test"), None);
    let detail = event_detail(&server, &job, "setup_fail")
        .unwrap_or_else(|| panic!("no setup_fail event: {:?}", server.events(&job)));
    assert!(detail.contains(why), "setup_fail detail {detail:?} should say {why:?}");
    let output = server.log_text(&job, "output");
    assert!(!output.contains("SETUP_RAN") && !output.contains("TEST_RAN"), "{output}");
    assert!(output.contains("CLEANUP_RAN"), "{output}");
    for line in output.lines().filter(|l| l.contains("PWNED")) {
        assert!(line.starts_with("./attachments/"), "outside attachments/: {line}\n{output}");
    }
    assert!(find_named(agent.dir(), "PWNED").iter().all(|p| p.contains("/attachments/")));
    let log = fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).unwrap_or_default()
        + &String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(why), "the agent log says why: {log}");
}

#[test]
fn attachments_unpack_under_phase_folders_and_leave_phase_data() {
    let server = FakeServer::start();
    let job = unique_id();
    let script = b"#!/bin/sh\necho from attachment\n";
    let mut suid = file("test/run.sh", script);
    suid.mode = 0o6755;
    let members = [
        dir("test/"),
        suid,
        file("./provision/image.img", b"IMAGE"),
        link(SYM, "test/sub/run-link", "../run.sh"),
        link(SYM, "test/image", "../provision/image.img"),
        link(HARD, "test/run-copy.sh", "test/run.sh"),
    ];
    // provision_data holds only attachments: it counts as absent.
    attachments_job(&server, &job, tar_gz(&members, true), r#","provision_data":{"attachments":[{"agent":"p"}]}"#);
    let agent = Agent::new(&server).command("provision", "echo PROVISION_RAN").command(
        "test",
        "sh attachments/test/sub/run-link; cat attachments/test/image; echo; stat -c 'mode=%a' attachments/test/run.sh; \
         test attachments/test/run.sh -ef attachments/test/run-copy.sh && echo HARDLINKED; grep -c attachments testflinger.json",
    );
    let out = agent.run_once(T);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status_of(&server, &job, "test"), Some(0));
    assert_eq!(status_of(&server, &job, "provision"), None, "provision_data left empty is absent");
    let text = server.log_text_phase(&job, "output", "test");
    assert!(text.contains("from attachment"), "{text}");
    assert!(text.contains("IMAGE"), "{text}");
    assert!(text.contains("mode=755"), "setuid/setgid dropped: {text}");
    assert!(text.contains("HARDLINKED"), "{text}");
    // testflinger.json keeps the job as received, as upstream.
    assert!(text.lines().any(|l| l.trim() == "1"), "{text}");
    assert!(!server.log_text(&job, "output").contains("PROVISION_RAN"));
}

#[test]
fn attachments_with_traversal_are_refused() {
    assert_refused(&[file("test/ok", b"x"), file("test/../../PWNED", b"x")], true, "a path with `..`");
}

#[test]
fn attachments_with_an_absolute_path_are_refused() {
    // Where the member would land if its absolute path were obeyed.
    let plant = format!("/tmp/PWNED-{}", unique_id());
    assert_refused(&[file(&plant, b"x")], true, "absolute path");
    assert!(!Path::new(&plant).exists(), "{plant} was written");
}

#[test]
fn attachments_outside_the_phase_folders_are_refused() {
    assert_refused(&[file("PWNED", b"x")], true, "not under provision/");
}

#[test]
fn attachments_with_a_symlink_leaving_the_folder_are_refused() {
    assert_refused(
        &[link(SYM, "test/PWNED-link", "../../../../etc"), file("test/PWNED-link/PWNED", b"x")],
        true,
        "leaves",
    );
}

#[test]
fn attachments_with_an_absolute_symlink_are_refused() {
    assert_refused(&[link(SYM, "test/PWNED", "/etc/shadow")], true, "absolute path");
}

#[test]
fn attachments_with_a_symlink_chain_are_refused() {
    // Each link alone stays inside; through `d`, `e` would climb out.
    assert_refused(
        &[link(SYM, "test/sub/d", "../../provision"), link(SYM, "test/sub/PWNED", "d/../../..")],
        true,
        "after a name",
    );
}

#[test]
fn attachments_writing_through_a_link_are_refused() {
    assert_refused(&[link(SYM, "test/d", "../provision"), file("test/d/PWNED", b"x")], true, "link or a file");
}

#[test]
fn attachments_with_a_hard_link_to_outside_are_refused() {
    assert_refused(&[link(HARD, "test/PWNED", "/etc/passwd")], true, "hard link target");
    assert_refused(&[link(HARD, "test/PWNED", "test/../../../etc/passwd")], true, "hard link target");
}

#[test]
fn attachments_with_device_files_or_fifos_are_refused() {
    assert_refused(
        &[Member { name: "test/PWNED-null", kind: CHR, mode: 0o666, link: "", data: b"", size: None }],
        true,
        "device",
    );
    assert_refused(
        &[Member { name: "test/PWNED-fifo", kind: FIFO, mode: 0o666, link: "", data: b"", size: None }],
        true,
        "fifo",
    );
}

#[test]
fn attachments_bomb_stops_at_the_size_limit() {
    // 4 MiB of zeros announcing 9 GiB: refused on the header, before a byte
    // is written (a real 9 GiB of zeros gzips to 9 MB; it would stop here).
    let zeros = vec![0u8; 4 << 20];
    let bomb = Member { name: "test/PWNED-zeros", kind: REG, mode: 0o644, link: "", data: &zeros, size: Some(9 << 30) };
    assert_refused(&[file("test/small", b"ok"), bomb], false, "unpacked size");
}

#[test]
fn attachments_bomb_stops_at_the_entry_limit() {
    let names: Vec<String> = (0..100_001).map(|i| format!("test/f{i}")).collect();
    let members: Vec<Member> = names.iter().map(|n| file(n, b"")).collect();
    // 100,000 files written before the limit is met: ~16 s alone, several
    // times that beside the rest of the suite on two cores.
    assert_refused_within(&members, true, "more than 100000 members", Duration::from_secs(180));
}

#[test]
fn attachments_that_are_not_a_tarball_fail_setup() {
    let server = FakeServer::start();
    let job = unique_id();
    attachments_job(&server, &job, b"not gzip at all".to_vec(), "");
    let agent = refusing_agent(&server);
    assert!(agent.run_once(T).status.success());
    assert!(status_of(&server, &job, "setup").is_some_and(|c| c != 0));
    assert_eq!(status_of(&server, &job, "cleanup"), Some(0));
    let detail = event_detail(&server, &job, "setup_fail").unwrap_or_default();
    assert!(detail.contains("unreadable"), "{detail}");
}

// ---- artifacts -----------------------------------------------------------------

#[test]
fn artifact_symlink_to_a_file_outside_uploads_the_link_not_the_content() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server);
    let secret = agent.dir().join("secret.txt");
    fs::write(&secret, "TOP-SECRET-CONTENT").unwrap();
    let agent = agent.command(
        "test",
        &format!("mkdir -p artifacts/sub && echo kept > artifacts/sub/log.txt && ln -s {} artifacts/leak && ln -s ../leak artifacts/sub/leak2", secret.display()),
    );
    assert!(agent.run_once(T).status.success());
    let bytes = server.artifact(&job).expect("artifact uploaded");
    let members = server.artifact_members(&job);
    let find = |n: &str| {
        members
            .iter()
            .find(|m| m.0 == n)
            .unwrap_or_else(|| panic!("{n} in {:?}", members.iter().map(|m| &m.0).collect::<Vec<_>>()))
    };
    assert_eq!(find("artifacts/sub/log.txt").1, b"kept\n");
    assert_eq!(find("artifacts/leak").2, SYM);
    assert!(find("artifacts/leak").1.is_empty());
    let mut all = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut all).unwrap();
    assert!(!all.windows(18).any(|w| w == b"TOP-SECRET-CONTENT"), "the linked file's content was uploaded");
}

/// `artifacts` itself a link to a folder outside the run dir: the upload
/// holds the link only (as upstream's tarfile stores it), not the folder.
#[test]
fn artifacts_folder_that_is_a_link_uploads_the_link_not_the_folder() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server);
    let outside = agent.dir().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("shadow"), "TOP-SECRET-CONTENT").unwrap();
    let agent = agent.command("test", &format!("ln -s {} artifacts", outside.display()));
    assert!(agent.run_once(T).status.success());
    let bytes = server.artifact(&job).expect("artifact uploaded");
    let members = server.artifact_members(&job);
    assert_eq!(members.iter().map(|m| (m.0.as_str(), m.2)).collect::<Vec<_>>(), [("artifacts", SYM)]);
    let mut all = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut all).unwrap();
    assert!(!all.windows(18).any(|w| w == b"TOP-SECRET-CONTENT"), "the linked folder's content was uploaded");
}

/// A TCP proxy to `upstream` that cuts the first `cuts` artifact uploads
/// after `after` bytes, both ways, as a dying connection would.
fn cutting_proxy(upstream: String, cuts: usize, after: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let cut_count = done.clone();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let upstream = upstream.clone();
            let cut_count = cut_count.clone();
            thread::spawn(move || {
                let Ok(mut server) = TcpStream::connect(&upstream) else { return };
                let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else { return };
                thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(Shutdown::Write);
                });
                let mut buf = vec![0u8; 16 * 1024];
                let mut sent = 0usize;
                let mut cutting = None;
                loop {
                    let n = match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    // Each request on a kept connection starts a read (the
                    // agent waits for an answer before the next one).
                    if cutting != Some(true) {
                        let head = String::from_utf8_lossy(&buf[..n.min(200)]).into_owned();
                        let is_upload =
                            head.starts_with("POST ") && head.lines().next().is_some_and(|l| l.contains("/artifact"));
                        cutting = Some(is_upload && cut_count.fetch_add(1, Ordering::SeqCst) < cuts);
                        if cutting == Some(true) {
                            sent = 0;
                        }
                    }
                    if cutting == Some(true) && sent + n > after {
                        let _ = server.write_all(&buf[..after - sent]);
                        let _ = client.shutdown(Shutdown::Both);
                        let _ = server.shutdown(Shutdown::Both);
                        return;
                    }
                    if server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
                let _ = server.shutdown(Shutdown::Write);
            });
        }
    });
    (format!("http://{addr}"), done)
}

#[test]
fn artifact_upload_cut_half_way_is_retried_and_arrives_whole() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let (proxy, uploads) = cutting_proxy(server.addr(), 1, 400_000);
    let agent = Agent::new(&server)
        .set("server_address", &yaml_str(&proxy))
        // 2 MiB that deflate cannot shrink: the body is well past the cut.
        .command(
            "test",
            "mkdir artifacts && head -c 2097152 /dev/urandom > artifacts/blob.bin && seq 1 50000 > artifacts/log.txt",
        );
    let out = agent.run_once(T);
    assert!(out.status.success());
    assert!(uploads.load(Ordering::SeqCst) >= 2, "the upload was cut once, then sent again");
    let members = server.artifact_members(&job);
    let blob = members.iter().find(|m| m.0 == "artifacts/blob.bin").expect("blob uploaded");
    assert_eq!(blob.1.len(), 2 << 20);
    let log = members.iter().find(|m| m.0 == "artifacts/log.txt").expect("log uploaded");
    assert!(log.1.ends_with(b"\n50000\n"));
    let last = server.results_posted(&job).last().cloned().unwrap();
    assert_eq!(last.get("job_state").and_then(Json::as_str), Some("complete"));
}

#[test]
fn artifacts_that_fill_the_disk_are_logged_and_the_outcome_still_delivered() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server);
    let small = agent.dir().join("small-disk");
    fs::create_dir_all(&small).unwrap();
    let Some(disk) = SmallDisk::mount(&small, 2) else { return };
    let agent = disk
        .enter(agent)
        .set("execution_basedir", &yaml_str(&small.join("run").to_string_lossy()))
        // A 2 MiB disk is far below the disk guard's default: off here, the
        // point is a job that fills the disk after it was taken.
        .set("min_free_mb", "0")
        // 1.5 MiB of noise fits; its archive next to it does not.
        .command("test", "mkdir artifacts && head -c 1572864 /dev/urandom > artifacts/blob.bin");
    let out = agent.run_once(T);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status_of(&server, &job, "test"), Some(0));
    let last = server.results_posted(&job).last().cloned().unwrap();
    assert_eq!(last.get("job_state").and_then(Json::as_str), Some("complete"));
    assert!(server.artifact(&job).is_none());
    let log = fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).unwrap_or_default()
        + &String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("cannot pack artifacts") && log.contains("No space left"), "{log}");
}
