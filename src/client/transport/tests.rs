use super::*;
use std::io::Read;
use std::net::TcpStream;
use std::time::Instant;

/// A listener that never accepts, its backlog full: further connects
/// get no answer, like a server whose packets are dropped.
fn blackhole() -> (std::os::fd::OwnedFd, TcpStream, u16) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket/bind/listen on loopback with checked results.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), len), 0);
        assert_eq!(libc::listen(fd, 0), 0);
        let mut bound: libc::sockaddr_in = std::mem::zeroed();
        let mut blen = len;
        assert_eq!(libc::getsockname(fd, (&mut bound as *mut libc::sockaddr_in).cast(), &mut blen), 0);
        let port = u16::from_be(bound.sin_port);
        // Fills the one-entry accept queue.
        let first = TcpStream::connect(("127.0.0.1", port)).expect("first connect");
        (owned, first, port)
    }
}

#[test]
fn a_connect_that_gets_no_answer_keeps_the_caller_working() {
    let (_listener, _first, port) = blackhole();
    let url = format!("http://127.0.0.1:{port}/v1/result/x");
    let mut calls = 0;
    let mut idle = || calls += 1;
    let t = Instant::now();
    let url = Url::parse(&url).unwrap();
    let req = Request {
        method: "GET",
        url: &url,
        headers: &[],
        payload: Payload::None,
        keep: Keep::Memory(1024),
        timeout: Duration::from_millis(400),
        idle: Some(&mut idle),
    };
    let r = exchange(&Net::new(), req);
    let waited = t.elapsed();
    // Either the connect or the answer waits; the caller worked throughout.
    assert!(r.is_err(), "no answer expected: {r:?}");
    assert!(waited >= Duration::from_millis(300), "it waited {waited:?}");
    assert!(calls >= 20, "idle ran {calls} times in {waited:?}");
}

/// A server on loopback that reads the request head and then does `then`
/// with the connection.
fn one_shot(then: impl FnOnce(TcpStream) + Send + 'static) -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).map(|n| n == 1).unwrap_or(false) {
            head.push(b[0]);
        }
        then(s)
    });
    (port, h)
}

fn get(port: u16, mut payload: Payload, timeout: Duration) -> Result<Reply, Failure> {
    let url = Url::parse(&format!("http://127.0.0.1:{port}/v1/job")).unwrap();
    let method = if matches!(payload, Payload::None) { "GET" } else { "POST" };
    let payload = payload.reborrow();
    exchange(
        &Net::new(),
        Request { method, url: &url, headers: &[], payload, keep: Keep::Memory(1 << 20), timeout, idle: None },
    )
}

