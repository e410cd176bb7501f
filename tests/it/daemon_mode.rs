//! Running as a classic daemon: `--daemon` with a locked pidfile, privilege drop after binding
//! (as root only), and syslog output over UDP, TCP and a unix datagram socket the test owns,
//! including the access line of each connection.

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(10);

fn alive(pid: i32) -> bool {
    // A zombie (no reaper in a container) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory effects; `pid` is the daemon this test started.
    unsafe { libc::kill(pid, sig) };
}

#[test]
fn daemon_with_pidfile_refuses_second_instance_and_cleans_up() {
    let dir = TestDir::new();
    let config = dir.write(
        "socketd.toml",
        "[daemon]\nshutdown_timeout = \"1s\"\n[[listener]]\nname = \"echo\"\nprotocol = \"unix\"\naddress = \"{dir}/echo.sock\"\nhandler = \"echo\"\n",
    );
    let pidfile = dir.path().join("socketd.pid");
    let start = || {
        let mut cmd = socketd_cmd();
        cmd.arg("--config")
            .arg(&config)
            .arg("--daemon")
            .arg("--pidfile")
            .arg(&pidfile);
        cmd.current_dir(dir.path());
        run_with_timeout(cmd, WAIT)
    };
    let first = start();
    assert_eq!(first.code(), Some(0), "{}", first.describe());
    // The parent exited only once the pidfile was written and the daemon was serving.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid), "daemon {pid} is not running");
    // A detached daemon is no child of ours: stop it by pid even if an assertion fails.
    let _stop = StopOnDrop(pid);
    // Nothing the daemon started holds the terminal (here: the test's pipes) either.
    for p in std::iter::once(pid).chain(children_of(pid)) {
        for fd in [1, 2] {
            let target = std::fs::read_link(format!("/proc/{p}/fd/{fd}")).unwrap();
            assert_eq!(
                target,
                std::path::Path::new("/dev/null"),
                "fd {fd} of {p} (daemon {pid})"
            );
        }
    }
    let mut s = Stream::unix(&dir.path().join("echo.sock"));
    s.write_all(b"up").unwrap();
    assert_eq!(s.read_n(2), b"up");
    drop(s);

    let second = start();
    assert_eq!(second.code(), Some(3), "{}", second.describe());
    assert_contains(
        &second.stderr,
        &[&format!(
            "another socketd (pid {pid}) is running with the pidfile"
        )],
    );
    assert!(alive(pid), "the second start disturbed the first daemon");

    kill(pid, libc::SIGTERM);
    wait_until("the daemon to exit", WAIT, || !alive(pid));
    wait_until("the pidfile to be removed", WAIT, || !pidfile.exists());
    assert!(
        !dir.path().join("echo.sock").exists(),
        "unix socket left behind"
    );
}

#[test]
fn daemon_bind_error_reaches_the_terminal() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = TestDir::new();
    let config = dir.write(
        "socketd.toml",
        &format!("[[listener]]\nname = \"clash\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:{port}\"\nhandler = \"echo\"\n"),
    );
    let pidfile = dir.path().join("socketd.pid");
    let mut cmd = socketd_cmd();
    cmd.arg("--config")
        .arg(&config)
        .arg("--daemon")
        .arg("--pidfile")
        .arg(&pidfile);
    let out = run_with_timeout(cmd, WAIT);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert_contains(
        &out.stderr,
        &["listener `clash`: cannot listen on tcp", "in use"],
    );
    assert!(!pidfile.exists(), "a failed start left its pidfile");
}

