//! Job JSON through `JobPlan::new` and the runner's limit arithmetic: any
//! job gives every phase limits within the config's caps (4 h and 15 min
//! when the config has none, as upstream caps them), and no instant
//! computed from them panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::time::{Duration, Instant};
use testflinger_agent::config::{Config, MAX_JOB_TIMEOUT};
use testflinger_agent::job::JobPlan;
use testflinger_agent::json::Json;

/// Config values the first byte picks from (none, the bounds, the defaults).
const CONF: [Option<u64>; 6] = [None, Some(1), Some(60), Some(14_400), Some(90_000), Some(MAX_JOB_TIMEOUT)];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let Ok(job) = Json::parse(text) else { return };
    let (global, output) = (CONF[usize::from(pick % 6)], CONF[usize::from(pick / 6 % 6)]);
    let mut conf = "agent_id: a\nserver_address: x\njob_queues: [q]\ntest_command: t\nkill_grace: 86400\n".to_string();
    for (key, value) in [("global_timeout", global), ("output_timeout", output)] {
        if let Some(v) = value {
            conf.push_str(&format!("{key}: {v}\n"));
        }
    }
    let config = Config::parse(&conf, Path::new("fuzz.conf")).expect("a valid config");
    let plan = JobPlan::new(&config, job);
    let now = Instant::now();
    for p in &plan.phases {
        let l = p.limits;
        // The config's value, or the default when it has none, is the cap.
        let within = |d: Duration, conf: Option<u64>, default: u64| d >= Duration::from_secs(1) && d.as_secs() <= conf.unwrap_or(default);
        assert!(l.global.is_none_or(|g| within(g, global, 4 * 3600)), "{:?}", l.global);
        assert!(l.output.is_none_or(|o| within(o, output, 15 * 60)), "{:?}", l.output);
        // Times of every kind: before the phase began, long after it.
        for (start, last, at) in [(now, now, now), (now, now, now + Duration::from_secs(u32::MAX.into())), (now + Duration::from_secs(1), now, now)] {
            let _ = l.expired(start, last, at);
            if let Some(due) = l.next_due(start, last) {
                assert!(due >= start.min(last));
            }
        }
    }
    for w in &plan.warnings {
        assert!(!w.contains(['\n', '\r']), "not one line: {w}");
    }
});
