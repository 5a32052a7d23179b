//! The minimal-image proof (`cross/minimal-image.sh`): the static agent in a
//! root file system holding only itself, a static busybox and /etc/passwd,
//! runs a real job against the fake server. Ignored by default: the script
//! builds the root and runs it with `TF_AGENT_WRAPPER` = its chroot runner.

use std::time::Duration;

use crate::fake_server::FakeServer;
use crate::harness::{Agent, QUEUE, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(120);

#[test]
#[ignore = "needs the root file system of cross/minimal-image.sh"]
fn minimal_image_job() {
    let arch =
        std::env::var("TF_IMAGE_ARCH").expect("TF_IMAGE_ARCH: the machine `uname -m` must print inside the image");
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"provision_data":{"url":"x"},"test_data":{"test_cmds":"x"}}"#));
    let agent = Agent::new(&server)
        .command("setup", "echo setup ran; ls /; ls /bin | wc -l")
        .command("provision", "echo provision ran; id")
        .command("test", "echo test ran on $(uname -m); test ! -e /lib && test ! -e /usr && echo no-libc-no-usr; mkdir -p artifacts; uname -m > artifacts/arch.txt")
        .command("cleanup", "echo cleanup ran");
    let out = agent.run_once(T);
    let log = |p: &str| server.log_text_phase(&job, "output", p);
    for phase in ["setup", "provision", "test", "cleanup"] {
        println!("--- {phase} output (from the fake server)\n{}", log(phase).trim_end());
    }
    assert!(out.status.success(), "agent exit {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let result = server.result(&job).expect("results posted");
    let status = result.get("status").cloned().unwrap_or(Json::Null);
    println!("--- status: {status}");
    for phase in ["setup", "provision", "test", "cleanup"] {
        assert_eq!(status.get(phase).and_then(Json::as_i64), Some(0), "status of {phase}: {status}");
        assert!(log(phase).contains(&format!("{phase} ran")), "{phase}: {}", log(phase));
    }
    // The image's root is what the script put there, and nothing else.
    let setup = log("setup");
    for entry in ["bin", "etc", "tmp"] {
        assert!(setup.lines().any(|l| l.trim() == entry), "/ lacks {entry}: {setup}");
    }
    assert!(!setup.lines().any(|l| ["lib", "usr", "lib64"].contains(&l.trim())), "{setup}");
    assert!(log("provision").contains("uid=0(root)"), "/etc/passwd names uid 0: {}", log("provision"));
    assert!(log("test").contains(&format!("test ran on {arch}")), "{}", log("test"));
    assert!(log("test").contains("no-libc-no-usr"), "{}", log("test"));
    let members = server.artifact_members(&job);
    println!(
        "--- artifacts: {:?}",
        members.iter().map(|(p, c, _)| (p.clone(), String::from_utf8_lossy(c).into_owned())).collect::<Vec<_>>()
    );
    assert!(
        members.iter().any(|(p, c, _)| p == "artifacts/arch.txt" && *c == format!("{arch}\n").into_bytes()),
        "artifact"
    );
    let last = server.results_posted(&job).last().cloned().expect("a final result");
    assert_eq!(last.get("job_state").and_then(Json::as_str), Some("complete"));
}