/// The first free TCP port below 1024 in 900..1000, or `None`.
fn free_low_port() -> Option<u16> {
    (900..1000).find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
fn drops_privileges_after_binding_a_low_port() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: privilege drop needs the tests to run as root");
        return;
    }
    let Some(port) = free_low_port() else {
        eprintln!("skipped: no free TCP port in 900..1000");
        return;
    };
    let (user, group) = ("nobody", "nogroup");
    let Ok(Some(u)) = nix::unistd::User::from_name(user) else {
        eprintln!("skipped: no `nobody` user");
        return;
    };
    let Ok(Some(g)) = nix::unistd::Group::from_name(group) else {
        eprintln!("skipped: no `nogroup` group");
        return;
    };
    let mut d = Daemon::start(&format!(
        "[daemon]\nuser = \"{user}\"\ngroup = \"{group}\"\nshutdown_timeout = \"1s\"\n[[listener]]\nname = \"low\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:{port}\"\nhandler = \"echo\"\n"
    ));
    let (uid, gid) = (u.uid.as_raw(), g.gid.as_raw());
    assert_eq!(
        status_field(d.pid(), "Uid"),
        format!("{uid} {uid} {uid} {uid}")
    );
    assert_eq!(
        status_field(d.pid(), "Gid"),
        format!("{gid} {gid} {gid} {gid}")
    );
    assert_eq!(status_field(d.pid(), "Groups"), format!("{gid}"));
    let mut s = d.connect("low");
    s.write_all(b"low").unwrap();
    assert_eq!(s.read_n(3), b"low");
    drop(s);
    assert_contains(&d.log(), &[&format!("running as uid {uid} gid {gid}")]);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn unknown_user_fails_check_and_start() {
    let toml = "[daemon]\nuser = \"no-such-user-socketd\"\n";
    let (out, path, _dir) = check(toml);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_contains(
        &out.stderr,
        &[
            &path.display().to_string(),
            "no such user \"no-such-user-socketd\"",
        ],
    );
    let mut d = Daemon::spawn(toml);
    assert_exit_code(d.wait_exit(WAIT), 1, &d);
}

/// Collects syslog lines from whatever transport the test set up.
enum Sink {
    Udp(UdpSocket),
    Unix(UnixDatagram),
    Tcp(TcpListener, Option<std::net::TcpStream>, Vec<u8>),
}

impl Sink {
    /// The next message (TCP: de-framed from octet counting).
    fn next(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let mut buf = vec![0u8; 65536];
        match self {
            Sink::Udp(s) => {
                s.set_read_timeout(Some(left)).unwrap();
                s.recv(&mut buf)
                    .ok()
                    .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
            }
            Sink::Unix(s) => {
                s.set_read_timeout(Some(left)).unwrap();
                s.recv(&mut buf)
                    .ok()
                    .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
            }
            Sink::Tcp(l, conn, pending) => loop {
                if let Some(sp) = pending.iter().position(|b| *b == b' ') {
                    let len: usize = std::str::from_utf8(&pending[..sp])
                        .ok()?
                        .parse()
                        .expect("octet count");
                    if pending.len() > sp + len {
                        let msg =
                            String::from_utf8_lossy(&pending[sp + 1..sp + 1 + len]).into_owned();
                        pending.drain(..sp + 1 + len);
                        return Some(msg);
                    }
                }
                if conn.is_none() {
                    l.set_nonblocking(false).unwrap();
                    let (c, _) = l.accept().ok()?;
                    *conn = Some(c);
                }
                let c = conn.as_mut()?;
                c.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                ))
                .unwrap();
                let n = c.read(&mut buf).ok()?;
                if n == 0 {
                    return None;
                }
                pending.extend_from_slice(&buf[..n]);
            },
        }
    }

    /// Messages until one contains `needle`; all of them so far are in `seen`.
    fn wait_for(&mut self, needle: &str, seen: &mut Vec<String>) -> String {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(m) = self.next(deadline) {
                seen.push(m.clone());
                if m.contains(needle) {
                    return m;
                }
            }
        }
        panic!(
            "no syslog message with {needle:?} within {WAIT:?}; got:\n{}",
            seen.join("\n")
        );
    }
}

