//! Binary upgrade (`socketd upgrade`, SIGUSR2): the running daemon starts the binary at its
//! own path with every listening socket, and stops accepting only once the new process
//! serves. Under load nothing is refused, reset or lost; a failed new binary is rolled back.
//!
//! Each daemon here runs from a copy of the binary in its temp dir, so a test can put another
//! binary (a copy, a script that fails) at that path the way a package upgrade does.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use crate::services::listener;

/// The name of the daemon's binary in its temp dir.
const BIN: &str = "socketd-under-test";
/// How long the old process may take to drain and exit after handing over.
const HANDOVER_BUDGET: Duration = Duration::from_secs(15);

/// The four kinds of echo listener plus one for a long connection, a pidfile and the given
/// `upgrade_timeout`.
fn config(upgrade_timeout: &str) -> String {
    format!(
        "[daemon]\npidfile = \"{{dir}}/socketd.pid\"\nshutdown_timeout = \"20s\"\n\
         upgrade_timeout = \"{upgrade_timeout}\"\n{}{}{}{}{}",
        listener("tcp", "tcp", "127.0.0.1:0", "echo"),
        listener("udp", "udp", "127.0.0.1:0", "echo"),
        listener("unix", "unix", "{dir}/stream.sock", "echo"),
        // A mode: bound in a private directory and renamed into place, so the socket's own
        // address is not its path (the hand-over must carry the path).
        listener("dgram", "unix-dgram", "{dir}/dgram.sock", "echo") + "mode = \"0666\"\n",
        listener("long", "tcp", "127.0.0.1:0", "echo"),
    )
}

/// Start the daemon from a copy of the binary in its own temp dir.
fn start(config_toml: &str) -> Daemon {
    let d = Daemon::spawn_with(config_toml, |dir, cfg| {
        let bin = dir.join(BIN);
        copy_binary(Path::new(SOCKETD), &bin);
        let mut cmd = command(&bin);
        cmd.arg("--config").arg(cfg);
        cmd
    });
    d.wait_ready();
    d
}

/// Copy an executable with `cp`, so this (multi-threaded) test process never holds it open
/// for writing: a child forked meanwhile by another test would inherit that descriptor, and
/// executing the file while any process has it open for writing fails with ETXTBSY.
fn copy_binary(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp {} {}: {status}",
        from.display(),
        to.display()
    );
}

/// Put `bin` at the daemon's binary path the way a package manager does (a new file renamed
/// over the old one: the running binary cannot be written).
fn install(d: &Daemon, write: impl FnOnce(&Path)) {
    let temp = d.dir().join(".new-binary");
    write(&temp);
    std::fs::rename(&temp, d.dir().join(BIN)).expect("rename the new binary into place");
}

fn install_copy(d: &Daemon) {
    install(d, |p| copy_binary(Path::new(SOCKETD), p));
}

fn install_script(d: &Daemon, body: &str) {
    install(d, |p| {
        use std::os::unix::fs::PermissionsExt;
        let text = p.with_extension("txt");
        std::fs::write(&text, format!("#!/bin/sh\n{body}\n")).expect("write the script");
        std::fs::set_permissions(&text, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        copy_binary(&text, p);
    });
}

/// `socketd upgrade` for the daemon `d`.
fn upgrade(d: &Daemon) -> CmdOutput {
    let mut cmd = socketd_cmd();
    cmd.arg("--config").arg(d.config_path()).arg("upgrade");
    run_with_timeout(cmd, Duration::from_secs(30))
}

fn pid_in_pidfile(d: &Daemon) -> i32 {
    let text = std::fs::read_to_string(d.dir().join("socketd.pid")).expect("read the pidfile");
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("pidfile holds {text:?}"))
}

/// A daemon process that is not the test's child (the new process of an upgrade): SIGKILLed
/// on drop if still running, so a failing test leaves nothing behind.
struct Successor {
    pid: i32,
}

