//! Build facts for `--version`: the commit, the target, the features and the
//! build date. The date comes from SOURCE_DATE_EPOCH, else the commit's
//! date, never the clock: two builds of one commit stay bit-identical.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

// The agent's own date arithmetic (only `format_unix` is used here).
#[allow(dead_code)]
#[path = "src/timestamp.rs"]
mod timestamp;

fn main() {
    println!("cargo:rerun-if-env-changed=TF_AGENT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // A new commit or checkout changes HEAD or the ref it points to.
    let in_git = Path::new(".git").exists();
    if in_git {
        for p in [
            git(&["rev-parse", "--git-path", "HEAD"]),
            git(&["rev-parse", "--symbolic-full-name", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])),
        ]
        .into_iter()
        .flatten()
        {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    // A build from a tarball has no git: the packager says which commit.
    let commit = std::env::var("TF_AGENT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| in_git.then(|| git(&["rev-parse", "--short=12", "HEAD"])).flatten())
        .unwrap_or_else(|| "unknown".into());
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .or_else(|| in_git.then(|| git(&["log", "-1", "--format=%ct"])).flatten().and_then(|s| s.parse().ok()));
    let date = match epoch {
        // `YYYY-MM-DD` of the ISO 8601 timestamp.
        Some(secs) => timestamp::format_unix(secs, 0)[..10].to_string(),
        None => "unknown".into(),
    };
    let features = if std::env::var_os("CARGO_FEATURE_TLS").is_some() { "tls" } else { "plain" };
    println!("cargo:rustc-env=TF_AGENT_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=TF_AGENT_BUILD_TARGET={}", std::env::var("TARGET").unwrap_or_default());
    println!("cargo:rustc-env=TF_AGENT_BUILD_FEATURES={features}");
    println!("cargo:rustc-env=TF_AGENT_BUILD_DATE={date}");
}
