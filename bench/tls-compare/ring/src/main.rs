//! N sequential GETs over rustls 0.23 + ring with a hand-written HTTP/1.1
//! exchange (the agent's design, minus the agent); prints the median time.
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::sync::Arc;

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("url");
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let rest = url.strip_prefix("https://").expect("https url");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "443"));
    let mut roots = rustls::RootCertStore::empty();
    match std::env::var("SSL_CERT_FILE") {
        Ok(f) => {
            roots.add_parsable_certificates(CertificateDer::pem_file_iter(f).unwrap().flatten());
        }
        Err(_) => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut times = Vec::new();
    for _ in 0..n {
        let t = std::time::Instant::now();
        let tcp = std::net::TcpStream::connect((host, port.parse::<u16>().unwrap())).unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), ServerName::try_from(host.to_string()).unwrap()).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let path = if path.is_empty() { "/" } else { path };
        write!(s, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"), "{}", String::from_utf8_lossy(&buf[..buf.len().min(100)]));
        times.push(t.elapsed());
    }
    times.sort();
    println!("ring requests={n} median={:?} min={:?} max={:?}", times[n / 2], times[0], times[n - 1]);
}
