//! Defects real programs found (issue 12), end to end with the real binary: `TCP_NODELAY` on
//! the client side of a blocking proxy (read from the daemon's own socket with
//! `pidfd_getfd`), `max_connections` equal to `max_workers` refusing at once in every model,
//! forked listeners' syslog lines in the daemon's name, exit status 255 after the client left,
//! a chatty program's stderr capped, and a fork server that dies reaped and replaced.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::exec::{d_stop, exec_listener};
use crate::forked::fork_servers;
use crate::harness::*;

const MODELS: [&str; 3] = ["threaded", "forked", "event"];

/// A copy of descriptor `fd` of process `pid` (`pidfd_getfd`), or `None` if it is gone.
fn steal_fd(pid: i32, fd: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return None;
    }
    // SAFETY: `pidfd` was just opened for this function alone.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags; returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as i32;
    // SAFETY: a descriptor the syscall just made for us.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The daemon's (or a descendant's) accepted socket whose peer is `client`, as a copy.
fn server_side_of(d: &Daemon, client: SocketAddr) -> Option<TcpStream> {
    let mut pids = vec![d.pid()];
    let mut i = 0;
    while i < pids.len() {
        pids.extend(children_of(pids[i]));
        i += 1;
    }
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let is_socket = std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("socket:"))
                .unwrap_or(false);
            if !is_socket {
                continue;
            }
            let Some(owned) = steal_fd(pid, fd) else {
                continue;
            };
            let s = TcpStream::from(owned);
            if s.peer_addr().ok() == Some(client) {
                return Some(s);
            }
        }
    }
    None
}

/// nginx sends a keep-alive response as headers then a body: two small writes. With Nagle on
/// the client socket the second waits for the client's delayed ACK (about 40 ms per
/// response), so the blocking proxy must set `TCP_NODELAY` on the accepted socket, as the
/// event model does. Read from the daemon's own socket, in every model; the split response
/// arrives whole too.
#[test]
fn proxy_sets_nodelay_on_the_client_socket_in_every_model() {
    let up = TcpListener::bind("127.0.0.1:0").expect("upstream");
    let up_addr = up.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in up.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    // Headers, then the body: two segments.
                    let _ = s.write_all(b"HEAD\n");
                    let _ = s.write_all(b"BODY\n");
                }
            });
        }
    });
    if steal_fd(std::process::id() as i32, 0).is_none() {
        eprintln!("skipped: pidfd_getfd is not available here");
        return;
    }
    for workers in MODELS {
        let d = Daemon::start(&format!(
            "[[listener]]\nname = \"p\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\n\
             handler = \"proxy\"\nworkers = \"{workers}\"\nproxy = {{ upstream = \"{up_addr}\" }}\n"
        ));
        let mut c = d.connect("p");
        for _ in 0..3 {
            c.write_all(b"GET\n").expect("request");
            assert_eq!(c.read_n(10), b"HEAD\nBODY\n", "{workers}");
        }
        let Stream::Tcp(tcp) = &c else {
            unreachable!("a tcp listener")
        };
        let me = tcp.local_addr().expect("client address");
        let server = server_side_of(&d, me)
            .unwrap_or_else(|| panic!("{workers}: no socket in the daemon with peer {me}"));
        assert!(
            server.nodelay().expect("getsockopt TCP_NODELAY"),
            "{workers}: the proxy's client socket has Nagle on"
        );
        drop((server, c));
        d_stop(d);
    }
}

/// Clients that an echo server answers and holds open.
fn held(d: &Daemon, name: &str, n: usize) -> Vec<Stream> {
    (0..n)
        .map(|i| {
            let mut s = d.connect(name);
            s.write_all(b"hi\n").expect("write");
            assert_eq!(s.read_n(3), b"hi\n", "client {i} answered");
            s
        })
        .collect()
}

/// README promises that `max_connections` at or below `max_workers` refuses instead of
/// queueing. At equality the pool is full exactly when the cap is reached: a client over it
/// must be accepted and closed at once, not left in the kernel's backlog, in every model.
#[test]
fn max_connections_equal_to_max_workers_refuses_at_once_in_every_model() {
    for workers in MODELS {
        let d = Daemon::start(&format!(
            "[[listener]]\nname = \"e\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\n\
             handler = \"echo\"\nworkers = \"{workers}\"\nmax_workers = 3\nmax_connections = 3\n"
        ));
        let mut kept = held(&d, "e", 3);
        for i in 0..3 {
            assert!(
                d.connect("e").closed_within(IO_TIMEOUT),
                "{workers}: client {i} over the cap was not refused"
            );
        }
        d.wait_log("max_connections", IO_TIMEOUT);
        // A place frees when a held client leaves.
        drop(kept.pop());
        wait_until("a place after a close", READY_TIMEOUT, || {
            // Refused meanwhile: closed, or reset because the line was unread.
            let mut s = d.connect("e");
            let mut back = [0u8; 2];
            s.write_all(b"x\n").is_ok() && s.read_exact(&mut back).is_ok() && &back == b"x\n"
        });
        drop(kept);
        d_stop(d);
    }
}

