//! `handler = "proxy"`: relay each connection (or UDP client) to one upstream address,
//! optionally prefixed with a PROXY protocol v1/v2 header naming the real client.
//!
//! This file holds what every worker model shares: the settings (`proxy = { upstream,
//! connect_timeout, proxy_protocol, udp_idle }`), the header encoder, and the blocking handler
//! for threaded and forked workers (the bytes move on the process's relay thread, `relay`).
//! The event-loop state machine is `event::proxy`. Upstreams are addresses, never host names:
//! socketd does not resolve names.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{BuildContext, Context, Factory, Handler, Request};
use crate::config::{Protocol, SettingsError};
use crate::conn::{Conn, PeerAddr};

/// How long a connect to the upstream may take when `connect_timeout` is not given.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a UDP client's upstream association lives without traffic by default.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);

/// Where the proxy connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// An IP address and port.
    Inet(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// Which PROXY protocol header, if any, goes first to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// The text header (`PROXY TCP4 …`).
    V1,
    /// The binary header.
    V2,
}

/// `proxy = {...}`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// Where connections are forwarded.
    pub upstream: Upstream,
    /// How long connecting upstream may take.
    pub connect_timeout: Duration,
    /// A PROXY protocol header sent upstream first, if any.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// UDP: how long an idle upstream association lives.
    pub udp_idle: Duration,
    /// `tls = {...}`: speak TLS to the upstream (`crate::tls::client`).
    pub tls: Option<crate::tls::client::ClientSettings>,
}

const KEYS: &str = "upstream, connect_timeout, proxy_protocol, udp_idle, tls";
const USAGE: &str =
    "proxy = { upstream = \"127.0.0.1:8080\" } (or \"[::1]:8080\", \"unix:/run/app.sock\")";

fn duration(table: &toml::Table, key: &str, default: Duration) -> Result<Duration, String> {
    match table.get(key) {
        None => Ok(default),
        Some(toml::Value::String(s)) => match crate::config::parse_duration(s) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(format!(
                "proxy: `{key}` = {s:?} is not a positive duration; e.g. \"5s\", \"500ms\""
            )),
            Err(why) => Err(format!("proxy: `{key}`: {why}")),
        },
        Some(_) => Err(format!(
            "proxy: `{key}` must be a duration string, e.g. \"5s\""
        )),
    }
}

/// The `proxy` table's shape, for serde: every key and its type (unknown keys refused); the
/// values are then checked by `ProxySettings::from_build`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read for its shape only
struct ProxyTable {
    upstream: Option<String>,
    connect_timeout: Option<String>,
    proxy_protocol: Option<String>,
    udp_idle: Option<String>,
    tls: Option<toml::Table>,
}

impl ProxySettings {
    /// Read the `proxy` table for a listener of `ctx.protocol` (every problem, in one line).
    pub(crate) fn from_build(ctx: &BuildContext) -> Result<ProxySettings, String> {
        ProxySettings::from_build_all(ctx).map_err(|all| all.join("; "))
    }

