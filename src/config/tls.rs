//! A stream listener's `tls = { ... }` table: raw keys, validation, and the loaded result.
//!
//! Validation loads every file (so `check` and a reload catch an unreadable file, a key that
//! does not belong to its certificate, a CA file without certificates) and builds the rustls
//! `ServerConfig` once; the validated `TlsSettings` carry it, plus a fingerprint of the files'
//! contents, so a reload after a certificate rotation sees a changed listener even when the
//! config text is the same.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::types::Protocol;
use super::validate::Check;
use crate::tls::load;

/// How long a client may take to finish the handshake when `handshake_timeout` is not given.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `tls = { ... }` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub crl: Option<Spanned<String>>,
    pub alpn: Option<Spanned<Vec<String>>>,
    pub min_version: Option<Spanned<String>>,
    pub sni: Option<Vec<Spanned<RawSni>>>,
    pub handshake_timeout: Option<Spanned<String>>,
}

/// One `sni = [{ names, cert, key }]` entry as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSni {
    pub names: Option<Spanned<Vec<String>>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
}

/// Whether clients must present a certificate signed by `client_ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ClientAuth {
    /// A client without a certificate from `client_ca` is refused in the handshake.
    Required,
    /// A client may present one (then it must verify) or none.
    Optional,
}

/// The lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// One extra certificate chosen by SNI.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SniCert {
    /// Names it serves: exact, or `*.example` for one label below.
    pub names: Vec<String>,
    /// The PEM chain.
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
}

/// A validated `tls` table.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TlsSettings {
    /// The default certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA certificates for client certificates (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Whether a client certificate is required (with `client_ca`).
    pub client_auth: ClientAuth,
    /// Revocation lists for client certificates.
    pub crl: Option<PathBuf>,
    /// ALPN protocols offered, in order of preference.
    pub alpn: Vec<String>,
    /// The lowest version accepted.
    pub min_version: MinVersion,
    /// Extra certificates chosen by SNI.
    pub sni: Vec<SniCert>,
    /// How long a client may take to finish the handshake.
    pub handshake_timeout: Duration,
    /// A hash of every file's contents at validation: rotated files make a changed config.
    pub fingerprint: String,
    /// The loaded config (not sent to the fork server, which never terminates TLS).
    #[serde(skip)]
    pub server: Option<Arc<rustls::ServerConfig>>,
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.cert,
            &self.key,
            &self.client_ca,
            self.client_auth,
            &self.crl,
            &self.alpn,
            self.min_version,
            &self.sni,
            self.handshake_timeout,
            &self.fingerprint,
        ) == (
            &other.cert,
            &other.key,
            &other.client_ca,
            other.client_auth,
            &other.crl,
            &other.alpn,
            other.min_version,
            &other.sni,
            other.handshake_timeout,
            &other.fingerprint,
        )
    }
}

const CLIENT_AUTH: (&str, &[&str]) = ("client_auth", &["required", "optional"]);
const MIN_VERSION: (&str, &[&str]) = ("TLS version", &["1.2", "1.3"]);

