//! The connection variables a program gets: the UCSPI convention (`PROTO`, `TCPREMOTEIP`, …,
//! `UNIXREMOTEUID`, …) that tcpserver and s6 programs read, plus systemd's `REMOTE_ADDR` and
//! `REMOTE_PORT`. Addresses are numeric (socketd never resolves names) and IPv4-mapped IPv6
//! addresses are shown as plain IPv4. Datagram programs get the UDP twins (`PROTO=UDP`,
//! `UDPREMOTEIP`, `UDPREMOTEPORT`, `UDPLOCALIP`, `UDPLOCALPORT`), as udpsocket and nosh's UDP
//! tools set them; the local address is the one the listener is bound to (`0.0.0.0` for a
//! wildcard, as udpsocket documents it).

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

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

/// The variables for a `wait` program handed the listening socket `fd` itself: there is no
/// peer yet (the program reads the first datagram), so a UDP socket gives `PROTO=UDP` with
/// `UDPLOCALIP` and `UDPLOCALPORT`, and a Unix datagram socket `PROTO=UNIX`.
pub fn socket_env(fd: BorrowedFd<'_>) -> Vec<Var> {
    let local = socket2::SockRef::from(&fd).local_addr().ok();
    match local.as_ref().and_then(socket2::SockAddr::as_socket) {
        Some(l) => vec![
            var("PROTO", "UDP"),
            var("UDPLOCALIP", canonical_ip(l.ip())),
            var("UDPLOCALPORT", l.port()),
        ],
        None => vec![var("PROTO", "UNIX")],
    }
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

    #[test]
    fn udp_datagram_gets_udp_variables_with_the_local_address() {
        let peer = PeerAddr::Inet("10.0.0.9:53000".parse().unwrap());
        let vars = connection_env(false, &peer, Some("0.0.0.0:69".parse().unwrap()));
        assert_eq!(get(&vars, "PROTO"), Some("UDP"));
        assert_eq!(get(&vars, "UDPREMOTEIP"), Some("10.0.0.9"));
        assert_eq!(get(&vars, "UDPREMOTEPORT"), Some("53000"));
        assert_eq!(get(&vars, "UDPLOCALIP"), Some("0.0.0.0"));
        assert_eq!(get(&vars, "UDPLOCALPORT"), Some("69"));
        assert_eq!(get(&vars, "REMOTE_ADDR"), Some("10.0.0.9"));
        assert_eq!(get(&vars, "TCPREMOTEIP"), None);
    }

    #[test]
    fn wait_sockets_are_told_apart() {
        use std::os::fd::AsFd;
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port().to_string();
        let vars = socket_env(udp.as_fd());
        assert_eq!(get(&vars, "PROTO"), Some("UDP"));
        assert_eq!(get(&vars, "UDPLOCALIP"), Some("127.0.0.1"));
        assert_eq!(get(&vars, "UDPLOCALPORT"), Some(port.as_str()));
        let (unix, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert_eq!(socket_env(unix.as_fd()), vec![var("PROTO", "UNIX")]);
    }
}
