//! What a service manager sees of a binary upgrade and of the fd store, with the test playing
//! the manager: a notify socket that records each message with its sender's pid
//! (`SCM_CREDENTIALS`) and any descriptors it carries (`SCM_RIGHTS`), and sockets passed back
//! with `LISTEN_FDS` the way systemd does on a restart. (`under_systemd` does the same with
//! real systemd as PID 1.)

use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};

use crate::harness::*;
use crate::services::listener;

/// One notify message: its text, the sender's pid, and the descriptors it carried.
struct Message {
    text: String,
    pid: i32,
    fds: Vec<OwnedFd>,
}

/// The manager's end of `NOTIFY_SOCKET`.
struct Manager {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Manager {
    fn bind(path: &Path) -> Manager {
        let sock = UnixDatagram::bind(path).expect("bind the notify socket");
        setsockopt(&sock, sockopt::PassCred, &true).expect("SO_PASSCRED");
        Manager {
            sock,
            seen: Vec::new(),
        }
    }

    fn recv(&mut self, timeout: Duration) -> Option<Message> {
        self.sock
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return None,
            Err(e) => panic!("recvmsg on the notify socket: {e}"),
        };
        let (mut pid, mut fds) = (0, Vec::new());
        for c in msg.cmsgs().expect("control messages") {
            match c {
                ControlMessageOwned::ScmCredentials(cred) => pid = cred.pid(),
                ControlMessageOwned::ScmRights(raw) => {
                    // SAFETY: SCM_RIGHTS just gave this process these new descriptors.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    )
                }
                _ => {}
            }
        }
        let n = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        self.seen.push(format!("[pid {pid}] {text:?}"));
        Some(Message { text, pid, fds })
    }

    /// Messages until one contains `needle` (panics with all seen after `timeout`).
    fn expect(&mut self, needle: &str, timeout: Duration) -> Message {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {needle:?} from the daemon within {timeout:?}; seen:\n{}",
                self.seen.join("\n")
            );
            if let Some(m) = self.recv(left) {
                if m.text.contains(needle) {
                    return m;
                }
            }
        }
    }
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key))
}

#[test]
fn an_upgrade_names_the_new_main_pid_and_the_new_process_feeds_the_watchdog() {
    let mut manager = None;
    let config = format!(
        "[daemon]\npidfile = \"{{dir}}/socketd.pid\"\n{}",
        listener("echo", "tcp", "127.0.0.1:0", "echo")
    );
    let mut d = Daemon::spawn_with(&config, |dir, cfg| {
        let path = dir.join("notify.sock");
        manager = Some(Manager::bind(&path));
        let mut cmd = socketd_cmd();
        cmd.arg("--config")
            .arg(cfg)
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "400000");
        cmd
    });
    let mut m = manager.expect("notify socket");
    let old = d.pid();
    assert_eq!(m.expect("READY=1", READY_TIMEOUT).pid, old);

    d.signal(libc::SIGUSR2);
    let reloading = m.expect("RELOADING=1", READY_TIMEOUT);
    assert_eq!(reloading.pid, old);
    let handed = m.expect("MAINPID=", READY_TIMEOUT);
    assert_eq!(handed.pid, old, "MAINPID= comes from the main process");
    // WATCHDOG=1 with it: the manager's watchdog clock restarts at the hand-over.
    assert_contains(&handed.text, &["READY=1", "WATCHDOG=1"]);
    let new: i32 = field(&handed.text, "MAINPID=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {:?}", handed.text));
    assert_ne!(new, old);
    wait_until("the pidfile to name the new process", READY_TIMEOUT, || {
        std::fs::read_to_string(d.dir().join("socketd.pid"))
            .is_ok_and(|t| t.trim() == new.to_string())
    });
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    // The new process keeps the watchdog fed; nothing more comes from the old one, and the
    // new one never said READY=1 itself (the manager would refuse it from a non-main pid).
    for _ in 0..2 {
        assert_eq!(m.expect("WATCHDOG=1", Duration::from_secs(5)).pid, new);
    }
    assert!(
        !m.seen
            .iter()
            .any(|s| s.starts_with(&format!("[pid {new}]")) && s.contains("READY=1")),
        "{}",
        m.seen.join("\n")
    );
    // SAFETY: kill(2) has no memory effects; `new` is the daemon the upgrade started.
    unsafe { libc::kill(new, libc::SIGTERM) };
    assert_eq!(m.expect("STOPPING=1", STOP_BUDGET).pid, new);
}