    /// Read the `proxy` table, collecting every problem (each names its key first).
    fn from_build_all(ctx: &BuildContext) -> Result<ProxySettings, Vec<String>> {
        let Some(table) = ctx.settings else {
            return Err(vec![format!(
                "handler `proxy` needs its settings: add {USAGE}"
            )]);
        };
        let mut errors = Vec::new();
        for key in table.keys() {
            if !KEYS.split(", ").any(|k| k == key) {
                errors.push(format!("proxy: unknown key `{key}`; valid keys: {KEYS}"));
            }
        }
        let upstream = match table.get("upstream") {
            // "proxy: upstream …" becomes "proxy: `upstream` …", so it is shown at its key.
            Some(toml::Value::String(s)) => parse_upstream(s)
                .map_err(|e| errors.push(e.replacen("proxy: upstream", "proxy: `upstream`", 1)))
                .ok(),
            Some(_) => {
                errors.push(format!("proxy: `upstream` must be a string, e.g. {USAGE}"));
                None
            }
            None => {
                errors.push(format!("proxy: `upstream` is required, e.g. {USAGE}"));
                None
            }
        };
        let proxy_protocol = match table.get("proxy_protocol") {
            None => None,
            Some(toml::Value::String(v)) if v == "v1" => Some(ProxyProtocol::V1),
            Some(toml::Value::String(v)) if v == "v2" => Some(ProxyProtocol::V2),
            Some(v) => {
                errors.push(format!(
                    "proxy: `proxy_protocol` = {v} is not valid; valid values: \"v1\", \"v2\" \
                     (leave it out for no header)"
                ));
                None
            }
        };
        if ctx.protocol.is_datagram() {
            if ctx.protocol != Protocol::Udp || !matches!(upstream, Some(Upstream::Inet(_)) | None)
            {
                errors.push(
                    "proxy: datagram proxying is UDP to UDP only: use protocol = \"udp\" \
                     with an ip:port upstream"
                        .into(),
                );
            }
            if proxy_protocol.is_some() {
                errors.push(
                    "proxy: `proxy_protocol` applies to stream listeners only; remove it".into(),
                );
            }
        }
        let tls = match table.get("tls") {
            None => None,
            Some(_) if ctx.protocol.is_datagram() => {
                errors.push("proxy: `tls` applies to stream listeners only; remove it".into());
                None
            }
            Some(toml::Value::Table(t)) => {
                let host = match &upstream {
                    Some(Upstream::Inet(a)) => Some(a.ip()),
                    _ => None,
                };
                crate::tls::client::ClientSettings::from_table(t, host)
                    .map_err(|e| errors.push(e))
                    .ok()
            }
            Some(_) => {
                errors.push(
                    "proxy: `tls` must be a table, e.g. tls = { server_name = \"app.example\", \
                     ca = \"/etc/socketd/upstream-ca.pem\" }"
                        .into(),
                );
                None
            }
        };
        let connect_timeout = duration(table, "connect_timeout", DEFAULT_CONNECT_TIMEOUT)
            .map_err(|e| errors.push(e))
            .ok();
        let udp_idle = duration(table, "udp_idle", DEFAULT_UDP_IDLE)
            .map_err(|e| errors.push(e))
            .ok();
        match (upstream, connect_timeout, udp_idle) {
            (Some(upstream), Some(connect_timeout), Some(udp_idle)) if errors.is_empty() => {
                Ok(ProxySettings {
                    upstream,
                    connect_timeout,
                    proxy_protocol,
                    udp_idle,
                    tls,
                })
            }
            _ => Err(errors),
        }
    }

    /// A blocking connect with the configured timeout (threaded and forked workers).
    pub fn connect_blocking(&self) -> io::Result<Conn> {
        match &self.upstream {
            Upstream::Inet(a) => {
                let s = TcpStream::connect_timeout(a, self.connect_timeout)?;
                let _ = s.set_nodelay(true);
                Ok(Conn::Tcp(s))
            }
            Upstream::Unix(p) => Ok(Conn::Unix(UnixStream::connect(p)?)),
        }
    }
}

/// `ip:port`, `[ipv6]:port` or `unix:/absolute/path`; never a host name.
pub(crate) fn parse_upstream(s: &str) -> Result<Upstream, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        let path = PathBuf::from(p);
        if !path.is_absolute() {
            return Err(format!(
                "proxy: upstream {s:?}: a unix path must be absolute, e.g. \"unix:/run/app.sock\""
            ));
        }
        return Ok(Upstream::Unix(path));
    }
    s.parse::<SocketAddr>().map(Upstream::Inet).map_err(|_| {
        format!(
            "proxy: upstream {s:?} is not an address; use ip:port, [ipv6]:port or unix:/path \
             (socketd never resolves host names)"
        )
    })
}

