//! Proxies from the environment, as Python's requests (and so the upstream
//! agent) reads them: `http_proxy` for http URLs, `https_proxy` for https
//! (reached with CONNECT), `all_proxy` for either, `no_proxy` for hosts that
//! are reached directly. Lower case wins over upper case, as in urllib.

use std::net::IpAddr;

use super::wire::Url;

/// An HTTP proxy: where to connect and what to say to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Proxy {
    pub host: String,
    pub port: u16,
    /// `Proxy-Authorization` value, when the proxy URL has a user.
    pub authorization: Option<String>,
}

impl Proxy {
    /// `[http://][user[:password]@]host[:port]`; the port defaults to 80
    /// (as requests does for an http proxy URL without one).
    pub(super) fn parse(value: &str) -> Result<Proxy, String> {
        let value = value.trim();
        let rest = match value.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!("proxy {value:?}: only http:// proxies are supported, not {scheme}://"));
            }
            None => value,
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let url = Url::parse(&format!("http://{hostport}/")).map_err(|e| format!("proxy {:?}: {e}", redact(value)))?;
        let authorization = userinfo.map(|u| {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            format!("Basic {}", base64(format!("{}:{}", percent_decode(user), percent_decode(pass)).as_bytes()))
        });
        Ok(Proxy { host: url.host, port: url.port, authorization })
    }
}

/// A proxy URL for a log line, without its password.
pub(super) fn redact(value: &str) -> String {
    match value.rsplit_once('@') {
        Some((before, after)) => {
            let scheme = before.split_once("://").map(|(s, _)| format!("{s}://")).unwrap_or_default();
            format!("{scheme}***@{after}")
        }
        None => value.to_string(),
    }
}

/// What the environment says, read once at start.
#[derive(Clone, Debug, Default)]
pub(super) struct Proxies {
    http: Option<String>,
    https: Option<String>,
    no_proxy: Vec<String>,
}

impl Proxies {
    pub(super) fn from_env() -> Proxies {
        Proxies::from_lookup(|k| std::env::var(k).ok())
    }

    pub(super) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Proxies {
        let var = |name: &str| {
            [name.to_string(), name.to_ascii_uppercase()]
                .into_iter()
                .find_map(|k| get(&k).filter(|v| !v.trim().is_empty()))
        };
        let all = var("all_proxy");
        Proxies {
            http: var("http_proxy").or_else(|| all.clone()),
            https: var("https_proxy").or(all),
            no_proxy: var("no_proxy")
                .unwrap_or_default()
                .split([',', ' '])
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    /// The proxy for `url`, if any; an error for a proxy setting that
    /// cannot be used (better than silently going direct).
    pub(super) fn for_url(&self, url: &Url) -> Result<Option<Proxy>, String> {
        let setting = if url.https { &self.https } else { &self.http };
        match setting {
            Some(value) if !self.bypass(url) => Proxy::parse(value).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether `no_proxy` names the URL's host: `*`, the host itself, a
    /// domain it is in (`example.com` or `.example.com`), an IP network
    /// (`10.0.0.0/8`), each optionally with `:port`.
    fn bypass(&self, url: &Url) -> bool {
        let ip: Option<IpAddr> = url.host.parse().ok();
        self.no_proxy.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, port) = split_port(entry);
            if port.is_some_and(|p| p != url.port) {
                return false;
            }
            if let (Some(ip), Some((net, bits))) = (ip, name.split_once('/')) {
                return in_network(ip, net, bits);
            }
            let name = name.trim_start_matches("*.").trim_start_matches('.');
            !name.is_empty() && (url.host == name || url.host.ends_with(&format!(".{name}")))
        })
    }
}

fn split_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(v6) = entry.strip_prefix('[') {
        if let Some((h, p)) = v6.split_once(']') {
            return (h, p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match entry.rsplit_once(':') {
        // A bare IPv6 address has colons too: only one colon means a port.
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_network(ip: IpAddr, net: &str, bits: &str) -> bool {
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else { return false };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                #[allow(clippy::cast_possible_truncation)] // two hex digits: below 256
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base64(input: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Proxies {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Proxies::from_lookup(move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    fn proxy_for(p: &Proxies, url: &str) -> Option<String> {
        p.for_url(&Url::parse(url).unwrap()).unwrap().map(|p| format!("{}:{}", p.host, p.port))
    }

    #[test]
    fn scheme_picks_the_variable_and_lower_case_wins() {
        let p = env(&[("http_proxy", "http://p1:3128"), ("HTTP_PROXY", "http://p2:3128"), ("HTTPS_PROXY", "p3:8080")]);
        assert_eq!(proxy_for(&p, "http://tf/"), Some("p1:3128".into()));
        assert_eq!(proxy_for(&p, "https://tf/"), Some("p3:8080".into()));
        assert_eq!(proxy_for(&env(&[("ALL_PROXY", "p4")]), "https://tf/"), Some("p4:80".into()));
        assert_eq!(proxy_for(&env(&[]), "https://tf/"), None);
    }

    #[test]
    fn no_proxy_matches_hosts_domains_networks_and_ports() {
        let p = env(&[("http_proxy", "p:1"), ("no_proxy", "localhost, .lab.example,10.0.0.0/8,tf.example:8000,[::1]")]);
        for direct in [
            "http://localhost/",
            "http://a.lab.example/",
            "http://lab.example/",
            "http://10.1.2.3/",
            "http://tf.example:8000/",
            "http://[::1]:5/",
        ] {
            assert_eq!(proxy_for(&p, direct), None, "{direct}");
        }
        for proxied in ["http://xlab.example/", "http://11.0.0.1/", "http://tf.example:8001/", "http://example/"] {
            assert_eq!(proxy_for(&p, proxied), Some("p:1".into()), "{proxied}");
        }
        assert_eq!(proxy_for(&env(&[("http_proxy", "p:1"), ("NO_PROXY", "*")]), "http://x/"), None);
    }

    #[test]
    fn proxy_credentials_become_basic_auth_and_odd_schemes_are_refused() {
        let p = Proxy::parse("http://us%40er:p%3Ass@proxy.lab:3128/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.lab", 3128));
        assert_eq!(p.authorization.as_deref(), Some(format!("Basic {}", base64(b"us@er:p:ss")).as_str()));
        assert_eq!(base64(b"Aladdin:open sesame"), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert!(Proxy::parse("socks5://p:1080").is_err());
        assert_eq!(redact("http://u:secret@p:1"), "http://***@p:1");
    }
}
