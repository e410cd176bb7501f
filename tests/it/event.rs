//! `workers = "event"`: every built-in on every socket kind, many connections at once,
//! back-pressure (a client that never reads cannot make the daemon grow), graceful stop with
//! a connection open, and `check` refusing a registered handler in event mode.

use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::*;

const SERVICES: [&str; 5] = ["echo", "discard", "chargen", "daytime", "time"];

fn event_listener(name: &str, protocol: &str, address: &str, handler: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\naddress = \"{address}\"\n\
         handler = \"{handler}\"\nworkers = \"event\"\nthreads = 2\n"
    )
}

fn all_services(protocol: &str, address: impl Fn(&str) -> String) -> Daemon {
    let mut toml = String::from("[daemon]\nshutdown_timeout = \"2s\"\n");
    for s in SERVICES {
        toml.push_str(&event_listener(s, protocol, &address(s), s));
    }
    let d = Daemon::start(&toml);
    assert_eq!(d.wait_ready(), SERVICES.len(), "{}", d.log_dump());
    d
}

fn check_streams(d: &Daemon) {
    // echo: a payload bigger than the loop's scratch buffer, then a half-close.
    let mut s = d.connect("echo");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut r = s.try_clone();
    let reader = std::thread::spawn(move || r.read_to_end_vec());
    s.write_all(&payload).expect("send to echo");
    s.shutdown_write();
    let back = reader.join().expect("reader");
    assert!(
        back == payload,
        "echo returned {} bytes, want {}",
        back.len(),
        payload.len()
    );

    let mut s = d.connect("discard");
    s.write_all(b"into the void\n").expect("send to discard");
    assert!(
        s.silent_for(Duration::from_millis(200)),
        "discard sent something"
    );
    s.shutdown_write();
    assert!(
        s.closed_within(IO_TIMEOUT),
        "discard did not close after EOF"
    );

    let mut s = d.connect("chargen");
    let got = s.read_n(74 * 3);
    let first: Vec<u8> = (0..72).map(|i| b' ' + (i % 95) as u8).collect();
    assert_eq!(&got[..72], &first[..], "chargen first line");
    assert_eq!(&got[72..74], b"\r\n");

    let mut s = d.connect("daytime");
    let line = String::from_utf8(s.read_to_end_vec()).expect("daytime is text");
    assert!(
        line.ends_with("\r\n") && line.len() > 10,
        "daytime line {line:?}"
    );

    let mut s = d.connect("time");
    let t = s.read_to_end_vec();
    assert_eq!(t.len(), 4, "time sends 4 bytes");
    let secs = u32::from_be_bytes([t[0], t[1], t[2], t[3]]) as i64 - 2_208_988_800;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!((secs - now).abs() < 60, "time is {secs}, now {now}");
}

fn check_datagrams(d: &Daemon) {
    let c = d.dgram("echo");
    c.send(b"ping event");
    assert_eq!(c.recv(), b"ping event");
    let c = d.dgram("discard");
    c.send(b"x");
    assert!(
        c.try_recv(Duration::from_millis(200)).is_none(),
        "discard answered"
    );
    let c = d.dgram("chargen");
    c.send(b"x");
    assert!(c.recv().len() <= 512);
    let c = d.dgram("daytime");
    c.send(b"x");
    assert!(c.recv().ends_with(b"\r\n"));
    let c = d.dgram("time");
    c.send(b"x");
    assert_eq!(c.recv().len(), 4);
}

