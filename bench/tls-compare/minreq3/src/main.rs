//! N sequential GETs with minreq 3 (rustls 0.23 + aws-lc-rs, platform
//! verifier: the system store / SSL_CERT_FILE); prints the median time.
fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("url");
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let mut times = Vec::new();
    for _ in 0..n {
        let t = std::time::Instant::now();
        let r = minreq::get(&url).send().expect("request");
        assert_eq!(r.status_code, 200);
        times.push(t.elapsed());
    }
    times.sort();
    println!("minreq3 requests={n} median={:?} min={:?} max={:?}", times[n / 2], times[0], times[n - 1]);
}