/// Reads syslog datagrams until `want` returns true for the collected lines.
fn syslog_until(sock: &UnixDatagram, seen: &mut Vec<String>, want: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = vec![0u8; 65536];
    while !want(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "syslog lines so far:\n{}", seen.join("\n"));
        sock.set_read_timeout(Some(left)).expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

/// The pid in an RFC 3164 `socketd[PID]:` tag.
fn tag_pid(line: &str) -> i32 {
    let rest = line.split("socketd[").nth(1).expect("socketd[pid] tag");
    let pid = rest.split(']').next().expect("closing bracket");
    pid.parse()
        .unwrap_or_else(|e| panic!("pid {pid:?} in {line:?}: {e}"))
}

/// Every line of a forked listener (a worker's access line, a program's stderr, exit status
/// and access line) carries the daemon's pid, the pidfile's, not a fork server's or a
/// worker's: an operator grepping the daemon's pid sees them all.
#[test]
fn forked_listener_lines_carry_the_daemon_pid() {
    let dir = TestDir::new();
    let log_path = dir.path().join("log.sock");
    let sink = UnixDatagram::bind(&log_path).expect("bind the syslog sink");
    let mut config = format!(
        "[daemon]\nlog = \"syslog\"\naccess_log = \"syslog\"\n[daemon.syslog]\naddress = \"unix:{}\"\n\
         [[listener]]\nname = \"fecho\"\nprotocol = \"unix\"\naddress = \"{}/fecho.sock\"\n\
         handler = \"echo\"\nworkers = \"forked\"\n",
        log_path.display(),
        dir.path().display()
    );
    config.push_str(&exec_listener(
        "prog",
        "unix",
        &format!("{}/prog.sock", dir.path().display()),
        "forked",
        "{ argv = [\"/bin/sh\", \"-c\", \"echo complaint >&2; exit 3\"], stderr = \"log\" }",
    ));
    let d = Daemon::spawn(&config);
    let mut seen = Vec::new();
    syslog_until(&sink, &mut seen, |s| {
        s.iter().any(|l| l.contains("socketd ready"))
    });
    let mut s = Stream::unix(&dir.path().join("fecho.sock"));
    s.write_all(b"hello").expect("write");
    s.shutdown_write();
    assert_eq!(s.read_to_end_vec(), b"hello");
    let mut p = Stream::unix(&dir.path().join("prog.sock"));
    let _ = p.read_to_end_vec();
    let needles = [
        "access: listener `fecho`",
        "complaint",
        "exited with status 3",
        "access: listener `prog`",
    ];
    syslog_until(&sink, &mut seen, |s| {
        needles.iter().all(|n| s.iter().any(|l| l.contains(n)))
    });
    for line in &seen {
        assert_eq!(tag_pid(line), d.pid(), "not in the daemon's name: {line:?}");
    }
    d_stop(d);
}

/// `sshd -i` exits with status 255 when its client disconnects: its normal end, so it must
/// not be a warning, or warnings lose their meaning. The rule: a non-zero exit status after
/// the client had closed its side of the connection is the client's doing (info); with the
/// client still connected it is the program's failure (warn). Both exec worker models.
#[test]
fn exit_status_after_the_client_left_is_not_a_warning() {
    for workers in ["threaded", "forked"] {
        let mut toml = exec_listener(
            "after",
            "tcp",
            "127.0.0.1:0",
            workers,
            "{ argv = [\"/bin/sh\", \"-c\", \"cat >/dev/null; exit 255\"] }",
        );
        toml.push_str(&exec_listener(
            "before",
            "tcp",
            "127.0.0.1:0",
            workers,
            "{ argv = [\"/bin/sh\", \"-c\", \"exit 255\"] }",
        ));
        let d = Daemon::start(&toml);
        // The client leaves first: the program reads EOF and exits 255.
        let mut a = d.connect("after");
        a.write_all(b"bye").expect("write");
        a.shutdown_write();
        assert!(a.closed_within(IO_TIMEOUT), "{workers}: program ended");
        let line = d.wait_log("listener `after`: /bin/sh", IO_TIMEOUT);
        assert!(
            line.contains("INFO") && line.contains("status 255"),
            "{workers}: {line}"
        );
        // The program fails while the client is still there.
        let mut b = d.connect("before");
        assert!(b.closed_within(IO_TIMEOUT), "{workers}: program ended");
        let line = d.wait_log("listener `before`: /bin/sh", IO_TIMEOUT);
        assert!(
            line.contains("WARN") && line.contains("status 255"),
            "{workers}: {line}"
        );
        drop((a, b));
        d_stop(d);
    }
}

/// A chatty program cannot flood the log through its stderr: past a burst, lines are dropped
/// (at most a steady rate is logged) and what was dropped is counted in one line, so every
/// line is accounted for. Both exec worker models.
#[test]
fn a_chatty_programs_stderr_is_capped_and_the_drops_counted() {
    const LINES: usize = 5000;
    for workers in ["threaded", "forked"] {
        // The access line (to stderr, beside the daemon's log) marks the connection's end.
        let d = Daemon::start(&format!(
            "[daemon]\naccess_log = \"stderr\"\n{}",
            exec_listener(
                "chatty",
                "tcp",
                "127.0.0.1:0",
                workers,
                &format!(
                    "{{ argv = [\"/bin/sh\", \"-c\", \"seq 1 {LINES} >&2\"], stderr = \"log\" }}"
                ),
            )
        ));
        let mut c = d.connect("chatty");
        assert!(c.closed_within(IO_TIMEOUT), "{workers}: program ended");
        let summary = d.wait_log("stderr lines", IO_TIMEOUT);
        d.wait_log("access: listener `chatty`", IO_TIMEOUT);
        let log = d.log();
        let logged = log
            .lines()
            .filter(|l| {
                l.contains("listener `chatty` pid ")
                    && l.rsplit(": ")
                        .next()
                        .is_some_and(|n| n.parse::<usize>().is_ok())
            })
            .count();
        let dropped: usize = summary
            .split("pid ")
            .nth(1)
            .and_then(|r| r.split(": ").nth(1))
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{workers}: count in {summary:?}"));
        assert!(logged < LINES / 4, "{workers}: {logged} lines logged");
        assert_eq!(logged + dropped, LINES, "{workers}: {summary}");
        d_stop(d);
    }
}

/// The state letter of /proc/PID/stat (`Z` for a zombie), or `None` once it is reaped.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// A fork server that dies is reaped at once (no zombie until the daemon stops), logged, and
/// replaced by a new one forked from a surviving fork server (the daemon has threads by then),
/// which gets every forked listener's config and socket: after every original fork server has
/// been killed, forked TCP and UDP listeners still serve, and the daemon still stops cleanly.
#[test]
fn a_dead_fork_server_is_reaped_logged_and_replaced() {
    let d = Daemon::start(
        "[[listener]]\nname = \"tcp\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\n\
         handler = \"echo\"\nworkers = \"forked\"\n\
         [[listener]]\nname = \"udp\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:0\"\n\
         handler = \"echo\"\nworkers = \"forked\"\n",
    );
    let original = fork_servers(&d);
    for (i, victim) in original.iter().enumerate() {
        // SAFETY: kill sends a signal to a pid this test just read as the daemon's child.
        unsafe { libc::kill(*victim, libc::SIGKILL) };
        wait_until("the killed fork server reaped", READY_TIMEOUT, || {
            proc_state(*victim).is_none()
        });
        d.wait_log_count("is gone", i + 1, READY_TIMEOUT);
        wait_until("a replacement fork server", READY_TIMEOUT, || {
            let now = fork_servers(&d);
            now.len() == original.len() && !now.contains(victim)
        });
    }
    let log = d.log();
    assert!(
        log.contains(&format!("fork server (pid {}) is gone", original[0]))
            && log.contains("replaced by pid"),
        "{log}"
    );
    // Every fork server now is a replacement; each serves both listeners.
    for round in 0..original.len() * 2 {
        let mut s = d.connect("tcp");
        s.write_all(b"again\n").expect("write");
        assert_eq!(s.read_line(), "again\n", "tcp round {round}");
        let u = d.dgram("udp");
        assert_eq!(u.request(b"dgram"), b"dgram", "udp round {round}");
    }
    assert!(!d.log().contains("not started"), "{}", d.log());
    d_stop(d);
}
