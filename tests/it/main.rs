//! Integration tests: the real agent binary against a fake Testflinger server.

mod artifacts;
mod budget;
mod core;
mod disk;
mod docs;
mod fake_server;
mod faults;
mod fidelity;
mod fleet;
mod harness;
mod http;
mod job_flow;
mod json;
mod metrics_endpoint;
mod minimal_image;
mod operator;
mod regressions;
mod secrets;
mod small_disk;
mod soak;
mod stalls;
mod startup;
mod streaming;
mod strict_dirs;
mod upstream_checklist;
mod upstream_parity;
mod version;

/// The fake server itself, spoken to over raw TCP.
mod fake_server_selftest {
    use crate::fake_server::{FakeServer, Fault, FaultAction};
    use crate::harness::{job_json, unique_id};
    use crate::json::Json;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
        fn json(&self) -> Json {
            Json::parse_bytes(&self.body).expect("JSON body")
        }
    }

    /// One keep-alive connection.
    struct Conn {
        stream: TcpStream,
        reader: BufReader<TcpStream>,
    }

    impl Conn {
        fn open(server: &FakeServer) -> Conn {
            let stream = TcpStream::connect(server.addr()).expect("connect");
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let reader = BufReader::new(stream.try_clone().unwrap());
            Conn { stream, reader }
        }

        /// Sends raw bytes and reads one response; `None` when the server closed.
        fn raw(&mut self, bytes: &[u8]) -> Option<Resp> {
            self.stream.write_all(bytes).unwrap();
            let mut line = String::new();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                self.reader.read_line(&mut h).ok()?;
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':')?;
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            let len = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
            let mut body = vec![0; len];
            self.reader.read_exact(&mut body).ok()?;
            Some(Resp { status, headers, body })
        }

        fn get(&mut self, path: &str, extra_headers: &str) -> Resp {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra_headers}\r\n");
            self.raw(req.as_bytes()).expect("response")
        }

        fn post(&mut self, path: &str, extra_headers: &str, body: &[u8]) -> Resp {
            let mut req =
                format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n{extra_headers}\r\n", body.len())
                    .into_bytes();
            req.extend_from_slice(body);
            self.raw(&req).expect("response")
        }
    }

    const COOKIE: &str = "Cookie: agent_name=a1\r\n";

    #[test]
    fn root_is_reachable_with_and_without_slash() {
        let s = FakeServer::start();
        let mut c = Conn::open(&s);
        assert_eq!(c.get("/v1", "").status, 200);
        let r = c.get("/v1/", "");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"].as_str(), Some("ok"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(s.url().starts_with("http://127.0.0.1:"));
        assert_eq!(s.requests().len(), 2, "keep-alive: two requests on one connection");
    }

    #[test]
    fn job_poll_needs_the_agent_cookie() {
        let s = FakeServer::start();
        let mut c = Conn::open(&s);
        let r = c.get("/v1/job?queue=test-queue", "");
        assert_eq!(r.status, 401);
        assert!(String::from_utf8_lossy(&r.body).contains("Agent not identified"));

        let r = c.post("/v1/agents/data/a1", "Content-Type: application/json\r\n", br#"{"state":"waiting"}"#);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("set-cookie"), Some("agent_name=a1; Path=/"));
        assert_eq!(c.get("/v1/job?queue=test-queue", "Cookie: theme=x; agent_name=a1\r\n").status, 204);
        assert_eq!(s.agent_states("a1"), vec!["waiting"]);

        let data = c.get("/v1/agents/data/a1", "").json();
        assert_eq!(data["name"].as_str(), Some("a1"));
        assert_eq!(data["state"].as_str(), Some("waiting"));
        assert_eq!(data["restricted_to"], Json::obj());
        assert_eq!(c.get("/v1/agents/data/nobody", "").status, 404);
        // Unknown fields are refused like the real server's schema does.
        assert_eq!(c.post("/v1/agents/data/a1", "", br#"{"bogus":1}"#).status, 422);
        assert_eq!(c.post("/v1/agents/data/a1", "", b"{not json").status, 400);
    }

    #[test]
    fn job_is_handed_out_once_then_204() {
        let s = FakeServer::start();
        let id = unique_id();
        s.push_job(&job_json(&id, "q2", r#"{"test_data": {"test_cmds": "true"}}"#));
        let mut c = Conn::open(&s);
        assert_eq!(c.get("/v1/job?queue=q1", COOKIE).status, 204);
        let r = c.get("/v1/job?queue=q1&queue=q2", COOKIE);
        assert_eq!(r.status, 200);
        let job = r.json();
        assert_eq!(job["job_id"].as_str(), Some(id.as_str()));
        assert_eq!(job.at("test_data.test_cmds").and_then(Json::as_str), Some("true"));
        assert_eq!(c.get("/v1/job?queue=q1&queue=q2", COOKIE).status, 204);
        assert_eq!(s.requests_to("GET", "/v1/job")[1].query_all("queue"), vec!["q1", "q2"]);

        // Result state: waiting, agent posts, cancel sticks.
        assert_eq!(c.get(&format!("/v1/result/{id}"), "").json()["job_state"].as_str(), Some("waiting"));
        assert_eq!(c.post(&format!("/v1/result/{id}"), "", br#"{"job_state":"test"}"#).status, 200);
        s.cancel_job(&id);
        assert_eq!(
            c.post(&format!("/v1/result/{id}"), "", br#"{"job_state":"complete","status":{"test":0}}"#).status,
            200
        );
        let res = s.result(&id).unwrap();
        assert_eq!(res["job_state"].as_str(), Some("cancelled"));
        assert_eq!(res.at("status.test").and_then(Json::as_i64), Some(0));
        assert_eq!(s.job_states_posted(&id), vec!["test", "complete"]);
        assert_eq!(c.get("/v1/result/unknown", "").status, 204);
    }

    #[test]
    fn faults_answer_first_then_normal_handling() {
        let s = FakeServer::start();
        s.add_fault(Fault::status("GET", "/v1", 2, 503));
        let mut c = Conn::open(&s);
        let r = c.get("/v1/", "");
        assert_eq!((r.status, r.body.len()), (503, 0));
        assert_eq!(c.get("/v1/", "").status, 503);
        assert_eq!(c.get("/v1/", "").status, 200);
        let statuses: Vec<u16> = s.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![503, 503, 200]);

        s.add_fault(Fault::new(None, "/v1/result", 1, FaultAction::CloseWithoutAnswer));
        assert!(c.raw(b"POST /v1/result/x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").is_none());
        assert_eq!(s.requests_to("POST", "/v1/result").last().unwrap().status, 0);
        assert!(s.results_posted("x").is_empty());

        s.add_fault(Fault::new(
            Some("GET"),
            "/v1/job",
            1,
            FaultAction::Body { status: 200, content_type: "application/json".into(), body: b"{broken".to_vec() },
        ));
        let mut c = Conn::open(&s);
        assert_eq!(c.get("/v1/job?queue=q", COOKIE).body, b"{broken");
        assert_eq!(c.get("/v1/job?queue=q", COOKIE).status, 204);

        s.add_fault(Fault::new(Some("GET"), "/v1", 1, FaultAction::Stall(Duration::from_millis(150))));
        let t0 = std::time::Instant::now();
        assert_eq!(c.get("/v1", "").status, 200);
        assert!(t0.elapsed() >= Duration::from_millis(150));
    }

    #[test]
    fn chunked_bodies_and_log_fragments() {
        let s = FakeServer::start();
        let mut c = Conn::open(&s);
        let body =
            br#"{"fragment_number": 1, "timestamp": "2024-01-01T00:00:00Z", "phase": "test", "log_data": "world\n"}"#;
        let (a, b) = body.split_at(30);
        let mut req =
            b"POST /v1/result/j1/log/output HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(format!("{:x};ext=1\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(format!("\r\n{:X}\r\n", b.len()).as_bytes());
        req.extend_from_slice(b);
        req.extend_from_slice(b"\r\n0\r\nX-Trailer: t\r\n\r\n");
        assert_eq!(c.raw(&req).unwrap().status, 200);
        let first =
            br#"{"fragment_number": 0, "timestamp": "2024-01-01T00:00:00Z", "phase": "setup", "log_data": "hello "}"#;
        assert_eq!(c.post("/v1/result/j1/log/output", "", first).status, 200);
        assert_eq!(s.fragments("j1", "output").iter().map(|f| f.number).collect::<Vec<_>>(), vec![1, 0]);
        assert_eq!(s.log_text("j1", "output"), "hello world\n");
        assert_eq!(s.log_text_phase("j1", "output", "test"), "world\n");
        assert_eq!(s.log_text("j1", "serial"), "");
        let bad_phase = br#"{"fragment_number": 2, "timestamp": "t", "phase": "nope", "log_data": ""}"#;
        assert_eq!(c.post("/v1/result/j1/log/output", "", bad_phase).status, 422);
    }

    #[test]
    fn multipart_artifact_is_unpacked() {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, "artifacts/a.txt", &b"hello"[..]).unwrap();
        let mut d = tar::Header::new_gnu();
        d.set_size(0);
        d.set_mode(0o755);
        d.set_entry_type(tar::EntryType::Directory);
        tar.append_data(&mut d, "artifacts/sub/", &b""[..]).unwrap();
        let gz = tar.into_inner().unwrap().finish().unwrap();

        let boundary = "XyZ123";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nignored\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n\
             Content-Type: application/x-gzip\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&gz);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

        let s = FakeServer::start();
        let mut c = Conn::open(&s);
        let ct = format!("Content-Type: multipart/form-data; boundary=\"{boundary}\"\r\n");
        assert_eq!(c.post("/v1/result/j2/artifact", &ct, &body).status, 200);
        assert_eq!(s.artifact("j2").unwrap(), gz);
        let members = s.artifact_members("j2");
        assert_eq!(members.len(), 2);
        assert_eq!(members[0], ("artifacts/a.txt".to_string(), b"hello".to_vec(), b'0'));
        assert_eq!((members[1].0.as_str(), members[1].2), ("artifacts/sub/", b'5'));
        assert_eq!(c.post("/v1/result/j3/artifact", "Content-Type: text/plain\r\n", b"x").status, 400);
    }

    #[test]
    fn auth_refresh_and_expiry() {
        let s = FakeServer::start();
        s.require_auth("secret");
        let mut c = Conn::open(&s);
        assert_eq!(c.get("/v1/", "").status, 200, "root needs no token");
        assert_eq!(c.get("/v1/agents/data/a1", "").status, 401);
        assert_eq!(c.post("/v1/oauth2/refresh", "", br#"{"refresh_token":"wrong"}"#).status, 401);
        let r = c.post("/v1/oauth2/refresh", "", br#"{"refresh_token":"secret"}"#);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["access_token"].as_str(), Some("tok-1"));
        assert_eq!(r.json()["expires_in"].as_i64(), Some(600));
        assert_eq!(c.post("/v1/agents/data/a1", "Authorization: Bearer tok-1\r\n", b"{}").status, 200);
        s.expire_token();
        assert_eq!(c.post("/v1/agents/data/a1", "Authorization: Bearer tok-1\r\n", b"{}").status, 401);
        c.post("/v1/oauth2/refresh", "", br#"{"refresh_token":"secret"}"#);
        assert_eq!(c.post("/v1/agents/data/a1", "Authorization: Bearer tok-2\r\n", b"{}").status, 200);
        assert_eq!(s.refresh_count(), 2);
    }

    #[test]
    fn events_attachments_and_big_results() {
        let s = FakeServer::start();
        let mut c = Conn::open(&s);
        assert_eq!(c.get("/v1/job/j4/attachments", "").status, 204);
        s.set_attachments("j4", vec![0x1f, 0x8b, 1, 2]);
        let r = c.get("/v1/job/j4/attachments", "");
        assert_eq!(
            (r.status, r.header("content-type"), r.body.as_slice()),
            (200, Some("application/gzip"), &[0x1f, 0x8b, 1, 2][..])
        );

        let ev = |names: &[&str]| {
            let list: Vec<String> = names
                .iter()
                .map(|n| format!(r#"{{"event_name":"{n}","timestamp":"2024-01-01T00:00:00Z","detail":""}}"#))
                .collect();
            format!(
                r#"{{"agent_id":"a1","job_queue":"q","job_status_webhook":"http://h","events":[{}]}}"#,
                list.join(",")
            )
        };
        assert_eq!(c.post("/v1/job/j4/events", "", ev(&["job_start"]).as_bytes()).status, 200);
        assert_eq!(c.post("/v1/job/j4/events", "", ev(&["job_start", "setup_start"]).as_bytes()).status, 200);
        assert_eq!(s.events("j4"), vec!["job_start", "setup_start"]);

        let big = format!(r#"{{"device_info": {{"x": "{}"}}}}"#, "a".repeat(16 * 1024 * 1024));
        assert_eq!(c.post("/v1/result/j4", "", big.as_bytes()).status, 413);
        assert!(s.results_posted("j4").is_empty());
    }

    #[test]
    fn garbage_input_does_not_kill_the_server() {
        let s = FakeServer::start();
        for junk in [
            &b"\x00\xff\xfe garbage\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"POST /v1/result/x HTTP/1.1\r\nContent-Length: zz\r\n\r\n",
        ] {
            let mut c = Conn::open(&s);
            if let Some(r) = c.raw(junk) {
                assert_eq!(r.status, 400);
            }
        }
        // A client that sends half a request and hangs up.
        let mut t = TcpStream::connect(s.addr()).unwrap();
        t.write_all(b"POST /v1/result/x HTTP/1.1\r\nContent-Length: 100\r\n\r\n{").unwrap();
        drop(t);
        let mut c = Conn::open(&s);
        assert_eq!(c.get("/v1", "").status, 200);
        assert_eq!(c.raw(b"GET /v1 HTTP/1.0\r\n\r\n").unwrap().status, 200);
        assert!(c.raw(b"GET /v1 HTTP/1.1\r\n\r\n").is_none(), "HTTP/1.0 without keep-alive closes");
    }

    #[test]
    fn stop_and_resume_listening_keeps_state() {
        let s = FakeServer::start();
        s.push_job(&job_json("j5", "q", ""));
        s.stop_listening();
        assert!(TcpStream::connect(s.addr()).is_err());
        s.resume_listening();
        let mut c = Conn::open(&s);
        assert_eq!(c.get("/v1/job?queue=q", COOKIE).status, 200);
        s.wait_until(Duration::from_secs(1), "job handed out", |s| s.queued_jobs() == 0);
    }

    #[test]
    fn harness_config_has_test_defaults() {
        let s = FakeServer::start();
        let a = crate::harness::Agent::new(&s)
            .set("polling_interval", "0.2")
            .command("test", "echo \"hi\"; cat testflinger.json > /dev/null")
            .set("advertised_queues", "q1: first\nq2: second")
            .remove("identifier")
            .token("r1");
        let text = std::fs::read_to_string(a.write_config()).unwrap();
        assert!(text.contains("agent_id: test-agent-1\n"));
        assert!(text.contains("polling_interval: 0.2\n"));
        assert!(text.contains(&format!("server_address: \"{}\"\n", s.url())));
        assert!(text.contains("test_command: \"echo \\\"hi\\\"; cat testflinger.json > /dev/null\"\n"));
        assert!(text.contains("advertised_queues:\n  q1: first\n  q2: second\n"));
        assert!(!text.contains("identifier"));
        assert!(a.logging_dir().starts_with(a.dir()));
        let token = std::fs::read_to_string(a.dir().join("refresh_token")).unwrap();
        assert_eq!(Json::parse(&token).unwrap()["refresh_token"].as_str(), Some("r1"));
        let id = unique_id();
        assert_eq!((id.len(), id.as_bytes()[14], id.as_bytes()[19]), (36, b'4', b'8'));
        assert_ne!(id, unique_id());
    }
}
