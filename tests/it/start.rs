//! Starting: the shipped config runs and serves what it says, and a start that cannot bind
//! fails with exit 3, naming the listener, without destroying anything it found or leaving
//! anything it made.

use std::path::Path;

use crate::harness::*;
use crate::services::{check_listener, listener};

/// `config/socketd.toml` with every address moved somewhere private: IP listeners to port 0
/// on the same IP, unix sockets into `{dir}` (only listeners' addresses: `[daemon.syslog]` has
/// one too), and the control socket too. Everything else (comments, defaults) as shipped.
fn shipped_config_made_private() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/socketd.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = String::new();
    let mut in_listener = false;
    for line in text.lines() {
        if line.trim_start().starts_with('[') {
            in_listener = line.trim() == "[[listener]]";
        }
        let value = line
            .strip_prefix("address")
            .filter(|_| in_listener)
            .and_then(|rest| rest.trim_start().strip_prefix('='))
            .map(|v| v.trim().trim_matches('"'));
        if line.starts_with("control = ") {
            out.push_str("control = \"{dir}/control\"\n");
            continue;
        }
        match value {
            Some(addr) => {
                let private = match addr.parse::<std::net::SocketAddr>() {
                    Ok(a) => std::net::SocketAddr::new(a.ip(), 0).to_string(),
                    Err(_) => {
                        let file = Path::new(addr).file_name().expect("a socket file name");
                        format!("{{dir}}/{}", file.to_string_lossy())
                    }
                };
                out.push_str(&format!("address = \"{private}\"\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The shipped config starts as an ordinary user and every listener in it answers as its
/// handler should.
#[test]
fn shipped_config_serves_every_service() {
    let toml = shipped_config_made_private();
    let mut d = Daemon::start(&toml);
    let n = d.wait_ready();
    let log = d.log();
    let names: Vec<String> = log
        .lines()
        .filter(|l| l.contains("` listening on "))
        .filter_map(|l| l.split("listener `").nth(1)?.split('`').next())
        .map(str::to_string)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names.len(), n, "{names:?}\n{}", d.log_dump());
    let mut served = std::collections::BTreeSet::new();
    for name in &names {
        let service = ["echo", "discard", "chargen", "daytime", "time"]
            .into_iter()
            .find(|s| name.starts_with(s))
            .unwrap_or_else(|| panic!("which service is listener {name:?}?"));
        check_listener(&d, name, service);
        served.insert((service, d.bound(name).protocol));
    }
    for service in ["echo", "discard", "chargen", "daytime", "time"] {
        for protocol in ["tcp", "udp"] {
            assert!(
                served.contains(&(service, protocol.to_string())),
                "the shipped config has no {service} over {protocol}: {served:?}"
            );
        }
    }
    assert!(
        served.iter().any(|(_, p)| p == "unix"),
        "the shipped config has no unix socket: {served:?}"
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn a_bind_failure_exits_3_and_removes_the_sockets_it_made() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut d = Daemon::spawn(&format!(
        "{}{}",
        listener("first", "unix", "{dir}/first.sock", "echo"),
        listener("second", "udp", &format!("127.0.0.1:{port}"), "echo"),
    ));
    assert_exit_code(d.wait_exit(READY_TIMEOUT), 3, &d);
    assert_contains(
        &d.log(),
        &["listener `second`", &format!("127.0.0.1:{port}"), "in use"],
    );
    let first = d.dir().join("first.sock");
    assert!(!first.exists(), "{} left behind", first.display());
}

#[test]
fn a_file_at_a_socket_path_is_refused_and_kept() {
    let dir = TestDir::new();
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, "keep me").expect("write");
    let toml = listener("echo", "unix", &file.display().to_string(), "echo");
    let mut d = Daemon::spawn(&toml);
    assert_exit_code(d.wait_exit(READY_TIMEOUT), 3, &d);
    assert_contains(&d.log(), &["listener `echo`", "not a socket"]);
    assert_eq!(
        std::fs::read_to_string(&file).expect("still there"),
        "keep me"
    );
}

#[test]
fn a_live_socket_is_never_stolen() {
    let first = Daemon::start(&listener("echo", "unix", "{dir}/echo.sock", "echo"));
    let path = first.path("echo");
    let mut second = Daemon::spawn(&listener(
        "echo",
        "unix",
        &path.display().to_string(),
        "echo",
    ));
    assert_exit_code(second.wait_exit(READY_TIMEOUT), 3, &second);
    assert_contains(&second.log(), &["listener `echo`", "another process"]);
    // The first daemon still owns and serves its socket.
    check_listener(&first, "echo", "echo");
}
