//! TLS to the server: rustls 0.23 with the ring provider, and the trust
//! store a lab expects.
//!
//! Trusted, in this order (OpenSSL's and requests' conventions):
//! - `SSL_CERT_FILE` (or `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`) and
//!   `SSL_CERT_DIR` when set: they replace the system store, as in OpenSSL;
//! - otherwise the system store: the first bundle found among the usual
//!   paths, else the certificates in `/etc/ssl/certs`;
//! - otherwise (an image without a store) the bundled Mozilla roots
//!   (webpki-roots);
//! - plus, always, the config's `server_ca_file` (a lab's own CA).
//!
//! Verification cannot be switched off: there is no setting for it. A
//! certificate that fails says for which name, for whom it was made and
//! who issued it, so the operator knows which CA to add.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Where the system keeps its CA bundle, by distribution (the list Go and
/// rustls-native-certs use).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/tls/cacert.pem",
];
const SYSTEM_DIR: &str = "/etc/ssl/certs";

/// The client's TLS settings, built once, and a line saying what it trusts.
pub(super) struct Tls {
    pub config: Arc<ClientConfig>,
    pub trusts: String,
}

/// Builds the trust store and the TLS config. An error when a CA file that
/// was asked for (environment or config) cannot be read or holds no
/// certificate: an operator who names a CA must not get another one.
pub(super) fn build(ca_file: Option<&Path>) -> Result<Tls, String> {
    build_with(ca_file, |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from))
}

fn build_with(ca_file: Option<&Path>, env: impl Fn(&str) -> Option<PathBuf>) -> Result<Tls, String> {
    let mut roots = RootCertStore::empty();
    let mut sources = Vec::new();
    let env_file =
        ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"].into_iter().find_map(|k| env(k).map(|p| (k, p)));
    let env_dir = env("SSL_CERT_DIR");
    if env_file.is_some() || env_dir.is_some() {
        if let Some((var, path)) = env_file {
            let n = add_file(&mut roots, &path).map_err(|e| format!("{var}: {e}"))?;
            sources.push(format!("{var}={} ({n})", path.display()));
        }
        if let Some(dirs) = env_dir {
            for dir in std::env::split_paths(&dirs) {
                let n = add_dir(&mut roots, &dir);
                sources.push(format!("SSL_CERT_DIR {} ({n})", dir.display()));
            }
        }
    } else if let Some(path) = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.is_file()) {
        let n = add_file(&mut roots, path).map_err(|e| format!("system CA bundle: {e}"))?;
        sources.push(format!("{} ({n})", path.display()));
    } else {
        let n = add_dir(&mut roots, Path::new(SYSTEM_DIR));
        if n > 0 {
            sources.push(format!("{SYSTEM_DIR} ({n})"));
        }
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        sources.push(format!("bundled Mozilla roots ({}), no system store found", roots.len()));
    }
    if let Some(path) = ca_file {
        let n = add_file(&mut roots, path).map_err(|e| format!("server_ca_file: {e}"))?;
        sources.push(format!("server_ca_file {} ({n})", path.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("trust store: {e}"))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        // Not a weaker check: the full webpki verification, with errors
        // that name the certificate (see `Naming`).
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Naming { inner: webpki }))
        .with_no_client_auth();
    Ok(Tls { config: Arc::new(config), trusts: sources.join(", ") })
}

/// Adds the certificates of a PEM file; an error if it has none.
fn add_file(roots: &mut RootCertStore, path: &Path) -> Result<usize, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<CertificateDer> = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok).collect();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(added)
}

/// Adds the certificates of every PEM file in a directory (the hashed
/// links OpenSSL keeps there point to the same files: duplicates are
/// harmless).
fn add_dir(roots: &mut RootCertStore, dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            if let Ok(bytes) = std::fs::read(&path) {
                let certs: Vec<CertificateDer> =
                    CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok).collect();
                n += roots.add_parsable_certificates(certs).0;
            }
        }
    }
    n
}