/// Start `socketd` with `fds` as its fds 3.. and `LISTEN_FDS`/`LISTEN_FDNAMES`, as systemd
/// starts a service with sockets from its fd store (`LISTEN_PID` is the shell's `$$`, which
/// `exec` keeps).
fn start_with_fds(config_toml: &str, fds: &[(String, OwnedFd)]) -> Daemon {
    let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
    let raw: Vec<RawFd> = fds.iter().map(|(_, f)| f.as_raw_fd()).collect();
    let d = Daemon::spawn_with(config_toml, move |_, cfg| {
        let mut cmd = command(Path::new("/bin/sh"));
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" --config \"$1\"")
            .arg(SOCKETD)
            .arg(cfg)
            .env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let base = 100;
        // SAFETY: between fork and exec only dup2/fcntl (async-signal-safe): every fd first
        // goes high (so none overwrites another), then into place at 3.. without CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    if libc::dup2(*fd, base + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for i in 0..raw.len() {
                    if libc::dup2(base + i as RawFd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(base + i as RawFd);
                }
                Ok(())
            });
        }
        cmd
    });
    d.wait_ready();
    d
}

#[test]
fn the_fd_store_keeps_every_socket_across_a_restart() {
    let body = format!(
        "{}{}{}",
        listener("tcp", "tcp", "127.0.0.1:0", "echo"),
        listener("udp", "udp", "127.0.0.1:0", "echo"),
        listener("unix", "unix", "{dir}/echo.sock", "echo"),
    );
    let config = format!("[daemon]\nfd_store = true\n{body}");
    let mut manager = None;
    let mut d = Daemon::spawn_with(&config, |dir, cfg| {
        let path = dir.join("notify.sock");
        manager = Some(Manager::bind(&path));
        let mut cmd = socketd_cmd();
        cmd.arg("--config").arg(cfg).env("NOTIFY_SOCKET", &path);
        cmd
    });
    let mut m = manager.expect("notify socket");
    m.expect("READY=1", READY_TIMEOUT);
    let mut store: Vec<(String, OwnedFd)> = Vec::new();
    while store.len() < 3 {
        let msg = m.expect("FDSTORE=1", READY_TIMEOUT);
        let name = field(&msg.text, "FDNAME=").expect("FDNAME=").to_string();
        assert_eq!(msg.fds.len(), 1, "one socket per message: {:?}", msg.text);
        store.extend(msg.fds.into_iter().map(|fd| (name.clone(), fd)));
    }
    let mut names: Vec<&str> = store.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["tcp", "udp", "unix"]);
    let (tcp, udp, unix) = (d.addr("tcp"), d.addr("udp"), d.path("unix"));

    // The stop (first half of a restart): the stored sockets stay open, the file stays.
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(
        unix.exists(),
        "the unix socket file was removed at the stop"
    );
    // Clients meanwhile are queued by the kernel, not refused.
    let mut waiting_tcp = Stream::tcp(tcp);
    let mut waiting_unix = Stream::unix(&unix);
    let waiting_udp = Dgram::udp(udp);
    waiting_tcp.write_all(b"queued tcp\n").expect("send");
    waiting_unix.write_all(b"queued unix\n").expect("send");
    waiting_udp.send(b"queued udp");

    // The start (second half): the manager passes the stored sockets back.
    let mut d2 = start_with_fds(&format!("[daemon]\nfd_store = true\n{body}"), &store);
    assert_eq!(waiting_tcp.read_line(), "queued tcp\n");
    assert_eq!(waiting_unix.read_line(), "queued unix\n");
    assert_eq!(waiting_udp.recv(), b"queued udp");
    let log = d2.log();
    assert_eq!(
        log.matches("passed by the service manager").count(),
        3,
        "{}",
        d2.log_dump()
    );
    assert_eq!(d2.addr("tcp"), tcp, "the TCP listener moved");
    drop((waiting_tcp, waiting_unix));
    d2.signal(libc::SIGTERM);
    assert_exit_code(d2.wait_exit(STOP_BUDGET), 0, &d2);
}