/// Validate `tls` for a listener of `protocol`; errors go to `c`, warnings (expiry) to the log.
pub(super) fn validate(
    raw: Option<&Spanned<RawTls>>,
    protocol: Option<Protocol>,
    c: &mut Check<'_, '_>,
) -> Option<TlsSettings> {
    let raw_spanned = raw?;
    let span = raw_spanned.span();
    let raw = raw_spanned.get_ref();
    if let Some(p) = protocol.filter(|p| p.is_datagram()) {
        c.error(
            &span,
            "tls",
            format!(
                "TLS needs a stream listener, and this one is protocol = \"{p}\"; use protocol = \
                 \"tcp\" or \"unix\", or remove the `tls` table (DTLS is not supported)"
            ),
        );
        return None;
    }
    let mark = c.diags.mark();
    for (value, key) in [(&raw.cert, "tls.cert"), (&raw.key, "tls.key")] {
        if value.is_none() {
            c.error(
                &span,
                "tls",
                format!(
                    "missing `{}`; add e.g. {} = \"/etc/socketd/server.pem\"",
                    &key[4..],
                    &key[4..]
                ),
            );
        }
    }
    let client_auth = c.choice(
        &raw.client_auth,
        "tls.client_auth",
        CLIENT_AUTH,
        |s| match s {
            "required" => Some(ClientAuth::Required),
            "optional" => Some(ClientAuth::Optional),
            _ => None,
        },
    );
    if let (Some(v), None) = (&raw.client_auth, &raw.client_ca) {
        c.error(
            &v.span(),
            "tls.client_auth",
            "needs `client_ca` (the CA file that signs client certificates); add e.g. \
             client_ca = \"/etc/socketd/clients-ca.pem\"",
        );
    }
    if let (Some(v), None) = (&raw.crl, &raw.client_ca) {
        c.error(
            &v.span(),
            "tls.crl",
            "revocation lists apply to client certificates: add `client_ca` too",
        );
    }
    let min_version = c.choice(
        &raw.min_version,
        "tls.min_version",
        MIN_VERSION,
        |s| match s {
            "1.2" => Some(MinVersion::Tls12),
            "1.3" => Some(MinVersion::Tls13),
            _ => None,
        },
    );
    let handshake_timeout = c.duration(
        &raw.handshake_timeout,
        "tls.handshake_timeout",
        DEFAULT_HANDSHAKE_TIMEOUT,
    );
    let alpn: Vec<String> = raw
        .alpn
        .as_ref()
        .map(|a| a.get_ref().clone())
        .unwrap_or_default();
    if let Some(a) = &raw.alpn {
        if alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
            c.error(
                &a.span(),
                "tls.alpn",
                "protocol names must be 1 to 255 bytes, e.g. alpn = [\"h2\", \"http/1.1\"]",
            );
        }
    }

    let mut hasher = DefaultHasher::new();
    let mut default = None;
    if let (Some(cert), Some(key)) = (&raw.cert, &raw.key) {
        default = load_pair(cert, key, "tls.cert", "tls.key", &mut hasher, c);
    }
    let mut names = Vec::new();
    let mut sni = Vec::new();
    for entry in raw.sni.iter().flatten() {
        let e = entry.get_ref();
        let (Some(n), Some(cert), Some(key)) = (&e.names, &e.cert, &e.key) else {
            c.error(
                &entry.span(),
                "tls.sni",
                "each entry needs `names`, `cert` and `key`, e.g. { names = [\"a.example\"], \
                 cert = \"/etc/socketd/a.pem\", key = \"/etc/socketd/a.key\" }",
            );
            continue;
        };
        if n.get_ref().is_empty() {
            c.error(&n.span(), "tls.sni.names", "must list at least one name");
        }
        if let Some(ck) = load_pair(cert, key, "tls.sni.cert", "tls.sni.key", &mut hasher, c) {
            let ck = Arc::new(ck);
            for name in n.get_ref() {
                names.push((name.to_ascii_lowercase(), Arc::clone(&ck)));
            }
        }
        sni.push(SniCert {
            names: n.get_ref().clone(),
            cert: PathBuf::from(cert.get_ref()),
            key: PathBuf::from(key.get_ref()),
        });
    }
    let mut client = None;
    if let Some(ca) = &raw.client_ca {
        hash_file(ca.get_ref(), &mut hasher);
        match load::roots(Path::new(ca.get_ref())) {
            Ok(roots) => {
                let crls = match &raw.crl {
                    Some(crl) => {
                        hash_file(crl.get_ref(), &mut hasher);
                        load::crls(Path::new(crl.get_ref())).unwrap_or_else(|e| {
                            c.error(&crl.span(), "tls.crl", e);
                            Vec::new()
                        })
                    }
                    None => Vec::new(),
                };
                let required = client_auth.unwrap_or(ClientAuth::Required) == ClientAuth::Required;
                client = Some((roots, crls, required));
            }
            Err(e) => c.error(&ca.span(), "tls.client_ca", e),
        }
    }
    if c.diags.grew_since(mark) {
        return None;
    }
    let parts = load::ServerParts {
        resolver: Arc::new(load::SniResolver {
            default: Arc::new(default?),
            names,
        }),
        client,
        alpn: alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
        tls13_only: min_version == Some(MinVersion::Tls13),
    };
    let server = match load::server_config(parts) {
        Ok(s) => s,
        Err(e) => {
            c.error(&span, "tls", e);
            return None;
        }
    };
    Some(TlsSettings {
        cert: PathBuf::from(raw.cert.as_ref()?.get_ref()),
        key: PathBuf::from(raw.key.as_ref()?.get_ref()),
        client_ca: raw.client_ca.as_ref().map(|p| PathBuf::from(p.get_ref())),
        client_auth: client_auth.unwrap_or(ClientAuth::Required),
        crl: raw.crl.as_ref().map(|p| PathBuf::from(p.get_ref())),
        alpn,
        min_version: min_version.unwrap_or(MinVersion::Tls12),
        sni,
        handshake_timeout,
        fingerprint: format!("{:016x}", hasher.finish()),
        server: Some(server),
    })
}

fn hash_file(path: &str, hasher: &mut DefaultHasher) {
    path.hash(hasher);
    std::fs::read(path).unwrap_or_default().hash(hasher);
}

/// Load one certificate and key, reporting at the key that names the bad file; an expired or
/// not yet valid certificate is a warning (with its date) at the `cert` key.
fn load_pair(
    cert: &Spanned<String>,
    key: &Spanned<String>,
    cert_key: &str,
    key_key: &str,
    hasher: &mut DefaultHasher,
    c: &mut Check<'_, '_>,
) -> Option<rustls::sign::CertifiedKey> {
    hash_file(cert.get_ref(), hasher);
    hash_file(key.get_ref(), hasher);
    let (cert_path, key_path) = (Path::new(cert.get_ref()), Path::new(key.get_ref()));
    match load::certified_key(cert_path, key_path) {
        Ok(ck) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let warning = ck
                .cert
                .first()
                .and_then(load::validity)
                .and_then(|v| v.warning(now));
            if let Some(w) = warning {
                warn_at(
                    c,
                    &cert.span(),
                    cert_key,
                    &format!("{}: certificate {w}", cert_path.display()),
                );
            }
            Some(ck)
        }
        Err(e) => {
            let at: &Range<usize> = &if e.path == key_path.display().to_string()
                && e.path != cert_path.display().to_string()
            {
                key.span()
            } else {
                cert.span()
            };
            let which = if at == &key.span() { key_key } else { cert_key };
            c.error(at, which, e);
            None
        }
    }
}

/// A warning in the same `file:line:col: listener: key` form as errors, logged (it does not
/// make `check` fail: an expired certificate still serves, and clients decide).
fn warn_at(c: &Check<'_, '_>, span: &Range<usize>, key: &str, detail: &str) {
    let (line, col) = c.diags.position(span.start);
    let text = format!(
        "{}:{line}:{col}: {}: key `{key}`: {detail}",
        c.diags.file().display(),
        c.section
    );
    // `check` runs without a logger: there the warning goes straight to stderr.
    if log::log_enabled!(log::Level::Warn) {
        log::warn!("{text}");
    } else {
        eprintln!("warning: {text}");
    }
}
