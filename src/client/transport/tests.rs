use super::*;

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
    exchange(&Net::new(), Request { method, url: &url, headers: &[], payload, keep: Keep::Memory(1 << 20), timeout, idle: None })
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
    let r = get(port, Payload::Bytes { content_type: "application/octet-stream", bytes: &body }, Duration::from_secs(10));
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
