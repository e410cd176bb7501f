//! The protection keys of a listener (issue 5): who may connect (`allow`, `deny`), how many at
//! once (`max_connections`, `max_per_source`), how fast (`rate`), for how long (`idle_timeout`,
//! `max_duration`), UDP anti-reflection (`min_source_port`) and the unix socket file's
//! permissions (`mode`, `owner`, `group`).
//!
//! `validate` turns the raw keys into a `Protection`, reporting each problem at its key's line
//! through the shared `Check`, and refuses keys that mean nothing for the listener's protocol
//! (an IP list on a unix socket, a connection cap on UDP) instead of silently ignoring them.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use toml::Spanned;

use super::raw::RawListener;
use super::types::Protocol;
use super::validate::Check;
use super::values::parse_duration;

/// Defaults of the protection keys, documented in `config/socketd.toml`.
pub mod protection_defaults {
    /// UDP datagrams from source ports below this are dropped (reflection via echo/chargen
    /// aimed at another service's well-known port, CERT CA-1996-01).
    pub const MIN_SOURCE_PORT: u16 = 1024;
}

/// `rate = "N/s"`: at most `count` new connections or datagrams per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    /// How many new connections or datagrams.
    pub count: u32,
    /// … per this long.
    pub per: Duration,
}

/// A unix socket file's permissions, applied before the listener accepts anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketFile {
    /// Permission bits, e.g. 0o660; `None` keeps what the umask gives.
    pub mode: Option<u32>,
    /// A user name or numeric uid to own the file.
    pub owner: Option<String>,
    /// A group name or numeric gid for the file.
    pub group: Option<String>,
}

/// A listener's admission and protection settings; every one is optional.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Protection {
    /// With a non-empty list, only these networks may connect. IPv4 entries are plain IPv4,
    /// mapped IPv6 entries are converted, so `::ffff:a.b.c.d` peers match them.
    pub allow: Vec<IpNet>,
    /// These networks are always refused (deny wins over allow).
    pub deny: Vec<IpNet>,
    /// Open connections on this listener at once.
    pub max_connections: Option<usize>,
    /// Open connections from one IP address at once.
    pub max_per_source: Option<usize>,
    /// New connections or datagrams per time unit.
    pub rate: Option<Rate>,
    /// No byte either way for this long closes the connection.
    pub idle_timeout: Option<Duration>,
    /// A connection is closed this long after it was accepted, whatever it does.
    pub max_duration: Option<Duration>,
    /// UDP only: datagrams from lower source ports are dropped; 0 turns the check off.
    pub min_source_port: u16,
    /// Unix kinds only: the socket file's mode and ownership.
    pub socket_file: SocketFile,
}

impl Default for Protection {
    fn default() -> Self {
        Protection {
            allow: Vec::new(),
            deny: Vec::new(),
            max_connections: None,
            max_per_source: None,
            rate: None,
            idle_timeout: None,
            max_duration: None,
            min_source_port: protection_defaults::MIN_SOURCE_PORT,
            socket_file: SocketFile::default(),
        }
    }
}

/// The protection keys of one listener. `protocol` is `None` when the listener's own
/// `protocol` key was wrong (already reported); then protocol-specific rules are skipped.
pub(super) fn validate(
    raw: &RawListener,
    protocol: Option<Protocol>,
    c: &mut Check<'_, '_>,
) -> Protection {
    let mut p = Protection {
        allow: networks(&raw.allow, "allow", c),
        deny: networks(&raw.deny, "deny", c),
        max_connections: count(&raw.max_connections, "max_connections", c),
        max_per_source: count(&raw.max_per_source, "max_per_source", c),
        rate: raw.rate.as_ref().and_then(|r| rate(r, c)),
        idle_timeout: timeout(&raw.idle_timeout, "idle_timeout", c),
        max_duration: timeout(&raw.max_duration, "max_duration", c),
        ..Protection::default()
    };
    if let Some(port) = &raw.min_source_port {
        match u16::try_from(*port.get_ref()) {
            Ok(n) => p.min_source_port = n,
            Err(_) => c.error(
                &port.span(),
                "min_source_port",
                format!(
                    "must be a port number from 0 to 65535, found {}; e.g. min_source_port = 1024 \
                     (the default; 0 turns the check off)",
                    port.get_ref()
                ),
            ),
        }
    }
    p.socket_file = SocketFile {
        mode: raw.mode.as_ref().and_then(|m| mode(m, c)),
        owner: raw.owner.as_ref().and_then(|o| account(o, "owner", c)),
        group: raw.group.as_ref().and_then(|g| account(g, "group", c)),
    };
    if let Some(protocol) = protocol {
        fits_protocol(raw, protocol, c);
    }
    p
}

