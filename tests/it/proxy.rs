//! `handler = "proxy"` under every worker model: TCP->TCP, TCP->Unix and Unix->TCP with a
//! 1 MiB payload and half-close propagated both ways, upstream refused, PROXY v1/v2 header
//! bytes, and UDP associations.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::harness::*;

const MODELS: [&str; 3] = ["threaded", "forked", "event"];

/// An upstream that takes one connection, reads to EOF (so it sees the client's half-close
/// passed on), sends everything back and closes. Returns what it received.
fn serve_once<S: Read + Write + Send + 'static>(
    accept: impl FnOnce() -> S + Send + 'static,
) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut s = accept();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("upstream read to EOF");
        s.write_all(&got).expect("upstream write back");
        got
    })
}

fn tcp_upstream() -> (String, JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr").to_string();
    let h = serve_once(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s
    });
    (addr, h)
}

fn unix_upstream(path: &Path) -> (String, JoinHandle<Vec<u8>>) {
    let l = UnixListener::bind(path).expect("bind unix upstream");
    let h = serve_once(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s
    });
    (format!("unix:{}", path.display()), h)
}

fn proxy_config(protocol: &str, address: &str, workers: &str, proxy: &str) -> String {
    format!(
        "[daemon]\nshutdown_timeout = \"2s\"\n[[listener]]\nname = \"p\"\nprotocol = \"{protocol}\"\n\
         address = \"{address}\"\nhandler = \"proxy\"\nworkers = \"{workers}\"\nproxy = {{ {proxy} }}\n"
    )
}

/// Send 1 MiB, half-close, read the echo to EOF; the upstream must have seen it all.
fn round_trip(d: &Daemon, upstream: JoinHandle<Vec<u8>>) {
    let payload: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let mut s = d.connect("p");
    let mut r = s.try_clone();
    let reader = std::thread::spawn(move || r.read_to_end_vec());
    s.write_all(&payload).expect("send through the proxy");
    s.shutdown_write();
    let back = reader.join().expect("reader");
    let seen = upstream.join().expect("upstream");
    assert!(
        seen == payload,
        "upstream saw {} bytes, want {}",
        seen.len(),
        payload.len()
    );
    assert!(
        back == payload,
        "client got {} bytes back, want {}",
        back.len(),
        payload.len()
    );
}

fn stop(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn proxy_tcp_to_tcp_half_close_every_model() {
    for workers in MODELS {
        let (up, h) = tcp_upstream();
        let d = Daemon::start(&proxy_config(
            "tcp",
            "127.0.0.1:0",
            workers,
            &format!("upstream = \"{up}\""),
        ));
        d.wait_ready();
        round_trip(&d, h);
        stop(d);
    }
}

#[test]
fn proxy_tcp_to_unix_and_unix_to_tcp() {
    for workers in MODELS {
        let dir = TestDir::new();
        let (up, h) = unix_upstream(&dir.path().join("up.sock"));
        let d = Daemon::start(&proxy_config(
            "tcp",
            "127.0.0.1:0",
            workers,
            &format!("upstream = \"{up}\""),
        ));
        d.wait_ready();
        round_trip(&d, h);
        stop(d);

        let (up, h) = tcp_upstream();
        let d = Daemon::start(&proxy_config(
            "unix",
            "{dir}/p.sock",
            workers,
            &format!("upstream = \"{up}\""),
        ));
        d.wait_ready();
        round_trip(&d, h);
        stop(d);
    }
}

#[test]
fn proxy_upstream_refused_closes_the_client_and_logs() {
    for workers in MODELS {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        // The listener above is closed again: nothing listens on `port` now.
        let d = Daemon::start(&proxy_config(
            "tcp",
            "127.0.0.1:0",
            workers,
            &format!("upstream = \"127.0.0.1:{port}\", connect_timeout = \"2s\""),
        ));
        d.wait_ready();
        let mut s = d.connect("p");
        let _ = s.write_all(b"hello");
        assert!(s.closed_within(IO_TIMEOUT), "{workers}: client not closed");
        d.wait_log("refused", READY_TIMEOUT);
        stop(d);
    }
}

/// What the upstream reads before the payload, for a given PROXY protocol version.
fn header_seen(workers: &str, version: &str) -> (Vec<u8>, SocketAddr, SocketAddr) {
    let (up, h) = tcp_upstream();
    let d = Daemon::start(&proxy_config(
        "tcp",
        "127.0.0.1:0",
        workers,
        &format!("upstream = \"{up}\", proxy_protocol = \"{version}\""),
    ));
    d.wait_ready();
    let mut s = d.connect("p");
    let (client, server) = match &s {
        Stream::Tcp(t) => (t.local_addr().expect("local"), t.peer_addr().expect("peer")),
        Stream::Unix(_) => unreachable!("tcp listener"),
    };
    s.write_all(b"DATA").expect("send");
    s.shutdown_write();
    let _ = s.read_to_end_vec();
    let seen = h.join().expect("upstream");
    stop(d);
    assert!(
        seen.ends_with(b"DATA"),
        "payload after the header: {seen:?}"
    );
    (seen[..seen.len() - 4].to_vec(), client, server)
}

#[test]
fn proxy_protocol_v1_and_v2_header_bytes() {
    for workers in ["threaded", "event"] {
        let (h, c, s) = header_seen(workers, "v1");
        let want = format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            c.ip(),
            s.ip(),
            c.port(),
            s.port()
        );
        assert_eq!(String::from_utf8_lossy(&h), want, "{workers} v1");

        let (h, c, s) = header_seen(workers, "v2");
        let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        let (SocketAddr::V4(c), SocketAddr::V4(s)) = (c, s) else {
            unreachable!("ipv4")
        };
        want.extend_from_slice(&c.ip().octets());
        want.extend_from_slice(&s.ip().octets());
        want.extend_from_slice(&c.port().to_be_bytes());
        want.extend_from_slice(&s.port().to_be_bytes());
        assert_eq!(h, want, "{workers} v2");
    }
}

