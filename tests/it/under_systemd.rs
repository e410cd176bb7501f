//! socketd deployed as an operator deploys it, under real systemd as PID 1 (`sysd::Container`):
//! installed the way README.md says (and from the Debian package), started, reloaded, stopped,
//! socket-activated, restarted by its watchdog and restarted with a broken config. Clients run
//! in the container's network namespace, outside the service, as root or as `nobody`.
//!
//! Root only (skipped with the reason otherwise; CI runs them). Every test boots its own
//! container and leaves nothing behind (`Container::stop` checks).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::sysd::{Container, SHARE};

/// The config a systemd deployment installs as /etc/socketd/socketd.toml.
const SYSTEMD_CONFIG: &str = include_str!("../../config/socketd-systemd.toml");
const CONFIG: &str = "/etc/socketd/socketd.toml";
/// Listeners in `SYSTEMD_CONFIG`.
const LISTENERS: usize = 11;
const UNIX_ECHO: &str = "/run/socketd/echo.sock";
/// How long a start, reload or stop through systemctl may take here.
const SYSTEMCTL: Duration = Duration::from_secs(60);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One echo exchange over TCP: connect, send, half-close, read all. Errors are returned (a
/// refused connection is an `Err`), never retried.
fn tcp_echo(port: u16, msg: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&local(port), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(msg)?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Read whatever a send-and-close service (daytime, time) sends on connect.
fn tcp_read(port: u16) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&local(port), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// One datagram to a UDP service and its answer.
fn udp_request(port: u16, msg: &[u8]) -> io::Result<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.connect(local(port))?;
    s.send(msg)?;
    let mut buf = [0u8; 1024];
    let n = s.recv(&mut buf)?;
    Ok(buf[..n].to_vec())
}

/// One echo exchange over a Unix stream socket at `path` (a host path into the container).
fn unix_echo(path: &Path, msg: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(msg)?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Every service of the shipped systemd config answers, from outside the service.
fn assert_shipped_services_answer(c: &Container) {
    c.in_net(|| {
        assert_eq!(tcp_echo(17007, b"echo tcp").unwrap(), b"echo tcp");
        assert_eq!(udp_request(17007, b"echo udp").unwrap(), b"echo udp");
        assert_eq!(tcp_echo(17009, b"into the void").unwrap(), b"");
        let daytime = String::from_utf8(tcp_read(17013).unwrap()).unwrap();
        assert!(
            daytime.ends_with("\r\n") && daytime.len() > 10,
            "{daytime:?}"
        );
        assert_eq!(udp_request(17013, b"?").unwrap().last(), Some(&b'\n'));
        let mut chargen = TcpStream::connect_timeout(&local(17019), IO_TIMEOUT).unwrap();
        chargen.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut line = [0u8; 74];
        chargen.read_exact(&mut line).unwrap();
        assert_eq!(&line[72..], b"\r\n");
        assert_eq!(tcp_read(17037).unwrap().len(), 4);
        assert_eq!(udp_request(17037, b"?").unwrap().len(), 4);
    });
    assert_eq!(
        unix_echo(&c.host_path(UNIX_ECHO), b"echo unix").unwrap(),
        b"echo unix"
    );
    // What the issue's operator typed, and a client that is not root on the unix socket.
    assert_eq!(c.sh("echo hi | nc -N 127.0.0.1 17007"), "hi\n");
    assert_eq!(
        c.sh(&format!(
            "echo hi | setpriv --reuid=nobody --regid=nogroup --clear-groups nc -N -U {UNIX_ECHO}"
        )),
        "hi\n"
    );
}

/// Poll the unit's journal until it holds `needle`; returns the journal. Panics after `timeout`.
#[track_caller]
fn wait_journal(c: &Container, unit: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let j = c.journal(unit);
        if j.contains(needle) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the journal of {unit} within {timeout:?}:\n{j}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `systemctl show -p NAME --value socketd`.
fn show(c: &Container, property: &str) -> String {
    c.exec(&["systemctl", "show", "-p", property, "--value", "socketd"])
        .stdout
        .trim()
        .to_string()
}

/// The `sh` code block that README.md's "By hand" install gives (the one after the marker).
fn readme_install_block() -> String {
    let readme = include_str!("../../README.md");
    let marker = "<!-- tests/it/under_systemd.rs runs this block";
    let after = &readme[readme
        .find(marker)
        .expect("the README marks its install block")..];
    let body = &after[after.find("```sh\n").expect("an sh block after the marker") + 6..];
    body[..body.find("```").expect("the block ends")].to_string()
}

/// The source tree as an operator has it after `cargo build --release`, staged inside.
fn stage_source(c: &Container) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in [
        "README.md",
        "config/socketd.toml",
        "config/socketd-systemd.toml",
        "systemd/socketd.service",
        "systemd/socketd.socket",
    ] {
        c.stage(&root.join(f), &format!("src/{f}"));
    }
    c.stage(Path::new(SOCKETD), "src/target/release/socketd");
    format!("{SHARE}/src")
}

/// Install socketd the way README.md tells an operator to, every command of its block but
/// `cargo build` (the test's binary stands in for the release build).
fn install_by_readme(c: &Container) {
    let src = stage_source(c);
    let block = readme_install_block();
    let script: String = block
        .lines()
        .filter(|l| !l.trim_start().starts_with("cargo "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(script.contains("socketd check"), "{block}");
    let out = c.sh(&format!("cd {src}\n{script}"));
    assert_eq!(
        out.trim(),
        "ok",
        "`socketd check` in the README block printed {out:?}"
    );
}

/// Echo clients on `port` in a loop from `threads` threads (inside the container's network
/// namespace) while `during` runs; returns (exchanges done, failures). Bounded: each thread
/// stops after 20,000 exchanges or 60s even if `during` takes longer.
fn echo_load<T: Send>(
    c: &Container,
    port: u16,
    threads: usize,
    during: impl FnOnce() -> T + Send,
) -> (usize, Vec<String>, T) {
    let stop = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let result = std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, done, failures) = (&stop, &done, &failures);
            s.spawn(move || {
                c.enter_net();
                let deadline = Instant::now() + Duration::from_secs(60);
                let msg = format!("load {t}");
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    match tcp_echo(port, msg.as_bytes()) {
                        Ok(reply) if reply == msg.as_bytes() => {}
                        other => failures.lock().unwrap().push(format!("{other:?}")),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Let the load get going, run `during`, then a little more load after it.
        wait_until("load started", Duration::from_secs(10), || {
            done.load(Ordering::Relaxed) >= 20
        });
        let r = during();
        let mark = done.load(Ordering::Relaxed);
        wait_until("load after", Duration::from_secs(10), || {
            done.load(Ordering::Relaxed) >= mark + 20
        });
        stop.store(true, Ordering::Relaxed);
        r
    });
    (done.into_inner(), failures.into_inner().unwrap(), result)
}

#[test]
fn installed_by_readme_start_reload_refuse_stop_under_systemd() {
    let Some(c) = Container::boot_or_skip("readme") else {
        return;
    };
    let t0 = Instant::now();
    install_by_readme(&c);
    // Nothing starts by itself; the socket unit is not pulled in by anything.
    assert_eq!(
        c.exec(&["systemctl", "is-active", "socketd"]).stdout.trim(),
        "inactive"
    );

    // Start: `systemctl` returns when socketd said READY=1, so everything answers at once.
    c.sh("systemctl enable --now socketd");
    assert_eq!(c.sh("systemctl is-active socketd").trim(), "active");
    assert_shipped_services_answer(&c);
    assert_eq!(
        c.sh("systemctl is-active socketd.socket || true").trim(),
        "inactive",
        "socketd.socket was started without being enabled"
    );
    assert_eq!(
        show(&c, "StatusText"),
        format!("{LISTENERS} listeners, 0 connections open")
    );
    let main_pid = show(&c, "MainPID");
    let journal = c.journal("socketd");
    assert!(
        !journal.contains("passed by the service manager"),
        "no socket unit, yet sockets were passed:\n{journal}"
    );

    // Reload under load: add a listener, remove one; the kept echo-tcp refuses nothing.
    let added = SYSTEMD_CONFIG.replace(
        "name = \"discard-tcp\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:17009\"\nhandler = \"discard\"",
        "name = \"echo-extra\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:17107\"\nhandler = \"echo\"",
    );
    assert_ne!(added, SYSTEMD_CONFIG);
    let (done, failures, reload) = echo_load(&c, 17007, 4, || {
        c.write(CONFIG, &added);
        let out = c.exec_timeout(&["systemctl", "reload", "socketd"], SYSTEMCTL);
        wait_journal(&c, "socketd", "reload: done", Duration::from_secs(20));
        out
    });
    assert!(reload.status.success(), "{}", reload.describe());
    eprintln!(
        "reload under load: {done} echo exchanges, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {done} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_contains(
        &c.journal("socketd"),
        &["reload: done (10 kept, 1 added, 1 removed)"],
    );
    c.in_net(|| {
        assert_eq!(tcp_echo(17107, b"new").unwrap(), b"new");
        let gone = tcp_echo(17009, b"x").unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::ConnectionRefused, "{gone}");
    });
    assert_eq!(show(&c, "MainPID"), main_pid, "a reload must not restart");

    // A broken file: `systemctl reload` fails, says why, and the running config keeps serving.
    let broken = added.replace("handler = \"daytime\"", "handler = \"daytime\"\nbogus = 1");
    c.write(CONFIG, &broken);
    let refused = c.exec_timeout(&["systemctl", "reload", "socketd"], SYSTEMCTL);
    assert!(
        !refused.status.success(),
        "reload of a broken file succeeded:\n{}",
        refused.describe()
    );
    let journal = wait_journal(
        &c,
        "socketd",
        "unknown key `bogus`",
        Duration::from_secs(10),
    );
    assert_contains(&journal, &[&format!("{CONFIG}:")]);
    assert_eq!(c.sh("systemctl is-active socketd").trim(), "active");
    assert_eq!(show(&c, "MainPID"), main_pid);
    c.in_net(|| assert_eq!(tcp_echo(17107, b"still").unwrap(), b"still"));
    // SIGHUP straight to the daemon (no check first): socketd refuses it itself, at error level.
    c.sh("systemctl kill --kill-whom=main -s SIGHUP socketd");
    wait_journal(
        &c,
        "socketd",
        "reload refused: the running configuration",
        Duration::from_secs(10),
    );
    let errors = c.sh("journalctl -u socketd -p err -o cat --no-pager");
    assert_contains(
        &errors,
        &["reload refused: the running configuration stays in force"],
    );
    c.in_net(|| assert_eq!(tcp_echo(17107, b"still").unwrap(), b"still"));
    c.write(CONFIG, &added);

    // Stop drains: the listeners close at once, the open connection is served to its end.
    let mut held = c.in_net(|| TcpStream::connect_timeout(&local(17007), IO_TIMEOUT).unwrap());
    held.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let stop = c.spawn(&["systemctl", "stop", "socketd"]);
    wait_journal(
        &c,
        "socketd",
        "stopping: 1 connections in flight",
        Duration::from_secs(20),
    );
    let refused = c.in_net(|| tcp_echo(17007, b"late").unwrap_err());
    assert_eq!(
        refused.kind(),
        io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    held.write_all(b"in flight").unwrap();
    let mut buf = [0u8; 9];
    held.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"in flight");
    drop(held);
    let out = stop.wait(SYSTEMCTL);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(show(&c, "Result"), "success");
    assert_eq!(show(&c, "ExecMainStatus"), "0");
    assert!(
        !c.host_path(UNIX_ECHO).exists(),
        "the unix socket outlived the service"
    );

    // The journal has the lifecycle, with levels kept (info for these).
    let journal = c.journal("socketd");
    let order = [
        "listener `echo-unix` listening on unix /run/socketd/echo.sock",
        &format!("socketd ready: {LISTENERS} listeners"),
        "reload: done (10 kept, 1 added, 1 removed)",
        "reload refused",
        "stopping: 1 connections in flight",
        "socketd stopped",
    ];
    let mut at = 0;
    for line in order {
        let i = journal[at..]
            .find(line)
            .unwrap_or_else(|| panic!("{line:?} missing or out of order in:\n{journal}"));
        at += i + line.len();
    }
    let info = c.sh("journalctl -u socketd -p info..info -o cat --no-pager");
    assert_contains(&info, &["socketd ready", "socketd stopped"]);
    eprintln!("under systemd, installed by README: {:?}", t0.elapsed());
    c.stop();
}