fn stop(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn event_builtins_over_tcp() {
    let d = all_services("tcp", |_| "127.0.0.1:0".into());
    check_streams(&d);
    stop(d);
}

#[test]
fn event_builtins_over_unix() {
    let d = all_services("unix", |s| format!("{{dir}}/{s}.sock"));
    check_streams(&d);
    stop(d);
}

#[test]
fn event_builtins_over_udp_and_unix_dgram() {
    let d = all_services("udp", |_| "127.0.0.1:0".into());
    check_datagrams(&d);
    stop(d);
    let d = all_services("unix-dgram", |s| format!("{{dir}}/{s}.sock"));
    check_datagrams(&d);
    stop(d);
}

#[test]
fn event_serves_many_concurrent_connections() {
    let d = Daemon::start(&event_listener("echo", "tcp", "127.0.0.1:0", "echo"));
    d.wait_ready();
    let mut conns: Vec<Stream> = (0..300).map(|_| d.connect("echo")).collect();
    for round in 0..3u8 {
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(format!("{round}:{i}\n").as_bytes())
                .expect("send");
        }
        for (i, c) in conns.iter_mut().enumerate() {
            assert_eq!(c.read_line(), format!("{round}:{i}\n"));
        }
    }
    drop(conns);
    stop(d);
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
fn event_echo_applies_back_pressure_to_a_client_that_never_reads() {
    let d = Daemon::start(&event_listener("echo", "unix", "{dir}/e.sock", "echo"));
    d.wait_ready();
    let before = rss_kib(d.pid());
    let s = d.connect("echo");
    s.set_read_timeout(Duration::from_millis(100));
    // Write 64 MiB without reading: the daemon must stop reading once the client's receive
    // buffer and its one pending chunk are full, so our writes start timing out.
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    let mut raw = s.try_clone();
    while written < 64 << 20 {
        match raw.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => break,
        }
    }
    assert!(
        written < 64 << 20,
        "the daemon kept reading {written} bytes it could not send"
    );
    let after = rss_kib(d.pid());
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    drop((s, raw));
    stop(d);
}

#[test]
fn event_graceful_stop_lets_an_open_connection_finish() {
    let mut d = Daemon::start(
        &("[daemon]\nshutdown_timeout = \"10s\"\n".to_string()
            + &event_listener("echo", "tcp", "127.0.0.1:0", "echo")),
    );
    d.wait_ready();
    let mut s = d.connect("echo");
    s.write_all(b"before\n").expect("send");
    assert_eq!(s.read_line(), "before\n");
    d.signal(libc::SIGTERM);
    d.wait_log("stopping:", READY_TIMEOUT);
    s.write_all(b"during stop\n").expect("send while draining");
    assert_eq!(s.read_line(), "during stop\n");
    s.shutdown_write();
    assert!(s.closed_within(IO_TIMEOUT));
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn event_stop_deadline_closes_idle_connections() {
    let mut d = Daemon::start(
        &("[daemon]\nshutdown_timeout = \"300ms\"\n".to_string()
            + &event_listener("echo", "tcp", "127.0.0.1:0", "echo")),
    );
    d.wait_ready();
    let mut s = d.connect("echo");
    s.write_all(b"x").expect("send");
    assert_eq!(s.read_n(1), b"x");
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(
        s.closed_within(IO_TIMEOUT),
        "connection still open after the stop"
    );
}

#[test]
fn check_refuses_a_registered_handler_in_event_mode() {
    let bin = example_bin("myhandler");
    let (out, file, _dir) = check_with(
        &bin,
        "[[listener]]\nname = \"my\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\n\
         handler = \"myhandler\"\nworkers = \"event\"\n",
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let diags = out.diagnostics(&file).join("\n");
    assert!(
        diags.contains("key `workers`") && diags.contains("no event-loop implementation"),
        "{}",
        out.describe()
    );
}

#[test]
fn event_idle_timeout_and_max_duration_close_connections() {
    let d = Daemon::start(
        &(event_listener("idle", "tcp", "127.0.0.1:0", "echo")
            + "idle_timeout = \"400ms\"\n"
            + &event_listener("long", "unix", "{dir}/long.sock", "chargen")
            + "max_duration = \"500ms\"\n"),
    );
    d.wait_ready();
    // An active client outlives idle_timeout several times over.
    let mut busy = d.connect("idle");
    for i in 0..10 {
        busy.write_all(format!("{i}\n").as_bytes()).expect("send");
        assert_eq!(busy.read_line(), format!("{i}\n"));
        std::thread::sleep(Duration::from_millis(150));
    }
    // A silent one is closed.
    let mut quiet = d.connect("idle");
    quiet.write_all(b"x").expect("send");
    assert_eq!(quiet.read_n(1), b"x");
    assert!(quiet.closed_within(IO_TIMEOUT), "idle connection left open");
    // chargen never stops by itself: max_duration cuts it.
    let mut s = d.connect("long");
    let mut buf = vec![0u8; 64 * 1024];
    let cut = std::time::Instant::now() + IO_TIMEOUT;
    let ended = loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break true,
            Ok(_) if std::time::Instant::now() > cut => break false,
            Ok(_) => {}
        }
    };
    assert!(ended, "chargen ran past max_duration");
    drop((busy, quiet, s));
    stop(d);
}

