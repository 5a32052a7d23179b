//! Config files: any text gives a config or a one-line error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use testflinger_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match Config::parse(text, Path::new("fuzz.conf")) {
            Ok(c) => assert!(!c.agent_id().trim().is_empty() && !c.job_queues().is_empty()),
            Err(e) => assert!(!e.to_string().contains(['\n', '\r']), "not one line: {e}"),
        }
    }
});
