//! URLs, as far as the agent needs them: the server's address, redirect
//! targets, proxies. One reader for all of them.

use std::io;

/// An `http` or `https` URL, as far as the agent needs one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    /// Lowercase; an IPv6 address without its brackets.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// `server_address` as upstream takes it (a URL, or a bare `host[:port]`
/// meaning http) as the base every request URL is built on: scheme and
/// host only. Upstream joins each request's absolute path (`/v1/...`) to
/// the address with `urljoin`, which drops any path the address has; so
/// does this (see [`server_path`]).
pub fn server_base(address: &str) -> String {
    let (base, _) = split_server_address(address);
    base
}

/// The path `server_address` holds that [`server_base`] drops (`None` for
/// none, or only `/`), for the start-up log.
pub fn server_path(address: &str) -> Option<String> {
    let (_, path) = split_server_address(address);
    Some(path).filter(|p| !p.trim_end_matches('/').is_empty())
}

fn split_server_address(address: &str) -> (String, String) {
    let address = address.trim();
    let full = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    let authority_at = full.find("://").map_or(0, |i| i + 3);
    match full[authority_at..].find('/') {
        Some(i) => {
            let (base, path) = full.split_at(authority_at + i);
            (base.to_string(), path.to_string())
        }
        None => (full, String::new()),
    }
}

impl Url {
    /// The one URL reader: the server's address (checked at start by the
    /// config), redirects, proxies. A host is a name (letters, digits,
    /// `-._`) or an IP address, IPv6 in brackets; a port, when written, is
    /// 1 to 65535.
    pub fn parse(url: &str) -> io::Result<Url> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("bad URL {url:?}: {why}"));
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        let (https, rest) = if lower.starts_with("https://") {
            (true, &url[8..])
        } else if lower.starts_with("http://") {
            (false, &url[7..])
        } else {
            return Err(bad("not http:// or https://"));
        };
        if url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(bad("control characters or spaces"));
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err(bad("user names and passwords in the server URL are not supported"));
        }
        let path = path.split('#').next().unwrap_or("");
        let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            if !h.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
                return Err(bad("bad IPv6 address"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("text after the IPv6 address"))?),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if !authority.starts_with('[') && !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
            return Err(bad(&format!("{host:?} is not a host name")));
        }
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(&format!("bad port {p:?} (a number from 1 to 65535)")))?,
        };
        Ok(Url { https, host: host.to_ascii_lowercase(), port, path })
    }

    pub fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    /// `host[:port]` as in a Host header: the port only when not the default.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == if self.https { 443 } else { 80 } { host } else { format!("{host}:{}", self.port) }
    }

    /// `host:port` always, as a CONNECT target.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        format!("{host}:{}", self.port)
    }

    /// Scheme, host and port: what tokens and cookies are bound to.
    pub fn same_origin(&self, other: &Url) -> bool {
        self.https == other.https && self.host == other.host && self.port == other.port
    }

    /// A `Location` value resolved against this URL.
    pub fn join(&self, location: &str) -> io::Result<Url> {
        let location = location.trim();
        let lower = location.get(..8).unwrap_or(location).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Url::parse(location);
        }
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{}://{rest}", self.scheme()));
        }
        if location.contains("://") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("redirect to a non-HTTP URL {location:?}"),
            ));
        }
        let path = if location.starts_with('/') {
            location.to_string()
        } else {
            let dir = self.path.split('?').next().unwrap_or("/");
            let dir = &dir[..dir.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{location}")
        };
        Url::parse(&format!("{}://{}{path}", self.scheme(), self.host_header()))
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme(), self.host_header(), self.path)
    }
}