#[test]
fn event_reload_applies_to_new_connections_only() {
    let cfg = |handler: &str, threads: u32| {
        format!(
            "[daemon]\nshutdown_timeout = \"2s\"\n[[listener]]\nname = \"svc\"\nprotocol = \"unix\"\n\
             address = \"{{dir}}/svc.sock\"\nhandler = \"{handler}\"\nworkers = \"event\"\n\
             threads = {threads}\n"
        )
    };
    let d = Daemon::start(&cfg("echo", 2));
    d.wait_ready();
    let mut old = d.connect("svc");
    old.write_all(b"one\n").expect("send");
    assert_eq!(old.read_line(), "one\n");
    d.write_config(&cfg("time", 1));
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", READY_TIMEOUT);
    // The open connection keeps its echo (its loop retires only once it closes)...
    old.write_all(b"two\n").expect("send after reload");
    assert_eq!(old.read_line(), "two\n");
    // ...and a new one gets the new handler, on the new loop.
    let mut new = d.connect("svc");
    assert_eq!(new.read_to_end_vec().len(), 4, "time after reload");
    drop((old, new));
    // `threads` went from 2 to 1: the old loops leave once their connections are gone.
    let loops = || {
        thread_names(d.pid())
            .iter()
            .filter(|n| n.starts_with("socketd:svc:ev"))
            .count()
    };
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while loops() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} event loop threads still running, want 1: {:?}",
            loops(),
            thread_names(d.pid())
        );
        // A new connection gives the listener a chance to retire empty loops.
        let mut probe = d.connect("svc");
        assert_eq!(probe.read_to_end_vec().len(), 4);
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(d);
}

#[test]
fn event_max_workers_bounds_open_connections() {
    let d = Daemon::start(
        &(event_listener("echo", "tcp", "127.0.0.1:0", "echo") + "max_workers = 2\n"),
    );
    d.wait_ready();
    let mut a = d.connect("echo");
    let mut b = d.connect("echo");
    for s in [&mut a, &mut b] {
        s.write_all(b"hi\n").expect("send");
        assert_eq!(s.read_line(), "hi\n");
    }
    // A third client waits in the backlog: connected by the kernel, not served.
    let mut c = d.connect("echo");
    c.write_all(b"third\n").expect("send");
    assert!(
        c.silent_for(Duration::from_millis(300)),
        "served past max_workers"
    );
    drop(a);
    assert_eq!(c.read_line(), "third\n", "served once a place freed");
    drop((b, c));
    stop(d);
}

/// Event-mode connections get the same access line as the other worker models.
#[test]
fn event_connections_get_an_access_line() {
    let toml = format!(
        "[daemon]\naccess_log = \"stderr\"\n{}",
        event_listener("echo", "tcp", "127.0.0.1:0", "echo")
    );
    let d = Daemon::start(&toml);
    d.wait_ready();
    let mut s = d.connect("echo");
    s.write_all(b"hello\n").expect("send");
    assert_eq!(s.read_line(), "hello\n");
    drop(s);
    let line = d.wait_log("access: listener `echo`", READY_TIMEOUT);
    assert!(line.contains(" in 6 out 6 outcome ok"), "{line}");
    stop(d);
}