/// Refuse keys that have no meaning for this kind of listener, naming what to use instead.
fn fits_protocol(raw: &RawListener, protocol: Protocol, c: &mut Check<'_, '_>) {
    let mut refuse = |span: Option<std::ops::Range<usize>>, key: &str, why: &str| {
        if let Some(span) = span {
            c.error(
                &span,
                key,
                format!("does not apply to a {protocol} listener: {why}"),
            );
        }
    };
    if protocol.is_unix() {
        let why = "unix peers have no IP address; restrict access with mode, owner and group";
        refuse(raw.allow.as_ref().map(Spanned::span), "allow", why);
        refuse(raw.deny.as_ref().map(Spanned::span), "deny", why);
        let why = "it counts connections per IP address; use max_connections";
        refuse(
            raw.max_per_source.as_ref().map(Spanned::span),
            "max_per_source",
            why,
        );
    } else {
        let why = "it sets a unix socket file's permissions; remove it";
        refuse(raw.mode.as_ref().map(Spanned::span), "mode", why);
        refuse(raw.owner.as_ref().map(Spanned::span), "owner", why);
        refuse(raw.group.as_ref().map(Spanned::span), "group", why);
    }
    if protocol.is_datagram() {
        let why = "datagram listeners have no connections; limit them with rate";
        refuse(
            raw.max_connections.as_ref().map(Spanned::span),
            "max_connections",
            why,
        );
        refuse(
            raw.max_per_source.as_ref().map(Spanned::span),
            "max_per_source",
            why,
        );
        refuse(
            raw.idle_timeout.as_ref().map(Spanned::span),
            "idle_timeout",
            why,
        );
        refuse(
            raw.max_duration.as_ref().map(Spanned::span),
            "max_duration",
            why,
        );
    }
    if protocol != Protocol::Udp {
        let why = "it guards UDP services against reflection; remove it";
        refuse(
            raw.min_source_port.as_ref().map(Spanned::span),
            "min_source_port",
            why,
        );
    }
}

type List = Option<Spanned<Vec<Spanned<String>>>>;

fn networks(list: &List, key: &str, c: &mut Check<'_, '_>) -> Vec<IpNet> {
    let Some(list) = list else { return Vec::new() };
    let mut nets = Vec::new();
    for item in list.get_ref() {
        match parse_network(item.get_ref()) {
            Ok(net) => nets.push(net),
            Err(detail) => c.error(&item.span(), key, detail),
        }
    }
    nets
}

/// "10.0.0.0/8", "2001:db8::/32", or a single address ("192.0.2.7", "::1"). IPv4-mapped IPv6
/// networks become IPv4, so the two spellings of an IPv4 host match the same peers.
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    const FIX: &str = "write an address or a CIDR block, e.g. \"192.0.2.7\", \"10.0.0.0/8\", \
                       \"2001:db8::/32\"";
    let net = if text.contains('/') {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR block; {FIX}"))?;
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has bits set after the /{} prefix; write the network, {:?}",
                net.prefix_len(),
                net.trunc().to_string()
            ));
        }
        net
    } else {
        let ip: IpAddr = text.parse().map_err(|_| {
            format!("{text:?} is not an IP address (socketd never resolves names); {FIX}")
        })?;
        IpNet::from(ip)
    };
    Ok(canonical_net(net))
}

/// `::ffff:a.b.c.d/n` (n >= 96) is the IPv4 network a.b.c.d/(n-96).
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.network().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(n) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                return IpNet::V4(n);
            }
        }
    }
    net
}

fn count(value: &Option<Spanned<i64>>, key: &str, c: &mut Check<'_, '_>) -> Option<usize> {
    let value = value.as_ref()?;
    match usize::try_from(*value.get_ref()) {
        Ok(n) if n > 0 => Some(n),
        _ => {
            let detail = format!(
                "must be a whole number of 1 or more, found {}; remove the key for no limit",
                value.get_ref()
            );
            c.error(&value.span(), key, detail);
            None
        }
    }
}

