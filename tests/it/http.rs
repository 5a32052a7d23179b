//! HTTP and TLS through the real binary: redirects that would carry the
//! token elsewhere, https with a lab CA the test makes (openssl CLI), and
//! jobs through an HTTP proxy the test runs (plain and CONNECT).

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::fake_server::{FakeServer, Fault, FaultAction};
use crate::harness::{Agent, AgentProc, QUEUE, job_json, unique_id};
use crate::json::Json;

const T: Duration = Duration::from_secs(60);

fn completed(server: &FakeServer, job: &str) -> bool {
    server.results_posted(job).iter().any(|r| r.get("job_state").and_then(Json::as_str) == Some("complete"))
}

/// Waits for `what` in the agent's log; panics with diagnostics after `T`.
fn wait_log(p: &mut AgentProc, what: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let log = p.log_text();
        if log.contains(what) {
            return log;
        }
        if let Some(status) = p.try_wait() {
            panic!("agent exited ({status}) before logging {what:?}\n{}", p.diagnostics());
        }
        assert!(Instant::now() < deadline, "agent never logged {what:?}\n{}", p.diagnostics());
        thread::sleep(Duration::from_millis(20));
    }
}

fn redirect(location: &str) -> FaultAction {
    FaultAction::RawThenClose(
        format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n").into_bytes(),
    )
}