impl Successor {
    fn alive(&self) -> bool {
        alive(self.pid)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) has no memory effects; the pid is checked alive just before (the
        // window in which it could be recycled is this one line).
        if self.alive() {
            unsafe { libc::kill(self.pid, sig) };
        }
    }

    fn wait_gone(&self, timeout: Duration) {
        wait_until(&format!("pid {} to exit", self.pid), timeout, || {
            !self.alive()
        });
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    crate::forked::processes()
        .iter()
        .any(|(p, _, state)| *p == pid && *state != 'Z' && *state != 'X')
}

/// Upgrade `d`'s current process (`from`) and return the new one, checking the pidfile moved.
#[track_caller]
fn upgrade_ok(d: &Daemon, from: i32) -> Successor {
    let out = upgrade(d);
    assert_eq!(out.code(), Some(0), "{}\n{}", out.describe(), d.log_dump());
    let new = pid_in_pidfile(d);
    assert_ne!(new, from, "the pidfile still names the old process");
    assert_contains(
        &out.stdout,
        &[&format!("upgraded: pid {from} -> pid {new}")],
    );
    Successor { pid: new }
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Counts {
    connections: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    other_errors: AtomicU64,
    datagrams_sent: AtomicU64,
    datagrams_lost: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Counts {
    fn error(&self, what: &str, e: &std::io::Error) {
        let counter = match e.kind() {
            ErrorKind::ConnectionRefused => &self.refused,
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => {
                &self.reset
            }
            _ => &self.other_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| format!("{what}: {e}"));
    }

    fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "connections made {}, refused {}, reset {}, other errors {}, datagrams sent {}, \
             lost {}; first error: {:?}",
            g(&self.connections),
            g(&self.refused),
            g(&self.reset),
            g(&self.other_errors),
            g(&self.datagrams_sent),
            g(&self.datagrams_lost),
            self.first_error.lock().map(|e| e.clone()).unwrap_or(None)
        )
    }

    fn clean(&self) -> bool {
        [
            &self.refused,
            &self.reset,
            &self.other_errors,
            &self.datagrams_lost,
        ]
        .iter()
        .all(|a| a.load(Ordering::Relaxed) == 0)
    }
}

/// Four clients (TCP, UDP, unix stream, unix datagram) echoing as fast as they can until
/// stopped, each one request at a time, counting every failure. Bounded: each stops after
/// `MAX_OPS` operations or when the load is stopped.
struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    ops: Vec<Arc<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

const MAX_OPS: u64 = 200_000;

impl Load {
    fn start(d: &Daemon) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let mut load = Load {
            stop,
            counts,
            ops: Vec::new(),
            threads: Vec::new(),
        };
        let (tcp, udp) = (d.addr("tcp"), d.addr("udp"));
        let (unix, dgram) = (d.path("unix"), d.path("dgram"));
        let own = d.dir().join("load-client.sock");
        load.spawn(move |c, n| stream_client(|| TcpStream::connect(tcp), c, n));
        load.spawn(move |c, n| stream_client(|| UnixStream::connect(&unix), c, n));
        load.spawn(move |c, n| udp_client(udp, c, n));
        load.spawn(move |c, n| unix_dgram_client(&dgram, &own, c, n));
        load
    }

    fn spawn(&mut self, f: impl FnOnce(&Counts, &dyn Fn() -> bool) + Send + 'static) {
        let ops = Arc::new(AtomicU64::new(0));
        self.ops.push(Arc::clone(&ops));
        let (stop, counts) = (Arc::clone(&self.stop), Arc::clone(&self.counts));
        self.threads.push(std::thread::spawn(move || {
            let go = || {
                let n = ops.fetch_add(1, Ordering::Relaxed);
                n < MAX_OPS && !stop.load(Ordering::Relaxed)
            };
            f(&counts, &go);
        }));
    }

    /// Wait until every client has done `more` operations beyond what it had done now.
    fn wait_for(&self, more: u64) {
        let target: Vec<u64> = self
            .ops
            .iter()
            .map(|o| o.load(Ordering::Relaxed) + more)
            .collect();
        wait_until(
            "every client to make progress",
            Duration::from_secs(30),
            || {
                self.ops
                    .iter()
                    .zip(&target)
                    .all(|(o, t)| o.load(Ordering::Relaxed) >= *t)
            },
        );
    }

