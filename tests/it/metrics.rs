//! The Prometheus endpoint (`[daemon.metrics] address`) scraped for real and parsed with the
//! reference parser (Debian's python3-prometheus-client); metrics and status under load; and
//! an access log on a full disk.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::control::{ctl, echo, listener, status};
use crate::harness::*;

const PYTHON: &str = "/usr/bin/python3";

/// Where the daemon serves metrics, from its `metrics: serving http://ADDR/metrics` line.
fn metrics_addr(d: &Daemon) -> SocketAddr {
    let line = d.wait_log("metrics: serving http://", READY_TIMEOUT);
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_default();
    addr.parse()
        .unwrap_or_else(|e| panic!("metrics address in {line:?}: {e}"))
}

/// One HTTP request; returns the status line and the body.
fn http(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(request).expect("send");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// Parse an exposition with prometheus_client's `text_string_to_metric_families`; returns
/// `name{label=value,...}` -> value for every sample (labels sorted).
fn parse(text: &str) -> HashMap<String, f64> {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        print("%s{%s} %r" % (s.name, labels, s.value))
"#;
    let dir = TestDir::new();
    let input = dir.path().join("metrics.txt");
    std::fs::write(&input, text).expect("write");
    let mut cmd = std::process::Command::new(PYTHON);
    cmd.args(["-c", script])
        .stdin(std::fs::File::open(&input).expect("open"));
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert_eq!(
        out.code(),
        Some(0),
        "the parser refused it: {}\n{text}",
        out.describe()
    );
    out.stdout
        .lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        panic!(
            "no sample {key}; have:\n{:#?}",
            m.keys().collect::<Vec<_>>()
        )
    })
}

