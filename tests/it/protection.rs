//! Protection at the door (issue 5), end to end with the real binary: `allow`/`deny` by source
//! address (clients bound to 127.0.0.1 and 127.0.0.2, and through an IPv4-mapped `[::]`
//! listener), `max_connections` and `max_per_source`, `rate` with its recovery, `idle_timeout`
//! and `max_duration` (including a slowloris of silent clients on a small pool), and UDP
//! anti-reflection (`min_source_port`). Heavier hostile-client tests are in `hostile.rs`.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::harness::*;

/// A TCP client whose source address is `from` (any 127.0.0.0/8 address works on Linux).
pub fn connect_from(from: &str, to: SocketAddr) -> Stream {
    let from: IpAddr = from.parse().expect("source address");
    let s =
        Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP)).expect("socket");
    s.bind(&SocketAddr::new(from, 0).into())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    s.connect_timeout(&to.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    Stream::Tcp(s)
}

/// Whether an echo server answers `s`: one line round trip. `false` if the connection was
/// closed at once (refused); data other than the echo fails the test.
pub fn echoes(s: &mut Stream) -> bool {
    if s.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    match s.read_exact(&mut buf) {
        Ok(()) => {
            assert_eq!(&buf, b"ping\n", "echo answered something else");
            true
        }
        Err(e) if is_timeout(&e) => panic!("no answer and no close within {IO_TIMEOUT:?}"),
        Err(_) => false,
    }
}

/// `echo_tcp` in a given worker model.
fn echo_tcp_in(workers: &str, name: &str, address: &str, extra: &str) -> String {
    echo_tcp(name, address, &format!("workers = \"{workers}\"\n{extra}"))
}

fn echo_tcp(name: &str, address: &str, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nprotocol = \"tcp\"\naddress = \"{address}\"\nhandler = \"echo\"\n{extra}\n"
    )
}

