//! Counters and the Prometheus text exposition format, served from the
//! agent's one thread, and mirrored to a node_exporter textfile.
//!
//! The names and labels are upstream's (`jobs_total`, `failures_total`,
//! `phase_duration_seconds`, `recovery_failures_total`), so dashboards made
//! for the Python agent keep working.
//!
//! The endpoint never blocks the agent: the listener and every connection
//! are non-blocking, each connection has a small request buffer and
//! deadlines, and the number of open connections is capped. The endpoint
//! is a wake source of the agent's one waiting place (`wait`): its
//! descriptors are polled along with the others, and it is served whenever
//! the agent waits (between polls, in the allocation hold, and while a
//! phase runs). Metrics never decides how long the agent sleeps.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use crate::atomic::write_atomic_mode;
use crate::phase::RECOVERY_FAILED;
use crate::wait;

mod endpoint;
use endpoint::Endpoint;
#[cfg(test)]
use endpoint::MAX_HEAD;

/// Upstream's buckets, in seconds: phases last minutes to hours.
pub const BUCKETS: [f64; 8] = [60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Non-cumulative counts per bucket of [`BUCKETS`]; the `+Inf` bucket
    /// is `count`.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

/// The agent's counters since it started, and where they are published.
pub struct Metrics {
    agent_id: String,
    identifier: String,
    jobs: u64,
    failures: BTreeMap<String, u64>,
    recovery_failures: u64,
    /// Keyed by (phase, release).
    durations: BTreeMap<(String, String), Histogram>,
    endpoint: Option<Endpoint>,
    textfile: Option<PathBuf>,
    textfile_failed: bool,
    /// Where to measure free disk space for the host gauges; none: no
    /// host gauges (unit tests compare exact output).
    vitals_dir: Option<PathBuf>,
}

impl Metrics {
    /// Counters only: nothing served, nothing written (tests, `--job`).
    pub fn new(agent_id: &str, identifier: &str) -> Metrics {
        Metrics {
            agent_id: agent_id.to_string(),
            identifier: identifier.to_string(),
            jobs: 0,
            failures: BTreeMap::new(),
            recovery_failures: 0,
            durations: BTreeMap::new(),
            endpoint: None,
            textfile: None,
            textfile_failed: false,
            vitals_dir: None,
        }
    }

    /// Listens on `address`: by default all addresses, as upstream's
    /// `start_http_server` does (Prometheus scrapes agents from another
    /// host); `metrics_address` narrows it.
    pub fn serve(mut self, address: SocketAddr) -> io::Result<Metrics> {
        let listener = TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        log::info!("serving metrics on {}", listener.local_addr()?);
        self.endpoint = Some(Endpoint { listener, conns: Vec::new() });
        Ok(self)
    }

    /// Also writes the exposition text to `path` (atomically) on every change.
    /// Adds the host gauges (disk free under `dir`, memory, temperature,
    /// throttling, own RSS), read at each scrape.
    pub fn with_vitals(mut self, dir: PathBuf) -> Metrics {
        self.vitals_dir = Some(dir);
        self
    }

    pub fn with_textfile(mut self, path: Option<PathBuf>) -> Metrics {
        self.textfile = path;
        self.write_textfile();
        self
    }

    pub fn job_started(&mut self) {
        self.jobs += 1;
        self.write_textfile();
    }

    /// Records a phase that ended with `code` after `seconds`. `release` is
    /// the label of the system on the device, `""` before provisioning.
    pub fn phase_ended(&mut self, phase: &str, seconds: f64, code: i32, release: &str) {
        self.durations.entry((phase.to_string(), release.to_string())).or_default().observe(seconds);
        if code != 0 {
            *self.failures.entry(phase.to_string()).or_default() += 1;
        }
        if code == RECOVERY_FAILED {
            self.recovery_failures += 1;
        }
        self.write_textfile();
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let agent = format!("agent_id=\"{}\"", escape(&self.agent_id));
        let mut s = String::with_capacity(2048);
        // Counters labelled only by agent_id start at 0 (upstream shows
        // them only after the first increment) so that rate() has a base.
        header(&mut s, "jobs", "Total jobs processed since last agent restart", "counter");
        let _ = writeln!(s, "jobs_total{{{agent}}} {}", float(self.jobs as f64));
        header(&mut s, "failures", "Total job failures since last agent restart", "counter");
        for (phase, n) in &self.failures {
            let _ = writeln!(s, "failures_total{{{agent},test_phase=\"{}\"}} {}", escape(phase), float(*n as f64));
        }
        header(
            &mut s,
            "phase_duration_seconds",
            "Duration of each job phase in seconds since last agent restart",
            "histogram",
        );
        for ((phase, release), h) in &self.durations {
            let labels = format!(
                "{agent},test_phase=\"{}\",identifier=\"{}\",release=\"{}\"",
                escape(phase),
                escape(&self.identifier),
                escape(release)
            );
            let mut cumulative = 0;
            for (b, n) in BUCKETS.iter().zip(h.buckets) {
                cumulative += n;
                let _ = writeln!(
                    s,
                    "phase_duration_seconds_bucket{{{labels},le=\"{}\"}} {}",
                    float(*b),
                    float(cumulative as f64)
                );
            }
            let _ = writeln!(s, "phase_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", float(h.count as f64));
            let _ = writeln!(s, "phase_duration_seconds_count{{{labels}}} {}", float(h.count as f64));
            let _ = writeln!(s, "phase_duration_seconds_sum{{{labels}}} {}", float(h.sum));
        }
        header(&mut s, "recovery_failures", "Total recovery failures since last agent restart", "counter");
        let _ = writeln!(s, "recovery_failures_total{{{agent}}} {}", float(self.recovery_failures as f64));
        if let Some(dir) = &self.vitals_dir {
            use crate::vitals;
            let gauges = [
                (
                    "testflinger_agent_disk_free_bytes",
                    "Bytes free under execution_basedir",
                    vitals::disk_free(vitals::existing_ancestor(dir)).map(|b| b as f64),
                ),
                (
                    "testflinger_agent_memory_available_bytes",
                    "MemAvailable of the host",
                    vitals::mem_available().map(|b| b as f64),
                ),
                (
                    "testflinger_agent_cpu_temperature_celsius",
                    "CPU temperature (thermal zone)",
                    vitals::cpu_temperature(),
                ),
                (
                    "testflinger_agent_throttled_flags",
                    "Raspberry Pi firmware throttling flags (get_throttled)",
                    vitals::throttled().map(|b| b as f64),
                ),
                (
                    "testflinger_agent_resident_memory_bytes",
                    "Resident memory of the agent",
                    vitals::own_rss().map(|b| b as f64),
                ),
            ];
            for (name, help, value) in gauges {
                if let Some(v) = value {
                    header(&mut s, name, help, "gauge");
                    let _ = writeln!(s, "{name}{{{agent}}} {}", float(v));
                }
            }
        }
        s
    }

    fn write_textfile(&mut self) {
        let Some(path) = &self.textfile else { return };
        // 0644: node_exporter reads it as another user; it holds no job
        // text but the release label, which comes masked.
        match write_atomic_mode(path, self.render().as_bytes(), 0o644) {
            Ok(()) => self.textfile_failed = false,
            // Logged once per run of failures, not on every change.
            Err(e) if !self.textfile_failed => {
                self.textfile_failed = true;
                log::error!("cannot write metrics textfile {}: {e}", path.display());
            }
            Err(_) => {}
        }
    }

    /// Accepts, reads and answers whatever scrapers are ready; never waits.
    pub fn service(&mut self, now: Instant) {
        // Taken out so that rendering can borrow self.
        let Some(mut ep) = self.endpoint.take() else { return };
        // Rendered at most once per wake, and only when someone asked.
        let mut body: Option<Vec<u8>> = None;
        let this = &*self;
        ep.service(now, &mut || body.get_or_insert_with(|| this.render().into_bytes()).clone());
        self.endpoint = Some(ep);
    }

    #[cfg(test)]
    fn local_port(&self) -> Option<u16> {
        self.endpoint.as_ref().and_then(|e| e.listener.local_addr().ok()).map(|a| a.port())
    }
}

impl wait::Source for Metrics {
    fn fds(&self, out: &mut Vec<libc::pollfd>) {
        let Some(ep) = &self.endpoint else { return };
        out.push(libc::pollfd { fd: ep.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        for c in &ep.conns {
            let events = if c.out.is_some() { libc::POLLOUT } else { libc::POLLIN };
            out.push(libc::pollfd { fd: c.stream.as_raw_fd(), events, revents: 0 });
        }
    }

    /// A connection's deadline: it is dropped then, ready or not.
    fn due(&self) -> Option<Instant> {
        self.endpoint.as_ref()?.conns.iter().map(|c| c.deadline()).min()
    }

    fn service(&mut self, now: Instant) {
        Metrics::service(self, now);
    }
}

fn header(s: &mut String, name: &str, help: &str, kind: &str) {
    let full = if kind == "counter" { format!("{name}_total") } else { name.to_string() };
    let _ = writeln!(s, "# HELP {full} {help}");
    let _ = writeln!(s, "# TYPE {full} {kind}");
}

/// Numbers as prometheus_client prints them (`1.0`, `60.0`, `0.5`).
fn float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.1}") } else { format!("{v}") }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    #[test]
    fn exposition_has_upstream_names_labels_and_buckets() {
        let mut m = Metrics::new("agent-\"1\"", "lab-7");
        m.job_started();
        m.phase_ended("setup", 30.0, 0, "");
        m.phase_ended("provision", 200.0, 46, "");
        m.phase_ended("test", 90000.0, 1, "24.04");
        let text = m.render();
        let agent = r#"agent_id="agent-\"1\"""#;
        for line in [
            format!("jobs_total{{{agent}}} 1.0"),
            format!("failures_total{{{agent},test_phase=\"provision\"}} 1.0"),
            format!("failures_total{{{agent},test_phase=\"test\"}} 1.0"),
            format!("recovery_failures_total{{{agent}}} 1.0"),
            format!(
                "phase_duration_seconds_bucket{{{agent},test_phase=\"setup\",identifier=\"lab-7\",release=\"\",le=\"60.0\"}} 1.0"
            ),
            format!(
                "phase_duration_seconds_bucket{{{agent},test_phase=\"provision\",identifier=\"lab-7\",release=\"\",le=\"120.0\"}} 0.0"
            ),
            format!(
                "phase_duration_seconds_bucket{{{agent},test_phase=\"provision\",identifier=\"lab-7\",release=\"\",le=\"300.0\"}} 1.0"
            ),
            format!(
                "phase_duration_seconds_bucket{{{agent},test_phase=\"test\",identifier=\"lab-7\",release=\"24.04\",le=\"14400.0\"}} 0.0"
            ),
            format!(
                "phase_duration_seconds_bucket{{{agent},test_phase=\"test\",identifier=\"lab-7\",release=\"24.04\",le=\"+Inf\"}} 1.0"
            ),
            format!(
                "phase_duration_seconds_sum{{{agent},test_phase=\"test\",identifier=\"lab-7\",release=\"24.04\"}} 90000.0"
            ),
            "# TYPE phase_duration_seconds histogram".to_string(),
            "# TYPE jobs_total counter".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(!text.contains("failures_total{agent_id=\"agent-\\\"1\\\"\",test_phase=\"setup\""), "{text}");
    }

    fn scrape(port: u16, m: &mut Metrics, request: &[u8]) -> String {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.write_all(request).expect("send");
        c.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        loop {
            m.service(Instant::now());
            let mut buf = [0u8; 4096];
            match c.read(&mut buf) {
                Ok(0) => return String::from_utf8_lossy(&got).into_owned(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
            assert!(Instant::now() < deadline, "no answer; got {:?}", String::from_utf8_lossy(&got));
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn endpoint_answers_despite_silent_and_endless_clients() {
        let mut m = Metrics::new("a", "").serve(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let port = m.local_port().expect("port");
        // One client that never speaks, one that sends header bytes forever.
        let _silent = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut endless = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        endless.write_all(b"GET / HTTP/1.1\r\nX: ").expect("send");
        let _ = endless.write_all(&[b'a'; MAX_HEAD]);
        let t = Instant::now();
        m.service(Instant::now());
        assert!(t.elapsed() < Duration::from_millis(100), "service blocked for {:?}", t.elapsed());
        let answer = scrape(port, &mut m, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("\njobs_total{agent_id=\"a\"} 0.0\n"), "{answer}");
        let answer = scrape(port, &mut m, b"POST / HTTP/1.0\n\n");
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
        // The endless one was cut off at MAX_HEAD with a 431, not buffered.
        assert!(m.endpoint.as_ref().is_some_and(|e| e.conns.iter().all(|c| c.head.len() <= MAX_HEAD + 512)));
    }

    #[test]
    fn slow_clients_hold_a_place_one_second_at_most_and_a_scraper_still_gets_in() {
        let mut m = Metrics::new("a", "").serve(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let port = m.local_port().expect("port");
        let t0 = Instant::now();
        // As many slow clients as there are places: half silent, half
        // trickling a request head.
        let mut slow: Vec<TcpStream> =
            (0..endpoint::MAX_CONNS).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect")).collect();
        for c in slow.iter_mut().skip(1).step_by(2) {
            c.write_all(b"GE").expect("send");
        }
        let held = |m: &Metrics| m.endpoint.as_ref().map_or(0, |e| e.conns.len());
        let give_up = Instant::now() + Duration::from_secs(10);
        while held(&m) < endpoint::MAX_CONNS {
            assert!(Instant::now() < give_up, "only {} accepted", held(&m));
            m.service(t0);
            std::thread::sleep(Duration::from_millis(1));
        }
        // All places taken: a scraper still gets its answer...
        let answer = scrape(port, &mut m, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        // ...and however they trickle, the slow ones are gone a second after
        // they connected.
        for c in slow.iter_mut().skip(1).step_by(2) {
            c.write_all(b"T").expect("send");
        }
        m.service(t0 + Duration::from_millis(900));
        m.service(t0 + Duration::from_secs(1));
        assert_eq!(held(&m), 0);
        for c in &mut slow {
            c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let mut buf = [0u8; 64];
            assert_eq!(c.read(&mut buf).map_err(|e| e.kind()).ok(), Some(0), "closed without an answer");
        }
    }

    #[test]
    fn textfile_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("tf-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("testflinger.prom");
        let mut m = Metrics::new("a", "").with_textfile(Some(path.clone()));
        m.job_started();
        let text = std::fs::read_to_string(&path).expect("textfile");
        assert!(text.contains("jobs_total{agent_id=\"a\"} 1.0"), "{text}");
        let names: Vec<_> = std::fs::read_dir(&dir).expect("ls").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("testflinger.prom")], "no temp file left");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn scrapes_are_answered_while_the_agent_waits() {
        let mut m = Metrics::new("a", "").serve(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let port = m.local_port().expect("port");
        // The scraper says it got its answer through `done`, which ends the wait.
        let (done, mut tell) = std::os::unix::net::UnixStream::pair().expect("pair");
        let scraper = std::thread::spawn(move || {
            let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").expect("send");
            let mut answer = String::new();
            let _ = c.read_to_string(&mut answer);
            tell.write_all(b"x").expect("tell");
            answer
        });
        let t = Instant::now();
        let woke = crate::wait::until(
            t + Duration::from_secs(20),
            Some(&mut m),
            Some(done.as_raw_fd()),
            crate::wait::Ends::Stop,
        );
        let answer = scraper.join().expect("scraper");
        assert_eq!(woke, crate::wait::Woke::Ready);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    }
}
