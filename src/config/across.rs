//! Rules across listeners: unique names, and no two listeners on an address the kernel would
//! refuse to bind twice. They run on the raw values, so they still work (and report) when a
//! listener has other problems.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use toml::Spanned;

use super::error::Diagnostics;
use super::raw::RawListener;
use super::types::*;
use super::validate::{parse_listen_addr, Section};

/// What the cross-listener rules need to know about one listener.
pub(super) struct Placed<'r> {
    pub section: Section,
    pub name: Option<&'r Spanned<String>>,
    /// The address span and the parsed address, when protocol and address were both valid.
    pub bound: Option<(Range<usize>, Protocol, ListenAddr)>,
}

impl<'r> Placed<'r> {
    /// Read from the raw listener; invalid values (already reported) just leave gaps.
    pub fn of(section: Section, raw: &'r RawListener) -> Placed<'r> {
        let protocol = raw
            .protocol
            .as_ref()
            .and_then(|p| Protocol::from_name(p.get_ref()));
        let bound = match (protocol, &raw.address) {
            (Some(protocol), Some(text)) => parse_listen_addr(protocol, text.get_ref())
                .ok()
                .map(|addr| (text.span(), protocol, addr)),
            _ => None,
        };
        Placed {
            section,
            name: raw.name.as_ref(),
            bound,
        }
    }
}

/// Unique names, and no two listeners binding what the kernel would refuse to bind twice.
/// A listener whose name repeats an earlier one has a numbered `section` ("listener #2").
pub(super) fn check_across(listeners: &[Placed<'_>], diags: &mut Diagnostics<'_>) {
    for (i, later) in listeners.iter().enumerate() {
        let earlier = &listeners[..i];
        if let Some(name) = later.name {
            let first = earlier
                .iter()
                .filter_map(|e| e.name)
                .find(|n| n.get_ref() == name.get_ref());
            if let Some(first) = first {
                let message = format!(
                    "{}: key `name`: listener `{}` is already defined at line {}; \
                     give each listener a unique name",
                    later.section,
                    name.get_ref(),
                    diags.line_of(&first.span())
                );
                diags.error(&name.span(), message);
            }
        }
        let Some((span, protocol, addr)) = &later.bound else {
            continue;
        };
        for other in earlier {
            let Some((other_span, other_protocol, other_addr)) = &other.bound else {
                continue;
            };
            let Some(why) = clash((*protocol, addr), (*other_protocol, other_addr)) else {
                continue;
            };
            let message = format!(
                "{}: key `address`: {why}, already used by {} at line {}; give each listener \
                 its own address",
                later.section,
                other.section,
                diags.line_of(other_span)
            );
            diags.error(span, message);
            break;
        }
    }
}

/// Why two bound addresses cannot both be bound, or `None` if they can. Port 0 never clashes
/// (the system picks a different free port for each). A wildcard address covers every address
/// of its family on that port. Unix kinds clash on the same path whatever their kind.
fn clash(a: (Protocol, &ListenAddr), b: (Protocol, &ListenAddr)) -> Option<String> {
    match (a.1, b.1) {
        (ListenAddr::Path(p), ListenAddr::Path(q)) => (same_path(p, q)).then(|| {
            format!(
                "the socket file {:?} ({} here, {} there)",
                p.display().to_string(),
                a.0,
                b.0
            )
        }),
        (ListenAddr::Inet(x), ListenAddr::Inet(y)) => inet_clash(x, y).then(|| {
            if x == y {
                format!("{} {x}", a.0)
            } else {
                format!(
                    "{} {x} overlaps {y} (a wildcard address covers them all)",
                    a.0
                )
            }
        }),
        _ => None,
    }
    .filter(|_| a.0 == b.0 || (a.0.is_unix() && b.0.is_unix()))
}

fn inet_clash(x: &SocketAddr, y: &SocketAddr) -> bool {
    // `[::]` is bound dual-stack (IPV6_V6ONLY off, the Linux default), so it also takes
    // every IPv4 address on its port; `0.0.0.0` covers IPv4 only.
    let covers =
        |w: &SocketAddr, o: &SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    x.port() != 0 && x.port() == y.port() && (x.ip() == y.ip() || covers(x, y) || covers(y, x))
}

#[cfg(test)]
mod clash_tests {
    use super::*;

    fn clash(a: &str, b: &str) -> bool {
        let (a, b) = (a.parse().expect("addr"), b.parse().expect("addr"));
        inet_clash(&a, &b) && inet_clash(&b, &a)
    }

    #[test]
    fn wildcards_cover_what_the_kernel_would_refuse() {
        assert!(clash("127.0.0.1:7", "127.0.0.1:7"));
        assert!(clash("0.0.0.0:7", "127.0.0.1:7"));
        assert!(clash("[::]:7", "[::1]:7"));
        // Dual-stack `[::]` takes IPv4 too.
        assert!(clash("[::]:7", "0.0.0.0:7"));
        assert!(clash("[::]:7", "127.0.0.1:7"));
        assert!(!clash("0.0.0.0:7", "[::1]:7"));
        assert!(!clash("127.0.0.1:7", "[::1]:7"));
        assert!(!clash("127.0.0.1:7", "127.0.0.2:7"));
        assert!(!clash("[::]:0", "0.0.0.0:0"));
        assert!(!clash("[::]:7", "0.0.0.0:8"));
    }
}

fn same_path(p: &Path, q: &Path) -> bool {
    let strip = |p: &Path| {
        p.strip_prefix(".")
            .map(Path::to_path_buf)
            .unwrap_or(p.to_path_buf())
    };
    strip(p) == strip(q)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_has, error, errors, parse, LISTENER};

    #[test]
    fn duplicate_names_point_at_the_first() {
        let second = LISTENER.replace("\"tcp\"", "\"tcpp\"");
        let all = errors(&format!("{LISTENER}\n{second}"));
        assert_eq!(all.len(), 2, "{all:#?}");
        assert_has(&all[0], &["socketd.toml:8:8: listener #2: key `name`: listener `echo` is already defined at line 2", "unique name"]);
        // The duplicate's other problems are called by its number, not the shared name.
        assert_has(&all[1], &["socketd.toml:9:12: listener #2: key `protocol`: unknown protocol \"tcpp\"; did you mean \"tcp\"?"]);
    }

    #[test]
    fn clashing_addresses_are_refused_but_port_zero_and_other_protocols_are_fine() {
        let l = |name: &str, protocol: &str, address: &str| {
            format!("[[listener]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\naddress = \"{address}\"\nhandler = \"echo\"\n")
        };
        let fine = [
            l("a", "tcp", "127.0.0.1:0"),
            l("b", "tcp", "127.0.0.1:0"),
            l("c", "udp", "127.0.0.1:7"),
            l("d", "tcp", "127.0.0.1:7"),
            l("e", "tcp", "[::1]:7"),
        ];
        parse(&fine.concat()).unwrap_or_else(|e| panic!("{e}"));

        let e = error(
            &[
                l("a", "tcp", "127.0.0.1:7007"),
                l("b", "tcp", "127.0.0.1:7007"),
            ]
            .concat(),
        );
        assert_has(&e, &["socketd.toml:9:11: listener `b`: key `address`: tcp 127.0.0.1:7007, already used by listener `a` at line 4", "its own address"]);
        let e = error(&[l("a", "udp", "0.0.0.0:53"), l("b", "udp", "127.0.0.1:53")].concat());
        assert_has(
            &e,
            &["listener `b`: key `address`: udp 127.0.0.1:53 overlaps 0.0.0.0:53"],
        );
        let e = error(&[l("a", "unix", "s.sock"), l("b", "unix-dgram", "./s.sock")].concat());
        assert_has(&e, &["socketd.toml:9:11: listener `b`: key `address`: the socket file \"./s.sock\" (unix-dgram here, unix there), already used by listener `a` at line 4"]);
    }
}