/// The PROXY protocol header announcing `peer` -> `local`. Clients without an IP address
/// (Unix sockets) are announced as `UNKNOWN` (v1) or command `LOCAL` (v2), as the spec says.
pub fn header(version: ProxyProtocol, peer: &PeerAddr, local: Option<SocketAddr>) -> Vec<u8> {
    let pair = match (peer, local) {
        (PeerAddr::Inet(p), Some(l)) => {
            let p = SocketAddr::new(crate::conn::canonical_ip(p.ip()), p.port());
            let l = SocketAddr::new(crate::conn::canonical_ip(l.ip()), l.port());
            (p.is_ipv4() == l.is_ipv4()).then_some((p, l))
        }
        _ => None,
    };
    match version {
        ProxyProtocol::V1 => match pair {
            Some((p, l)) => {
                let fam = if p.is_ipv4() { "TCP4" } else { "TCP6" };
                format!(
                    "PROXY {fam} {} {} {} {}\r\n",
                    p.ip(),
                    l.ip(),
                    p.port(),
                    l.port()
                )
                .into_bytes()
            }
            None => b"PROXY UNKNOWN\r\n".to_vec(),
        },
        ProxyProtocol::V2 => {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            let mut addrs = Vec::new();
            let fam = match pair {
                Some((SocketAddr::V4(p), SocketAddr::V4(l))) => {
                    addrs.extend_from_slice(&p.ip().octets());
                    addrs.extend_from_slice(&l.ip().octets());
                    addrs.extend_from_slice(&p.port().to_be_bytes());
                    addrs.extend_from_slice(&l.port().to_be_bytes());
                    0x11 // AF_INET, STREAM
                }
                Some((SocketAddr::V6(p), SocketAddr::V6(l))) => {
                    addrs.extend_from_slice(&p.ip().octets());
                    addrs.extend_from_slice(&l.ip().octets());
                    addrs.extend_from_slice(&p.port().to_be_bytes());
                    addrs.extend_from_slice(&l.port().to_be_bytes());
                    0x21 // AF_INET6, STREAM
                }
                _ => 0x00, // AF_UNSPEC, with command LOCAL below
            };
            // Version 2 with command PROXY when there are addresses to tell; otherwise LOCAL,
            // which the spec (2.2) tells senders to use and every receiver to accept (using
            // the connection's own endpoints). PROXY with AF_UNSPEC may be refused, and
            // HAProxy does refuse it.
            h.push(if addrs.is_empty() { 0x20 } else { 0x21 });
            h.push(fam);
            h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
            h.extend_from_slice(&addrs);
            h
        }
    }
}

/// The local address of an accepted connection (not the listener's wildcard), for headers.
pub fn local_of(conn: &Conn) -> Option<SocketAddr> {
    match conn {
        Conn::Tcp(s) => s.local_addr().ok(),
        Conn::Unix(_) => None,
    }
}

/// Builds the blocking `proxy` handler (threaded and forked workers).
pub fn build(ctx: &BuildContext) -> Result<Factory, SettingsError> {
    let settings = Arc::new(super::read_shape_then::<ProxyTable, _>(
        "proxy",
        ctx.settings,
        || {
            ProxySettings::from_build_all(ctx)
                .map_err(|all| SettingsError::from_messages("proxy", ctx.settings, all))
        },
    )?);
    Ok(Arc::new(move || {
        Box::new(ProxyHandler(Arc::clone(&settings))) as Box<dyn Handler>
    }))
}

/// Connects upstream, then waits while the process's relay thread copies both ways.
struct ProxyHandler(Arc<ProxySettings>);