fn syslog_run(sink: &mut Sink, syslog_table: &str, pri_info: u32, rfc5424: bool) {
    let config = format!(
        "[daemon]\nlog = \"syslog\"\naccess_log = \"syslog\"\nshutdown_timeout = \"1s\"\n[daemon.syslog]\n{syslog_table}\n[[listener]]\nname = \"echo\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n"
    );
    let mut d = Daemon::spawn(&config);
    let pid = d.pid();
    let mut seen = Vec::new();
    let ready = sink.wait_for("socketd ready: 1 listeners", &mut seen);
    let expected_prefix = if rfc5424 {
        format!("<{pri_info}>1 ")
    } else {
        format!("<{pri_info}>")
    };
    assert!(
        ready.starts_with(&expected_prefix),
        "priority/version prefix {expected_prefix:?} in {ready:?}"
    );
    if rfc5424 {
        assert_contains(&ready, &[&format!(" socketd {pid} ")]);
    } else {
        assert_contains(&ready, &[&format!("socketd[{pid}]: socketd ready")]);
    }
    let line = seen
        .iter()
        .find(|m| m.contains("listener `echo` listening on tcp "))
        .expect("listening line");
    let addr: std::net::SocketAddr = line.rsplit(' ').next().unwrap().trim().parse().unwrap();
    let mut s = Stream::tcp(addr);
    s.write_all(b"hello").unwrap();
    s.shutdown_write();
    assert_eq!(s.read_to_end_vec(), b"hello");
    let access = sink.wait_for("access: listener `echo`", &mut seen);
    assert_contains(
        &access,
        &["peer 127.0.0.1:", " duration ", " in 5 out 5 outcome ok"],
    );
    d.signal(libc::SIGTERM);
    sink.wait_for("socketd stopped", &mut seen);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(
        !d.log().contains("socketd ready"),
        "with log = syslog, lines went to stderr too:\n{}",
        d.log()
    );
}

#[test]
fn syslog_over_udp_rfc5424_local3() {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let table = format!(
        "address = \"udp:{}\"\nfacility = \"local3\"\nformat = \"rfc5424\"",
        udp.local_addr().unwrap()
    );
    // local3 = 19; info = 6: 19 * 8 + 6.
    syslog_run(&mut Sink::Udp(udp), &table, 158, true);
}

#[test]
fn syslog_over_a_unix_datagram_socket_rfc3164_daemon() {
    let dir = TestDir::new();
    let path = dir.path().join("log.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let table = format!("address = \"unix:{}\"", path.display());
    // daemon = 3; info = 6: 3 * 8 + 6.
    syslog_run(&mut Sink::Unix(sock), &table, 30, false);
}

#[test]
fn syslog_over_tcp_is_octet_counted() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let table = format!(
        "address = \"tcp:{}\"\nfacility = \"local0\"",
        l.local_addr().unwrap()
    );
    // local0 = 16; info = 6.
    syslog_run(&mut Sink::Tcp(l, None, Vec::new()), &table, 134, false);
}

#[test]
fn unreachable_syslog_falls_back_to_stderr() {
    let dir = TestDir::new();
    let missing = dir.path().join("nobody-listens.sock");
    let mut d = Daemon::start(&format!(
        "[daemon]\nlog = \"syslog\"\nshutdown_timeout = \"1s\"\n[daemon.syslog]\naddress = \"unix:{}\"\n",
        missing.display()
    ));
    assert_contains(&d.log(), &["logging to stderr until it is reachable"]);
    // It comes back: the next lines (after the retry interval) go to syslog.
    let sock = UnixDatagram::bind(&missing).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        d.signal(libc::SIGUSR1);
        if let Ok(n) = sock.recv(&mut buf) {
            got = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let got = got.unwrap_or_else(|| panic!("syslog never reconnected\n{}", d.log_dump()));
    assert!(got.starts_with('<'), "{got:?}");
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    let _ = Path::new(&missing);
}

/// SIGKILLs a detached daemon (and so its fork servers) when the test ends, however it ends.
struct StopOnDrop(i32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            kill(self.0, libc::SIGKILL);
        }
    }
}