/// Two clients, two datagrams each, through a UDP proxy; returns how many distinct source
/// addresses the upstream saw.
fn udp_proxy_sources(workers: &str) -> usize {
    let up = UdpSocket::bind("127.0.0.1:0").expect("bind upstream");
    up.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let up_addr = up.local_addr().expect("addr");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut sources = std::collections::HashSet::new();
        // Two clients x two datagrams, each answered with a prefix.
        for _ in 0..4 {
            let Ok((n, from)) = up.recv_from(&mut buf) else {
                break;
            };
            sources.insert(from);
            let mut reply = b"up:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = up.send_to(&reply, from);
        }
        sources.len()
    });
    let d = Daemon::start(&proxy_config(
        "udp",
        "127.0.0.1:0",
        workers,
        &format!("upstream = \"{up_addr}\""),
    ));
    d.wait_ready();
    let (a, b) = (d.dgram("p"), d.dgram("p"));
    for i in 0..2 {
        a.send(format!("a{i}").as_bytes());
        assert_eq!(a.recv(), format!("up:a{i}").as_bytes(), "{workers}");
        b.send(format!("b{i}").as_bytes());
        assert_eq!(b.recv(), format!("up:b{i}").as_bytes(), "{workers}");
    }
    let sources = echo.join().expect("upstream");
    stop(d);
    sources
}

#[test]
fn proxy_udp_associations() {
    assert_eq!(
        udp_proxy_sources("event"),
        2,
        "one upstream association per client"
    );
    // Threaded and forked workers relay one exchange per datagram (a socket each).
    assert_eq!(udp_proxy_sources("threaded"), 4);
    assert_eq!(udp_proxy_sources("forked"), 4);
}

#[test]
fn check_refuses_bad_proxy_settings() {
    let (out, _file, _dir) = check(&proxy_config(
        "tcp",
        "127.0.0.1:0",
        "event",
        "upstream = \"localhost:80\"",
    ));
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.describe().contains("never resolves host names"),
        "{}",
        out.describe()
    );
}

#[test]
fn proxy_upstream_half_close_keeps_the_other_direction_open() {
    for workers in MODELS {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let up = l.local_addr().expect("addr");
        // The upstream speaks first, half-closes, and only then reads the client to EOF.
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            s.write_all(b"hello, then EOF").expect("greet");
            s.shutdown(std::net::Shutdown::Write).expect("half-close");
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("read the client to EOF");
            got
        });
        let d = Daemon::start(&proxy_config(
            "tcp",
            "127.0.0.1:0",
            workers,
            &format!("upstream = \"{up}\""),
        ));
        d.wait_ready();
        let mut s = d.connect("p");
        assert_eq!(s.read_to_end_vec(), b"hello, then EOF", "{workers}");
        let payload = vec![b'z'; 200_000];
        s.write_all(&payload)
            .expect("send after the upstream's EOF");
        s.shutdown_write();
        let got = server.join().expect("upstream");
        assert!(
            got == payload,
            "{workers}: upstream got {} bytes",
            got.len()
        );
        drop(s);
        stop(d);
    }
}