    fn finish(mut self) -> Arc<Counts> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("a load client panicked");
        }
        Arc::clone(&self.counts)
    }
}

/// Connect, send one line, read the echo, close; again.
fn stream_client<S: Read + Write>(
    connect: impl Fn() -> std::io::Result<S>,
    counts: &Counts,
    go: &dyn Fn() -> bool,
) {
    let mut i = 0u64;
    while go() {
        i += 1;
        let msg = format!("stream {i}\n");
        let mut s = match connect() {
            Ok(s) => s,
            Err(e) => {
                counts.error("connect", &e);
                continue;
            }
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        let mut back = vec![0u8; msg.len()];
        let r = s
            .write_all(msg.as_bytes())
            .and_then(|()| s.read_exact(&mut back));
        match r {
            Ok(()) if back == msg.as_bytes() => {}
            Ok(()) => counts.error(
                "echo",
                &std::io::Error::other(format!("sent {msg:?}, got {:?}", lossy(&back))),
            ),
            Err(e) => counts.error("echo", &e),
        }
    }
}

fn set_timeouts_udp(s: &UdpSocket) {
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
}

/// Send one numbered datagram, wait for its echo; a missing echo is a lost datagram.
fn udp_client(server: SocketAddr, counts: &Counts, go: &dyn Fn() -> bool) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.connect(server).expect("connect");
    set_timeouts_udp(&s);
    dgram_loop(counts, go, |m| s.send(m), |b| s.recv(b));
}

fn unix_dgram_client(server: &Path, own: &Path, counts: &Counts, go: &dyn Fn() -> bool) {
    let s = UnixDatagram::bind(own).expect("bind the client");
    s.connect(server).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    dgram_loop(counts, go, |m| s.send(m), |b| s.recv(b));
    let _ = std::fs::remove_file(own);
}

fn dgram_loop(
    counts: &Counts,
    go: &dyn Fn() -> bool,
    send: impl Fn(&[u8]) -> std::io::Result<usize>,
    recv: impl Fn(&mut [u8]) -> std::io::Result<usize>,
) {
    let mut i = 0u64;
    let mut buf = [0u8; 256];
    while go() {
        i += 1;
        let msg = format!("datagram {i}");
        if let Err(e) = send(msg.as_bytes()) {
            counts.error("send", &e);
            continue;
        }
        counts.datagrams_sent.fetch_add(1, Ordering::Relaxed);
        // Replies to earlier (late) datagrams are skipped; only this one's echo counts.
        loop {
            match recv(&mut buf) {
                Ok(n) if buf[..n] == *msg.as_bytes() => break,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {
                    counts.datagrams_lost.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    counts.error("recv", &e);
                    break;
                }
            }
        }
    }
}

/// The kinds of descriptor a process holds (`socket`, `pipe`, `anon_inode:[eventfd]`, file
/// paths), counted, and the inodes of its sockets.
fn fd_table(pid: i32) -> (std::collections::BTreeMap<String, usize>, Vec<String>) {
    let mut kinds = std::collections::BTreeMap::new();
    let mut sockets = Vec::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd");
    for e in dir.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy().into_owned();
        let kind = if t.starts_with("socket:") {
            sockets.push(t.clone());
            "socket".to_string()
        } else if t.starts_with("pipe:") {
            "pipe".to_string()
        } else {
            t
        };
        *kinds.entry(kind).or_default() += 1;
    }
    (kinds, sockets)
}