#[test]
fn a_server_that_drips_its_answer_is_given_up_at_the_call_deadline() {
    let (port, h) = one_shot(|mut s| {
        // One byte every 50 ms: never a wait of `timeout` without progress.
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
        for b in answer.iter().chain(std::iter::repeat(&b'x')).take(400) {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let t = Instant::now();
    let r = get(port, Payload::None, Duration::from_millis(300));
    let took = t.elapsed();
    println!("drip-fed call ended after {took:?}");
    match r {
        Err(Failure::Net(e)) => assert!(e.to_string().contains("the call's deadline"), "{e}"),
        other => panic!("expected the deadline to end the call: {other:?}"),
    }
    // 400 bytes at 50 ms would take 20 s: the deadline (2 × 300 ms) ended it.
    assert!(took < Duration::from_secs(15), "{took:?}");
    let _ = h.join();
}

#[test]
fn an_answer_sent_before_the_body_is_read() {
    let (port, h) = one_shot(|mut s| {
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
        let _ = s.write_all(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        // Closing with unread data sends a reset, as nginx's does.
        drop(s);
    });
    let body = vec![b'x'; 32 << 20];
    let r =
        get(port, Payload::Bytes { content_type: "application/octet-stream", bytes: &body }, Duration::from_secs(10));
    assert_eq!(r.map(|r| r.status).map_err(|e| format!("{e:?}")), Ok(413));
    let _ = h.join();
}

#[test]
fn the_deadline_grows_with_the_bytes_moved() {
    let mut b = Budget::new(Duration::from_secs(5));
    let first = b.deadline();
    b.progress(10 * 64 * 1024);
    assert_eq!(b.deadline() - first, Duration::from_secs(10));
}

/// What the scripted keep-alive server does with each request, in order
/// across connections (then it answers and keeps the connection).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Then {
    /// Answer 200 and keep the connection.
    Answer,
    /// Answer 200 with `Connection: close`, and close.
    AnswerClose,
    /// Answer as HTTP/1.0 (no keep-alive), and close.
    Answer10,
    /// Answer 200 without saying so, then close at once (a server that
    /// drops an idle connection right after an answer).
    AnswerThenClose,
    /// Wait for the request to arrive, then close without reading it:
    /// the race of a server ending an idle connection as a request comes.
    DropUnread,
    /// Read the head and half the body, then close (mid-request).
    CloseMidRequest,
}

struct Scripted {
    port: u16,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    /// `METHOD path body` of every request the server handled (answered).
    handled: Arc<Mutex<Vec<String>>>,
    /// One message per connection the server closed.
    closed: std::sync::mpsc::Receiver<()>,
}

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn scripted(script: Vec<Then>) -> Scripted {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (tx, closed) = std::sync::mpsc::channel();
    let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
    let (a, h) = (accepted.clone(), handled.clone());
    std::thread::spawn(move || {
        // Ends when the test (and so the listener's last client) is gone.
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            a.fetch_add(1, Ordering::SeqCst);
            let (script, handled, tx) = (script.clone(), h.clone(), tx.clone());
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
                loop {
                    let then = script.lock().unwrap().pop_front().unwrap_or(Then::Answer);
                    if then == Then::DropUnread {
                        let mut b = [0u8; 1];
                        // Waits for the request, leaves it unread: the close resets.
                        let _ = s.peek(&mut b);
                        break;
                    }
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut b) {
                            Ok(1) => head.push(b[0]),
                            _ => {
                                let _ = tx.send(());
                                return;
                            }
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if then == Then::CloseMidRequest {
                        let mut half = vec![0u8; len / 2];
                        let _ = s.read_exact(&mut half);
                        break;
                    }
                    let mut body = vec![0u8; len];
                    if s.read_exact(&mut body).is_err() {
                        break;
                    }
                    let line = text.lines().next().unwrap_or("").rsplit_once(' ').map_or("", |(l, _)| l).to_string();
                    handled.lock().unwrap().push(format!("{line} {}", String::from_utf8_lossy(&body)));
                    let answer: &[u8] = match then {
                        Then::AnswerClose => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        Then::Answer10 => b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    };
                    if s.write_all(answer).is_err() || then != Then::Answer {
                        break;
                    }
                }
                drop(s);
                let _ = tx.send(());
            });
        }
    });
    Scripted { port, accepted, handled, closed }
}

impl Scripted {
    /// Waits (10 s at most) until the server has closed `n` connections in all.
    fn wait_closed(&self, n: usize) {
        for _ in 0..n {
            self.closed.recv_timeout(Duration::from_secs(10)).expect("the server closes the connection");
        }
    }
    fn handled(&self) -> Vec<String> {
        self.handled.lock().unwrap().clone()
    }
}

fn call(net: &Net, port: u16, method: &str, body: &str) -> Result<u16, String> {
    let url = Url::parse(&format!("http://127.0.0.1:{port}/v1/x")).unwrap();
    let payload = if body.is_empty() {
        Payload::None
    } else {
        Payload::Bytes { content_type: "application/json", bytes: body.as_bytes() }
    };
    let req = Request {
        method,
        url: &url,
        headers: &[],
        payload,
        keep: Keep::Memory(1024),
        timeout: Duration::from_secs(10),
        idle: None,
    };
    exchange(net, req).map(|r| r.status).map_err(|e| format!("{e:?}"))
}

#[test]
fn calls_share_one_connection() {
    let server = scripted(vec![]);
    let net = Net::new();
    for i in 0..5 {
        assert_eq!(call(&net, server.port, "GET", ""), Ok(200));
        assert_eq!(call(&net, server.port, "POST", &format!("{{\"n\":{i}}}")), Ok(200));
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(server.handled().len(), 10);
}

#[test]
fn a_connection_the_server_ended_is_not_reused() {
    // Closed after an answer that said so, after an HTTP/1.0 answer, and
    // after one that did not say it: each next call opens a new connection,
    // and each POST is handled once.
    for then in [Then::AnswerClose, Then::Answer10, Then::AnswerThenClose] {
        let server = scripted(vec![then]);
        let net = Net::new();
        assert_eq!(call(&net, server.port, "GET", ""), Ok(200), "{then:?}");
        server.wait_closed(1);
        assert_eq!(call(&net, server.port, "POST", "{\"n\":1}"), Ok(200), "{then:?}");
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2, "{then:?}");
        assert_eq!(server.handled(), ["GET /v1/x ", "POST /v1/x {\"n\":1}"], "{then:?}");
    }
}

