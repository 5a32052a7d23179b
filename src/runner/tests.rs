use super::*;

struct Collect {
    out: Vec<u8>,
    stop_after: Option<Instant>,
}

impl Watcher for Collect {
    fn output(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
    }
    fn check(&mut self, now: Instant, _drain: &mut Drain) -> Option<Stop> {
        self.stop_after.filter(|t| now >= *t).map(|_| Stop::Cancelled)
    }
    fn next_wake(&self, now: Instant) -> Instant {
        self.stop_after.unwrap_or(now + Duration::from_secs(1))
    }
}

use super::TEST_SERIAL as SERIAL;

fn collect() -> Collect {
    Collect { out: Vec::new(), stop_after: None }
}

#[test]
fn merges_output_and_reports_code_mod_256() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = collect();
    let o = run("echo out; echo err >&2; exit 300", Path::new("/"), &[], Limits::default(), &mut w);
    assert_eq!(o.code, 300 % 256);
    assert_eq!(String::from_utf8_lossy(&w.out), "out\nerr\n");
}

#[test]
fn env_and_cwd_are_applied() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = collect();
    let env = vec![("TF_X".to_string(), "42".to_string())];
    let o = run("echo $TF_X; pwd", Path::new("/tmp"), &env, Limits::default(), &mut w);
    assert_eq!(o.code, 0);
    assert_eq!(String::from_utf8_lossy(&w.out), "42\n/tmp\n");
}

#[test]
fn missing_cwd_gives_100() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = collect();
    let o = run("true", Path::new("/nonexistent/dir"), &[], Limits::default(), &mut w);
    assert_eq!(o.code, 100);
    assert!(String::from_utf8_lossy(&w.out).contains("cannot start"));
}

#[test]
fn global_timeout_kills_the_group() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = collect();
    let limits = Limits { global: Some(Duration::from_millis(300)), ..Limits::default() };
    // Run to its end, the command would leave the file behind.
    let dir = std::env::temp_dir().join(format!("tf-runner-global-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let o = run("sleep 30 & sleep 30; touch ran-to-the-end", &dir, &[], limits, &mut w);
    let ran = dir.join("ran-to-the-end").exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ran, "the command was waited for, not killed");
    assert!(matches!(o.stopped, Some(Stop::GlobalTimeout(_))));
    assert!(String::from_utf8_lossy(&w.out).contains("Global timeout reached"));
}

#[test]
fn a_full_read_then_silence_does_not_block_the_loop() {
    // Exactly one read buffer of output, then nothing: a blocking second
    // read would hold the loop, and the timeout would never fire.
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = collect();
    let limits = Limits { global: Some(Duration::from_millis(500)), ..Limits::default() };
    let cmd = format!("dd if=/dev/zero bs={READ_BUF} count=1 2>/dev/null; sleep 30");
    let o = run(&cmd, Path::new("/"), &[], limits, &mut w);
    assert!(matches!(o.stopped, Some(Stop::GlobalTimeout(_))), "{o:?}");
    assert_eq!(w.out.iter().filter(|&&b| b == 0).count(), READ_BUF);
}

/// Blocks in its first `check` as a call to a stalled server would,
/// draining meanwhile, until the stop message comes through `drain`.
struct Stalled {
    out: Vec<u8>,
    stopped_inside: bool,
    calls: u32,
}

impl Watcher for Stalled {
    fn output(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
    }
    fn check(&mut self, _: Instant, drain: &mut Drain) -> Option<Stop> {
        self.calls += 1;
        if self.calls > 1 {
            return None;
        }
        let give_up = Instant::now() + Duration::from_secs(20);
        while Instant::now() < give_up && !self.stopped_inside {
            let out = &mut self.out;
            drain(&mut |data| out.extend_from_slice(data));
            self.stopped_inside = String::from_utf8_lossy(&self.out).contains("Global timeout reached");
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
    fn next_wake(&self, now: Instant) -> Instant {
        now + Duration::from_secs(1)
    }
}

#[test]
fn a_timeout_is_acted_on_while_the_watcher_waits_on_a_slow_server() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = Stalled { out: Vec::new(), stopped_inside: false, calls: 0 };
    let limits = Limits { global: Some(Duration::from_millis(300)), ..Limits::default() };
    let o = run("echo started; sleep 30", Path::new("/"), &[], limits, &mut w);
    assert!(w.stopped_inside, "the stop waited for the call to end: {}", String::from_utf8_lossy(&w.out));
    assert!(matches!(o.stopped, Some(Stop::GlobalTimeout(_))), "{o:?}");
    assert!(String::from_utf8_lossy(&w.out).starts_with("started\n"), "{}", String::from_utf8_lossy(&w.out));
}

#[test]
fn limits_of_any_length_never_overflow() {
    let now = Instant::now();
    let huge = Limits {
        global: Some(Duration::MAX),
        output: Some(Duration::from_secs(u64::MAX)),
        kill_grace: Some(Duration::MAX),
        on_agent_stop: true,
    };
    assert!(huge.next_due(now, now).is_some_and(|t| t > now));
    assert_eq!(huge.expired(now, now, now), None);
    let short =
        Limits { global: Some(Duration::from_secs(5)), output: Some(Duration::from_secs(2)), ..Limits::default() };
    assert_eq!(short.next_due(now, now), Some(now + Duration::from_secs(2)));
    assert_eq!(short.expired(now, now, now + Duration::from_secs(2)), Some(Stop::OutputTimeout(2)));
    assert_eq!(
        short.expired(now, now + Duration::from_secs(4), now + Duration::from_secs(5)),
        Some(Stop::GlobalTimeout(5))
    );
    // A clock read before the phase began (as `drain` may pass) is no panic.
    assert_eq!(short.expired(now + Duration::from_secs(9), now + Duration::from_secs(9), now), None);
    assert_eq!(Limits::default().next_due(now, now), None);

    // The phase itself runs to its end under such limits.
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = collect();
    let o = run("echo done", Path::new("/"), &[], huge, &mut w);
    assert_eq!((o.code, o.stopped), (0, None));
    assert_eq!(String::from_utf8_lossy(&w.out), "done\n");
}
