//! Hostile conditions (issue 5), end to end: descriptor exhaustion under `RLIMIT_NOFILE` 64
//! with 100 clients held open, the soft limit raised to the hard one at start, a datagram
//! flood on one listener while another keeps answering (with the daemon's RSS watched), 200
//! clients sending random bytes and resetting, and the unix socket file rules (`mode`,
//! `owner`, `group`; stale file replaced; live socket, regular file and directory refused).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::protection::{connect_from, echoes, Wrapped};

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .expect("stat format");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |i: usize| fields[i].parse::<u64>().expect("a tick count");
    field(11) + field(12)
}

/// A `Name:   value kB` line of /proc/PID/status, in kB.
fn status_kb(pid: i32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in status"));
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a kB figure")
}

fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// (soft, hard) "Max open files" of a process.
fn nofile_limits(pid: i32) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc/PID/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let v: Vec<&str> = line.split_whitespace().collect();
    (v[3].to_string(), v[4].to_string())
}

const ECHO: &str = "[[listener]]\nname = \"echo\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n";

#[test]
fn fd_exhaustion_pauses_without_spinning_and_recovers() {
    fd_exhaustion("threaded");
}

/// The same with `workers = "event"`: the event loops accept, pause and retry themselves.
#[test]
fn fd_exhaustion_pauses_without_spinning_and_recovers_event() {
    fd_exhaustion("event");
}

/// The same with `workers = "forked"`: the fork servers accept, and the daemon, out of
/// descriptors for its copies of the connections, tells them to pause.
#[test]
fn fd_exhaustion_pauses_without_spinning_and_recovers_forked() {
    fd_exhaustion("forked");
}

fn fd_exhaustion(workers: &str) {
    let d = Daemon::start(&format!(
        "{ECHO}max_workers = 200\nworkers = \"{workers}\"\n"
    ));
    let addr = d.addr("echo");
    // Admitted with descriptors to spare: it must be served all along.
    let mut early = Stream::tcp(addr);
    assert!(echoes(&mut early), "served before the limit");
    // Soft and hard both, as if started under `prlimit --nofile=64:64`.
    let limit = run_with_timeout(
        {
            let mut c = std::process::Command::new("prlimit");
            c.args(["--pid", &d.pid().to_string(), "--nofile=64:64"]);
            c
        },
        READY_TIMEOUT,
    );
    assert!(
        limit.status.success(),
        "prlimit failed: {}",
        limit.describe()
    );
    let mut held: Vec<Stream> = (0..100).map(|_| Stream::tcp(addr)).collect();
    d.wait_log("accept failed", READY_TIMEOUT);
    assert_contains(&d.log(), &["pausing, retrying every 200ms"]);
    // Starved, the daemon waits on its retry timer: (almost) no CPU.
    let before = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(d.pid()) - before;
    eprintln!("daemon CPU while out of descriptors: {used} ticks in 2s");
    assert!(
        used <= 40,
        "the daemon used {used} clock ticks in 2s while out of descriptors"
    );
    assert_eq!(
        d.log().matches("accept failed").count(),
        1,
        "logged once per episode"
    );
    // Not asserted: at the very margin a burst can still leave an accepted connection's
    // handler without the second descriptor it needs (it is closed and logged); see
    // `protect::near_fd_limit`.
    // Clients that got in are served all along. (With fork servers accepting, the margin
    // can be any connection: the daemon may lose the knock of one accepted in the burst, and
    // the fork server closes it after its wait; see `worker::doorway`.)
    assert!(echoes(&mut early), "an accepted client is still served");
    if workers != "forked" {
        assert!(echoes(&mut held[0]), "an accepted client is still served");
    }
    held.clear();
    drop(early);
    let mut fresh = Stream::tcp(addr);
    fresh.set_read_timeout(Duration::from_secs(20));
    assert!(
        echoes(&mut fresh),
        "service returns once descriptors free up"
    );
    d.wait_log("accepting again", READY_TIMEOUT);
    // The daemon short of descriptors for what fork servers send it loses a message, not the
    // fork server.
    assert!(
        !d.log().contains("is gone"),
        "a fork server was lost:\n{}",
        d.log_dump()
    );
}

#[test]
fn soft_fd_limit_is_raised_to_the_hard_limit_at_start() {
    let d = Wrapped::start("prlimit", &["--nofile=256:4096"], ECHO);
    assert_eq!(
        nofile_limits(d.pid()),
        ("4096".into(), "4096".into()),
        "soft limit not raised\n{}",
        d.log_text()
    );
}