#[test]
fn a_get_the_server_dropped_unread_goes_again_on_a_new_connection() {
    let server = scripted(vec![Then::Answer, Then::DropUnread]);
    let net = Net::new();
    assert_eq!(call(&net, server.port, "GET", ""), Ok(200));
    assert_eq!(call(&net, server.port, "GET", ""), Ok(200));
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(server.handled().len(), 2);
}

#[test]
fn a_post_that_may_have_reached_the_server_is_never_sent_again() {
    // The server ends the kept connection as the request arrives, or in the
    // middle of its body: the POST had gone out, so it fails to the caller
    // instead of going again on a new connection.
    for then in [Then::DropUnread, Then::CloseMidRequest] {
        let server = scripted(vec![Then::Answer, then]);
        let net = Net::new();
        assert_eq!(call(&net, server.port, "POST", "{\"n\":1}"), Ok(200), "{then:?}");
        let second = call(&net, server.port, "POST", "{\"n\":2}");
        assert!(second.is_err(), "{then:?}: {second:?}");
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1, "{then:?}: no second connection");
        assert_eq!(server.handled(), ["POST /v1/x {\"n\":1}"], "{then:?}");
    }
}

#[test]
fn a_connection_that_would_idle_past_its_limit_is_closed_before_the_wait() {
    let server = scripted(vec![]);
    let net = Net::new();
    assert_eq!(call(&net, server.port, "GET", ""), Ok(200));
    // A wait well within the limit keeps it.
    net.before_wait(Duration::from_secs(1));
    assert_eq!(call(&net, server.port, "GET", ""), Ok(200));
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    // A longer wait closes it now: the server sees our close.
    net.before_wait(keep::IDLE);
    server.wait_closed(1);
    assert_eq!(call(&net, server.port, "GET", ""), Ok(200));
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn an_early_answer_on_a_kept_connection_is_read_and_the_connection_dropped() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let read_head = |s: &mut TcpStream| {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).map(|n| n == 1).unwrap_or(false) {
                head.push(b[0]);
            }
        };
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").expect("answer");
        // The upload on the kept connection: refused after its head.
        read_head(&mut s);
        let _ = s.write_all(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        drop(s);
        // The next call comes on a new connection.
        let (mut s, _) = listener.accept().expect("accept");
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").expect("answer");
    });
    let net = Net::new();
    let body = vec![b'x'; 32 << 20];
    assert_eq!(call(&net, port, "GET", ""), Ok(200));
    let url = Url::parse(&format!("http://127.0.0.1:{port}/v1/x")).unwrap();
    let payload = Payload::Bytes { content_type: "application/octet-stream", bytes: &body };
    let req = Request {
        method: "POST",
        url: &url,
        headers: &[],
        payload,
        keep: Keep::Memory(1024),
        timeout: Duration::from_secs(10),
        idle: None,
    };
    assert_eq!(exchange(&net, req).map(|r| r.status).map_err(|e| format!("{e:?}")), Ok(413));
    assert_eq!(call(&net, port, "GET", ""), Ok(200));
    h.join().expect("server");
}

/// A 1xx the client did not ask for (RFC 9110 15.2: a client must be able
/// to parse one before the final answer) is not an early answer: the body
/// goes on, and the final answer comes after it.
#[test]
fn an_interim_answer_during_the_upload_does_not_stop_the_body() {
    const LEN: usize = 32 << 20;
    let (port, h) = one_shot(|mut s| {
        let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        // The 100 reaches the client while its body fills the socket.
        std::thread::sleep(Duration::from_millis(300));
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while got < LEN {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    let body = vec![b'x'; LEN];
    let r =
        get(port, Payload::Bytes { content_type: "application/octet-stream", bytes: &body }, Duration::from_secs(3));
    assert_eq!(r.map(|r| r.status).map_err(|e| format!("{e:?}")), Ok(200));
    let _ = h.join();
}