#[test]
fn deny_and_allow_by_source_address() {
    deny_and_allow_by_source_address_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn deny_and_allow_by_source_address_event() {
    deny_and_allow_by_source_address_in("event");
}

/// The same with `workers = "forked"`: the fork servers accept (`forked_accept.rs`).
#[test]
fn deny_and_allow_by_source_address_forked() {
    deny_and_allow_by_source_address_in("forked");
}

fn deny_and_allow_by_source_address_in(workers: &str) {
    let d = Daemon::start(
        &(echo_tcp_in(workers, "deny", "127.0.0.1:0", "deny = [\"127.0.0.2\"]")
            + &echo_tcp_in(
                workers,
                "allow",
                "127.0.0.1:0",
                "allow = [\"127.0.0.2/32\", \"10.0.0.0/8\"]",
            )),
    );
    let (deny, allow) = (d.addr("deny"), d.addr("allow"));
    assert!(
        echoes(&mut connect_from("127.0.0.1", deny)),
        "127.0.0.1 is not denied"
    );
    let mut refused = connect_from("127.0.0.2", deny);
    assert!(
        refused.closed_within(IO_TIMEOUT),
        "a denied client is closed at once, with no byte"
    );
    assert!(
        echoes(&mut connect_from("127.0.0.2", allow)),
        "127.0.0.2 is allowed"
    );
    assert!(
        connect_from("127.0.0.1", allow).closed_within(IO_TIMEOUT),
        "outside the allow list"
    );
    let line = d.wait_log("refused connection from 127.0.0.2:", IO_TIMEOUT);
    assert_contains(&line, &["listener `deny`", "not allowed by allow/deny"]);
}

/// socketd started through a wrapper that execs it (`prlimit`, `systemd-socket-activate`),
/// so the wrapper's pid is the daemon's; stopped with SIGTERM (then SIGKILL) on drop.
pub struct Wrapped {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
    pub _dir: TestDir,
}

impl Wrapped {
    /// Run `wrapper args... SOCKETD --config FILE` and wait for `socketd ready`.
    pub fn start(wrapper: &str, args: &[&str], toml: &str) -> Wrapped {
        let w = Wrapped::spawn(wrapper, args, toml);
        w.wait_ready();
        w
    }

    /// Run `wrapper args... SOCKETD --config FILE` without waiting.
    pub fn spawn(wrapper: &str, args: &[&str], toml: &str) -> Wrapped {
        let dir = TestDir::new();
        let config = dir.write("socketd.toml", toml);
        let log = dir.path().join("daemon.log");
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = command(std::path::Path::new(wrapper));
        cmd.args(args).args([SOCKETD, "--config"]).arg(&config);
        cmd.stdout(out.try_clone().expect("clone")).stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {wrapper}: {e}"));
        Wrapped {
            child,
            log,
            _dir: dir,
        }
    }

    /// Wait for `socketd ready` in the log.
    pub fn wait_ready(&self) {
        wait_until("socketd ready", READY_TIMEOUT, || {
            self.log_text().contains("socketd ready")
        });
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Wrapped {
    fn drop(&mut self) {
        // Our own unreaped child: the pid cannot have been reused.
        let pid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_BUDGET;
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("=== daemon log ===\n{}", self.log_text());
        }
    }
}

#[test]
fn ipv4_mapped_peers_on_a_dual_stack_listener_are_matched_as_ipv4() {
    if skip_without_ipv6() {
        return;
    }
    // socketd binds `[::]` IPv6-only, so a dual-stack socket comes from a service manager
    // (systemd's default for ListenStream=[::]:P): peers arrive as ::ffff:a.b.c.d.
    let port = std::net::TcpListener::bind("[::]:0")
        .expect("a free port")
        .local_addr()
        .expect("addr")
        .port();
    let any = format!("[::]:{port}");
    let toml = echo_tcp("any", "[::]:0", "deny = [\"127.0.0.2\"]");
    let d = Wrapped::spawn(
        "systemd-socket-activate",
        &["-l", &any, "--fdname=any"],
        &toml,
    );
    wait_until("systemd-socket-activate to listen", READY_TIMEOUT, || {
        d.log_text().contains("Listening on")
    });
    // systemd-socket-activate starts socketd on the first connection, which socketd serves.
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let mut first = connect_from("127.0.0.1", v4);
    first.set_read_timeout(READY_TIMEOUT);
    assert!(
        echoes(&mut first),
        "mapped 127.0.0.1 is served\n{}",
        d.log_text()
    );
    d.wait_ready();
    assert!(
        connect_from("127.0.0.2", v4).closed_within(IO_TIMEOUT),
        "mapped 127.0.0.2 is denied"
    );
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    assert!(
        echoes(&mut connect_from("::1", v6)),
        "IPv6 clients are judged as themselves"
    );
    wait_until("the refusal in the log", IO_TIMEOUT, || {
        d.log_text().contains("refused connection from 127.0.0.2:") // logged as plain IPv4
    });
    drop(d);
    // An allow list written in IPv4 admits mapped IPv4 peers on a socketd-bound IPv6 listener
    // too, and refuses IPv6 ones outside it.
    let d = Daemon::start(&echo_tcp("only", "[::1]:0", "allow = [\"127.0.0.1\"]"));
    assert!(
        connect_from("::1", d.addr("only")).closed_within(IO_TIMEOUT),
        "::1 is not in the allow list"
    );
}

#[test]
fn connection_caps_refuse_at_once_and_free_on_close() {
    connection_caps_refuse_at_once_and_free_on_close_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn connection_caps_refuse_at_once_and_free_on_close_event() {
    connection_caps_refuse_at_once_and_free_on_close_in("event");
}

/// The same with `workers = "forked"`: the fork servers accept (`forked_accept.rs`).
#[test]
fn connection_caps_refuse_at_once_and_free_on_close_forked() {
    connection_caps_refuse_at_once_and_free_on_close_in("forked");
}

fn connection_caps_refuse_at_once_and_free_on_close_in(workers: &str) {
    let d = Daemon::start(&echo_tcp_in(
        workers,
        "capped",
        "127.0.0.1:0",
        "max_workers = 16\nmax_connections = 3\nmax_per_source = 2",
    ));
    let addr = d.addr("capped");
    let mut a1 = connect_from("127.0.0.1", addr);
    let mut a2 = connect_from("127.0.0.1", addr);
    assert!(echoes(&mut a1) && echoes(&mut a2));
    assert!(
        connect_from("127.0.0.1", addr).closed_within(IO_TIMEOUT),
        "third from one source"
    );
    let mut b1 = connect_from("127.0.0.2", addr);
    assert!(echoes(&mut b1), "another source still gets in");
    assert!(
        connect_from("127.0.0.3", addr).closed_within(IO_TIMEOUT),
        "fourth on the listener"
    );
    d.wait_log("max_per_source reached", IO_TIMEOUT);
    // Service resumes as soon as a connection closes: no backlog, no restart.
    drop(a1);
    wait_until("a place to free up after a close", READY_TIMEOUT, || {
        echoes(&mut connect_from("127.0.0.3", addr))
    });
    assert!(
        echoes(&mut a2) && echoes(&mut b1),
        "admitted connections were never disturbed"
    );
}

#[test]
fn rate_refuses_a_burst_and_recovers_by_itself() {
    rate_refuses_a_burst_and_recovers_by_itself_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn rate_refuses_a_burst_and_recovers_by_itself_event() {
    rate_refuses_a_burst_and_recovers_by_itself_in("event");
}

/// The same with `workers = "forked"`: the fork servers accept (`forked_accept.rs`).
#[test]
fn rate_refuses_a_burst_and_recovers_by_itself_forked() {
    rate_refuses_a_burst_and_recovers_by_itself_in("forked");
}

fn rate_refuses_a_burst_and_recovers_by_itself_in(workers: &str) {
    let d = Daemon::start(&echo_tcp_in(
        workers,
        "rated",
        "127.0.0.1:0",
        "rate = \"10/s\"",
    ));
    let addr = d.addr("rated");
    let start = Instant::now();
    let served = (0..40)
        .filter(|_| echoes(&mut connect_from("127.0.0.1", addr)))
        .count();
    let elapsed = start.elapsed().as_secs_f64();
    let most = 10 + (elapsed * 10.0).ceil() as usize + 1;
    assert!(served >= 10, "the first 10 pass at once; served {served}");
    assert!(
        served <= most,
        "served {served} of 40 in {elapsed:.2}s, at most {most} fit 10/s"
    );
    d.wait_log("over rate", IO_TIMEOUT);
    // One quiet second refills the bucket: ten in a row pass again.
    std::thread::sleep(Duration::from_millis(1100));
    for i in 0..10 {
        assert!(
            echoes(&mut connect_from("127.0.0.1", addr)),
            "connection {i} after the window was refused"
        );
    }
}

#[test]
fn udp_rate_drops_datagrams_over_it() {
    let d = Daemon::start(
        "[[listener]]\nname = \"u\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\nrate = \"5/m\"\n",
    );
    let c = Dgram::udp(d.addr("u"));
    for i in 0..5 {
        assert_eq!(
            c.request(format!("d{i}").as_bytes()),
            format!("d{i}").into_bytes()
        );
    }
    c.send(b"sixth");
    assert_eq!(
        c.try_recv(Duration::from_millis(700)),
        None,
        "over 5/m: dropped"
    );
    d.wait_log("dropped datagram from 127.0.0.1:", IO_TIMEOUT);
}

#[test]
fn idle_timeout_frees_workers_held_by_silent_clients() {
    idle_timeout_frees_workers_held_by_silent_clients_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn idle_timeout_frees_workers_held_by_silent_clients_event() {
    idle_timeout_frees_workers_held_by_silent_clients_in("event");
}

/// The same with `workers = "forked"`: the fork servers accept (`forked_accept.rs`).
#[test]
fn idle_timeout_frees_workers_held_by_silent_clients_forked() {
    idle_timeout_frees_workers_held_by_silent_clients_in("forked");
}

fn idle_timeout_frees_workers_held_by_silent_clients_in(workers: &str) {
    let d = Daemon::start(&echo_tcp_in(
        workers,
        "idle",
        "127.0.0.1:0",
        "max_workers = 2\nidle_timeout = \"1s\"",
    ));
    let addr = d.addr("idle");
    // A slowloris: silent clients take every worker of the small pool.
    let mut silent: Vec<Stream> = (0..4).map(|_| connect_from("127.0.0.1", addr)).collect();
    let start = Instant::now();
    let mut real = connect_from("127.0.0.1", addr);
    // Two rounds of silent clients time out (1s each) before its turn comes.
    real.set_read_timeout(Duration::from_secs(15));
    assert!(
        echoes(&mut real),
        "a real client is served once the silent ones time out"
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "it had to wait for idle_timeout ({waited:?})"
    );
    for s in &mut silent {
        assert!(
            s.closed_within(Duration::from_secs(10)),
            "a silent client is closed"
        );
    }
    // A client that keeps talking is never idle.
    let mut chatty = connect_from("127.0.0.1", addr);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            echoes(&mut chatty),
            "activity every 400ms keeps a 1s idle_timeout away"
        );
    }
}

#[test]
fn idle_timeout_counts_both_directions() {
    let chargen = "[[listener]]\nname = \"cg\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"chargen\"\nidle_timeout = \"1s\"\n";
    let d = Daemon::start(chargen);
    // A reader keeps chargen's writes flowing: never idle, though it never sends a byte.
    let mut reader = connect_from("127.0.0.1", d.addr("cg"));
    let until = Instant::now() + Duration::from_millis(2500);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < until {
        assert!(
            reader.read(&mut buf).expect("chargen keeps sending") > 0,
            "closed while data flowed"
        );
    }
    // A client that never reads stalls chargen's writes: after the buffers fill, nothing
    // moves either way, so the connection is closed.
    let mut stalled = connect_from("127.0.0.1", d.addr("cg"));
    std::thread::sleep(Duration::from_secs(4));
    stalled.set_read_timeout(Duration::from_secs(10));
    let mut total = 0usize;
    loop {
        match stalled.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if is_timeout(&e) => panic!("still open after {total} buffered bytes"),
            Err(_) => break,
        }
    }
    assert!(total > 0, "chargen wrote before stalling");
}

#[test]
fn max_duration_cuts_even_a_busy_connection() {
    max_duration_cuts_even_a_busy_connection_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn max_duration_cuts_even_a_busy_connection_event() {
    max_duration_cuts_even_a_busy_connection_in("event");
}

/// The same with `workers = "forked"`: the fork servers accept (`forked_accept.rs`).
#[test]
fn max_duration_cuts_even_a_busy_connection_forked() {
    max_duration_cuts_even_a_busy_connection_in("forked");
}

fn max_duration_cuts_even_a_busy_connection_in(workers: &str) {
    let d = Daemon::start(&echo_tcp_in(
        workers,
        "short",
        "127.0.0.1:0",
        "max_duration = \"1s\"",
    ));
    let mut s = connect_from("127.0.0.1", d.addr("short"));
    let start = Instant::now();
    while echoes(&mut s) {
        assert!(start.elapsed() < Duration::from_secs(10), "never cut");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "cut too early: {:?}",
        start.elapsed()
    );
    d.wait_log("closed at max_duration", Duration::from_secs(10));
    assert!(
        echoes(&mut connect_from("127.0.0.1", d.addr("short"))),
        "new connections still served"
    );
}

/// A UDP socket bound to a port below 1024 (needs root or CAP_NET_BIND_SERVICE).
fn privileged_udp() -> Option<UdpSocket> {
    (1000..1024)
        .rev()
        .find_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
}

#[test]
fn udp_datagrams_from_privileged_ports_get_no_answer() {
    let Some(low) = privileged_udp() else {
        eprintln!(
            "skipped: cannot bind a UDP port below 1024 here (needs root or CAP_NET_BIND_SERVICE)"
        );
        return;
    };
    let d = Daemon::start(
        "[[listener]]\nname = \"guarded\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n\
         [[listener]]\nname = \"open\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\nmin_source_port = 0\n\
         [[listener]]\nname = \"cg\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:0\"\nhandler = \"chargen\"\n",
    );
    let port = low.local_addr().expect("local addr").port();
    low.set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    low.send_to(b"reflect me", d.addr("guarded")).expect("send");
    let mut buf = [0u8; 1024];
    assert!(
        low.recv_from(&mut buf).is_err(),
        "a datagram from port {port} was answered"
    );
    d.wait_log(
        &format!("dropped datagram from 127.0.0.1:{port}: source port below min_source_port"),
        IO_TIMEOUT,
    );
    // The same sender on a listener with the check off is answered: it is the setting.
    low.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    low.send_to(b"hello", d.addr("open")).expect("send");
    let (n, _) = low
        .recv_from(&mut buf)
        .expect("min_source_port = 0 answers");
    assert_eq!(&buf[..n], b"hello");
    // An ordinary client is answered, and chargen's answer stays within RFC 864's 512 bytes.
    assert_eq!(Dgram::udp(d.addr("guarded")).request(b"x"), b"x");
    let reply = Dgram::udp(d.addr("cg")).request(&[b'a'; 2000]);
    assert!(
        !reply.is_empty() && reply.len() <= 512,
        "chargen replied {} bytes",
        reply.len()
    );
}
