//! systemd integration without systemd as PID 1: sd_notify messages read from a datagram
//! socket the test owns (a path and an abstract `@name`), socket activation through
//! `systemd-socket-activate`, and `systemd-analyze verify`/`security` on the shipped units.

use std::io::Write;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

const ECHO: &str = r#"
[daemon]
shutdown_timeout = "1s"

[[listener]]
name = "echo"
protocol = "tcp"
address = "127.0.0.1:0"
handler = "echo"
"#;

/// Receive notify datagrams until one contains `want`; returns it. Panics after `timeout`.
fn expect_msg(
    sock: &UnixDatagram,
    want: &str,
    timeout: Duration,
    seen: &mut Vec<String>,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no notify message with {want:?} within {timeout:?}; got {seen:#?}"
        );
        sock.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(msg.clone());
            if msg.contains(want) {
                return msg;
            }
        }
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn notify_lifecycle(abstract_name: bool) {
    let mut sock = None;
    let mut d = Daemon::spawn_with(ECHO, |dir, config| {
        let (s, var) = if abstract_name {
            let name = format!(
                "socketd-it-notify-{}-{}",
                std::process::id(),
                dir.display().to_string().len()
            );
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
        } else {
            let path = dir.join("notify.sock");
            (
                UnixDatagram::bind(&path).unwrap(),
                path.display().to_string(),
            )
        };
        sock = Some(s);
        let mut cmd = socketd_cmd();
        cmd.arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", var)
            .env("WATCHDOG_USEC", "300000");
        cmd
    });
    let sock = sock.expect("notify socket bound");
    let mut seen = Vec::new();
    let ready = expect_msg(&sock, "READY=1", READY_TIMEOUT, &mut seen);
    assert_contains(&ready, &["STATUS=1 listeners, 0 connections open"]);
    // READY=1 comes after binding: the listener is there and serving.
    let mut s = d.connect("echo");
    s.write_all(b"hi").unwrap();
    assert_eq!(s.read_n(2), b"hi");
    drop(s);
    expect_msg(&sock, "WATCHDOG=1", Duration::from_secs(5), &mut seen);
    d.signal(libc::SIGHUP);
    let reloading = expect_msg(&sock, "RELOADING=1", Duration::from_secs(10), &mut seen);
    assert_contains(&reloading, &["MONOTONIC_USEC="]);
    expect_msg(&sock, "READY=1", Duration::from_secs(10), &mut seen);
    d.signal(libc::SIGTERM);
    expect_msg(&sock, "STOPPING=1", Duration::from_secs(10), &mut seen);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn sd_notify_on_a_path_socket() {
    notify_lifecycle(false);
}

#[test]
fn sd_notify_on_an_abstract_socket() {
    notify_lifecycle(true);
}

#[test]
fn no_notify_socket_is_a_no_op() {
    let mut d = Daemon::start(ECHO);
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", READY_TIMEOUT);
    assert!(!d.log().contains("notify"), "{}", d.log_dump());
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn socket_activation_by_name_and_by_address() {
    let Some(activate) = which("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package `systemd`)");
        return;
    };
    let (named, stray) = (free_port(), free_port());
    let config = r#"
[daemon]
shutdown_timeout = "1s"

[[listener]]
name = "echo"
protocol = "tcp"
address = "127.0.0.1:0"
handler = "echo"

[[listener]]
name = "by-address"
protocol = "unix"
address = "{dir}/act.sock"
handler = "echo"
"#;
    let mut d = Daemon::spawn_with(config, |dir, config| {
        let mut cmd = command(&activate);
        cmd.arg(format!("--listen=127.0.0.1:{named}"))
            .arg(format!("--listen={}", dir.join("act.sock").display()))
            .arg(format!("--listen=127.0.0.1:{stray}"))
            .arg("--fdname=echo:something:stray")
            .arg(SOCKETD)
            .arg("--config")
            .arg(config);
        cmd
    });
    // Without --accept, systemd-socket-activate starts the program on the first connection.
    d.wait_log("as 5.", READY_TIMEOUT);
    let mut s = Stream::tcp(([127, 0, 0, 1], named).into());
    s.write_all(b"named").unwrap();
    d.wait_ready();
    assert_eq!(s.read_n(5), b"named");
    assert_eq!(
        d.addr("echo").port(),
        named,
        "`echo` adopted the socket named after it"
    );
    assert_contains(
        &d.log(),
        &[
            "listener `echo`: using the socket `echo` passed by the service manager",
            "listener `by-address`: using the socket `something` passed by the service manager",
            "passed socket `stray` (tcp 127.0.0.1:",
            "matches no listener",
        ],
    );
    let mut u = Stream::unix(&d.dir().join("act.sock"));
    u.write_all(b"path").unwrap();
    assert_eq!(u.read_n(4), b"path");
    drop((s, u));
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(
        d.dir().join("act.sock").exists(),
        "socketd removed a unix socket file it did not create"
    );
}

fn analyze_units(dir: &Path) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let mut out = Vec::new();
    for unit in ["socketd.service", "socketd.socket"] {
        let text = std::fs::read_to_string(root.join(unit)).expect("read the unit");
        // The units name the binary without a directory (systemd's search path finds it);
        // `systemd-analyze verify` needs it to exist, so point it at the one under test.
        let text = text.replace("=socketd ", &format!("={SOCKETD} "));
        let path = dir.join(unit);
        std::fs::write(&path, text).unwrap();
        out.push(path);
    }
    let mut it = out.into_iter();
    Some((it.next()?, it.next()?))
}

#[test]
fn systemd_units_verify_without_warnings_and_score_as_hardened() {
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("skipped: systemd-analyze is not installed (Debian package `systemd`)");
        return;
    };
    let dir = TestDir::new();
    let (service, socket) = analyze_units(dir.path()).expect("units written");
    let mut cmd = Command::new(&analyze);
    // --man=no: the man page the units name is installed by the package, not on this host.
    cmd.args(["verify", "--man=no"]).arg(&service).arg(&socket);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    let own: Vec<&str> = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .filter(|l| l.contains("socketd.service") || l.contains("socketd.socket"))
        .collect();
    assert!(
        out.status.success() && own.is_empty(),
        "systemd-analyze verify complained:\n{}",
        out.describe()
    );

    let mut cmd = Command::new(&analyze);
    cmd.args(["security", "--offline=yes"]).arg(&service);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    let score: f64 = out
        .stdout
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for socketd.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{}", out.describe()));
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{}", out.stdout);
}
