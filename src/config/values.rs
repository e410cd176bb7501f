//! Parsers for the config's value formats (durations, ip:port, socket paths), kept free of TOML
//! so each rule is tested on its own. Each returns what is wrong and what would be right, worded
//! to follow "key `x`: " in a diagnostic.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The longest Unix socket path: `sun_path` is 108 bytes including the terminating NUL.
pub(super) const MAX_UNIX_PATH: usize = 107;

const DURATION_FORMAT: &str =
    "write a whole number followed by a unit, with no space, e.g. \"500ms\", \"10s\", \"5m\" \
     (units: ms, s, m, h; combine as \"1m30s\")";

/// A duration such as "500ms", "10s", "5m" or "1h30m" (humantime's units, no spaces).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let plain = !text.is_empty()
        && text.starts_with(|c: char| c.is_ascii_digit())
        && !text.contains(|c: char| c.is_whitespace() || c == '.');
    let parsed = if plain {
        humantime::parse_duration(text).ok()
    } else {
        None
    };
    let d = parsed.ok_or_else(|| format!("{text:?} is not a duration; {DURATION_FORMAT}"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "{text:?} is longer than socketd can count from now (at most 100 years, \"36500d\"); \
             write a shorter duration"
        ));
    }
    Ok(d)
}

/// The longest duration a config may give: deadlines are `now + duration`, which overflows
/// (a panic, at SIGTERM for `shutdown_timeout`) somewhere past 290 billion years.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// An `ip:port` or `[ipv6]:port` for tcp and udp listeners; names are refused, never resolved.
pub(super) fn parse_inet(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    const FIX: &str = "write ip:port, e.g. \"127.0.0.1:7007\", \"0.0.0.0:7007\" or \"[::1]:7007\" \
                       (port 0 lets the system pick a free port)";
    let why = inet_problem(text);
    Err(format!("{text:?} is not an ip:port address: {why}; {FIX}"))
}

fn inet_problem(text: &str) -> String {
    if text.is_empty() {
        return "it is empty".into();
    }
    if let Some(rest) = text.strip_prefix('[') {
        return match rest.split_once(']') {
            None => "the `[` of the IPv6 address is never closed".into(),
            Some((ip, after)) => match (ip.parse::<Ipv6Addr>(), after.strip_prefix(':')) {
                (Err(_), _) => format!("`{ip}` is not an IPv6 address"),
                (Ok(_), None) => "the port is missing after `]`".into(),
                (Ok(_), Some(port)) => port_problem(port),
            },
        };
    }
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => {
            return "the port is missing (an IPv6 address needs brackets, with the port after \
                    them)"
                .into()
        }
        Ok(IpAddr::V4(_)) => return "the port is missing".into(),
        Err(_) => {}
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return if looks_like_name(text) {
            never_resolves(text)
        } else {
            "the port is missing".into()
        };
    };
    if host.contains(':') {
        return "an IPv6 address needs brackets around it, with the port after them".into();
    }
    if host.parse::<IpAddr>().is_ok() {
        return port_problem(port);
    }
    if looks_like_name(host) {
        return never_resolves(host);
    }
    format!("`{host}` is not an IP address")
}

fn port_problem(port: &str) -> String {
    if port.is_empty() {
        "the port is missing".into()
    } else {
        format!("`{port}` is not a port number (0 to 65535)")
    }
}

