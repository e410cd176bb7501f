//! Fork servers accept for `workers = "forked"` stream listeners (issue 12): every fork server
//! watches the listener's socket and the daemon only judges each connection. Shown through
//! SIGUSR1's "accepted by fork servers" count, which only a fork server's report can raise;
//! the limits, a stop's deadline, a reload that removes the listener, and a fork server killed
//! and replaced are checked on this path, and the old hand-off path
//! (`SOCKETD_FORKED_ACCEPT=handoff`, for the bench's A/B) still serves and refuses. The other
//! forked tests (`forked.rs`, `forked_exec.rs`, `protection.rs`'s `_forked` variants) run on the
//! default path, and on the hand-off path when the tests run with that variable set.

use std::io::Write;
use std::time::Duration;

use crate::forked::{fork_servers, forked};
use crate::harness::*;
use crate::protection::echoes;

fn echo_forked(name: &str, extra: &str) -> String {
    format!(
        "[daemon]\nshutdown_timeout = \"60s\"\n{}",
        forked(name, "tcp", "127.0.0.1:0", "echo", extra)
    )
}

/// The fork servers' accept count in the `count`th status line for `name`, or `None` when the
/// line has none (the main loop accepts).
fn accepted_by_fork_servers(d: &Daemon, name: &str, count: usize) -> Option<u64> {
    d.signal(libc::SIGUSR1);
    let line = d.wait_log_count(&format!("status: listener `{name}`"), count, IO_TIMEOUT);
    let (_, n) = line.split_once("accepted by fork servers ")?;
    Some(
        n.trim()
            .parse()
            .unwrap_or_else(|_| panic!("count in {line:?}")),
    )
}

fn handoff_daemon(toml: &str) -> Daemon {
    let d = Daemon::spawn_with(toml, |_, config| {
        let mut cmd = command(std::path::Path::new(SOCKETD));
        cmd.arg("--config")
            .arg(config)
            .env("SOCKETD_FORKED_ACCEPT", "handoff");
        cmd
    });
    d.wait_ready();
    d
}

