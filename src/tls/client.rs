//! TLS to a proxy's upstream: `proxy = { upstream, tls = { server_name, ca, client_cert,
//! client_key } }`. The settings build a rustls `ClientConfig` once (at `check` and build
//! time); each connection hands its TCP socket to the TLS front and gets back the plaintext
//! end of a socketpair, which the proxy relays as if it were the upstream itself.

use std::os::unix::net::UnixStream as StdUnix;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

use super::front::{front, Job, Wire};
use super::load;

/// How long the upstream's TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the system's trust anchors are, in the order tried (`SSL_CERT_FILE` first).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// A validated upstream `tls` table.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub server_name: ServerName<'static>,
    pub config: Arc<ClientConfig>,
    /// The table as written, for comparing settings across reloads.
    source: toml::Table,
}

impl PartialEq for ClientSettings {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// The table holds only strings, so equality is total.
impl Eq for ClientSettings {}

const KEYS: &str = "server_name, ca, client_cert, client_key";

fn path<'t>(table: &'t toml::Table, key: &str) -> Result<Option<&'t str>, String> {
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(_) => Err(format!(
            "proxy: `tls.{key}` must be a file path in quotes, e.g. {key} = \"/etc/socketd/{key}.pem\""
        )),
    }
}

impl ClientSettings {
    /// Read `tls = { ... }` from a proxy table; `host` is the upstream's address, the server
    /// name when `server_name` is not given.
    pub fn from_table(table: &toml::Table, host: Option<std::net::IpAddr>) -> Result<Self, String> {
        for key in table.keys() {
            if !KEYS.split(", ").any(|k| k == key) {
                return Err(format!(
                    "proxy: unknown key `tls.{key}`; valid keys: {KEYS}"
                ));
            }
        }
        let server_name = match table.get("server_name") {
            Some(toml::Value::String(s)) => ServerName::try_from(s.clone())
                .map_err(|e| format!("proxy: `tls.server_name` {s:?}: {e}"))?,
            Some(_) => return Err("proxy: `tls.server_name` must be a string".into()),
            None => match host {
                Some(ip) => ServerName::IpAddress(ip.into()),
                None => {
                    return Err("proxy: `tls.server_name` is required for a unix upstream".into())
                }
            },
        };
        let roots = match path(table, "ca")? {
            Some(ca) => load::roots(Path::new(ca)).map_err(|e| format!("proxy: `tls.ca`: {e}"))?,
            None => system_roots()?,
        };
        let builder = ClientConfig::builder_with_provider(load::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match (path(table, "client_cert")?, path(table, "client_key")?) {
            (Some(c), Some(k)) => {
                let ck = load::certified_key(Path::new(c), Path::new(k))
                    .map_err(|e| format!("proxy: `tls.client_cert`/`tls.client_key`: {e}"))?;
                builder
                    .with_client_auth_cert(
                        ck.cert,
                        load::key(Path::new(k)).map_err(|e| e.to_string())?,
                    )
                    .map_err(|e| format!("proxy: `tls.client_key`: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(
                    "proxy: `tls.client_cert` and `tls.client_key` go together; give both".into(),
                )
            }
        };
        Ok(ClientSettings {
            server_name,
            config: Arc::new(config),
            source: table.clone(),
        })
    }

    /// Start TLS on `wire` (connected or still connecting), after `preamble` in the clear
    /// (a PROXY protocol header); returns the plaintext end, blocking.
    pub fn wrap(&self, wire: Wire, preamble: Vec<u8>, label: String) -> std::io::Result<StdUnix> {
        let (mine, theirs) = StdUnix::pair()?;
        mine.set_nonblocking(true)?;
        front()?.submit(Job::Connect {
            wire,
            config: Arc::clone(&self.config),
            name: self.server_name.clone(),
            plain: mio::net::UnixStream::from_std(mine),
            preamble,
            deadline: Instant::now() + HANDSHAKE_TIMEOUT,
            label,
        })?;
        Ok(theirs)
    }
}

/// The system's CA bundle.
fn system_roots() -> Result<RootCertStore, String> {
    let env = std::env::var("SSL_CERT_FILE").ok();
    let candidates = env
        .iter()
        .map(String::as_str)
        .chain(SYSTEM_BUNDLES.iter().copied());
    for file in candidates {
        let Ok(certs) = load::certs(Path::new(file)) else {
            continue;
        };
        let mut store = RootCertStore::empty();
        store.add_parsable_certificates(certs);
        if !store.is_empty() {
            return Ok(store);
        }
    }
    Err(format!(
        "proxy: no `tls.ca` given and no system CA bundle found (looked at $SSL_CERT_FILE, {}); \
         add ca = \"/path/to/ca.pem\"",
        SYSTEM_BUNDLES.join(", ")
    ))
}
