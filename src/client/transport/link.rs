//! What runs over a new connection before the request: the proxy's
//! CONNECT tunnel for https, then the TLS handshake.

use std::io::{self, BufReader, Write};

use super::super::proxy::Proxy;
use super::super::wire::{self, Url};
use super::socket::Socket;
use super::{Failure, Net, keep};

/// Sets up what runs over a new connection: nothing for http, the TLS
/// handshake for https (resumed when the config holds a session).
pub(super) fn new_link(net: &Net, socket: &mut Socket, url: &Url) -> Result<keep::Link, Failure> {
    if !url.https {
        return Ok(keep::Link::Plain);
    }
    #[cfg(feature = "tls")]
    {
        let config = net.tls()?;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a TLS server name: {e}", url.host))
        })?;
        let mut conn = rustls::ClientConnection::new(config, name).map_err(|e| io::Error::other(e.to_string()))?;
        // The handshake first, so that a certificate problem reads as one and
        // not as a failed write of the request.
        super::super::tls::handshake(&mut conn, socket, &url.authority()).map_err(|e| super::stopped(e, false))?;
        Ok(keep::Link::Tls(Box::new(conn)))
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = (net, socket);
        Err(Failure::Net(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("https to {}: this build has no TLS (built without the `tls` feature)", url.host),
        )))
    }
}

/// Opens a CONNECT tunnel to `url` through the proxy.
pub(super) fn tunnel(socket: &mut Socket, proxy: &Proxy, url: &Url) -> io::Result<()> {
    let mut headers = Vec::new();
    if let Some(auth) = &proxy.authorization {
        headers.push(("Proxy-Authorization".to_string(), auth.clone()));
    }
    let head = wire::request_head("CONNECT", &url.authority(), &url.authority(), &headers)?;
    socket.write_all(&head)?;
    socket.flush()?;
    // Byte by byte: what follows the proxy's answer is the server's TLS,
    // which must not be swallowed by a read-ahead buffer.
    let mut r = BufReader::with_capacity(1, &mut *socket);
    let answer = wire::read_head(&mut r, true)?;
    if !(200..300).contains(&answer.status) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "proxy {}:{} refused CONNECT to {}: HTTP {}",
                proxy.host,
                proxy.port,
                url.authority(),
                answer.status
            ),
        ));
    }
    Ok(())
}
