//! PEM files to rustls objects, with the checks `socketd check` makes on them.
//!
//! Ground level: knows files, PEM and X.509, nothing of listeners or handlers. `config::tls`
//! calls it while validating (so a bad certificate fails `check` and refuses a reload), and
//! the result, a ready `ServerConfig`, rides in the validated listener config.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// The crypto provider every TLS object in socketd uses (`ring`: see the README's TLS section
/// for the measurement that chose it).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Something wrong with one file; the caller adds the config key and position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: String,
    pub detail: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.detail)
    }
}

fn file_error(path: &Path, detail: impl fmt::Display) -> FileError {
    FileError {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// Read a file whole, with an operator's wording for the usual failures.
fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))
}

/// Every certificate in a PEM file, in order (a chain: leaf first). None is an error.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let bytes = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            path,
            "holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)",
        ));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        file_error(
            path,
            format!("holds no usable private key (expected -----BEGIN PRIVATE KEY-----): {e}"),
        )
    })
}

/// A certificate chain and its key, checked to belong together.
pub fn certified_key(cert: &Path, key_path: &Path) -> Result<CertifiedKey, FileError> {
    let chain = certs(cert)?;
    let key = key(key_path)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_error(key_path, format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(_)) => Err(file_error(
            key_path,
            format!(
                "this private key does not match the certificate in {}",
                cert.display()
            ),
        )),
        Err(e) => Err(file_error(cert, format!("unusable certificate: {e}"))),
    }
}

/// A CA file: at least one certificate, all of them usable as trust anchors.
pub fn roots(path: &Path) -> Result<RootCertStore, FileError> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store
            .add(cert)
            .map_err(|e| file_error(path, format!("unusable CA certificate: {e}")))?;
    }
    Ok(store)
}

/// Every CRL in a PEM file.
pub fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, FileError> {
    let bytes = read(path)?;
    let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, format!("not valid PEM: {e}")))?;
    if crls.is_empty() {
        return Err(file_error(
            path,
            "holds no CRL (expected -----BEGIN X509 CRL----- blocks)",
        ));
    }
    for (i, crl) in crls.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_crl(crl.as_ref()) {
            return Err(file_error(
                path,
                format!(
                    "CRL number {} in the file is not a valid X.509 CRL: {e}",
                    i + 1
                ),
            ));
        }
    }
    Ok(crls)
}

/// When a certificate is valid, for the "expired" and "not yet valid" warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// A warning if `now` (Unix seconds) is outside the validity period.
    pub fn warning(&self, now: i64) -> Option<String> {
        if now > self.not_after {
            Some(format!("expired on {}", rfc3339(self.not_after)))
        } else if now < self.not_before {
            Some(format!("not valid before {}", rfc3339(self.not_before)))
        } else {
            None
        }
    }
}

fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The validity period of a DER certificate, if it parses.
pub fn validity(cert: &CertificateDer<'_>) -> Option<Validity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let v = parsed.validity();
    Some(Validity {
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
    })
}

/// A certificate's subject and issuer as one-line distinguished names (`CN=a, O=b`).
pub fn subject_and_issuer(cert: &[u8]) -> Option<(String, String)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some((parsed.subject().to_string(), parsed.issuer().to_string()))
}

/// DER to PEM, as web servers give `SSL_CLIENT_CERT`.
pub fn to_pem(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Picks the certificate by SNI: an exact name, then a `*.` wildcard one label deep, else the
/// default certificate.
#[derive(Debug)]
pub struct SniResolver {
    pub default: Arc<CertifiedKey>,
    /// Lower-case names (`a.example`, `*.example`) to their certificate.
    pub names: Vec<(String, Arc<CertifiedKey>)>,
}

impl SniResolver {
    /// The certificate for `name` (none given: the default).
    pub fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return Arc::clone(&self.default);
        };
        let exact = self.names.iter().find(|(n, _)| *n == name);
        let wildcard = || {
            let (_, parent) = name.split_once('.')?;
            let want = format!("*.{parent}");
            self.names.iter().find(|(n, _)| *n == want)
        };
        exact
            .or_else(wildcard)
            .map_or_else(|| Arc::clone(&self.default), |(_, ck)| Arc::clone(ck))
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// Everything a server-side TLS config is made of, already loaded and checked.
pub struct ServerParts {
    pub resolver: Arc<SniResolver>,
    /// Client certificates: trust anchors, CRLs and whether one is required.
    pub client: Option<(
        RootCertStore,
        Vec<CertificateRevocationListDer<'static>>,
        bool,
    )>,
    pub alpn: Vec<Vec<u8>>,
    pub tls13_only: bool,
}

/// Session tickets are encrypted with one process-wide key (rotated by rustls), and the
/// session-ID cache is process-wide, so a reload that builds a new config keeps resumption.
fn ticketer() -> Option<Arc<dyn rustls::server::ProducesTickets>> {
    static TICKETER: OnceLock<Option<Arc<dyn rustls::server::ProducesTickets>>> = OnceLock::new();
    TICKETER
        .get_or_init(|| rustls::crypto::ring::Ticketer::new().ok())
        .clone()
}

fn session_cache() -> Arc<dyn rustls::server::StoresServerSessions> {
    static CACHE: OnceLock<Arc<rustls::server::ServerSessionMemoryCache>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| rustls::server::ServerSessionMemoryCache::new(4096));
    Arc::clone(cache) as Arc<dyn rustls::server::StoresServerSessions>
}

/// Make the rustls server config; errors here are about combinations, not files.
pub fn server_config(parts: ServerParts) -> Result<Arc<ServerConfig>, String> {
    let versions: &[&rustls::SupportedProtocolVersion] = if parts.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match parts.client {
        None => builder.with_no_client_auth(),
        Some((roots, crls, required)) => {
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .with_crls(crls);
            if !required {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| format!("client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(parts.resolver);
    config.alpn_protocols = parts.alpn;
    config.session_storage = session_cache();
    if let Some(t) = ticketer() {
        config.ticketer = t;
    }
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_matches_base64() {
        let pem = to_pem(b"hello world");
        assert_eq!(
            pem,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n"
        );
        assert!(to_pem(&[0u8; 100]).lines().all(|l| l.len() <= 64));
    }

    #[test]
    fn validity_warnings_name_the_date() {
        let v = Validity {
            not_before: 1_000_000_000,
            not_after: 1_700_000_000,
        };
        assert_eq!(v.warning(1_500_000_000), None);
        let late = v.warning(1_800_000_000).expect("expired");
        assert!(late.contains("expired on 2023-11-14"), "{late}");
        let early = v.warning(1).expect("not yet valid");
        assert!(early.contains("not valid before 2001-09-09"), "{early}");
    }
}
