//! Inputs the fuzz targets (`fuzz/`) once crashed on, replayed through the
//! same checks on every `cargo test`, so no nightly toolchain is needed to
//! keep them fixed.

use std::path::{Path, PathBuf};

use testflinger_agent::client::wire;
use testflinger_agent::config::Config;
use testflinger_agent::json::Json;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        out.push((entry.path(), bytes));
    }
    out
}

#[test]
fn config_regressions_give_one_line_errors() {
    let cases = inputs("config");
    assert!(!cases.is_empty(), "fuzz/regressions/config holds the crash the fuzzer found");
    for (path, bytes) in cases {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = Config::parse(&text, Path::new("fuzz.conf")) {
            let line = e.to_string();
            assert!(!line.contains(['\n', '\r']), "{}: {line:?}", path.display());
        }
    }
}

#[test]
fn json_regressions_round_trip() {
    let cases = inputs("json");
    assert!(!cases.is_empty(), "fuzz/regressions/json holds the tricky JSON corpus");
    let mut parsed = 0;
    for (path, bytes) in cases {
        if let Ok(v) = Json::parse_bytes(&bytes) {
            parsed += 1;
            assert_eq!(Json::parse(&v.to_string_compact()).ok(), Some(v), "{}", path.display());
        }
    }
    // Most of the corpus is valid JSON: a parser that refused everything
    // would otherwise pass.
    assert!(parsed >= 4, "{parsed} of the corpus parsed");
}

/// Same checks as the `answer` target: the first byte picks the cap.
#[test]
fn answer_regressions_are_errors_or_capped_answers() {
    let cases = inputs("answer");
    assert!(!cases.is_empty(), "fuzz/regressions/answer holds the chunk-size crash of issue 12");
    for (path, bytes) in cases {
        let Some((&c, rest)) = bytes.split_first() else { continue };
        let cap = [0usize, 1, 16, 4096, 1 << 20][c as usize % 5];
        if let Ok((head, body)) = wire::read_answer(rest, cap) {
            assert!(body.len() <= cap && (100..=599).contains(&head.status), "{}", path.display());
            if let Some(location) = head.location {
                let base = wire::Url::parse("https://tf.example.com:8443/v1/job?queue=q").expect("base URL");
                let _ = base.join(&location).map(|next| base.same_origin(&next));
            }
        }
    }
}

/// Same checks as the `limits` target (no config timeouts for a first
/// byte of 0): every limit within its cap, no instant out of range.
#[test]
fn limits_regressions_stay_within_the_caps() {
    let cases = inputs("limits");
    assert!(!cases.is_empty(), "fuzz/regressions/limits holds the job of issue 21");
    let config =
        Config::parse("agent_id: a\nserver_address: x\njob_queues: [q]\ntest_command: t\n", Path::new("fuzz.conf"))
            .expect("config");
    for (path, bytes) in cases {
        let Some((_, rest)) = bytes.split_first() else { continue };
        let Ok(job) = Json::parse(&String::from_utf8_lossy(rest)) else { continue };
        let plan = testflinger_agent::job::JobPlan::new(&config, job);
        let now = std::time::Instant::now();
        for p in &plan.phases {
            assert!(p.limits.global.is_none_or(|g| g.as_secs() <= 4 * 3600), "{}", path.display());
            assert!(p.limits.output.is_none_or(|o| o.as_secs() <= 15 * 60), "{}", path.display());
            let _ = (p.limits.next_due(now, now), p.limits.expired(now, now, now));
        }
    }
}
