//! Stopping (socketserver's `shutdown()` + `server_close()`): SIGTERM/SIGINT stop accepting at
//! once and let open connections run on until they end or `shutdown_timeout` passes; a second
//! SIGTERM or a SIGQUIT stops at once; unix socket files are gone afterwards.

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::services::listener;

/// A TCP and a Unix echo listener, with the given `shutdown_timeout`.
fn echo_daemon(shutdown_timeout: &str) -> Daemon {
    echo_daemon_in("threaded", shutdown_timeout)
}

/// `echo_daemon` in a given worker model.
fn echo_daemon_in(workers: &str, shutdown_timeout: &str) -> Daemon {
    Daemon::start(&format!(
        "[daemon]\nshutdown_timeout = \"{shutdown_timeout}\"\n{}workers = \"{workers}\"\n{}workers = \"{workers}\"\n",
        listener("tcp", "tcp", "127.0.0.1:0", "echo"),
        listener("unix", "unix", "{dir}/echo.sock", "echo"),
    ))
}

#[track_caller]
fn round_trip(s: &mut Stream, msg: &[u8]) {
    s.write_all(msg).expect("send");
    assert_bytes_eq(msg, &s.read_n(msg.len()));
}

/// A new connection is refused once listeners are closed.
#[track_caller]
fn assert_refused(d: &Daemon, addr: std::net::SocketAddr, path: &std::path::Path) {
    match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!(
            "a new TCP connection to {addr} was accepted after SIGTERM\n{}",
            d.log_dump()
        ),
    }
    assert!(
        !path.exists(),
        "{} still exists after SIGTERM",
        path.display()
    );
    assert!(
        UnixStream::connect(path).is_err(),
        "a new unix connection was accepted"
    );
}

#[test]
fn sigterm_serves_open_connections_until_they_close_then_exits_0() {
    sigterm_serves_open_connections_until_they_close_then_exits_0_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn sigterm_serves_open_connections_until_they_close_then_exits_0_event() {
    sigterm_serves_open_connections_until_they_close_then_exits_0_in("event");
}

fn sigterm_serves_open_connections_until_they_close_then_exits_0_in(workers: &str) {
    let mut d = echo_daemon_in(workers, "10s");
    let (addr, path) = (d.addr("tcp"), d.path("unix"));
    let mut tcp = d.connect("tcp");
    let mut unix = d.connect("unix");
    round_trip(&mut tcp, b"before\n");
    round_trip(&mut unix, b"before\n");

    d.signal(libc::SIGTERM);
    d.wait_log(
        "stopping: 2 connections in flight, waiting up to 10s",
        READY_TIMEOUT,
    );
    assert_refused(&d, addr, &path);

    // Both keep being served, for as long as their clients want.
    for i in 0..5 {
        round_trip(&mut tcp, format!("after {i}\n").as_bytes());
        round_trip(&mut unix, format!("after {i}\n").as_bytes());
    }
    assert!(
        d.is_running(),
        "exited with connections open\n{}",
        d.log_dump()
    );
    let started = Instant::now();
    tcp.shutdown_write();
    assert_eq!(tcp.read_to_end_vec(), b"");
    assert!(
        d.is_running(),
        "exited with a connection open\n{}",
        d.log_dump()
    );
    round_trip(&mut unix, b"last\n");
    drop(unix);

    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        started.elapsed()
    );
    assert_contains(&d.log(), &["socketd stopped"]);
}

/// The daemon exits 0 within 2 s of `started` (a signal that must not wait for a drain).
fn exits_at_once(d: &mut Daemon, started: Instant) {
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, d);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
}

