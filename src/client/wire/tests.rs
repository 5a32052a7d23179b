use super::*;

fn read(raw: &[u8], cap: usize) -> io::Result<(u16, String)> {
    read_answer(raw, cap).map(|(h, b)| (h.status, String::from_utf8_lossy(&b).into_owned()))
}

#[test]
fn a_head_cut_off_is_an_error_not_a_status() {
    assert_eq!(read(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK", 10).unwrap().0, 200);
    for cut in [&b"HTTP/1.1 200 OK\r\nContent-Le"[..], b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 2", b""] {
        assert!(read(cut, 10).is_err(), "{:?}", String::from_utf8_lossy(cut));
    }
}

#[test]
fn reads_bodies_by_length_chunks_or_close_within_the_cap() {
    assert_eq!(read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 10).unwrap(), (200, "hello".into()));
    let chunked =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\nX-T: 1\r\n\r\n";
    assert_eq!(read(chunked, 10).unwrap(), (200, "hello".into()));
    assert_eq!(read(b"HTTP/1.0 200 OK\r\n\r\nuntil close", 20).unwrap(), (200, "until close".into()));
    assert_eq!(read(b"HTTP/1.1 204 No Content\r\n\r\n", 10).unwrap(), (204, String::new()));
    assert_eq!(
        read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", 10).unwrap(),
        (200, "x".into())
    );
    assert!(read(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello", 10).is_err(), "short body");
    for big in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"[..],
        chunked,
        b"HTTP/1.0 200 OK\r\n\r\nhello world",
    ] {
        assert_eq!(read(big, 4).unwrap_err().kind(), io::ErrorKind::FileTooLarge);
    }
}

/// The crash of issue 12: a chunk size at the top of u64 overflowed
/// `body.len() + size`. Now it is a size like any other: the body ends
/// long before it, and that is an answer cut off.
#[test]
fn hostile_lengths_are_errors_not_crashes() {
    let huge = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc";
    assert_eq!(read(huge, 1 << 20).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    let mut long = huge.to_vec();
    long.extend(std::iter::repeat_n(b'a', 100));
    assert_eq!(read(&long, 16).unwrap_err().kind(), io::ErrorKind::FileTooLarge);
    let cases: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nabcde\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 99999999999999999999 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching\r\n\r\n",
    ];
    for raw in cases {
        assert!(read(raw, 1 << 20).is_err(), "{:?}", String::from_utf8_lossy(raw));
    }
    // The largest length that fits: refused by the cap before any read.
    let max = b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n";
    assert_eq!(read(max, 1 << 20).unwrap_err().kind(), io::ErrorKind::FileTooLarge);
    // Streamed without a cap, a huge chunk is just a body cut off.
    let mut r = BufReader::new(&huge[..]);
    let head = read_head(&mut r, false).unwrap();
    let mut body = BodyReader::new(&mut r, head.framing);
    assert_eq!(io::copy(&mut body, &mut io::sink()).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn heads_are_capped() {
    let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
    raw.extend(std::iter::repeat_n(b"X-A: b\r\n".as_slice(), 300).flatten());
    raw.extend(b"\r\n");
    assert!(read(&raw, 10).is_err());
    let mut raw = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 70_000));
    raw.extend(b"\r\n\r\n");
    assert!(read(&raw, 10).is_err());
}

#[test]
fn location_is_kept() {
    let (head, _) =
        read_answer(&b"HTTP/1.1 307 T\r\nLocation: http://x:1/a\r\nContent-Length: 0\r\n\r\n"[..], 10).unwrap();
    assert_eq!(head.location.as_deref(), Some("http://x:1/a"));
}

#[test]
fn parses_urls() {
    let t = Url::parse("http://127.0.0.1:8000/v1/result/x/artifact").unwrap();
    assert_eq!(
        (t.https, t.host.as_str(), t.port, t.path.as_str()),
        (false, "127.0.0.1", 8000, "/v1/result/x/artifact")
    );
    let t = Url::parse("HTTPS://TF.example.com").unwrap();
    assert_eq!((t.https, t.port, t.host.as_str(), t.path.as_str()), (true, 443, "tf.example.com", "/"));
    let t = Url::parse("http://[::1]:9/x?q=1").unwrap();
    assert_eq!((t.host.as_str(), t.port, t.host_header()), ("::1", 9, "[::1]:9".to_string()));
    for bad in ["ftp://x", "http://", "http://u:p@h/", "http://h:99999/", "http://h/a b"] {
        assert!(Url::parse(bad).is_err(), "{bad}");
    }
    // The rules the config's `server_address` check relies on.
    let t = Url::parse("http://tf_x.lab-2:65535").unwrap();
    assert_eq!((t.host.as_str(), t.port), ("tf_x.lab-2", 65535));
    for (bad, why) in [
        ("http://h:0", "bad port \"0\""),
        ("http://h:", "bad port \"\""),
        ("http://h:port/", "bad port \"port\""),
        ("http://:80", "no host"),
        ("http://h!x/", "is not a host name"),
        ("http://a:b:80/", "is not a host name"),
        ("http://[fe80::1%eth0]/", "bad IPv6 address"),
        ("http://[::1]80/", "text after the IPv6 address"),
        ("http://[::1]:/", "bad port"),
    ] {
        let e = Url::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn a_bare_server_address_means_http() {
    assert_eq!(server_base(" 10.0.0.5:8000/ "), "http://10.0.0.5:8000");
    assert_eq!(server_base("https://tf.example.com/"), "https://tf.example.com");
    assert_eq!(Url::parse(&server_base("tf")).unwrap().to_string(), "http://tf/");
}

#[test]
fn redirect_targets_resolve_and_origins_compare() {
    let base = Url::parse("https://tf.example.com/v1/job?queue=q").unwrap();
    assert!(base.same_origin(&base.join("/v1/other").unwrap()));
    assert!(base.same_origin(&base.join("https://TF.example.com:443/x").unwrap()));
    assert!(!base.same_origin(&base.join("http://tf.example.com/x").unwrap()), "downgrade");
    assert!(!base.same_origin(&base.join("https://tf.example.com:8443/x").unwrap()), "port");
    assert!(!base.same_origin(&base.join("//evil.example/x").unwrap()), "host");
    assert_eq!(base.join("other").unwrap().path, "/v1/other");
    assert!(base.join("file:///etc/passwd").is_err());
}

#[test]
fn header_values_cannot_inject_lines() {
    assert!(request_head("GET", "/", "h", &[("Cookie".into(), "a\r\nX: y".into())]).is_err());
    let head = request_head("GET", "/v1", "h:1", &[("Cookie".into(), "agent_name=a".into())]).unwrap();
    assert!(String::from_utf8(head).unwrap().starts_with("GET /v1 HTTP/1.1\r\nHost: h:1\r\n"));
}

#[test]
fn header_values_and_names_must_be_visible_ascii() {
    let one = |k: &str, v: &str| request_head("GET", "/", "h", &[(k.to_string(), v.to_string())]);
    for bad in ["a\rb", "a\nb", "tok\0en", "caf\u{e9}", "x\x7f", "\x1b[31m", " lead", "trail\t"] {
        let e = one("Authorization", bad).unwrap_err();
        assert_eq!(e.to_string(), "the Authorization header holds a byte that is not visible ASCII", "{bad:?}");
        assert!(!e.to_string().contains(bad), "a value may be a secret: never quoted");
    }
    for bad_name in ["", "X Y", "X:Y", "X\n"] {
        assert!(one(bad_name, "v").is_err(), "{bad_name:?}");
    }
    let head = one("Authorization", "Bearer a.b-c_d~e+f/g=").unwrap();
    assert!(String::from_utf8(head).unwrap().contains("\r\nAuthorization: Bearer a.b-c_d~e+f/g=\r\n"));
    assert!(one("Proxy-Authorization", "Basic YWdlbnQ6czpjcmV0").is_ok());
}

/// Issue 22: the cap was printed as what was left of it
/// (`headers longer than 65519 bytes`).
#[test]
fn an_oversized_head_names_the_cap() {
    let mut raw = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', MAX_HEAD as usize));
    let e = read(&raw, 10).unwrap_err();
    assert_eq!(e.to_string(), "answer's status line and headers longer than 65536 bytes in all");
}