fn rate(value: &Spanned<String>, c: &mut Check<'_, '_>) -> Option<Rate> {
    match parse_rate(value.get_ref()) {
        Ok(r) => Some(r),
        Err(detail) => {
            c.error(&value.span(), "rate", detail);
            None
        }
    }
}

/// "N/s" or "N/m" (also "N/h"), N a whole number of 1 or more.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let fix = "write a count per second or minute, e.g. \"50/s\" or \"600/m\"";
    let Some((n, unit)) = text.split_once('/') else {
        return Err(format!("{text:?} is not a rate; {fix}"));
    };
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => {
            return Err(format!(
                "unknown rate unit {other:?} in {text:?}; valid units: s, m, h; {fix}"
            ))
        }
    };
    match n.trim().parse::<u32>() {
        Ok(count) if count > 0 => Ok(Rate { count, per }),
        _ => Err(format!(
            "{:?} is not a whole number of 1 or more in {text:?}; {fix}",
            n.trim()
        )),
    }
}

fn timeout(value: &Option<Spanned<String>>, key: &str, c: &mut Check<'_, '_>) -> Option<Duration> {
    let value = value.as_ref()?;
    match parse_duration(value.get_ref()) {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            c.error(
                &value.span(),
                key,
                "must be longer than 0s; remove the key for no limit",
            );
            None
        }
        Err(detail) => {
            c.error(&value.span(), key, detail);
            None
        }
    }
}

fn mode(value: &Spanned<String>, c: &mut Check<'_, '_>) -> Option<u32> {
    let text = value.get_ref();
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() => Some(m),
        _ => {
            let detail = format!(
                "{text:?} is not an octal file mode; write it as a string of octal digits, e.g. \
                 mode = \"0660\" (owner and group may connect) or \"0666\" (everyone)"
            );
            c.error(&value.span(), "mode", detail);
            None
        }
    }
}

/// A user or group that exists on this system (by name or number), checked now so that a
/// typo fails `check` rather than the start.
fn account(value: &Spanned<String>, key: &str, c: &mut Check<'_, '_>) -> Option<String> {
    let text = value.get_ref();
    let found = if key == "owner" {
        resolve_user(text).map(|_| ())
    } else {
        resolve_group(text).map(|_| ())
    };
    match found {
        Ok(()) => Some(text.clone()),
        Err(detail) => {
            c.error(&value.span(), key, detail);
            None
        }
    }
}

/// A user name or numeric uid to a uid.
pub fn resolve_user(text: &str) -> Result<u32, String> {
    if let Ok(uid) = text.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(text) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!(
            "no user named {text:?} on this system; use an existing user name or a numeric uid"
        )),
        Err(e) => Err(format!("cannot look up user {text:?}: {e}")),
    }
}