#[test]
fn sigint_stops_like_sigterm() {
    let mut d = echo_daemon("10s");
    let mut tcp = d.connect("tcp");
    d.signal(libc::SIGINT);
    d.wait_log("stopping: 1 connections in flight", READY_TIMEOUT);
    round_trip(&mut tcp, b"still here\n");
    drop(tcp);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn sigterm_with_nothing_in_flight_exits_at_once() {
    sigterm_with_nothing_in_flight_exits_at_once_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn sigterm_with_nothing_in_flight_exits_at_once_event() {
    sigterm_with_nothing_in_flight_exits_at_once_in("event");
}

fn sigterm_with_nothing_in_flight_exits_at_once_in(workers: &str) {
    let mut d = echo_daemon_in(workers, "10s");
    let started = Instant::now();
    d.signal(libc::SIGTERM);
    exits_at_once(&mut d, started);
    assert_contains(
        &d.log(),
        &["stopping: 0 connections in flight", "socketd stopped"],
    );
}

#[test]
fn shutdown_timeout_closes_connections_that_never_end() {
    shutdown_timeout_closes_connections_that_never_end_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn shutdown_timeout_closes_connections_that_never_end_event() {
    shutdown_timeout_closes_connections_that_never_end_in("event");
}

fn shutdown_timeout_closes_connections_that_never_end_in(workers: &str) {
    let mut d = echo_daemon_in(workers, "500ms");
    let mut tcp = d.connect("tcp");
    round_trip(&mut tcp, b"x");
    let started = Instant::now();
    d.signal(libc::SIGTERM);
    // The client never closes; the daemon closes it at the deadline and exits.
    assert!(
        tcp.closed_within(IO_TIMEOUT),
        "the connection was never closed"
    );
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "exit after {took:?}, expected soon after the 500ms shutdown_timeout\n{}",
        d.log_dump()
    );
    assert_contains(&d.log(), &["shutdown_timeout reached", "socketd stopped"]);
}

#[test]
fn a_second_sigterm_stops_at_once() {
    a_second_sigterm_stops_at_once_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn a_second_sigterm_stops_at_once_event() {
    a_second_sigterm_stops_at_once_in("event");
}

fn a_second_sigterm_stops_at_once_in(workers: &str) {
    let mut d = echo_daemon_in(workers, "60s");
    let mut tcp = d.connect("tcp");
    round_trip(&mut tcp, b"x");
    d.signal(libc::SIGTERM);
    d.wait_log("stopping: 1 connections in flight", READY_TIMEOUT);
    round_trip(&mut tcp, b"draining");
    let started = Instant::now();
    d.signal(libc::SIGTERM);
    exits_at_once(&mut d, started);
    assert!(
        tcp.closed_within(IO_TIMEOUT),
        "the open connection was not closed"
    );
    assert_contains(&d.log(), &["second stop signal"]);
}

#[test]
fn sigquit_stops_at_once() {
    sigquit_stops_at_once_in("threaded");
}

/// The same with `workers = "event"`: the event loops accept for themselves.
#[test]
fn sigquit_stops_at_once_event() {
    sigquit_stops_at_once_in("event");
}

fn sigquit_stops_at_once_in(workers: &str) {
    let mut d = echo_daemon_in(workers, "60s");
    let (path, mut tcp) = (d.path("unix"), d.connect("tcp"));
    round_trip(&mut tcp, b"x");
    let started = Instant::now();
    d.signal(libc::SIGQUIT);
    exits_at_once(&mut d, started);
    assert!(
        tcp.closed_within(IO_TIMEOUT),
        "the open connection was not closed"
    );
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn unix_socket_files_are_removed_on_stop() {
    let mut d = Daemon::start(&format!(
        "{}{}",
        listener("stream", "unix", "{dir}/stream.sock", "echo"),
        listener("dgram", "unix-dgram", "{dir}/dgram.sock", "echo"),
    ));
    let (stream, dgram) = (d.path("stream"), d.path("dgram"));
    assert!(stream.exists() && dgram.exists(), "sockets not created");
    assert!(
        stream.starts_with(d.dir()),
        "{} not under {{dir}}",
        stream.display()
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(!stream.exists(), "{} left behind", stream.display());
    assert!(!dgram.exists(), "{} left behind", dgram.display());
}

#[test]
fn a_stale_socket_file_is_replaced_at_start() {
    // A crash leaves the socket file behind; the next start must not refuse it.
    let dir = TestDir::new();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let toml = listener("echo", "unix", &stale.display().to_string(), "echo");
    let mut d = Daemon::start(&toml);
    let mut s = d.connect("echo");
    round_trip(&mut s, b"fresh\n");
    drop(s);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(!stale.exists());
}

/// A handler that ignores both its socket and the stop flag cannot keep the daemon alive:
/// it exits shortly after `shutdown_timeout` plus a grace second.
#[test]
fn a_stuck_handler_does_not_block_the_stop() {
    let bin = example_bin("testhandlers");
    let mut d = Daemon::start_bin(
        &bin,
        &format!(
            "[daemon]\nshutdown_timeout = \"300ms\"\n{}",
            listener("stuck", "tcp", "127.0.0.1:0", "stuck")
        ),
    );
    let mut s = d.connect("stuck");
    assert_eq!(s.read_line(), "stuck\n");
    let started = Instant::now();
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "exit took {took:?}\n{}",
        d.log_dump()
    );
    assert_contains(&d.log(), &["shutdown_timeout reached"]);
}

/// A handler that polls the shutting-down flag (chargen does) ends its endless stream when a
/// stop begins, so the daemon need not wait for `shutdown_timeout`.
#[test]
fn endless_chargen_ends_when_a_stop_begins() {
    let mut d = Daemon::start(&format!(
        "[daemon]\nshutdown_timeout = \"30s\"\n{}",
        listener("chargen", "tcp", "127.0.0.1:0", "chargen")
    ));
    let mut s = d.connect("chargen");
    assert_bytes_eq(
        &crate::services::chargen_pattern(74 * 10, 0),
        &s.read_n(74 * 10),
    );
    let started = Instant::now();
    d.signal(libc::SIGTERM);
    // Keep reading so the handler is never blocked on a full buffer; the stream must end.
    let rest = s.read_to_end_vec();
    assert!(!rest.is_empty());
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "stop took {took:?}\n{}",
        d.log_dump()
    );
}
