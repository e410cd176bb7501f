//! The connection variables a program gets: the UCSPI convention (`PROTO`, `TCPREMOTEIP`, …,
//! `UNIXREMOTEUID`, …) that tcpserver and s6 programs read, plus systemd's `REMOTE_ADDR` and
//! `REMOTE_PORT`. Addresses are numeric (socketd never resolves names) and IPv4-mapped IPv6
//! addresses are shown as plain IPv4.

use std::net::SocketAddr;

use crate::conn::{canonical_ip, PeerAddr};

/// One environment variable.
pub type Var = (String, String);

fn var(k: &str, v: impl ToString) -> Var {
    (k.to_string(), v.to_string())
}

/// The variables for a connection (`stream`) or a datagram from `peer`, received on `local`.
pub fn connection_env(stream: bool, peer: &PeerAddr, local: Option<SocketAddr>) -> Vec<Var> {
    let mut vars = Vec::new();
    match peer {
        PeerAddr::Inet(remote) => {
            let p = if stream { "TCP" } else { "UDP" };
            let ip = canonical_ip(remote.ip());
            vars.push(var("PROTO", p));
            vars.push(var(&format!("{p}REMOTEIP"), ip));
            vars.push(var(&format!("{p}REMOTEPORT"), remote.port()));
            if let Some(l) = local {
                vars.push(var(&format!("{p}LOCALIP"), canonical_ip(l.ip())));
                vars.push(var(&format!("{p}LOCALPORT"), l.port()));
            }
            vars.push(var("REMOTE_ADDR", ip));
            vars.push(var("REMOTE_PORT", remote.port()));
        }
        PeerAddr::Unix { path, cred } => {
            vars.push(var("PROTO", "UNIX"));
            if let Some(c) = cred {
                vars.push(var("UNIXREMOTEUID", c.uid));
                vars.push(var("UNIXREMOTEGID", c.gid));
                vars.push(var("UNIXREMOTEPID", c.pid));
            }
            if let Some(p) = path {
                vars.push(var("UNIXREMOTEPATH", p.display()));
            }
        }
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::PeerCred;

    fn get<'a>(vars: &'a [Var], k: &str) -> Option<&'a str> {
        vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn tcp_peer_with_mapped_address_shows_ipv4() {
        let peer = PeerAddr::Inet("[::ffff:10.1.2.3]:4000".parse().unwrap());
        let vars = connection_env(true, &peer, Some("[::ffff:127.0.0.1]:79".parse().unwrap()));
        assert_eq!(get(&vars, "PROTO"), Some("TCP"));
        assert_eq!(get(&vars, "TCPREMOTEIP"), Some("10.1.2.3"));
        assert_eq!(get(&vars, "TCPREMOTEPORT"), Some("4000"));
        assert_eq!(get(&vars, "TCPLOCALIP"), Some("127.0.0.1"));
        assert_eq!(get(&vars, "TCPLOCALPORT"), Some("79"));
        assert_eq!(get(&vars, "REMOTE_ADDR"), Some("10.1.2.3"));
        assert_eq!(get(&vars, "REMOTE_PORT"), Some("4000"));
    }

    #[test]
    fn unix_peer_gets_credentials() {
        let peer = PeerAddr::Unix {
            path: None,
            cred: Some(PeerCred {
                pid: 5,
                uid: 6,
                gid: 7,
            }),
        };
        let vars = connection_env(true, &peer, None);
        assert_eq!(get(&vars, "PROTO"), Some("UNIX"));
        assert_eq!(get(&vars, "UNIXREMOTEPID"), Some("5"));
        assert_eq!(get(&vars, "UNIXREMOTEUID"), Some("6"));
        assert_eq!(get(&vars, "UNIXREMOTEGID"), Some("7"));
        assert_eq!(get(&vars, "REMOTE_ADDR"), None);
    }
}