#[test]
fn http_redirects_to_another_host_or_port_get_no_token_and_no_job() {
    let server = FakeServer::start();
    server.require_auth("refresh-secret");
    let elsewhere = FakeServer::start();
    let bait = unique_id();
    elsewhere.push_job(&job_json(&bait, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let other_port = format!("http://127.0.0.1:{}", elsewhere.port());
    let other_host = format!("http://localhost:{}", elsewhere.port());
    // The token refresh (a POST with the refresh token), then job polls.
    server.add_fault(Fault::new(
        Some("POST"),
        "/v1/oauth2/refresh",
        1,
        redirect(&format!("{other_port}/v1/oauth2/refresh")),
    ));
    server.add_fault(Fault::new(Some("GET"), "/v1/job", 2, redirect(&format!("{other_host}/v1/job?queue={QUEUE}"))));
    server.add_fault(Fault::new(Some("GET"), "/v1/job", 2, redirect(&format!("{other_port}/v1/job?queue={QUEUE}"))));
    let mine = unique_id();
    let setup = Agent::new(&server).token("refresh-secret").command("test", "echo hi");
    let mut p = setup.spawn();
    wait_log(&mut p, "redirect refused");
    // Faults done, then the job from our own server runs.
    server.push_job(&job_json(&mine, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    server.wait_until(T, "our job complete", |s| completed(s, &mine));
    let log = p.log_text();
    assert!(log.contains(&format!("{other_port}/v1/oauth2/refresh is on another origin")), "{log}");
    assert!(log.contains(&format!("{other_host}/v1/job?queue={QUEUE} is on another origin")), "{log}");
    assert!(elsewhere.requests().is_empty(), "the other server was reached: {:?}", elsewhere.request_lines());
    assert_eq!(elsewhere.queued_jobs(), 1, "the job was not taken from the other server");
    assert!(!completed(&server, &bait) && !setup.run_dir(&bait).exists());
    assert!(p.try_wait().is_none(), "the agent keeps running\n{}", p.diagnostics());
}

/// A whole job, polls and posts alike, goes over one kept connection.
#[test]
fn http_one_kept_connection_carries_a_whole_job() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let setup = Agent::new(&server).command("test", "echo hi");
    assert!(setup.run_once(T).status.success());
    assert!(completed(&server, &job));
    let (connections, requests) = (server.connections(), server.requests().len());
    println!("{connections} connections for {requests} requests");
    assert!(
        requests >= 10 && connections <= 2,
        "{connections} connections for {requests} requests: {:?}",
        server.request_lines()
    );
}

#[test]
fn http_same_origin_redirect_is_followed() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    // Relative Location: same scheme, host and port.
    server.add_fault(Fault::new(Some("GET"), "/v1/job", 1, redirect(&format!("/v1/job?queue={QUEUE}"))));
    let setup = Agent::new(&server).command("test", "echo hi");
    assert!(setup.run_once(T).status.success());
    assert!(completed(&server, &job));
    let lines = server.request_lines();
    assert!(lines.iter().filter(|l| l.starts_with("GET /v1/job?")).count() >= 2, "{lines:?}");
}

#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use crate::harness::TempDir;
    use std::io::Read;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// A CA and a certificate for `localhost` and 127.0.0.1 it signed,
    /// made with the openssl CLI.
    pub struct Pki {
        pub dir: TempDir,
    }

    impl Pki {
        pub fn new() -> Pki {
            let dir = TempDir::new("tf-pki");
            let run = |args: &[&str]| {
                let out = Command::new("openssl")
                    .args(args)
                    .current_dir(dir.path())
                    .output()
                    .expect("openssl CLI (apt-get install openssl)");
                assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            };
            let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
            run(&[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Test Lab CA/O=TF Test"],
                &["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat());
            run(&[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]]
                .concat());
            std::fs::write(
                dir.path().join("ext.cnf"),
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
            )
            .unwrap();
            run(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ]);
            Pki { dir }
        }

        pub fn ca(&self) -> PathBuf {
            self.dir.path().join("ca.pem")
        }
    }

    /// A TLS front for the fake server: terminates TLS with the test's
    /// certificate and relays the bytes to the fake's plain port.
    pub struct TlsFront {
        pub port: u16,
        /// Connections accepted, and how many of their handshakes resumed
        /// an earlier TLS session.
        pub accepted: Arc<std::sync::atomic::AtomicUsize>,
        pub resumed: Arc<std::sync::atomic::AtomicUsize>,
        /// Why each connection ended early, as the server's TLS saw it
        /// (e.g. the alert the client sent).
        pub errors: Arc<Mutex<Vec<String>>>,
    }

    impl TlsFront {
        pub fn start(pki: &Pki, backend: u16) -> TlsFront {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::{CertificateDer, PrivateKeyDer};
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(pki.dir.path().join("server.pem")).unwrap().map(|c| c.unwrap()).collect();
            let key = PrivateKeyDer::from_pem_file(pki.dir.path().join("server.key")).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
            let config = Arc::new(config);
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let errors = Arc::new(Mutex::new(Vec::new()));
            let seen = errors.clone();
            let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let resumed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (a, r) = (accepted.clone(), resumed.clone());
            thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let config = config.clone();
                    let seen = seen.clone();
                    let r = r.clone();
                    thread::spawn(move || relay_tls(conn, config, backend, seen, r));
                }
            });
            TlsFront { port, accepted, resumed, errors }
        }

        pub fn errors(&self) -> Vec<String> {
            self.errors.lock().unwrap().clone()
        }
    }

    /// One connection: TLS on the client side, plain to the backend, until
    /// either side is done or a minute.
    fn relay_tls(
        client: TcpStream,
        config: Arc<rustls::ServerConfig>,
        backend: u16,
        errors: Arc<Mutex<Vec<String>>>,
        resumed: Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let Ok(conn) = rustls::ServerConnection::new(config) else { return };
        let Ok(mut plain) = TcpStream::connect(("127.0.0.1", backend)) else { return };
        let tick = Some(Duration::from_millis(5));
        let _ = client.set_read_timeout(tick);
        let _ = plain.set_read_timeout(tick);
        let mut tls = rustls::StreamOwned::new(conn, client);
        let mut buf = [0u8; 16384];
        let deadline = Instant::now() + Duration::from_secs(60);
        let idle =
            |e: &std::io::Error| matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
        let mut counted = false;
        while Instant::now() < deadline {
            if !counted && !tls.conn.is_handshaking() {
                counted = true;
                if tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    resumed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            match tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if plain.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if idle(&e) => {}
                Err(e) => {
                    errors.lock().unwrap().push(e.to_string());
                    break;
                }
            }
            match plain.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tls.write_all(&buf[..n]).and_then(|_| tls.flush()).is_err() {
                        break;
                    }
                }
                Err(e) if idle(&e) => {}
                Err(_) => break,
            }
        }
        tls.conn.send_close_notify();
        let _ = tls.flush();
        let _ = tls.sock.shutdown(Shutdown::Both);
    }

    fn https_setup(server: &FakeServer, front: &TlsFront, host: &str) -> crate::harness::AgentSetup {
        Agent::new(server)
            .set("server_address", &format!("\"https://{host}:{}\"", front.port))
            .command("test", "echo over tls")
    }

    #[test]
    fn https_with_a_lab_ca_through_ssl_cert_file() {
        let pki = Pki::new();
        let server = FakeServer::start();
        let front = TlsFront::start(&pki, server.port());
        let job = unique_id();
        server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
        let setup = https_setup(&server, &front, "localhost").env("SSL_CERT_FILE", &pki.ca().to_string_lossy());
        let out = setup.run_once(T);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(completed(&server, &job));
        assert!(server.log_text_phase(&job, "output", "test").contains("over tls"));
    }

    /// One kept connection carries a whole job over https; when the server
    /// ends every connection after its answer (upstream's gunicorn), each
    /// new connection resumes the TLS session instead of a full handshake.
    #[test]
    fn https_keeps_one_connection_and_resumes_sessions_when_it_must_reconnect() {
        use std::sync::atomic::Ordering::SeqCst;
        let pki = Pki::new();
        let server = FakeServer::start();
        let front = TlsFront::start(&pki, server.port());
        let job = unique_id();
        server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
        let setup = https_setup(&server, &front, "localhost").env("SSL_CERT_FILE", &pki.ca().to_string_lossy());
        let out = setup.run_once(T);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(completed(&server, &job));
        let (kept, requests) = (front.accepted.load(SeqCst), server.requests().len());
        println!("kept alive: {kept} TLS connections for {requests} requests");
        assert!(requests >= 10 && kept <= 2, "{kept} TLS connections for {requests} requests");

        server.set_keep_alive(false);
        let before = (front.accepted.load(SeqCst), front.resumed.load(SeqCst), server.requests().len());
        let job = unique_id();
        server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
        let out = setup.run_once(T);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(completed(&server, &job));
        let connections = front.accepted.load(SeqCst) - before.0;
        let resumed = front.resumed.load(SeqCst) - before.1;
        let requests = server.requests().len() - before.2;
        println!("Connection: close: {connections} TLS connections ({resumed} resumed) for {requests} requests");
        assert_eq!(connections, requests, "one connection per request when the server closes each");
        // The first of a run is a full handshake (a new process).
        assert!(resumed + 1 >= connections, "{resumed} of {connections} handshakes resumed");
    }

    #[test]
    fn https_with_a_lab_ca_through_the_config_key() {
        let pki = Pki::new();
        let server = FakeServer::start();
        let front = TlsFront::start(&pki, server.port());
        let job = unique_id();
        server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
        // By IP address: the certificate names 127.0.0.1 too.
        let setup = https_setup(&server, &front, "127.0.0.1")
            .set("server_ca_file", &format!("{:?}", pki.ca().to_string_lossy()));
        let out = setup.run_once(T);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(completed(&server, &job));
    }

    #[test]
    fn https_without_the_lab_ca_is_refused_naming_the_certificate() {
        let pki = Pki::new();
        let server = FakeServer::start();
        let front = TlsFront::start(&pki, server.port());
        let job = unique_id();
        server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
        let setup = https_setup(&server, &front, "localhost");
        let mut p = setup.spawn();
        let log = wait_log(&mut p, "certificate for localhost refused");
        assert!(log.contains("issued by a CA this agent does not trust"), "{log}");
        assert!(log.contains("issuer CN=Test Lab CA, O=TF Test"), "{log}");
        assert!(
            server.requests().is_empty(),
            "nothing may pass an unverified connection: {:?}",
            server.request_lines()
        );
        assert_eq!(server.queued_jobs(), 1);
        // The agent keeps trying (the operator may fix the store), it does
        // not fall back to anything unverified.
        assert!(p.try_wait().is_none(), "{}", p.diagnostics());
        p.kill();
        // A CA file without a certificate is refused at start, naming the key.
        let empty: &Path = Path::new("/dev/null");
        let out = https_setup(&server, &front, "localhost")
            .set("server_ca_file", &format!("{:?}", empty.display().to_string()))
            .run_once(T);
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("server_ca_file"));
    }

    /// Issue 22: a refused certificate was logged at ERROR on every
    /// attempt, and the server saw the connection just end ("unexpected
    /// EOF"); upstream's agent (OpenSSL) sends an alert naming the cause.
    #[test]
    fn a_refused_certificate_is_logged_once_and_the_server_gets_the_alert() {
        let pki = Pki::new();
        let server = FakeServer::start();
        let front = TlsFront::start(&pki, server.port());
        let mut p = https_setup(&server, &front, "localhost").spawn();
        let deadline = Instant::now() + T;
        while front.errors().len() < 3 {
            assert!(Instant::now() < deadline, "three refused handshakes: {:?}\n{}", front.errors(), p.diagnostics());
            thread::sleep(Duration::from_millis(20));
        }
        p.kill();
        let errors = front.errors();
        assert!(errors.iter().all(|e| e == "received fatal alert: UnknownCA"), "{errors:?}");
        let log = p.log_text();
        let refused: Vec<&str> = log.lines().filter(|l| l.contains("certificate for localhost refused")).collect();
        assert_eq!(refused.iter().filter(|l| l.contains("ERROR: ")).count(), 1, "{log}");
        assert!(refused.iter().filter(|l| l.contains("DEBUG: ")).count() >= 2, "the repeats, quietly: {log}");
        assert!(!log.contains("OtherError"), "{log}");
    }

    #[test]
    fn https_is_never_downgraded_by_a_redirect() {
        let pki = Pki::new();
        let server = FakeServer::start();
        let front = TlsFront::start(&pki, server.port());
        let plain = FakeServer::start();
        // Same host and port with http, and the same host on a plain port.
        let same_port = format!("http://localhost:{}/v1/job?queue={QUEUE}", front.port);
        let plain_port = format!("http://localhost:{}/v1/job?queue={QUEUE}", plain.port());
        server.add_fault(Fault::new(Some("GET"), "/v1/job", 1, redirect(&same_port)));
        server.add_fault(Fault::new(Some("GET"), "/v1/job", 1, redirect(&plain_port)));
        let setup = https_setup(&server, &front, "localhost")
            .env("SSL_CERT_FILE", &pki.ca().to_string_lossy())
            .token("refresh-secret");
        server.require_auth("refresh-secret");
        let mut p = setup.spawn();
        wait_log(&mut p, &format!("{plain_port} is a downgrade from https to http"));
        let log = wait_log(&mut p, &format!("{same_port} is a downgrade from https to http"));
        assert!(log.contains("redirect refused"), "{log}");
        assert!(plain.requests().is_empty(), "plain http was used: {:?}", plain.request_lines());
        assert!(p.try_wait().is_none(), "{}", p.diagnostics());
    }

    #[test]
    fn https_job_through_a_connect_proxy() {
        let pki = Pki::new();
        let server = FakeServer::start();
        let front = TlsFront::start(&pki, server.port());
        let proxy = super::Proxy::start();
        let job = unique_id();
        server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
        let setup = https_setup(&server, &front, "localhost")
            .env("SSL_CERT_FILE", &pki.ca().to_string_lossy())
            .env("HTTPS_PROXY", &format!("http://agent:s%3Acret@127.0.0.1:{}", proxy.port));
        let out = setup.run_once(T);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(completed(&server, &job));
        let seen = proxy.seen();
        let connect = format!("CONNECT localhost:{} HTTP/1.1", front.port);
        assert!(!seen.is_empty() && seen.iter().all(|(line, _)| *line == connect), "{seen:?}");
        // The tunnel is kept: one carries the whole job.
        assert_eq!(seen.len(), 1, "{seen:?}");
        // agent:s:cret in Basic auth.
        assert!(seen.iter().all(|(_, auth)| auth.as_deref() == Some("Basic YWdlbnQ6czpjcmV0")), "{seen:?}");
    }
}

