//! Accept where the work is (issue 12): a `workers = "event"` stream listener's event loops
//! accept for themselves on the one socket (the first loop, more as it saturates; every loop
//! with `SOCKETD_EVENT_ACCEPT=every`). Shown through SIGUSR1's per-loop accept counts; the
//! old hand-off path stays selectable (`SOCKETD_EVENT_ACCEPT=handoff`, for the bench's A/B).
//! When further loops join is a matter of load, unit-tested in `event::accept`. Limits, stop and reload under this path are also covered by the `_event`
//! variants in `protection.rs` and `stop.rs`.

use std::io::Write;
use std::time::Instant;

use crate::harness::*;

fn echo_event(name: &str, extra: &str) -> String {
    format!(
        "[daemon]\nshutdown_timeout = \"60s\"\n[[listener]]\nname = \"{name}\"\nprotocol = \"tcp\"\n\
         address = \"127.0.0.1:0\"\nhandler = \"echo\"\nworkers = \"event\"\n{extra}\n"
    )
}

/// The per-loop counts (accepted, open now) of the `count`th status line for `name`.
fn per_loop(d: &Daemon, name: &str, count: usize) -> (Vec<u64>, Vec<u64>) {
    d.signal(libc::SIGUSR1);
    let line = d.wait_log_count(&format!("status: listener `{name}`"), count, IO_TIMEOUT);
    let Some((_, counts)) = line.split_once("accepted by event loops ") else {
        panic!("no per-loop accept counts in {line:?}");
    };
    let Some((accepted, open)) = counts.trim().split_once(" (open on each ") else {
        panic!("no per-loop open counts in {line:?}");
    };
    let parse = |s: &str| -> Vec<u64> {
        s.trim_end_matches(')')
            .split('/')
            .map(|n| n.parse().unwrap_or_else(|_| panic!("count in {line:?}")))
            .collect()
    };
    (parse(accepted), parse(open))
}

fn accepted_per_loop(d: &Daemon, name: &str, count: usize) -> Vec<u64> {
    per_loop(d, name, count).0
}

/// One connect, echo, close.
fn one_echo(addr: std::net::SocketAddr) {
    let mut s = Stream::tcp(addr);
    s.write_all(b"ping\n").expect("send");
    assert_eq!(s.read_line(), "ping\n");
}

/// A daemon whose event loops accept in `mode` (`SOCKETD_EVENT_ACCEPT`).
fn start_mode(config: &str, mode: &str) -> Daemon {
    let d = Daemon::spawn_with(config, |_, path| {
        let mut cmd = command(std::path::Path::new(SOCKETD));
        cmd.arg("--config")
            .arg(path)
            .env("SOCKETD_EVENT_ACCEPT", mode);
        cmd
    });
    d.wait_ready();
    d
}

#[test]
fn every_event_loop_accepts_and_the_main_loop_accepts_none() {
    let d = start_mode(&echo_event("e", "threads = 2"), "every");
    let addr = d.addr("e");
    let deadline = Instant::now() + OP_DEADLINE;
    let mut served = 0u64;
    let mut round = 0;
    loop {
        // Bursts of parallel clients: a loop busy accepting or serving is not the one the
        // kernel wakes for the next connection, so both loops get some.
        let clients: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(move || (0..16).for_each(|_| one_echo(addr))))
            .collect();
        for c in clients {
            c.join().expect("client thread");
        }
        served += 8 * 16;
        round += 1;
        let counts = accepted_per_loop(&d, "e", round);
        assert_eq!(counts.len(), 2, "one count per loop: {counts:?}");
        // Every connection was accepted by a loop: none went through the main loop.
        assert_eq!(counts.iter().sum::<u64>(), served, "{counts:?}");
        if counts.iter().all(|&n| n > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {served} connections one loop accepted none: {counts:?}"
        );
    }
    d.signal(libc::SIGTERM);
    let mut d = d;
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

