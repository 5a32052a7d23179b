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

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
#[allow(clippy::cast_possible_truncation)] // day 1..=31 and month 1..=12 by construction
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

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
        .and_then(|s| s.trim().parse::<i64>().ok())
        .or_else(|| in_git.then(|| git(&["log", "-1", "--format=%ct"])).flatten().and_then(|s| s.parse().ok()));
    let date = match epoch {
        Some(secs) => {
            let (y, m, d) = civil(secs.div_euclid(86_400));
            format!("{y:04}-{m:02}-{d:02}")
        }
        None => "unknown".into(),
    };
    let features = if std::env::var_os("CARGO_FEATURE_TLS").is_some() { "tls" } else { "plain" };
    println!("cargo:rustc-env=TF_AGENT_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=TF_AGENT_BUILD_TARGET={}", std::env::var("TARGET").unwrap_or_default());
    println!("cargo:rustc-env=TF_AGENT_BUILD_FEATURES={features}");
    println!("cargo:rustc-env=TF_AGENT_BUILD_DATE={date}");
}
