//! `allow` / `deny`: which IP addresses may reach a listener at all.
//!
//! Peers are matched in their canonical form (`conn::canonical_ip`), and the config stores
//! IPv4-mapped networks as IPv4 (`config::parse_network`), so a client reaching a `[::]`
//! listener as `::ffff:a.b.c.d` is judged exactly like a.b.c.d: no bypass through the mapping.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::conn::canonical_ip;

/// Whether `ip` may connect: deny wins; with an allow list, anything outside it is refused.
/// Peers without an IP (unix sockets) are not judged here: their listeners have no lists.
pub fn permits(allow: &[IpNet], deny: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical_ip(ip);
    if deny.iter().any(|n| n.contains(&ip)) {
        return false;
    }
    allow.is_empty() || allow.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_network;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| parse_network(s).unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let allow = nets(&["127.0.0.0/8", "2001:db8::/32"]);
        let deny = nets(&["127.0.0.2"]);
        assert!(permits(&allow, &deny, ip("127.0.0.1")));
        assert!(!permits(&allow, &deny, ip("127.0.0.2")));
        assert!(!permits(&allow, &deny, ip("10.0.0.1")));
        assert!(permits(&allow, &deny, ip("2001:db8::5")));
        assert!(!permits(&allow, &deny, ip("::1")));
        assert!(permits(&[], &[], ip("10.0.0.1")), "no lists: everyone");
        assert!(!permits(&[], &deny, ip("127.0.0.2")));
    }

    #[test]
    fn mapped_ipv6_peers_are_judged_as_ipv4() {
        let deny = nets(&["127.0.0.2"]);
        assert!(!permits(&[], &deny, ip("::ffff:127.0.0.2")));
        let allow = nets(&["::ffff:127.0.0.1"]);
        assert!(permits(&allow, &[], ip("127.0.0.1")));
        assert!(permits(&allow, &[], ip("::ffff:127.0.0.1")));
        assert!(!permits(&allow, &[], ip("::ffff:127.0.0.2")));
    }
}