/// The webpki verifier, with failures that say which certificate failed.
/// rustls gets webpki's own error, so that the alert it sends the server
/// names the cause (`unknown_ca`, `bad_certificate`, `certificate_expired`:
/// what the server's logs show, as with upstream's agent); the worded
/// verdict is kept aside for the log line (`handshake`).
#[derive(Debug)]
struct Naming {
    inner: Arc<WebPkiServerVerifier>,
}

/// The worded verdict on the last refused certificate. One handshake at a
/// time (the agent is single-threaded): set by the verifier, taken by
/// `handshake` when that handshake fails.
static VERDICT: Mutex<Option<String>> = Mutex::new(None);
/// The last handshake failure logged at ERROR: the same one again (every
/// retry, until the operator fixes the trust store) goes at DEBUG.
static LOGGED: Mutex<Option<String>> = Mutex::new(None);

fn slot(m: &Mutex<Option<String>>) -> std::sync::MutexGuard<'_, Option<String>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Completes the TLS handshake on `tls`. On failure the alert rustls
/// queued (if any) is written out before this returns: without this write
/// the server saw only the connection end ("unexpected EOF"; test
/// `a_refused_certificate_is_logged_once_and_the_server_gets_the_alert`).
/// The error says why in words, and is logged at ERROR once per change of
/// reason (the caller logs its failures at a quieter level).
pub(super) fn handshake<S: Read + Write>(conn: &mut ClientConnection, sock: &mut S, authority: &str) -> io::Result<()> {
    slot(&VERDICT).take();
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(sock) {
            if e.get_ref().is_none_or(|inner| !inner.is::<rustls::Error>()) {
                // The network (reset, no answer in time), the call's
                // deadline or the agent's stop, not TLS: the caller says it
                // as it says any other.
                return Err(e);
            }
            while conn.wants_write() {
                if !matches!(conn.write_tls(sock), Ok(n) if n > 0) {
                    break;
                }
            }
            let _ = sock.flush();
            let reason = format!("TLS handshake with {authority}: {}", reason(&e));
            let mut logged = slot(&LOGGED);
            if logged.as_deref() == Some(reason.as_str()) {
                log::debug!("{reason}");
            } else {
                log::error!("{reason}");
                *logged = Some(reason.clone());
            }
            return Err(io::Error::new(e.kind(), reason));
        }
    }
    slot(&LOGGED).take();
    Ok(())
}

/// A TLS failure in words: our verdict on the certificate as the verifier
/// wrote it, else rustls' own words (its Display, not its debug form).
fn reason(e: &io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_)) => match slot(&VERDICT).take() {
            Some(verdict) => verdict,
            None => e.to_string(),
        },
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// Why a server's certificate was refused, in words an operator can act on.
struct Refused {
    name: String,
    subject: String,
    issuer: String,
    why: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "certificate for {} refused: {} (certificate subject {}, issuer {}); to trust a lab CA set server_ca_file or SSL_CERT_FILE",
            self.name, self.why, self.subject, self.issuer
        )
    }
}

fn why(e: &CertificateError) -> String {
    match e {
        CertificateError::UnknownIssuer => "issued by a CA this agent does not trust".into(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "not valid for that name".into()
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired".into(),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "not valid yet".into(),
        CertificateError::Revoked => "revoked".into(),
        CertificateError::BadEncoding => "not a well-formed certificate".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "not made for a TLS server (its extended key usage)".into()
        }
        // webpki's own reasons (name constraints, a CA used as a server
        // certificate...) come as identifiers: said as words.
        CertificateError::Other(other) => words(&other.to_string()),
        other => words(&format!("{other:?}")),
    }
}

