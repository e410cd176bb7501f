//! What the log says and in whose name: input any local user can send must not be able to
//! flood it at warn level, and a forked worker's lines over syslog carry the worker's own pid.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Datagrams from an unbound Unix socket cannot be answered. Any local user can send them as
/// fast as they like, so each one must not cost a warn line (debug at most).
#[test]
fn unanswerable_unix_datagrams_are_not_logged_at_warn() {
    let d = Daemon::start(
        "[[listener]]\nname = \"udg\"\nprotocol = \"unix-dgram\"\naddress = \"{dir}/udg.sock\"\nhandler = \"echo\"\n",
    );
    let path = d.path("udg");
    let anonymous = UnixDatagram::unbound().expect("unbound socket");
    for i in 0..20 {
        anonymous
            .send_to(format!("nobody {i}").as_bytes(), &path)
            .expect("send from an unbound socket");
    }
    // A bound client's echo shows the daemon is serving; give the 20 before it time to finish.
    let c = d.dgram("udg");
    c.send(b"somebody");
    assert_eq!(c.recv(), b"somebody");
    std::thread::sleep(Duration::from_millis(300));
    let log = d.log();
    assert!(
        !log.contains("no address to reply"),
        "an unanswerable datagram was logged at info or above:\n{log}"
    );
    assert!(!log.contains("WARN"), "unexpected warnings:\n{log}");
}

/// Reads syslog datagrams until one contains `needle`.
fn wait_syslog(sock: &UnixDatagram, needle: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(m.clone());
            if m.contains(needle) {
                return m;
            }
        }
    }
    panic!(
        "no syslog message with {needle:?}; got:\n{}",
        seen.join("\n")
    );
}

/// The pid in an RFC 3164 `socketd[PID]:` tag.
fn tag_pid(line: &str) -> i32 {
    let rest = line.split("socketd[").nth(1).expect("socketd[pid] tag");
    let pid = rest.split(']').next().expect("closing bracket");
    pid.parse()
        .unwrap_or_else(|e| panic!("pid {pid:?} in {line:?}: {e}"))
}

/// A forked worker's own lines over syslog name the worker's pid, not the daemon's (which the
/// logger saw when it was set up): here its debug line for a datagram. Its connections' access
/// lines are written by the daemon's access log sink (`access_log = "syslog"`), so they carry
/// the daemon's pid and count in its metrics.
#[test]
fn forked_workers_log_with_their_own_pid_over_syslog() {
    let dir = TestDir::new();
    let log_path = dir.path().join("log.sock");
    let sink = UnixDatagram::bind(&log_path).expect("bind the syslog sink");
    let config = format!(
        "[daemon]\nlog = \"syslog\"\nlog_level = \"debug\"\naccess_log = \"syslog\"\n\
         shutdown_timeout = \"1s\"\n[daemon.syslog]\naddress = \"unix:{}\"\n\
         [[listener]]\nname = \"fecho\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n\
         workers = \"forked\"\n\
         [[listener]]\nname = \"fudp\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n\
         workers = \"forked\"\n",
        log_path.display()
    );
    let mut d = Daemon::spawn(&config);
    let mut seen = Vec::new();
    let ready = wait_syslog(&sink, "socketd ready: 2 listeners", &mut seen);
    assert_eq!(
        tag_pid(&ready),
        d.pid(),
        "the daemon's own lines: {ready:?}"
    );
    let addr_of = |proto: &str, name: &str| -> std::net::SocketAddr {
        let line = seen
            .iter()
            .find(|m| m.contains(&format!("listener `{name}` listening on {proto} ")))
            .expect("listening line");
        line.rsplit(' ')
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("address in {line:?}"))
    };
    let (tcp, udp) = (addr_of("tcp", "fecho"), addr_of("udp", "fudp"));
    let mut s = Stream::tcp(tcp);
    s.write_all(b"hello").expect("write");
    s.shutdown_write();
    assert_eq!(s.read_to_end_vec(), b"hello");
    let access = wait_syslog(&sink, "access: listener `fecho`", &mut seen);
    assert!(access.contains(" in 5 out 5 outcome ok"), "{access}");
    assert_eq!(
        tag_pid(&access),
        d.pid(),
        "the access line is written by the daemon's sink: {access:?}"
    );
    let c = Dgram::udp(udp);
    assert_eq!(c.request(b"ping"), b"ping");
    let worker_line = wait_syslog(&sink, "access: listener `fudp`", &mut seen);
    assert_ne!(
        tag_pid(&worker_line),
        d.pid(),
        "a forked worker's own line carries the daemon's pid: {worker_line:?}"
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}