/// Request lines a proxy saw, each with its Proxy-Authorization.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A forward HTTP proxy: absolute-form requests for http (one per
/// connection), CONNECT tunnels for https (kept as long as the client
/// keeps them). Records each request line and its Proxy-Authorization.
struct Proxy {
    port: u16,
    seen: Seen,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let log = log.clone();
                thread::spawn(move || proxy_one(conn, log));
            }
        });
        Proxy { port, seen }
    }

    fn seen(&self) -> Vec<(String, Option<String>)> {
        self.seen.lock().unwrap().clone()
    }
}

fn proxy_one(client: TcpStream, log: Seen) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(read_half) = client.try_clone() else { return };
    let mut r = BufReader::new(read_half);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut headers = Vec::new();
    let mut auth = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        if h.trim_end().is_empty() {
            break;
        }
        if let Some(v) = h.strip_prefix("Proxy-Authorization:") {
            auth = Some(v.trim().to_string());
        } else {
            headers.push(h);
        }
    }
    let line = line.trim_end().to_string();
    log.lock().unwrap().push((line.clone(), auth));
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut client = client;
    let (authority, head) = if method == "CONNECT" {
        (target.to_string(), None)
    } else {
        let Some(rest) = target.strip_prefix("http://") else { return };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        // One request per connection: the server's answer then says
        // `Connection: close`, and the agent does not keep it.
        (
            authority.to_string(),
            Some(format!("{method} {path} HTTP/1.1\r\n{}Connection: close\r\n\r\n", headers.concat())),
        )
    };
    let Ok(mut upstream) = TcpStream::connect(authority.as_str()) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    match head {
        None => {
            let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
        }
        Some(head) => {
            let _ = upstream.write_all(head.as_bytes());
        }
    }
    // Whatever the reader already buffered goes first.
    let _ = upstream.write_all(r.buffer());
    let (Ok(mut up_read), Ok(mut client_write)) = (upstream.try_clone(), client.try_clone()) else { return };
    let down = thread::spawn(move || {
        let _ = std::io::copy(&mut up_read, &mut client_write);
        let _ = client_write.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut r.into_inner(), &mut upstream);
    let _ = upstream.shutdown(Shutdown::Write);
    let _ = down.join();
}

