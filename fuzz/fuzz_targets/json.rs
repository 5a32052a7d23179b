//! Job and server-answer JSON: never panics; what parses re-serializes to
//! text that parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use testflinger_agent::json::Json;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = Json::parse_bytes(data) {
        let text = v.to_string_compact();
        let again = Json::parse(&text).expect("our own output parses");
        assert_eq!(again, v);
        // What the job loop asks of a job must not panic either.
        let _ = v.get("job_id").and_then(Json::as_str);
        let _ = v.get("global_timeout").and_then(Json::as_i64);
        let _ = v.get("reserve_data").and_then(|d| d.get("timeout")).and_then(Json::as_i64);
        let _ = v.is_empty_like();
    }
});