/// The default (the first loop accepts, others join under load): every connection is still a
/// loop's, none the main loop's.
#[test]
fn by_default_the_loops_accept_and_the_main_loop_none() {
    let mut d = Daemon::start(&echo_event("d", "threads = 2"));
    for _ in 0..16 {
        one_echo(d.addr("d"));
    }
    let counts = accepted_per_loop(&d, "d", 1);
    assert_eq!(counts.len(), 2, "one count per loop: {counts:?}");
    assert_eq!(counts.iter().sum::<u64>(), 16, "{counts:?}");
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

/// Connections that come one at a time wake the same waiting loop; the busier loop passes
/// them on, so long-lived connections still spread over the accepting loops (here every loop;
/// by default the loops beyond the first accept only under load).
#[test]
fn connections_arriving_one_by_one_spread_over_the_loops() {
    let mut d = start_mode(&echo_event("s", "threads = 2"), "every");
    let mut held = Vec::new();
    for i in 0..8 {
        let mut s = Stream::tcp(d.addr("s"));
        s.write_all(format!("c{i}\n").as_bytes()).expect("send");
        assert_eq!(s.read_line(), format!("c{i}\n"));
        held.push(s);
    }
    let (accepted, open) = per_loop(&d, "s", 1);
    assert_eq!(accepted.iter().sum::<u64>(), 8, "{accepted:?}");
    assert_eq!(open.iter().sum::<u64>(), 8, "{open:?}");
    assert!(open.iter().all(|&n| n >= 3), "unbalanced: {open:?}");
    drop(held);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn the_hand_off_path_stays_selectable() {
    let mut d = start_mode(&echo_event("h", "threads = 2"), "handoff");
    for _ in 0..4 {
        one_echo(d.addr("h"));
    }
    d.signal(libc::SIGUSR1);
    let line = d.wait_log("status: listener `h`", IO_TIMEOUT);
    assert!(
        !line.contains("accepted by event loops"),
        "handoff: the main loop accepts: {line}"
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn reload_keeps_counts_changes_loops_and_drains_a_removed_listener() {
    let mut d = Daemon::start(&echo_event("r", "threads = 2"));
    let mut old = Stream::tcp(d.addr("r"));
    old.write_all(b"one\n").expect("send");
    assert_eq!(old.read_line(), "one\n");
    // Three loops now, and a cap the open connection already fills: the guard's counts
    // carry over, so the next client is refused at once by whichever loop accepts it.
    d.write_config(&echo_event("r", "threads = 3\nmax_connections = 1"));
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", READY_TIMEOUT);
    assert!(
        Stream::tcp(d.addr("r")).closed_within(IO_TIMEOUT),
        "over max_connections after the reload"
    );
    old.write_all(b"two\n").expect("send after reload");
    assert_eq!(old.read_line(), "two\n");
    assert_eq!(accepted_per_loop(&d, "r", 1).len(), 3, "three loops accept");
    let addr = d.addr("r");
    // The listener removed: no new connection, the open one goes on, then it drains.
    // (A long shutdown_timeout: a count left behind would hold the stop past STOP_BUDGET.)
    d.write_config(
        "[daemon]\nshutdown_timeout = \"60s\"\n[[listener]]\nname = \"other\"\n\
         protocol = \"unix\"\naddress = \"{dir}/other.sock\"\nhandler = \"echo\"\n",
    );
    d.signal(libc::SIGHUP);
    d.wait_log_count("reload: done", 2, READY_TIMEOUT);
    assert!(
        std::net::TcpStream::connect_timeout(&addr, IO_TIMEOUT).is_err(),
        "the removed listener's socket is closed"
    );
    old.write_all(b"three\n").expect("send while draining");
    assert_eq!(old.read_line(), "three\n");
    drop(old);
    d.wait_log("listener `r`: drained", IO_TIMEOUT);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}