#[test]
fn a_full_manager_queue_delays_the_fd_store_but_loses_no_socket() {
    // More listeners than a unix datagram socket queues by default (net.unix.max_dgram_qlen
    // is 10): with the manager not reading yet, some FDSTORE=1 messages find no room.
    const N: usize = 14;
    let mut config = String::from("[daemon]\nfd_store = true\n");
    for i in 0..N {
        config.push_str(&listener(&format!("l{i}"), "tcp", "127.0.0.1:0", "echo"));
    }
    let mut manager = None;
    let mut d = Daemon::spawn_with(&config, |dir, cfg| {
        let path = dir.join("notify.sock");
        manager = Some(Manager::bind(&path));
        let mut cmd = socketd_cmd();
        cmd.arg("--config").arg(cfg).env("NOTIFY_SOCKET", &path);
        cmd
    });
    let mut m = manager.expect("notify socket");
    d.wait_ready();
    assert!(
        !d.log().contains("fd store:"),
        "all stored although the manager read nothing\n{}",
        d.log_dump()
    );
    assert!(!d.log().contains("cannot put"), "{}", d.log_dump());
    let mut names = Vec::new();
    while names.len() < N {
        let msg = m.expect("FDSTORE=1", READY_TIMEOUT);
        assert_eq!(msg.fds.len(), 1, "{:?}", msg.text);
        names.push(field(&msg.text, "FDNAME=").expect("FDNAME=").to_string());
    }
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), N, "{names:?}");
    d.wait_log(
        &format!("fd store: {N} listening sockets kept"),
        READY_TIMEOUT,
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn sockets_from_socket_activation_are_handed_over_and_their_files_kept() {
    let Some(activate) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.is_file()) else {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package `systemd`)");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // The manager binds the TCP socket on a port and a unix socket with a name socketd would
    // never pick; the listeners' own addresses differ (port 0, another path): adopted by name.
    let config = format!(
        "[daemon]\npidfile = \"{{dir}}/socketd.pid\"\n{}{}",
        listener("tcp", "tcp", "127.0.0.1:0", "echo"),
        listener("unix", "unix", "{dir}/unused.sock", "echo"),
    );
    let mut d = Daemon::spawn_with(&config, |dir, cfg| {
        let mut cmd = command(activate);
        cmd.arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--listen={}", dir.join("manager.sock").display()))
            .arg("--fdname=tcp:unix")
            .arg(SOCKETD)
            .arg("--config")
            .arg(cfg);
        cmd
    });
    // systemd-socket-activate starts socketd on the first connection.
    d.wait_log("as 4.", READY_TIMEOUT);
    let mut first = Stream::tcp(([127, 0, 0, 1], port).into());
    first.write_all(b"first\n").expect("send");
    d.wait_ready();
    assert_eq!(first.read_line(), "first\n");
    drop(first);
    let old = d.pid();
    d.signal(libc::SIGUSR2);
    d.wait_log("stops accepting and drains", READY_TIMEOUT);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    let log = d.log();
    for name in ["tcp", "unix"] {
        assert_contains(
            &log,
            &[&format!(
                "listener `{name}`: using the socket `{name}` handed over by pid {old}"
            )],
        );
    }
    let new: i32 = std::fs::read_to_string(d.dir().join("socketd.pid"))
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    let manager_sock = d.dir().join("manager.sock");
    let mut s = Stream::tcp(([127, 0, 0, 1], port).into());
    s.write_all(b"tcp\n").expect("send");
    assert_eq!(s.read_line(), "tcp\n");
    let mut u = Stream::unix(&manager_sock);
    u.write_all(b"unix\n").expect("send");
    assert_eq!(u.read_line(), "unix\n");
    drop((s, u));
    assert!(
        !d.dir().join("unused.sock").exists(),
        "bound its own socket"
    );
    // SAFETY: kill(2) has no memory effects; `new` is the daemon the upgrade started.
    unsafe { libc::kill(new, libc::SIGTERM) };
    wait_until("the new process to stop", STOP_BUDGET, || {
        std::fs::read_to_string(format!("/proc/{new}/stat")).map_or(true, |s| s.contains(") Z "))
    });
    assert!(
        manager_sock.exists(),
        "the manager's socket file was removed by socketd"
    );
}

#[test]
fn a_rolled_back_upgrade_says_ready_again_from_the_old_process() {
    let mut manager = None;
    let config = format!(
        "[daemon]\ncontrol = \"{{dir}}/control\"\n{}",
        listener("echo", "tcp", "127.0.0.1:0", "echo")
    );
    let mut d = Daemon::spawn_with(&config, |dir, cfg| {
        let path = dir.join("notify.sock");
        manager = Some(Manager::bind(&path));
        let mut cmd = socketd_cmd();
        cmd.arg("--config").arg(cfg).env("NOTIFY_SOCKET", &path);
        cmd
    });
    let mut m = manager.expect("notify socket");
    let old = d.pid();
    m.expect("READY=1", READY_TIMEOUT);
    let mut up = socketd_cmd();
    up.arg("--config")
        .arg(d.config_path())
        .args(["upgrade", "--binary", "/bin/false"]);
    let out = run_with_timeout(up, Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_contains(&out.stderr, &["exited with status 1 before it was ready"]);
    assert_eq!(m.expect("RELOADING=1", READY_TIMEOUT).pid, old);
    let again = m.expect("READY=1", READY_TIMEOUT);
    assert_eq!(again.pid, old);
    assert!(
        !m.seen.iter().any(|s| s.contains("MAINPID=")),
        "{}",
        m.seen.join("\n")
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}