/// A group name or numeric gid to a gid.
pub fn resolve_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(text) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!(
            "no group named {text:?} on this system; use an existing group name or a numeric gid"
        )),
        Err(e) => Err(format!("cannot look up group {text:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{error, errors, parse};

    #[test]
    fn networks_parse_and_mapped_ipv6_becomes_ipv4() {
        assert_eq!(
            parse_network("10.0.0.0/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_network("127.0.0.2").unwrap().to_string(),
            "127.0.0.2/32"
        );
        assert_eq!(parse_network("::1").unwrap().to_string(), "::1/128");
        assert_eq!(
            parse_network("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_network("::ffff:127.0.0.2").unwrap().to_string(),
            "127.0.0.2/32"
        );
        let e = parse_network("10.1.2.3/8").unwrap_err();
        assert!(e.contains("\"10.0.0.0/8\""), "{e}");
        assert!(parse_network("localhost")
            .unwrap_err()
            .contains("never resolves"));
        assert!(parse_network("10.0.0.0/33").is_err());
    }

    #[test]
    fn rates_parse() {
        assert_eq!(
            parse_rate("5/s"),
            Ok(Rate {
                count: 5,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            parse_rate("600/m"),
            Ok(Rate {
                count: 600,
                per: Duration::from_secs(60)
            })
        );
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("5").unwrap_err().contains("\"50/s\""));
        assert!(parse_rate("5/d")
            .unwrap_err()
            .contains("valid units: s, m, h"));
        assert!(parse_rate("-1/s").is_err());
    }

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        assert_eq!(resolve_user("root"), Ok(0));
        assert_eq!(resolve_user("4321"), Ok(4321));
        assert_eq!(resolve_group("0"), Ok(0));
        assert!(resolve_user("no-such-user-socketd")
            .unwrap_err()
            .contains("no user named"));
    }

    const TCP: &str = "[[listener]]\nname = \"e\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n";

    #[test]
    fn a_full_protected_listener_validates() {
        let text = format!(
            "{TCP}allow = [\"127.0.0.0/8\", \"::1\"]\ndeny = [\"127.0.0.2\"]\nmax_connections = 100\n\
             max_per_source = 4\nrate = \"50/s\"\nidle_timeout = \"30s\"\nmax_duration = \"1h\"\n"
        );
        let c = parse(&text).expect("valid");
        let p = &c.listeners[0].protect;
        assert_eq!(p.allow.len(), 2);
        assert_eq!(p.deny[0].to_string(), "127.0.0.2/32");
        assert_eq!((p.max_connections, p.max_per_source), (Some(100), Some(4)));
        assert_eq!(
            p.rate,
            Some(Rate {
                count: 50,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(p.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(p.max_duration, Some(Duration::from_secs(3600)));
        assert_eq!(p.min_source_port, 1024, "the default");
    }

    #[test]
    fn bad_values_are_reported_at_their_line_with_the_fix() {
        let e = error(&format!(
            "{TCP}allow = [\"10.0.0.0/8\",\n  \"example.com\"]\n"
        ));
        assert!(e.starts_with("socketd.toml:7:"), "{e}");
        assert!(
            e.contains("listener `e`: key `allow`: \"example.com\" is not an IP address"),
            "{e}"
        );
        let e = error(&format!("{TCP}rate = \"fast\"\n"));
        assert!(
            e.contains("socketd.toml:6:") && e.contains("key `rate`") && e.contains("\"50/s\""),
            "{e}"
        );
        let e = error(&format!("{TCP}max_per_source = 0\n"));
        assert!(
            e.contains("key `max_per_source`: must be a whole number of 1 or more"),
            "{e}"
        );
        let e = error(&format!("{TCP}idle_timeout = \"0s\"\n"));
        assert!(
            e.contains("key `idle_timeout`: must be longer than 0s"),
            "{e}"
        );
    }

    #[test]
    fn keys_that_do_not_fit_the_protocol_are_refused() {
        let udp = TCP.replace("\"tcp\"", "\"udp\"");
        let all = errors(&format!(
            "{udp}max_connections = 5\nidle_timeout = \"5s\"\nmode = \"0600\"\n"
        ))
        .join("\n");
        assert!(
            all.contains("key `max_connections`: does not apply to a udp listener"),
            "{all}"
        );
        assert!(all.contains("key `idle_timeout`: does not apply"), "{all}");
        assert!(
            all.contains(
                "key `mode`: does not apply to a udp listener: it sets a unix socket file"
            ),
            "{all}"
        );
        let ok = parse(&format!("{udp}min_source_port = 0\nrate = \"10/m\"\n")).expect("valid");
        assert_eq!(ok.listeners[0].protect.min_source_port, 0);
        let e = error(&format!("{udp}min_source_port = 70000\n"));
        assert!(e.contains("from 0 to 65535"), "{e}");
        let unix = "[[listener]]\nname = \"u\"\nprotocol = \"unix\"\naddress = \"/tmp/x.sock\"\nhandler = \"echo\"\n";
        let e = error(&format!("{unix}allow = [\"127.0.0.1\"]\n"));
        assert!(
            e.contains("unix peers have no IP address; restrict access with mode, owner and group"),
            "{e}"
        );
        let c = parse(&format!(
            "{unix}mode = \"0660\"\nowner = \"root\"\ngroup = \"0\"\n"
        ))
        .expect("valid");
        let f = &c.listeners[0].protect.socket_file;
        assert_eq!(
            (f.mode, f.owner.as_deref(), f.group.as_deref()),
            (Some(0o660), Some("root"), Some("0"))
        );
        let e = error(&format!("{unix}mode = \"rw\"\n"));
        assert!(e.contains("mode = \"0660\""), "{e}");
        let e = error(&format!("{unix}owner = \"no-such-user-socketd\"\n"));
        assert!(e.contains("no user named"), "{e}");
    }
}
