//! `--version`: what a binary taken from a controller says about itself
//! (issue 25 item 4): version, commit, target, features and build date.

use std::process::Command;

use crate::harness::{agent_bin, agent_command};

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}: ");
    let mut found = text.lines().filter_map(|l| l.strip_prefix(prefix.as_str()));
    let v = found.next().unwrap_or_else(|| panic!("no `{key}:` line in\n{text}"));
    assert!(found.next().is_none(), "two `{key}:` lines in\n{text}");
    v
}

#[test]
fn version_names_the_commit_target_features_and_build_date() {
    let out = agent_command().arg("--version").output().expect("run the agent");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().next(), Some(concat!("testflinger-agent ", env!("CARGO_PKG_VERSION"))), "{text}");

    let commit = field(&text, "commit");
    assert!(commit == "unknown" || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())), "{text}");
    let target = field(&text, "target");
    assert!(target.contains("-linux"), "{text}");
    let features = field(&text, "features");
    assert!(features == "tls" || features == "plain", "{text}");
    let date = field(&text, "built");
    let b = date.as_bytes();
    assert!(
        b.len() == 10 && b[4] == b'-' && b[7] == b'-' && date.bytes().filter(u8::is_ascii_digit).count() == 8,
        "{text}"
    );

    // The binary cargo built with this test: its facts are this checkout's.
    let own_build =
        std::env::var_os("TF_AGENT_BIN").is_none() || agent_bin() == env!("CARGO_BIN_EXE_testflinger-agent");
    if own_build {
        assert_eq!(features, if cfg!(feature = "tls") { "tls" } else { "plain" }, "{text}");
        if std::env::var_os("TF_AGENT_COMMIT").is_none() {
            if let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) {
                assert_eq!(commit, head, "{text}");
            }
        }
        if std::env::var_os("SOURCE_DATE_EPOCH").is_none() {
            let day = Command::new("git")
                .args(["log", "-1", "--date=format-local:%Y-%m-%d", "--format=%cd"])
                .env("TZ", "UTC")
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
            if let Some(day) = day {
                assert_eq!(date, day, "the build date is the commit's, not the clock's\n{text}");
            }
        }
    }
}