fn looks_like_name(host: &str) -> bool {
    host.chars().any(|c| c.is_ascii_alphabetic())
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn never_resolves(host: &str) -> String {
    let hint = if host == "localhost" {
        " (for localhost write 127.0.0.1 or [::1])"
    } else {
        ""
    };
    format!("`{host}` is a host name, and socketd never resolves names{hint}")
}

/// A filesystem path for unix and unix-dgram listeners.
pub(super) fn parse_unix_path(text: &str) -> Result<PathBuf, String> {
    const FIX: &str = "write a filesystem path, e.g. \"/run/socketd/echo.sock\"";
    if text.is_empty() {
        return Err(format!("the socket path is empty; {FIX}"));
    }
    if text.contains('\0') {
        return Err(format!("the socket path contains a NUL byte; {FIX}"));
    }
    if text.len() > MAX_UNIX_PATH {
        return Err(format!(
            "the socket path is {} bytes long, but a Unix socket path holds at most {MAX_UNIX_PATH} \
             bytes; use a shorter path (a relative one works too)",
            text.len()
        ));
    }
    if text.parse::<SocketAddr>().is_ok() {
        return Err(format!(
            "{text:?} looks like ip:port, but unix listeners bind a filesystem path; {FIX}, \
             or use protocol = \"tcp\" or \"udp\""
        ));
    }
    Ok(PathBuf::from(text))
}

/// The candidate closest to a misspelled `word`, if one is close enough to be a likely typo.
pub(super) fn suggest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_only() {
        let keys = ["name", "protocol", "address", "max_workers"];
        assert_eq!(suggest("adress", &keys), Some("address"));
        assert_eq!(suggest("protcol", &keys), Some("protocol"));
        assert_eq!(suggest("max-workers", &keys), Some("max_workers"));
        assert_eq!(suggest("colour", &keys), None);
        assert_eq!(suggest("x", &keys), None);
        assert_eq!(edit_distance("tcpp", "tcp"), 1);
    }

    #[test]
    fn durations_with_units_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn absurd_durations_are_refused_before_they_overflow_a_deadline() {
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
        for huge in ["36501d", "300000000000y"] {
            let e = parse_duration(huge).expect_err(huge);
            assert!(e.contains("at most 100 years"), "{huge}: {e}");
        }
    }

    #[test]
    fn bad_durations_say_the_format() {
        for bad in ["10 seconds", "abc", "-1s", "", "10", "1.5s", " 10s", "s10"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("\"500ms\", \"10s\", \"5m\""), "{bad}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn inet_addresses_parse_including_ipv6_and_port_zero() {
        let ok = |s: &str| parse_inet(s).map(|a| a.to_string());
        assert_eq!(ok("127.0.0.1:7007"), Ok("127.0.0.1:7007".into()));
        assert_eq!(ok("0.0.0.0:0"), Ok("0.0.0.0:0".into()));
        assert_eq!(ok("[::1]:7007"), Ok("[::1]:7007".into()));
        assert_eq!(ok("[::]:0"), Ok("[::]:0".into()));
    }

    #[test]
    fn bad_inet_addresses_say_why_and_how() {
        let cases = [
            (
                "localhost:7007",
                "never resolves names (for localhost write 127.0.0.1 or [::1])",
            ),
            ("example.com:80", "`example.com` is a host name"),
            ("example.com", "`example.com` is a host name"),
            ("127.0.0.1", "the port is missing"),
            ("127.0.0.1:", "the port is missing"),
            ("127.0.0.1:70000", "`70000` is not a port number"),
            ("::1:7007", "needs brackets"),
            ("fe80::zz:80", "needs brackets"),
            ("[::1]", "the port is missing after `]`"),
            ("[::1:7007", "never closed"),
            ("[zz]:1", "`zz` is not an IPv6 address"),
            ("300.1.1.1:5", "`300.1.1.1` is not an IP address"),
            ("", "it is empty"),
        ];
        for (text, why) in cases {
            let e = parse_inet(text).expect_err(text);
            assert!(e.contains(why), "{text}: {e}");
            assert!(e.contains("\"[::1]:7007\""), "{text}: {e}");
        }
    }

    #[test]
    fn unix_paths_are_checked_for_length_and_emptiness() {
        assert_eq!(
            parse_unix_path("/run/x.sock"),
            Ok(PathBuf::from("/run/x.sock"))
        );
        assert_eq!(parse_unix_path("rel.sock"), Ok(PathBuf::from("rel.sock")));
        assert!(parse_unix_path(&"a".repeat(MAX_UNIX_PATH)).is_ok());
        let long = parse_unix_path(&"a".repeat(MAX_UNIX_PATH + 1)).unwrap_err();
        assert!(
            long.contains("108 bytes long") && long.contains("at most 107"),
            "{long}"
        );
        assert!(parse_unix_path("").unwrap_err().contains("empty"));
        assert!(parse_unix_path("127.0.0.1:7007")
            .unwrap_err()
            .contains("looks like ip:port"));
    }
}