/// The socket inodes of a process's listeners: the sockets bound to the listeners' addresses,
/// as `ss` would show them, found here from /proc/net (TCP, UDP) and /proc/net/unix.
fn listener_inodes(d: &Daemon) -> Vec<String> {
    let mut out = Vec::new();
    for (name, file) in [("tcp", "tcp"), ("long", "tcp"), ("udp", "udp")] {
        let port = format!(":{:04X}", d.addr(name).port());
        let table = std::fs::read_to_string(format!("/proc/net/{file}")).expect("/proc/net");
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Listening (0A) TCP sockets, or UDP, bound on that port.
            if f[1].ends_with(&port) && (file == "udp" || f[3] == "0A") {
                out.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    // Unix sockets by the address they were bound to: in the daemon's dir (a socket with a
    // mode was bound in a private directory there, then renamed into place). No client
    // socket of the test is bound in the dir at this point.
    let unix = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    let dir = d.dir().display().to_string();
    for line in unix.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 8 && f[7].starts_with(&dir) {
            out.push(format!("socket:[{}]", f[6]));
        }
    }
    out.sort();
    out
}

#[test]
fn upgrade_under_load_refuses_resets_and_loses_nothing() {
    let mut d = start(&config("20s"));
    let old = d.pid();
    let mut long = d.connect("long");
    long.write_all(b"before\n").expect("send");
    assert_eq!(long.read_line(), "before\n");
    let load = Load::start(&d);
    load.wait_for(200);

    install_copy(&d);
    let new = upgrade_ok(&d, old);
    d.wait_log("upgrade: pid", READY_TIMEOUT);
    load.wait_for(500);
    let counts = load.finish();
    eprintln!("upgrade under load: {}", counts.summary());
    assert!(counts.clean(), "{}\n{}", counts.summary(), d.log_dump());

    // The long connection is still the old process's: it answers, and the old process waits.
    long.write_all(b"after\n").expect("send");
    assert_eq!(long.read_line(), "after\n");
    assert!(
        d.is_running(),
        "the old process left before its connection ended"
    );
    drop(long);
    assert_exit_code(d.wait_exit(HANDOVER_BUDGET), 0, &d);
    for name in ["unix", "dgram"] {
        assert!(d.path(name).exists(), "{name}'s socket file was removed");
    }
    // The new process serves every listener, and removes the socket files when it stops.
    let mut s = d.connect("unix");
    s.write_all(b"new\n").expect("send");
    assert_eq!(s.read_line(), "new\n");
    drop(s);
    assert_eq!(d.dgram("udp").request(b"new"), b"new");
    new.signal(libc::SIGTERM);
    new.wait_gone(STOP_BUDGET);
    for name in ["unix", "dgram"] {
        assert!(
            !d.path(name).exists(),
            "{name}'s socket file left after the stop"
        );
    }
    assert!(
        !d.dir().join("socketd.pid").exists(),
        "pidfile left after the stop"
    );
}

#[test]
fn ten_upgrades_in_a_row_under_load() {
    let mut d = start(&config("20s"));
    let load = Load::start(&d);
    load.wait_for(100);
    let mut current = Successor { pid: d.pid() };
    let mut previous: Vec<Successor> = Vec::new();
    for _ in 0..10 {
        install_copy(&d);
        let next = upgrade_ok(&d, current.pid);
        load.wait_for(50);
        previous.push(std::mem::replace(&mut current, next));
    }
    let counts = load.finish();
    eprintln!("ten upgrades under load: {}", counts.summary());
    assert!(counts.clean(), "{}\n{}", counts.summary(), d.log_dump());
    assert_exit_code(d.wait_exit(HANDOVER_BUDGET), 0, &d);
    for p in &previous {
        p.wait_gone(HANDOVER_BUDGET);
    }
    current.signal(libc::SIGTERM);
    current.wait_gone(STOP_BUDGET);
    std::mem::forget(previous);
}

#[test]
fn the_new_process_holds_its_listeners_and_nothing_of_the_old_one() {
    let mut d = start(&config("20s"));
    let old = d.pid();
    let listeners = listener_inodes(&d);
    assert_eq!(listeners.len(), 5, "{listeners:?}");
    let (old_kinds, old_sockets) = fd_table(old);
    for l in &listeners {
        assert!(old_sockets.contains(l), "old process lacks listener {l}");
    }
    install_copy(&d);
    let new = upgrade_ok(&d, old);
    assert_exit_code(d.wait_exit(HANDOVER_BUDGET), 0, &d);
    let (new_kinds, new_sockets) = fd_table(new.pid);
    // The same listening sockets (adopted, not bound again) ...
    assert_eq!(listener_inodes(&d), listeners, "the listeners changed");
    for l in &listeners {
        assert!(new_sockets.contains(l), "new process lacks listener {l}");
    }
    // ... and otherwise what a freshly started daemon holds: as many sockets (listeners,
    // their reply handles, its own fork server, signal and notify sockets) as the old process
    // had, no pipe (the readiness and output pipes are closed), nothing of any kind more
    // than the old process had at its start. (The old one may hold descriptors the test
    // runner leaked into it; the new one is started with everything above its own closed.)
    assert_eq!(
        new_kinds.get("socket"),
        old_kinds.get("socket"),
        "sockets: new {new_kinds:?}, old {old_kinds:?}"
    );
    assert_eq!(new_kinds.get("pipe"), None, "new {new_kinds:?}");
    for (kind, n) in &new_kinds {
        assert!(
            old_kinds.get(kind).is_some_and(|o| n <= o),
            "the new process has {n} x {kind}; the old one had {:?}\nnew {new_kinds:?}\nold \
             {old_kinds:?}",
            old_kinds.get(kind)
        );
    }
    new.signal(libc::SIGTERM);
    new.wait_gone(STOP_BUDGET);
}

/// After a failed upgrade: the old process still serves everything, and still owns the
/// pidfile; a later good upgrade still works.
#[track_caller]
fn still_serving(d: &Daemon) {
    assert!(d.is_running(), "the old process exited\n{}", d.log_dump());
    assert_eq!(pid_in_pidfile(d), d.pid(), "the pidfile moved");
    let mut s = d.connect("tcp");
    s.write_all(b"still\n").expect("send");
    assert_eq!(s.read_line(), "still\n");
    assert_eq!(d.dgram("dgram").request(b"still"), b"still");
}

#[test]
fn a_new_binary_that_exits_at_start_is_rolled_back() {
    let mut d = start(&config("10s"));
    install_script(
        &d,
        "echo 'new build: cannot start, missing libfoo' >&2\nexit 1",
    );
    let out = upgrade(&d);
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    let line = d.wait_log("upgrade failed:", READY_TIMEOUT);
    assert_contains(
        &line,
        &[
            "the new process exited with status 1 before it was ready",
            "new build: cannot start, missing libfoo",
            &format!("still serving as pid {}", d.pid()),
        ],
    );
    still_serving(&d);
    let old = d.pid();
    install_copy(&d);
    let new = upgrade_ok(&d, old);
    assert_exit_code(d.wait_exit(HANDOVER_BUDGET), 0, &d);
    new.signal(libc::SIGTERM);
    new.wait_gone(STOP_BUDGET);
}

#[test]
fn a_new_binary_that_never_gets_ready_is_killed_and_rolled_back() {
    let mut d = start(&config("1s"));
    install_script(&d, "echo 'waiting for something' >&2\nexec sleep 60");
    let out = upgrade(&d);
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    let line = d.wait_log("upgrade failed:", READY_TIMEOUT);
    assert_contains(&line, &["was not ready within 1s", "waiting for something"]);
    still_serving(&d);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(
        !d.path("unix").exists(),
        "the old process keeps its socket files"
    );
}

#[test]
fn a_second_upgrade_during_one_is_refused() {
    let mut d = start(&config("3s"));
    install_script(&d, "exec sleep 60");
    d.signal(libc::SIGUSR2);
    d.wait_log("upgrade: started", READY_TIMEOUT);
    d.signal(libc::SIGUSR2);
    d.wait_log(
        "upgrade refused: an upgrade is already in progress",
        READY_TIMEOUT,
    );
    d.wait_log("upgrade failed:", READY_TIMEOUT);
    still_serving(&d);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn the_pidfile_and_its_lock_pass_to_the_new_process_without_a_gap() {
    let mut d = start(&config("20s"));
    let old = d.pid();
    install_copy(&d);
    let new = upgrade_ok(&d, old);
    let (bin, cfg) = (d.dir().join(BIN), d.config_path().to_path_buf());
    let second = || {
        let mut cmd = command(&bin);
        cmd.arg("--config").arg(&cfg);
        let out = run_with_timeout(cmd, READY_TIMEOUT);
        assert_eq!(out.code(), Some(3), "{}", out.describe());
        assert_contains(
            &out.stderr,
            &[&format!("another socketd (pid {}) is running", new.pid)],
        );
    };
    // While both processes run (they share the lock) ...
    second();
    assert_exit_code(d.wait_exit(HANDOVER_BUDGET), 0, &d);
    // ... and after the old one has exited (it left the lock and the file to the new one).
    second();
    assert_eq!(pid_in_pidfile(&d), new.pid);
    new.signal(libc::SIGTERM);
    new.wait_gone(STOP_BUDGET);
    assert!(
        !d.dir().join("socketd.pid").exists(),
        "pidfile left after the stop"
    );
}

#[test]
fn a_new_process_that_cannot_bind_is_rolled_back_and_the_pidfile_lock_stays() {
    let mut d = start(&config("10s"));
    install_copy(&d);
    // The new config adds a listener on a port someone else holds: the new process fails at
    // bind, after it took its share of the pidfile's lock.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    d.write_config(&format!(
        "{}{}",
        config("10s"),
        listener("extra", "tcp", &format!("127.0.0.1:{port}"), "echo")
    ));
    let out = upgrade(&d);
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    let line = d.wait_log("upgrade failed:", READY_TIMEOUT);
    assert_contains(
        &line,
        &["listener `extra`: cannot listen on tcp 127.0.0.1:"],
    );
    still_serving(&d);
    // The failed process must not have released the lock it shared with the old one.
    let mut cmd = command(&d.dir().join(BIN));
    cmd.arg("--config").arg(d.config_path());
    let second = run_with_timeout(cmd, READY_TIMEOUT);
    assert_eq!(second.code(), Some(3), "{}", second.describe());
    assert_contains(
        &second.stderr,
        &[&format!("another socketd (pid {}) is running", d.pid())],
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn forked_workers_and_exec_programs_finish_on_the_old_process() {
    // One program per connection that answers a line with its pid, under both worker models.
    let program = r#"{ argv = ["/bin/sh", "-c", "read line; echo \"$$ $line\""] }"#;
    let config = format!(
        "[daemon]\npidfile = \"{{dir}}/socketd.pid\"\nshutdown_timeout = \"20s\"\n{}{}{}",
        crate::exec::exec_listener("forked", "tcp", "127.0.0.1:0", "forked", program),
        crate::exec::exec_listener("threaded", "tcp", "127.0.0.1:0", "threaded", program),
        listener("echo", "tcp", "127.0.0.1:0", "echo") + "workers = \"forked\"\n",
    );
    let mut d = start(&config);
    let old = d.pid();
    // Connections the old process accepted, with their programs and forked worker running.
    let mut open: Vec<(&str, Stream)> = ["forked", "threaded", "echo"]
        .into_iter()
        .map(|name| (name, d.connect(name)))
        .collect();
    let (_, echo) = &mut open[2];
    echo.write_all(b"first\n").expect("send");
    assert_eq!(echo.read_line(), "first\n");
    install_copy(&d);
    let new = upgrade_ok(&d, old);
    // The new process serves new connections meanwhile.
    let mut fresh = d.connect("threaded");
    fresh.write_all(b"fresh\n").expect("send");
    assert!(fresh.read_line().ends_with(" fresh\n"));
    assert!(
        d.is_running(),
        "the old process did not wait for its connections"
    );
    for (name, mut s) in open {
        s.write_all(b"after\n").expect("send");
        let line = s.read_line();
        assert!(
            line.ends_with("after\n"),
            "{name}: {line:?}\n{}",
            d.log_dump()
        );
    }
    assert_exit_code(d.wait_exit(HANDOVER_BUDGET), 0, &d);
    assert!(
        !d.log().contains("shutdown_timeout reached"),
        "the old process cut its work short\n{}",
        d.log_dump()
    );
    new.signal(libc::SIGTERM);
    new.wait_gone(STOP_BUDGET);
}

#[test]
fn a_detached_daemon_is_upgraded_through_its_pidfile() {
    let dir = TestDir::new();
    let cfg = dir.write("socketd.toml", &config("20s"));
    let bin = dir.path().join(BIN);
    copy_binary(Path::new(SOCKETD), &bin);
    let mut cmd = command(&bin);
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--daemon")
        .current_dir(dir.path());
    let out = run_with_timeout(cmd, READY_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let pidfile = dir.path().join("socketd.pid");
    let read_pid = || -> i32 {
        let text = std::fs::read_to_string(&pidfile).expect("pidfile");
        text.trim().parse().expect("a pid")
    };
    let old = Successor { pid: read_pid() };
    let sock = dir.path().join("stream.sock");
    let echo = |msg: &str| {
        let mut s = Stream::unix(&sock);
        s.write_all(msg.as_bytes()).expect("send");
        s.read_line()
    };
    assert_eq!(echo("before\n"), "before\n");

    let temp = dir.path().join(".new");
    copy_binary(Path::new(SOCKETD), &temp);
    std::fs::rename(&temp, &bin).expect("install the new binary");
    let mut up = socketd_cmd();
    up.arg("--config").arg(&cfg).arg("upgrade");
    let out = run_with_timeout(up, Duration::from_secs(30));
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let new = Successor { pid: read_pid() };
    assert_ne!(new.pid, old.pid);
    assert_contains(
        &out.stdout,
        &[&format!("upgraded: pid {} -> pid {}", old.pid, new.pid)],
    );
    old.wait_gone(HANDOVER_BUDGET);
    assert_eq!(echo("after\n"), "after\n");
    assert_eq!(
        read_pid(),
        new.pid,
        "the old process took the pidfile with it"
    );
    new.signal(libc::SIGTERM);
    new.wait_gone(STOP_BUDGET);
    assert!(!pidfile.exists(), "pidfile left after the stop");
    assert!(!sock.exists(), "socket file left after the stop");
}

#[test]
fn a_binary_that_cannot_be_executed_is_rolled_back_at_once() {
    let mut d = start(&config("10s"));
    // Not executable: execve fails in the child, which says so on the readiness pipe.
    install(&d, |p| {
        std::fs::write(p.with_extension("txt"), b"not a program").expect("write");
        copy_binary(&p.with_extension("txt"), p);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    });
    d.signal(libc::SIGUSR2);
    let line = d.wait_log("upgrade failed:", READY_TIMEOUT);
    assert_contains(
        &line,
        &["cannot start the new binary (execve: Permission denied"],
    );
    still_serving(&d);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

/// `config` with a control socket: `socketd upgrade` then goes through it and gets the outcome.
fn config_with_control(upgrade_timeout: &str) -> String {
    config(upgrade_timeout).replacen("[daemon]\n", "[daemon]\ncontrol = \"{dir}/control\"\n", 1)
}

fn upgrade_with(d: &Daemon, args: &[&str]) -> CmdOutput {
    let mut cmd = socketd_cmd();
    cmd.arg("--config")
        .arg(d.config_path())
        .arg("upgrade")
        .args(args);
    run_with_timeout(cmd, Duration::from_secs(30))
}

fn script(d: &Daemon, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let text = d.dir().join(format!("{name}.txt"));
    std::fs::write(&text, format!("#!/bin/sh\n{body}\n")).expect("write the script");
    std::fs::set_permissions(&text, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = d.dir().join(name);
    copy_binary(&text, &path);
    path
}

#[test]
fn upgrade_through_the_control_socket_to_another_binary() {
    let mut d = start(&config_with_control("20s"));
    let old = d.pid();
    let other = d.dir().join("socketd-other");
    copy_binary(Path::new(SOCKETD), &other);
    let out = upgrade_with(&d, &["--binary", &other.display().to_string()]);
    assert_eq!(out.code(), Some(0), "{}\n{}", out.describe(), d.log_dump());
    let new = Successor {
        pid: pid_in_pidfile(&d),
    };
    assert_contains(
        &out.stdout,
        &[&format!("upgraded: pid {old} -> pid {}", new.pid)],
    );
    let exe = std::fs::read_link(format!("/proc/{}/exe", new.pid)).expect("exe");
    assert_eq!(exe, other, "the new process runs --binary");
    assert_exit_code(d.wait_exit(HANDOVER_BUDGET), 0, &d);
    let mut s = d.connect("tcp");
    s.write_all(b"new\n").expect("send");
    assert_eq!(s.read_line(), "new\n");
    drop(s);
    new.signal(libc::SIGTERM);
    new.wait_gone(STOP_BUDGET);
}

#[test]
fn a_failed_upgrade_through_the_control_socket_says_why() {
    let mut d = start(&config_with_control("2s"));
    let bad = script(
        &d,
        "bad",
        "echo 'new build: missing libfoo.so.2' >&2\nexit 1",
    );
    let out = upgrade_with(&d, &["--binary", &bad.display().to_string()]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_contains(
        &out.stderr,
        &[
            "upgrade failed: the new process exited with status 1 before it was ready",
            "new build: missing libfoo.so.2",
        ],
    );
    still_serving(&d);

    // One that never gets ready, and a second upgrade asked for meanwhile.
    let slow = script(&d, "slow", "echo 'waiting forever' >&2\nexec sleep 60");
    let mut first = socketd_cmd();
    first
        .arg("--config")
        .arg(d.config_path())
        .args(["upgrade", "--binary", &slow.display().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let first = first.spawn().expect("start socketd upgrade");
    // (The bad binary's upgrade above logged the first such line.)
    d.wait_log_count("upgrade: started", 2, READY_TIMEOUT);
    let second = upgrade_with(&d, &[]);
    assert_eq!(second.code(), Some(1), "{}", second.describe());
    assert_contains(&second.stderr, &["an upgrade is already in progress"]);
    let first = first.wait_with_output().expect("wait for socketd upgrade");
    assert_eq!(first.status.code(), Some(1), "{first:?}");
    assert_contains(
        &String::from_utf8_lossy(&first.stderr),
        &["was not ready within 2s", "waiting forever"],
    );
    still_serving(&d);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn a_paused_listener_stays_paused_across_an_upgrade() {
    let mut d = start(&config_with_control("20s"));
    let cfg = d.config_path().to_path_buf();
    let ctl = |args: &[&str]| {
        let mut cmd = socketd_cmd();
        cmd.arg("--config").arg(&cfg).args(args);
        run_with_timeout(cmd, Duration::from_secs(30))
    };
    let out = ctl(&["pause", "tcp"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let old = d.pid();
    let new = upgrade_ok(&d, old);
    d.wait_log(
        "listener `tcp`: paused, as before the upgrade",
        READY_TIMEOUT,
    );
    assert_exit_code(d.wait_exit(HANDOVER_BUDGET), 0, &d);
    let out = ctl(&["status", "--json"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    assert_eq!(status["status"]["process"]["pid"], new.pid, "{status}");
    let tcp = status["status"]["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == "tcp"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(tcp["paused"], true, "{status}");
    // Queued meanwhile (not refused), served once resumed.
    let mut s = d.connect("tcp");
    s.write_all(b"queued\n").expect("send");
    assert!(
        s.silent_for(Duration::from_millis(300)),
        "served while paused"
    );
    let out = ctl(&["resume", "tcp"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(s.read_line(), "queued\n");
    drop(s);
    new.signal(libc::SIGTERM);
    new.wait_gone(STOP_BUDGET);
}