#[test]
fn datagram_flood_on_one_listener_does_not_starve_another() {
    let d = Daemon::start(&format!(
        "{ECHO}[[listener]]\nname = \"flood\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n"
    ));
    let (calm, flood) = (d.addr("echo"), d.addr("flood"));
    let rss_before = status_kb(d.pid(), "VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..2)
        .map(|i| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                let payload = pseudo_random(1400, i + 1);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if s.send_to(&payload, flood).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    let (mut rounds, mut worst, mut rss_peak) = (0, Duration::ZERO, rss_before);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let t = Instant::now();
        assert!(
            echoes(&mut connect_from("127.0.0.1", calm)),
            "the calm listener stopped answering"
        );
        worst = worst.max(t.elapsed());
        rounds += 1;
        rss_peak = rss_peak.max(status_kb(d.pid(), "VmRSS"));
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = senders.into_iter().map(|h| h.join().expect("sender")).sum();
    eprintln!(
        "flood: {sent} datagrams sent in 4s; calm listener: {rounds} round trips, worst {worst:?}; \
         VmRSS {rss_before} kB before, {rss_peak} kB peak"
    );
    assert!(sent > 1000, "the flood was not a flood ({sent} datagrams)");
    assert!(
        worst < Duration::from_secs(2),
        "a calm round trip took {worst:?}"
    );
    // Bounded: at most max_workers datagrams (64 KiB buffers) and threads in flight.
    assert!(
        rss_peak < rss_before + 64 * 1024,
        "VmRSS grew from {rss_before} kB to {rss_peak} kB"
    );
    assert_eq!(
        Dgram::udp(flood).request(b"after"),
        b"after",
        "the flooded listener recovers"
    );
}

#[test]
fn two_hundred_clients_sending_garbage_and_resetting() {
    let d = Daemon::start(&format!(
        "{ECHO}[[listener]]\nname = \"cg\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"chargen\"\n\
         [[listener]]\nname = \"day\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"daytime\"\n\
         [[listener]]\nname = \"dis\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"discard\"\n"
    ));
    let targets = [d.addr("echo"), d.addr("cg"), d.addr("day"), d.addr("dis")];
    let fds_before = open_fds(d.pid());
    let threads: Vec<_> = (0..10u64)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..20u64 {
                    let seed = t * 100 + i + 1;
                    let garbage = pseudo_random(1 + (seed as usize * 7919) % 20_000, seed);
                    let Stream::Tcp(mut s) = Stream::tcp(targets[(seed % 4) as usize]) else {
                        unreachable!()
                    };
                    let _ = s.write_all(&garbage);
                    if seed % 3 == 0 {
                        let mut buf = [0u8; 512];
                        let _ = s.read(&mut buf);
                    }
                    if seed % 2 == 0 {
                        // Close with RST instead of FIN.
                        socket2::SockRef::from(&s)
                            .set_linger(Some(Duration::ZERO))
                            .expect("SO_LINGER");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread panicked");
    }
    assert!(d.is_running(), "the daemon died\n{}", d.log_dump());
    assert!(echoes(&mut Stream::tcp(d.addr("echo"))), "still serving");
    wait_until(
        "every connection's descriptors to be closed",
        Duration::from_secs(15),
        || open_fds(d.pid()) <= fds_before,
    );
    let log = d.log();
    assert!(!log.contains("panicked"), "a handler panicked\n{log}");
}

fn unix_echo(path: &Path, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"u\"\nprotocol = \"unix\"\naddress = \"{}\"\nhandler = \"echo\"\n{extra}\n",
        path.display()
    )
}

#[test]
fn unix_socket_mode_and_ownership_are_in_place_before_accepting() {
    let root = nix::unistd::geteuid().is_root();
    let (owner, group) = if root { ("65534", "65534") } else { ("", "") };
    let ids = if root {
        format!("owner = \"{owner}\"\ngroup = \"{group}\"\n")
    } else {
        String::new()
    };
    let d = Daemon::start(&format!(
        "[[listener]]\nname = \"u\"\nprotocol = \"unix\"\naddress = \"{{dir}}/u.sock\"\nhandler = \"echo\"\nmode = \"0660\"\n{ids}"
    ));
    let path = d.path("u");
    let meta = fs::metadata(&path).expect("the socket file");
    assert_eq!(meta.mode() & 0o7777, 0o660, "mode");
    if root {
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "owner and group");
    } else {
        eprintln!("owner/group not tested: needs root");
    }
    let leftovers: Vec<_> = fs::read_dir(d.dir())
        .expect("read the dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".socketd-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary entries left: {leftovers:?}"
    );
    assert!(echoes(&mut Stream::unix(&path)), "serves at the final path");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = TestDir::new();
    let path = dir.path().join("stale.sock");
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists(), "the dead listener left its file");
    let _d = Daemon::start(&unix_echo(&path, ""));
    assert!(echoes(&mut Stream::unix(&path)));
}

/// Start a daemon expected to refuse `path`; returns its log.
fn refused_start(path: &Path) -> String {
    let mut d = Daemon::spawn(&unix_echo(path, ""));
    let status = d.wait_exit(READY_TIMEOUT);
    assert_exit_code(status, 3, &d);
    d.log()
}

#[test]
fn a_live_socket_at_the_path_is_refused_and_left_alone() {
    let dir = TestDir::new();
    let path = dir.path().join("live.sock");
    let owner = UnixListener::bind(&path).expect("bind");
    let log = refused_start(&path);
    assert_contains(
        &log,
        &[
            &format!("another process is listening on {}", path.display()),
            "listener `u`",
        ],
    );
    // socketd's liveness probe left a connection in our backlog; ours is the one that talks.
    let mut c = std::os::unix::net::UnixStream::connect(&path).expect("our socket still answers");
    c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    c.write_all(b"hello").expect("write");
    owner.set_nonblocking(false).expect("blocking");
    let ours = (0..3).find_map(|_| {
        let (mut s, _) = owner.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)
            .ok()
            .filter(|()| &buf == b"hello")
            .map(|()| s)
    });
    ours.expect("our client reached our socket")
        .write_all(b"mine")
        .expect("write");
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"mine");
}

#[test]
fn a_regular_file_or_directory_at_the_path_is_refused_and_left_alone() {
    let dir = TestDir::new();
    let file = dir.path().join("precious.txt");
    fs::write(&file, "keep me").expect("write");
    let log = refused_start(&file);
    assert_contains(
        &log,
        &[&format!("{} exists and is not a socket", file.display())],
    );
    assert_eq!(fs::read_to_string(&file).expect("still there"), "keep me");
    let sub = dir.path().join("a-directory");
    fs::create_dir(&sub).expect("mkdir");
    fs::write(sub.join("inside"), "x").expect("write");
    let log = refused_start(&sub);
    assert_contains(
        &log,
        &[&format!("{} exists and is not a socket", sub.display())],
    );
    assert!(sub.join("inside").exists(), "the directory is untouched");
}