impl Handler for ProxyHandler {
    fn handle(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()> {
        match req {
            Request::Stream(s) => {
                let client = s.conn().try_clone()?;
                // Upstreams answer in several small writes (nginx: headers, then the body);
                // with Nagle on, each later one would wait for the client's delayed ACK.
                if let Conn::Tcp(t) = &client {
                    let _ = t.set_nodelay(true);
                }
                let peer = s.peer().clone();
                let up = match self.0.connect_blocking() {
                    Ok(u) => u,
                    Err(e) => {
                        log::warn!(
                            "listener `{}` peer {peer}: proxy: upstream {:?} unreachable: {e}; \
                             closing the client",
                            ctx.listener_name(),
                            self.0.upstream
                        );
                        return Ok(());
                    }
                };
                let preamble = self
                    .0
                    .proxy_protocol
                    .map(|v| header(v, &peer, local_of(&client).or(s.local_addr())));
                let up = match &self.0.tls {
                    // The header goes first in the clear, then the TLS session (as haproxy's
                    // `send-proxy` with `ssl` does); the front relays it.
                    Some(tls) => {
                        let label = format!("listener `{}` upstream", ctx.listener_name());
                        let wire = match up {
                            Conn::Tcp(t) => {
                                t.set_nonblocking(true)?;
                                crate::tls::front::Wire::Tcp(mio::net::TcpStream::from_std(t))
                            }
                            Conn::Unix(u) => {
                                u.set_nonblocking(true)?;
                                crate::tls::front::Wire::Unix(mio::net::UnixStream::from_std(u))
                            }
                        };
                        Conn::Unix(tls.wrap(wire, preamble.unwrap_or_default(), label)?)
                    }
                    None => {
                        if let Some(h) = preamble {
                            up.try_clone()?.write_all(&h)?;
                        }
                        up
                    }
                };
                // Bytes the handler API already buffered from the client go first.
                let early = s.rfile.buffer().to_vec();
                if !early.is_empty() {
                    up.try_clone()?.write_all(&early)?;
                }
                let r = relay_blocking(client, up);
                // The relay made the shared socket non-blocking; the worker may use it still.
                let _ = s.conn().set_nonblocking(false);
                r
            }
            Request::Datagram(d) => {
                // One blocking exchange per datagram: send, wait up to the idle time for one
                // reply. The event model keeps real per-client associations.
                let Upstream::Inet(addr) = &self.0.upstream else {
                    return Ok(());
                };
                let bind: SocketAddr = if addr.is_ipv4() {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let sock = std::net::UdpSocket::bind(bind)?;
                sock.connect(addr)?;
                sock.set_read_timeout(Some(self.0.connect_timeout))?;
                sock.send(d.data())?;
                let mut buf = vec![0u8; crate::conn::MAX_DATAGRAM];
                match sock.recv(&mut buf) {
                    Ok(n) => d.reply(&buf[..n]).map(|_| ()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }
}

/// Copy both ways until both sides have finished, on this process's relay thread (see
/// `relay`); each EOF becomes a half-close of the other.
fn relay_blocking(client: Conn, up: Conn) -> io::Result<()> {
    super::relay::relay(client, up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;

    #[test]
    fn v1_header_bytes() {
        let peer = PeerAddr::Inet("192.0.2.1:5000".parse().unwrap());
        let h = header(
            ProxyProtocol::V1,
            &peer,
            Some("198.51.100.2:80".parse().unwrap()),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 80\r\n");
        let unix = PeerAddr::Unix {
            path: None,
            cred: None,
        };
        assert_eq!(header(ProxyProtocol::V1, &unix, None), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_header_bytes() {
        let peer = PeerAddr::Inet("192.0.2.1:5000".parse().unwrap());
        let h = header(
            ProxyProtocol::V2,
            &peer,
            Some("198.51.100.2:80".parse().unwrap()),
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        want.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2, 0x13, 0x88, 0, 80]);
        assert_eq!(h, want);
    }

    /// A unix-socket client has no address to tell: the v2 header is command LOCAL (0x20)
    /// with family AF_UNSPEC and no address block, which the spec says every receiver must
    /// accept (HAProxy resets command PROXY with AF_UNSPEC).
    #[test]
    fn v2_header_for_a_unix_client_is_local() {
        let unix = PeerAddr::Unix {
            path: None,
            cred: None,
        };
        assert_eq!(
            header(ProxyProtocol::V2, &unix, None),
            b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"
        );
    }

    /// A client cut off by `max_duration` or a stop's deadline (its socket shut down both
    /// ways) ends the relay even when the upstream stays silent and open.
    #[test]
    fn a_shut_down_client_ends_the_relay_despite_a_silent_upstream() {
        let (client_end, _client) = UnixStream::pair().expect("client pair");
        let (up_end, _silent_upstream) = UnixStream::pair().expect("upstream pair");
        let tracker_handle = client_end.try_clone().expect("clone");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(relay_blocking(Conn::Unix(client_end), Conn::Unix(up_end)));
        });
        std::thread::sleep(Duration::from_millis(100));
        tracker_handle
            .shutdown(Shutdown::Both)
            .expect("shutdown like the tracker");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the relay kept waiting for a silent upstream")
            .expect("relay result");
    }

    #[test]
    fn durations_use_the_config_format_and_its_bounds() {
        let settings = |extra: &str| {
            let table: toml::Table = format!("upstream = \"127.0.0.1:9\"\n{extra}")
                .parse()
                .expect("toml");
            ProxySettings::from_build(&BuildContext {
                listener: "p",
                protocol: Protocol::Udp,
                settings: Some(&table),
            })
        };
        let ok = settings("udp_idle = \"90s\"").expect("valid");
        assert_eq!(ok.udp_idle, Duration::from_secs(90));
        let e = settings("udp_idle = \"300000000000y\"").expect_err("overflows a deadline");
        assert!(e.contains("at most 100 years"), "{e}");
        let e = settings("connect_timeout = \"0s\"").expect_err("zero");
        assert!(e.contains("not a positive duration"), "{e}");
    }

    #[test]
    fn upstream_is_never_a_name() {
        assert!(parse_upstream("localhost:80").is_err());
        assert_eq!(
            parse_upstream("[::1]:80"),
            Ok(Upstream::Inet("[::1]:80".parse().unwrap()))
        );
        assert_eq!(
            parse_upstream("unix:/run/a.sock"),
            Ok(Upstream::Unix("/run/a.sock".into()))
        );
        assert!(parse_upstream("unix:rel.sock").is_err());
    }
}
