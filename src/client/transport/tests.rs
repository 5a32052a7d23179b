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
    let r = exchange(&Net::new(), "GET", &url, &[], Payload::None, Keep::Memory(1024), Duration::from_millis(400), Some(&mut idle));
    let waited = t.elapsed();
    // Either the connect or the answer waits; the caller worked throughout.
    assert!(r.is_err(), "no answer expected: {r:?}");
    assert!(waited >= Duration::from_millis(300), "it waited {waited:?}");
    assert!(calls >= 20, "idle ran {calls} times in {waited:?}");
}