fn stop_cleanly(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

fn default_path() -> bool {
    std::env::var("SOCKETD_FORKED_ACCEPT").as_deref() != Ok("handoff")
}

#[test]
fn fork_servers_accept_every_connection() {
    if !default_path() {
        return; // this test is about the default path; the hand-off one is below
    }
    let d = Daemon::start(
        &(echo_forked("tcp", "") + &forked("unix", "unix", "{dir}/e.sock", "echo", "")),
    );
    let addr = d.addr("tcp");
    for i in 0..20 {
        let mut s = Stream::tcp(addr);
        s.write_all(format!("t{i}\n").as_bytes()).expect("send");
        assert_eq!(s.read_line(), format!("t{i}\n"));
    }
    for i in 0..5 {
        let mut s = d.connect("unix");
        s.write_all(format!("u{i}\n").as_bytes()).expect("send");
        assert_eq!(s.read_line(), format!("u{i}\n"));
    }
    // Every connection came in through a fork server's knock: none through the main loop.
    assert_eq!(accepted_by_fork_servers(&d, "tcp", 1), Some(20));
    assert_eq!(accepted_by_fork_servers(&d, "unix", 1), Some(5));
    stop_cleanly(d);
}

#[test]
fn the_hand_off_path_stays_selectable_for_forked_listeners() {
    let d = handoff_daemon(&echo_forked("h", "max_workers = 2\nmax_connections = 2"));
    let addr = d.addr("h");
    let mut a = Stream::tcp(addr);
    let mut b = Stream::tcp(addr);
    assert!(echoes(&mut a) && echoes(&mut b));
    assert!(
        Stream::tcp(addr).closed_within(IO_TIMEOUT),
        "over max_connections: refused at once on the hand-off path too"
    );
    assert_eq!(
        accepted_by_fork_servers(&d, "h", 1),
        None,
        "the main loop accepts"
    );
    drop((a, b));
    stop_cleanly(d);
}

/// Issue 7 on this path: with `max_connections` equal to `max_workers`, a client over the cap
/// is accepted and closed at once, not left in the backlog; a place frees when one closes.
#[test]
fn max_connections_at_max_workers_refuses_at_once() {
    let d = Daemon::start(&echo_forked("cap", "max_workers = 3\nmax_connections = 3"));
    let addr = d.addr("cap");
    let mut held: Vec<Stream> = (0..3).map(|_| Stream::tcp(addr)).collect();
    for s in &mut held {
        assert!(echoes(s));
    }
    for _ in 0..3 {
        assert!(
            Stream::tcp(addr).closed_within(IO_TIMEOUT),
            "over max_connections: closed at once"
        );
    }
    d.wait_log("max_connections reached", IO_TIMEOUT);
    held.pop();
    wait_until("a place to free up after a close", READY_TIMEOUT, || {
        echoes(&mut Stream::tcp(addr))
    });
    for s in &mut held {
        assert!(echoes(s), "admitted connections were never disturbed");
    }
    drop(held);
    stop_cleanly(d);
}

/// At `max_workers` (no `max_connections`) newcomers wait in the backlog and are served as
/// soon as a child ends: nothing refused, nothing lost.
#[test]
fn max_workers_queues_and_serves_when_a_child_ends() {
    let d = Daemon::start(&echo_forked("q", "max_workers = 2"));
    let addr = d.addr("q");
    let mut a = Stream::tcp(addr);
    let mut b = Stream::tcp(addr);
    assert!(echoes(&mut a) && echoes(&mut b));
    let mut c = Stream::tcp(addr);
    c.write_all(b"third\n").expect("send");
    assert!(
        c.silent_for(Duration::from_millis(300)),
        "a third client waits while both workers are busy"
    );
    drop(a);
    assert_eq!(c.read_line(), "third\n", "served once a child ended");
    drop((b, c));
    stop_cleanly(d);
}

/// A stop's deadline still cuts a forked connection that the daemon never accepted itself.
#[test]
fn a_stop_deadline_cuts_a_long_forked_connection() {
    let toml = "[daemon]\nshutdown_timeout = \"1s\"\n".to_string()
        + &forked("long", "tcp", "127.0.0.1:0", "echo", "");
    let mut d = Daemon::start(&toml);
    let mut s = Stream::tcp(d.addr("long"));
    assert!(echoes(&mut s));
    d.signal(libc::SIGTERM);
    d.wait_log("shutdown_timeout reached", Duration::from_secs(5));
    assert!(
        s.closed_within(IO_TIMEOUT),
        "the connection is closed at the deadline"
    );
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

/// A listener a reload removed is closed in every fork server too: its port is free.
#[test]
fn a_listener_removed_by_reload_frees_its_port() {
    let d = Daemon::start(
        &(echo_forked("gone", "") + &forked("stays", "tcp", "127.0.0.1:0", "echo", "")),
    );
    let (gone, stays) = (d.addr("gone"), d.addr("stays"));
    assert!(echoes(&mut Stream::tcp(gone)));
    let _ = accepted_by_fork_servers(&d, "gone", 1);
    d.write_config(&format!(
        "[daemon]\nshutdown_timeout = \"60s\"\n{}",
        forked("stays", "tcp", "127.0.0.1:0", "echo", "")
    ));
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", READY_TIMEOUT);
    wait_until(
        "the removed listener's port to be free",
        READY_TIMEOUT,
        || std::net::TcpListener::bind(gone).is_ok(),
    );
    assert!(
        echoes(&mut Stream::tcp(stays)),
        "the kept listener serves on"
    );
    stop_cleanly(d);
}

/// Killed fork servers are replaced, and the replacements watch the listener: after every
/// original one is gone, connections are still accepted (by fork servers) and served.
#[test]
fn replaced_fork_servers_watch_the_listener() {
    let d = Daemon::start(&echo_forked("r", ""));
    let addr = d.addr("r");
    assert!(echoes(&mut Stream::tcp(addr)));
    let originals = fork_servers(&d);
    for (i, pid) in originals.iter().enumerate() {
        // SAFETY: kill(2) on a pid this test just read as the daemon's child.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
        d.wait_log_count("replaced by pid", i + 1, READY_TIMEOUT);
    }
    let now = fork_servers(&d);
    assert!(
        now.iter().all(|p| !originals.contains(p)),
        "every fork server replaced: {originals:?} -> {now:?}"
    );
    let before = accepted_by_fork_servers(&d, "r", 1);
    for _ in 0..12 {
        assert!(
            echoes(&mut Stream::tcp(addr)),
            "served after the replacements"
        );
    }
    if default_path() {
        let after = accepted_by_fork_servers(&d, "r", 2);
        assert_eq!(
            after.zip(before).map(|(a, b)| a - b),
            Some(12),
            "accepted by the replacement fork servers"
        );
    }
    stop_cleanly(d);
}

/// Pause keeps the socket open and the fork servers stop accepting; resume serves what
/// queued. Drain closes the socket in every fork server before it returns, and the open
/// connection finishes.
#[test]
fn pause_resume_and_drain_reach_the_fork_servers() {
    use crate::control::{ctl, listener, status, CONTROL};
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        forked("fe", "tcp", "127.0.0.1:0", "echo", "")
    ));
    let addr = d.addr("fe");
    let out = ctl(&d, &["pause", "fe"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(listener(&status(&d), "fe")["state"], "paused");
    let mut queued = Stream::tcp(addr);
    queued.write_all(b"waiting\n").expect("send");
    assert!(
        queued.silent_for(Duration::from_millis(300)),
        "served while paused"
    );
    let out = ctl(&d, &["resume", "fe"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(queued.read_line(), "waiting\n");
    let mut open = Stream::tcp(addr);
    assert!(echoes(&mut open));
    let out = ctl(&d, &["drain", "fe"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        std::net::TcpStream::connect_timeout(&addr, IO_TIMEOUT).is_err(),
        "the socket is closed in every process once drain returns"
    );
    assert!(echoes(&mut open), "the open connection still works");
    drop((queued, open));
    d.wait_log("listener `fe`: drained", READY_TIMEOUT);
    stop_cleanly(d);
}