#[test]
fn a_real_scrape_parses_and_counts_what_happened() {
    // `broken` runs a program that is removed after the start: its spawn fails, a handler
    // error.
    let mut d = Daemon::spawn_with(&format!(
        "[daemon]\ncontrol = \"{{dir}}/control\"\n[daemon.metrics]\naddress = \"127.0.0.1:0\"\n{}\
         [[listener]]\nname = \"closed\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n\
         deny = [\"127.0.0.0/8\"]\n\
         [[listener]]\nname = \"broken\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"exec\"\n\
         exec = {{ argv = [\"{{dir}}/prog\"] }}\n",
        echo("echo")
    ), |dir, config| {
        let prog = dir.join("prog");
        std::fs::write(&prog, "#!/bin/sh\necho hi\n").expect("write prog");
        std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let mut cmd = socketd_cmd();
        cmd.arg("--config").arg(config);
        cmd
    });
    d.wait_ready();
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", READY_TIMEOUT);
    std::fs::remove_file(d.dir().join("prog")).expect("remove prog");
    let addr = metrics_addr(&d);
    for i in 0..4 {
        let mut s = d.connect("echo");
        s.write_all(format!("n{i}\n").as_bytes()).expect("send");
        s.shutdown_write();
        assert_eq!(s.read_to_end_vec(), format!("n{i}\n").as_bytes());
    }
    for _ in 0..2 {
        let mut s = d.connect("closed");
        assert!(s.closed_within(IO_TIMEOUT), "a denied peer is closed");
    }
    let mut s = d.connect("broken");
    assert!(
        s.closed_within(IO_TIMEOUT),
        "closed when the program cannot run"
    );
    let deadline = Instant::now() + READY_TIMEOUT;
    while listener(&status(&d), "broken")["handler_errors"] != 1 {
        assert!(Instant::now() < deadline, "the failed spawn counted");
        std::thread::sleep(POLL);
    }
    // The status the scrape shows is taken after the workers reported (served == 4).
    let deadline = Instant::now() + READY_TIMEOUT;
    while listener(&status(&d), "echo")["served"] != 4 {
        assert!(Instant::now() < deadline, "4 served");
        std::thread::sleep(POLL);
    }
    let text = scrape(addr);
    let m = parse(&text);
    assert_eq!(
        value(&m, "socketd_connections_accepted_total{listener=echo}"),
        4.0
    );
    assert_eq!(
        value(&m, "socketd_connections_accepted_total{listener=closed}"),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "socketd_connections_refused_total{listener=closed,reason=acl}"
        ),
        2.0
    );
    assert_eq!(
        value(&m, "socketd_received_bytes_total{listener=echo}"),
        12.0
    );
    assert_eq!(value(&m, "socketd_sent_bytes_total{listener=echo}"), 12.0);
    assert_eq!(
        value(&m, "socketd_handler_errors_total{listener=echo}"),
        0.0
    );
    assert_eq!(value(&m, "socketd_connections_open{listener=echo}"), 0.0);
    assert_eq!(value(&m, "socketd_workers_busy{listener=echo}"), 0.0);
    assert_eq!(
        value(
            &m,
            "socketd_connection_duration_seconds_count{listener=echo}"
        ),
        4.0
    );
    assert_eq!(
        value(
            &m,
            "socketd_connection_duration_seconds_bucket{le=+Inf,listener=echo}"
        ),
        4.0
    );
    assert_eq!(value(&m, "socketd_reloads_total{result=ok}"), 1.0);
    assert_eq!(value(&m, "socketd_reloads_total{result=refused}"), 0.0);
    assert!(value(&m, "socketd_process_open_fds{}") > 3.0);
    assert!(value(&m, "socketd_process_resident_memory_bytes{}") > 0.0);
    // Status names the same endpoint.
    assert_eq!(status(&d)["metrics"], addr.to_string());
    // Anything but GET /metrics is refused politely.
    assert_eq!(
        http(addr, b"GET / HTTP/1.0\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http(addr, b"POST /metrics HTTP/1.0\r\n\r\n").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(http(addr, b"\r\n\r\n").0, "HTTP/1.1 405 Method Not Allowed");
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

/// Raise this process's soft open-file limit to `want` if the hard limit allows; the limit
/// in force afterwards.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read only the struct passed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// 10,000 connections open at once (each served once, then held); meanwhile scrapes and
/// `socketd status` answer and count every one of them as open; when they close, the gauges go
/// back to 0 and the counters hold all 10,000.
#[test]
fn metrics_and_status_stay_responsive_with_ten_thousand_open_connections() {
    const CONNS: usize = 10_000;
    let limit = raise_nofile(CONNS as u64 + 2_000);
    if limit < CONNS as u64 + 2_000 {
        eprintln!(
            "skipped: RLIMIT_NOFILE is {limit}, the test needs {}",
            CONNS + 2_000
        );
        return;
    }
    let mut d = Daemon::start(
        "[daemon]\ncontrol = \"{dir}/control\"\n[daemon.metrics]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"echo\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n\
         workers = \"event\"\nthreads = 2\nmax_workers = 12000\n",
    );
    let (maddr, eaddr) = (metrics_addr(&d), d.addr("echo"));
    // Four clients open 2,500 each; every connection is served once, then held open.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut held = Vec::with_capacity(CONNS / 4);
                for _ in 0..CONNS / 4 {
                    let mut s = TcpStream::connect_timeout(&eaddr, IO_TIMEOUT).expect("connect");
                    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                    s.write_all(b"x").expect("send");
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).expect("echo");
                    held.push(s);
                }
                held
            })
        })
        .collect();
    // Scrapes and status while the connections pile up: each must answer (their own
    // deadlines: 20s for HTTP, 65s for the client) and parse.
    let mut answered = 0;
    while !clients.iter().all(|c| c.is_finished()) {
        let m = parse(&scrape(maddr));
        assert!(m.contains_key("socketd_connections_open{listener=echo}"));
        assert_eq!(status(&d)["state"], "running");
        answered += 1;
    }
    let held: Vec<TcpStream> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    eprintln!("{answered} scrapes and status calls answered while 10,000 connections opened");
    assert!(answered >= 1);
    let m = parse(&scrape(maddr));
    assert_eq!(
        value(&m, "socketd_connections_open{listener=echo}"),
        CONNS as f64
    );
    assert_eq!(
        value(&m, "socketd_connections_accepted_total{listener=echo}"),
        CONNS as f64
    );
    assert!(value(&m, "socketd_process_open_fds{}") >= CONNS as f64);
    let s = status(&d);
    assert_eq!(listener(&s, "echo")["open"], CONNS);
    assert!(
        s["process"]["fds"]
            .as_u64()
            .is_some_and(|n| n >= CONNS as u64),
        "{}",
        s["process"]
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = parse(&scrape(maddr));
        let ended = value(
            &m,
            "socketd_connection_duration_seconds_count{listener=echo}",
        );
        // The duration is observed where the connection ends (its event loop), the open gauge
        // falls when the main loop books the end a moment later: wait for both.
        let open = value(&m, "socketd_connections_open{listener=echo}");
        if ended == CONNS as f64 && open == 0.0 {
            assert_eq!(
                value(&m, "socketd_received_bytes_total{listener=echo}"),
                CONNS as f64
            );
            assert_eq!(
                value(&m, "socketd_sent_bytes_total{listener=echo}"),
                CONNS as f64
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "all connections ended: {ended}, still open: {open}"
        );
        std::thread::sleep(POLL);
    }
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

/// An access log that cannot be written (/dev/full: every write fails with ENOSPC) loses
/// access lines, counted and reported, never the service or the daemon's own log.
#[test]
fn a_full_disk_drops_access_lines_with_a_count_never_the_service() {
    let mut d = Daemon::start(&format!(
        "[daemon]\ncontrol = \"{{dir}}/control\"\naccess_log = \"file:/dev/full\"\n\
         [daemon.metrics]\naddress = \"127.0.0.1:0\"\n{}",
        echo("echo")
    ));
    for i in 0..50 {
        let mut s = d.connect("echo");
        s.write_all(format!("{i}\n").as_bytes()).expect("send");
        s.shutdown_write();
        assert_eq!(s.read_to_end_vec(), format!("{i}\n").as_bytes());
    }
    let warning = d.wait_log("access log: ", READY_TIMEOUT);
    assert_contains(&warning, &["lines dropped", "No space left on device"]);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let s = status(&d);
        let dropped = s["access_log"]["dropped"].as_u64().unwrap_or(0);
        if dropped == 50 {
            assert_eq!(s["access_log"]["written"], 0);
            assert_eq!(s["access_log"]["target"], "file:/dev/full");
            break;
        }
        assert!(Instant::now() < deadline, "50 dropped: {s}");
        std::thread::sleep(POLL);
    }
    let m = parse(&scrape(metrics_addr(&d)));
    assert_eq!(
        value(&m, "socketd_access_log_lines_total{result=dropped}"),
        50.0
    );
    // Lifecycle lines still get through, and the reload result too.
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", READY_TIMEOUT);
    let out = ctl(&d, &["status"]);
    assert_contains(
        &out.stdout,
        &["access log: file:/dev/full, 0 lines written, 50 dropped"],
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert_contains(&d.log(), &["socketd stopped"]);
}

/// Forked workers' connections count in the daemon's metrics and reach its access log.
#[test]
fn forked_connections_are_counted_and_logged_by_the_daemon() {
    let mut d = Daemon::start(
        "[daemon]\ncontrol = \"{dir}/control\"\naccess_log = \"file:{dir}/access.log\"\n\
         [[listener]]\nname = \"fecho\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\n\
         handler = \"echo\"\nworkers = \"forked\"\n",
    );
    for _ in 0..3 {
        let mut s = d.connect("fecho");
        s.write_all(b"forked\n").expect("send");
        s.shutdown_write();
        assert_eq!(s.read_to_end_vec(), b"forked\n");
    }
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let l = listener(&status(&d), "fecho").clone();
        if l["bytes_in"] == 21 && l["bytes_out"] == 21 && l["served"] == 3 {
            assert_eq!(l["workers"], "forked");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "3 forked connections counted: {l}"
        );
        std::thread::sleep(POLL);
    }
    let log = d.dir().join("access.log");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("access: listener `fecho`").count() == 3 {
            assert!(text.contains(" in 7 out 7 outcome ok"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "3 access lines: {text}");
        std::thread::sleep(POLL);
    }
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

/// An access log whose reader does not keep up (a FIFO the test opened and never reads): the
/// writer blocks on the full pipe, the bounded queue fills, and further lines are dropped and
/// counted; every connection is still served and the loop warns in the daemon's log.
#[test]
fn a_stuck_access_log_drops_lines_with_a_count_and_the_service_goes_on() {
    const CLIENTS: usize = 16;
    const EACH: usize = 750;
    let dir = TestDir::new();
    let fifo = dir.path().join("fifo");
    let c_path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    // The read end, held open and never read.
    let _reader = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("open the fifo's read end")
    };
    let mut d = Daemon::start(&format!(
        "[daemon]\ncontrol = \"{{dir}}/control\"\naccess_log = \"file:{}\"\n{}",
        fifo.display(),
        echo("echo")
    ));
    let addr = d.addr("echo");
    let load: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..EACH {
                    let mut s = Stream::tcp(addr);
                    s.write_all(b"x").expect("send");
                    s.shutdown_write();
                    assert_eq!(s.read_to_end_vec(), b"x");
                }
            })
        })
        .collect();
    for t in load {
        t.join().expect("every connection served");
    }
    let total = (CLIENTS * EACH) as u64;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let s = status(&d);
        let l = listener(&s, "echo");
        let (written, dropped) = (
            s["access_log"]["written"].as_u64().unwrap_or(0),
            s["access_log"]["dropped"].as_u64().unwrap_or(0),
        );
        if l["served"] == total && dropped > 0 {
            // Written, dropped, and the rest still queued or in the blocked write.
            assert!(written + dropped <= total, "{s}");
            assert!(written < total, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "lines dropped: {s}");
        std::thread::sleep(POLL);
    }
    let warning = d.wait_log("access log: ", READY_TIMEOUT);
    assert_contains(&warning, &["lines dropped", "queue full"]);
    round_trip_echo(&d);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

fn round_trip_echo(d: &Daemon) {
    let mut s = d.connect("echo");
    s.write_all(b"still\n").expect("send");
    assert_eq!(s.read_line(), "still\n");
}
