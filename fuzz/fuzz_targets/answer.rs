//! Server answers as bytes off the socket: the reader never panics, never
//! returns more body than the cap, and a redirect target it reports
//! resolves (or not) without panicking either.
#![no_main]
use libfuzzer_sys::fuzz_target;
use testflinger_agent::client::wire;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the cap, so both sides of it get exercised.
    let Some((&c, bytes)) = data.split_first() else { return };
    let cap = [0usize, 1, 16, 4096, 1 << 20][c as usize % 5];
    if let Ok((head, body)) = wire::read_answer(bytes, cap) {
        assert!(body.len() <= cap);
        assert!((100..=599).contains(&head.status));
        if let Some(location) = head.location {
            let base = wire::Url::parse("https://tf.example.com:8443/v1/job?queue=q").expect("base URL");
            if let Ok(next) = base.join(&location) {
                let _ = base.same_origin(&next);
                let _ = next.to_string();
            }
        }
    }
});