#[test]
fn proxy_upstream_connect_timeout_closes_the_client_and_logs() {
    // An upstream whose accept queue is full: the kernel drops further SYNs, so a connect
    // neither succeeds nor fails until the client gives up.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let up = l.local_addr().expect("addr");
    let mut held = Vec::new();
    let full = (0..4096).any(|_| {
        match std::net::TcpStream::connect_timeout(&up, Duration::from_millis(300)) {
            Ok(s) => {
                held.push(s);
                false
            }
            Err(_) => true,
        }
    });
    assert!(full, "could not fill the upstream's accept queue");
    for workers in MODELS {
        let d = Daemon::start(&proxy_config(
            "tcp",
            "127.0.0.1:0",
            workers,
            &format!("upstream = \"{up}\", connect_timeout = \"500ms\""),
        ));
        d.wait_ready();
        let mut s = d.connect("p");
        assert!(s.closed_within(IO_TIMEOUT), "{workers}: client not closed");
        // Event loops say which setting ran out; blocking connects report the OS error.
        let needle = if workers == "event" {
            "connect_timeout"
        } else {
            "timed out"
        };
        d.wait_log(needle, READY_TIMEOUT);
        stop(d);
    }
    drop((l, held));
}

/// An upstream that accepts and then neither reads, writes nor closes, until the test drops
/// the returned sender; each connection it accepts is announced on the receiver.
fn silent_upstream() -> (
    SocketAddr,
    std::sync::mpsc::Sender<()>,
    std::sync::mpsc::Receiver<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let up = l.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        l.set_nonblocking(true).expect("nonblocking");
        let mut held = Vec::new();
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            rx.recv_timeout(Duration::from_millis(20))
        {
            if let Ok((s, _)) = l.accept() {
                held.push(s);
                let _ = seen_tx.send(());
            }
        }
    });
    (up, tx, seen)
}

/// Everything that ends a proxied connection still ends it when the upstream stays silent
/// and open: `idle_timeout` (no byte either way), `max_duration`, and a stop's
/// `shutdown_timeout`, in every model (the blocking models relay on a shared relay thread).
#[test]
fn idle_timeout_max_duration_and_stop_end_a_relay_to_a_silent_upstream() {
    for workers in MODELS {
        let (up, _hold, upstream_accepted) = silent_upstream();
        for limit in ["idle_timeout = \"300ms\"", "max_duration = \"300ms\""] {
            let mut d = Daemon::start(&format!(
                "{}{limit}\n",
                proxy_config(
                    "tcp",
                    "127.0.0.1:0",
                    workers,
                    &format!("upstream = \"{up}\"")
                )
            ));
            let mut s = d.connect("p");
            s.write_all(b"to a silent upstream\n").expect("send");
            assert!(
                s.closed_within(IO_TIMEOUT),
                "{workers} {limit}: the connection was never closed\n{}",
                d.log_dump()
            );
            // The worker's place came back: a second client is served (and cut) the same way.
            let mut s = d.connect("p");
            assert!(
                s.closed_within(IO_TIMEOUT),
                "{workers} {limit}: second client"
            );
            d.signal(libc::SIGTERM);
            assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
        }
        // No limit: the stop's deadline (2 s here) cuts the connection and the daemon exits.
        let mut d = Daemon::start(&proxy_config(
            "tcp",
            "127.0.0.1:0",
            workers,
            &format!("upstream = \"{up}\""),
        ));
        let mut s = d.connect("p");
        s.write_all(b"to a silent upstream\n").expect("send");
        // Stop only once this connection is relayed, not still in the backlog: the upstream
        // has accepted it, the fifth (two clients under each limit above).
        for n in 1..=5 {
            upstream_accepted
                .recv_timeout(IO_TIMEOUT)
                .unwrap_or_else(|_| panic!("{workers}: upstream connection {n} never came"));
        }
        d.signal(libc::SIGTERM);
        assert!(
            s.closed_within(IO_TIMEOUT),
            "{workers}: the stop never closed the connection\n{}",
            d.log_dump()
        );
        assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
        assert_contains(&d.log(), &["shutdown_timeout reached"]);
    }
}