#[test]
fn http_job_through_a_proxy() {
    let server = FakeServer::start();
    let proxy = Proxy::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let setup = Agent::new(&server)
        .command("test", "echo via proxy; mkdir -p artifacts; echo a > artifacts/a.txt")
        .env("http_proxy", &format!("127.0.0.1:{}", proxy.port))
        .env("no_proxy", "example.invalid,.lab.invalid");
    let out = setup.run_once(T);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(completed(&server, &job));
    assert!(server.artifact(&job).is_some());
    let seen = proxy.seen();
    let base = format!("http://127.0.0.1:{}/", server.port());
    assert!(seen.iter().any(|(l, _)| l.starts_with(&format!("GET {base}v1/job?"))), "{seen:?}");
    assert!(seen.iter().any(|(l, _)| l.starts_with(&format!("POST {base}v1/result/{job}/artifact"))), "{seen:?}");
    assert!(seen.iter().all(|(l, _)| l.contains(&base)), "every request through the proxy: {seen:?}");
    // no_proxy naming the server's host takes the proxy out.
    let job2 = unique_id();
    server.push_job(&job_json(&job2, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let before = proxy.seen().len();
    let direct =
        Agent::new(&server).env("http_proxy", &format!("127.0.0.1:{}", proxy.port)).env("NO_PROXY", "127.0.0.0/8");
    assert!(direct.run_once(T).status.success());
    assert!(completed(&server, &job2));
    assert_eq!(proxy.seen().len(), before, "no_proxy bypasses the proxy");
}