/// `NameConstraintViolation(...)` as `name constraint violation`: the
/// identifier of a verdict rustls and webpki only print in debug form.
fn words(identifier: &str) -> String {
    let name = identifier.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or("");
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_uppercase() && !out.is_empty() {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    if out.is_empty() { "refused by the verifier".into() } else { out }
}

impl ServerCertVerifier for Naming {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).map_err(|e| match e {
            rustls::Error::InvalidCertificate(cause) => {
                let (subject, issuer) = names(end_entity).unwrap_or_else(|| ("?".into(), "?".into()));
                let refused = Refused { name: server_name.to_str().into_owned(), subject, issuer, why: why(&cause) };
                *slot(&VERDICT) = Some(refused.to_string());
                rustls::Error::InvalidCertificate(cause)
            }
            other => other,
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One DER element: (tag, contents, the rest). `None` on anything odd:
/// the certificate comes from the server, every length is checked.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Subject and issuer of a certificate, as `CN=..., O=...`.
fn names(cert: &[u8]) -> Option<(String, String)> {
    let (_, certificate, _) = der(cert)?;
    let (_, tbs, _) = der(certificate)?;
    let (tag, _, mut rest) = der(tbs)?;
    if tag == 0xa0 {
        // Explicit version; the serial number follows.
        rest = der(rest)?.2;
    }
    let (_, _, rest) = der(rest)?; // signature algorithm
    let (_, issuer, rest) = der(rest)?;
    let (_, _, rest) = der(rest)?; // validity
    let (_, subject, _) = der(rest)?;
    Some((name(subject), name(issuer)))
}

/// An X.501 name's CN, O and OU attributes.
fn name(mut rdns: &[u8]) -> String {
    let mut parts = Vec::new();
    while let Some((_, set, rest)) = der(rdns) {
        rdns = rest;
        let mut attrs = set;
        while let Some((_, attr, rest)) = der(attrs) {
            attrs = rest;
            let Some((_, oid, value)) = der(attr) else { continue };
            let Some((_, text, _)) = der(value) else { continue };
            let label = match oid {
                [0x55, 0x04, 0x03] => "CN",
                [0x55, 0x04, 0x0a] => "O",
                [0x55, 0x04, 0x0b] => "OU",
                _ => continue,
            };
            parts.push(format!("{label}={}", String::from_utf8_lossy(text)));
        }
    }
    if parts.is_empty() { "(no name)".into() } else { parts.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_roots_when_there_is_no_store_and_named_files_must_load() {
        let none = |_: &str| None;
        // This machine has a system store, or not: either way some roots.
        let tls = build_with(None, none).unwrap();
        assert!(!tls.trusts.is_empty());
        let missing = Path::new("/nonexistent/ca.pem");
        let e = build_with(Some(missing), none).err().unwrap();
        assert!(e.starts_with("server_ca_file: /nonexistent/ca.pem"), "{e}");
        let e = build_with(None, |k| (k == "SSL_CERT_FILE").then(|| PathBuf::from("/dev/null"))).err().unwrap();
        assert!(e.contains("SSL_CERT_FILE") && e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn verdicts_are_words_not_debug_output() {
        let other = CertificateError::Other(rustls::OtherError(Arc::new(FakeWebpki)));
        assert_eq!(why(&other), "name constraint violation");
        assert_eq!(why(&CertificateError::UnknownRevocationStatus), "unknown revocation status");
        assert_eq!(why(&CertificateError::UnknownIssuer), "issued by a CA this agent does not trust");
        assert_eq!(words(""), "refused by the verifier");
    }

    /// webpki's errors print their debug form as their Display.
    #[derive(Debug)]
    struct FakeWebpki;
    impl fmt::Display for FakeWebpki {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("NameConstraintViolation")
        }
    }
    impl std::error::Error for FakeWebpki {}

    #[test]
    fn der_walker_survives_garbage() {
        for bad in
            [&[][..], &[0x30], &[0x30, 0x85, 1, 1, 1, 1, 1], &[0x30, 0x82, 0xff, 0xff, 0], &[0x30, 0x03, 0x30, 0x01]]
        {
            assert!(names(bad).is_none());
        }
        let root = webpki_roots::TLS_SERVER_ROOTS.first().unwrap();
        // A trust anchor's subject is a bare name's contents.
        assert!(name(&root.subject).contains('='), "{}", name(&root.subject));
    }
}
