//! `workers = "forked"`: every built-in over every socket kind and a registered handler in
//! child processes, `max_workers` as a cap on live children, no zombies after hundreds of
//! connections, forked work next to a busy threaded listener, a child holding only its own
//! connection, and SIGTERM with children that will not end by themselves.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::services::{check_listener, listener};

/// A `[[listener]]` with `workers = "forked"` and extra lines.
pub fn forked(name: &str, protocol: &str, address: &str, handler: &str, extra: &str) -> String {
    format!(
        "{}workers = \"forked\"\n{extra}\n",
        listener(name, protocol, address, handler)
    )
}

/// (pid, ppid, state) of every process, from /proc.
pub fn processes() -> Vec<(i32, i32, char)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may hold spaces: parse after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((pid, ppid, state));
    }
    out
}

/// Every process descended from `root` (not `root` itself), with its state.
pub fn descendants(root: i32) -> Vec<(i32, char)> {
    let all = processes();
    let mut found: Vec<(i32, char)> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, state) in &all {
            if *ppid == p {
                found.push((*pid, *state));
                frontier.push(*pid);
            }
        }
    }
    found
}

/// The fork servers: the daemon's child processes (two per CPU, at most eight).
pub fn fork_servers(d: &Daemon) -> Vec<i32> {
    let kids: Vec<i32> = processes()
        .iter()
        .filter(|(_, pp, _)| *pp == d.pid())
        .map(|(p, _, _)| *p)
        .collect();
    assert!(
        (1..=8).contains(&kids.len()),
        "the daemon's children are its fork servers, one to eight: {kids:?}\n{}",
        d.log_dump()
    );
    kids
}

/// Workers (children of the fork servers) right now.
fn workers(d: &Daemon) -> usize {
    let fs = fork_servers(d);
    processes()
        .iter()
        .filter(|(_, pp, _)| fs.contains(pp))
        .count()
}

fn stop_cleanly(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn every_builtin_forked_over_every_socket_kind() {
    let services = ["echo", "discard", "chargen", "daytime", "time"];
    let kinds = [
        ("tcp", "127.0.0.1:0"),
        ("udp", "127.0.0.1:0"),
        ("unix", "{dir}/S.sock"),
        ("unix-dgram", "{dir}/S.dgram"),
    ];
    let mut toml = String::from("[daemon]\nshutdown_timeout = \"2s\"\n");
    for (proto, addr) in kinds {
        for s in services {
            let name = format!("{s}-{proto}");
            toml.push_str(&forked(&name, proto, &addr.replace('S', &name), s, ""));
        }
    }
    let d = Daemon::start(&toml);
    assert_eq!(d.wait_ready(), 20, "{}", d.log_dump());
    for (proto, _) in kinds {
        for s in services {
            check_listener(&d, &format!("{s}-{proto}"), s);
        }
    }
    stop_cleanly(d);
}

#[test]
fn myhandler_example_runs_forked() {
    let bin = example_bin("myhandler");
    let d = Daemon::start_bin(
        &bin,
        &format!(
            "{}{}{}",
            forked("tcp", "tcp", "127.0.0.1:0", "myhandler", ""),
            forked("unix", "unix", "{dir}/my.sock", "myhandler", ""),
            forked("udp", "udp", "127.0.0.1:0", "myhandler", ""),
        ),
    );
    for name in ["tcp", "unix"] {
        let mut s = d.connect(name);
        s.write_all(b"hello\nworld\n").expect("send");
        assert_eq!(s.read_line(), "Your msg=hello\n");
        assert_eq!(s.read_line(), "Your msg=world\n");
        s.shutdown_write();
        assert_eq!(
            s.read_to_end_vec(),
            b"",
            "{name}: closes after the client does"
        );
    }
    assert_eq!(lossy(&d.dgram("udp").request(b"ping")), "Your msg=ping\n");
    assert_contains(
        &d.log(),
        &["tcp: request from", "unix: request from", "finished with"],
    );
    stop_cleanly(d);
}

#[test]
fn max_workers_caps_live_children_under_a_burst() {
    let d = Daemon::start(&forked(
        "echo",
        "tcp",
        "127.0.0.1:0",
        "echo",
        "max_workers = 3",
    ));
    // Ten clients at once; each child holds its connection until the client closes.
    let mut clients: Vec<Stream> = (0..10).map(|_| d.connect("echo")).collect();
    for c in clients.iter_mut() {
        c.write_all(b"x").expect("send");
    }
    wait_until("three children serving", READY_TIMEOUT, || workers(&d) == 3);
    // Which three are served first is not fixed: the fork servers accept concurrently.
    let mut answered = Vec::new();
    for c in clients.iter_mut() {
        c.set_read_timeout(Duration::from_millis(300));
        let mut b = [0u8; 1];
        answered.push(c.read(&mut b).is_ok_and(|n| n == 1));
    }
    assert_eq!(
        answered.iter().filter(|a| **a).count(),
        3,
        "only max_workers connections are served at once"
    );
    assert_eq!(workers(&d), 3, "never more children than max_workers");
    // Close the answered clients; the queued ones are served as children exit, three at most.
    let queued_at = answered.iter().map(|a| !a);
    let mut queued: Vec<Stream> = clients
        .into_iter()
        .zip(queued_at)
        .filter_map(|(c, queued)| queued.then_some(c))
        .collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut peak = 0;
    while !queued.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} clients never served\n{}",
            queued.len(),
            d.log_dump()
        );
        peak = peak.max(workers(&d));
        queued.retain_mut(|c| {
            c.set_read_timeout(Duration::from_millis(20));
            let mut b = [0u8; 1];
            !c.read(&mut b).is_ok_and(|n| n == 1)
        });
    }
    assert!(peak <= 3, "peak children {peak}");
    wait_until("children gone", READY_TIMEOUT, || workers(&d) == 0);
    stop_cleanly(d);
}

#[test]
fn queued_connections_are_served_when_children_exit() {
    let d = Daemon::start(&forked(
        "echo",
        "tcp",
        "127.0.0.1:0",
        "echo",
        "max_workers = 2",
    ));
    let mut first: Vec<Stream> = (0..2).map(|_| d.connect("echo")).collect();
    for c in first.iter_mut() {
        c.write_all(b"a").expect("send");
        assert_eq!(c.read_n(1), b"a");
    }
    let mut waiting = d.connect("echo");
    waiting.write_all(b"b").expect("send");
    assert!(
        waiting.silent_for(Duration::from_millis(300)),
        "third client waits at the cap"
    );
    drop(first);
    waiting.set_read_timeout(IO_TIMEOUT);
    assert_eq!(waiting.read_n(1), b"b", "served once a child exited");
    drop(waiting);
    stop_cleanly(d);
}

#[test]
fn no_zombies_after_hundreds_of_forked_connections() {
    let d = Daemon::start(&format!(
        "{}{}",
        forked("echo", "tcp", "127.0.0.1:0", "echo", "max_workers = 16"),
        forked("uecho", "udp", "127.0.0.1:0", "echo", "max_workers = 16")
    ));
    let addr = d.addr("echo");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..75 {
                    let mut s = Stream::tcp(addr);
                    let msg = format!("{t}-{i}\n");
                    s.write_all(msg.as_bytes()).expect("send");
                    assert_eq!(s.read_line(), msg);
                }
            })
        })
        .collect();
    let u = d.dgram("uecho");
    for i in 0..100 {
        assert_eq!(
            u.request(format!("d{i}").as_bytes()),
            format!("d{i}").as_bytes()
        );
    }
    for t in threads {
        t.join().expect("client thread");
    }
    wait_until("every child reaped", READY_TIMEOUT, || workers(&d) == 0);
    let zombies: Vec<_> = descendants(d.pid())
        .into_iter()
        .filter(|(_, s)| *s == 'Z')
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    stop_cleanly(d);
}

#[test]
fn forked_connections_while_a_threaded_listener_is_busy() {
    let d = Daemon::start(&format!(
        "{}{}",
        listener("busy", "tcp", "127.0.0.1:0", "echo"),
        forked("forked", "tcp", "127.0.0.1:0", "echo", "max_workers = 8"),
    ));
    let busy = d.addr("busy");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut s = Stream::tcp(busy);
                    for _ in 0..20 {
                        let msg = format!("load {t} {n}\n");
                        s.write_all(msg.as_bytes()).expect("send");
                        assert_eq!(s.read_line(), msg);
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    for i in 0..300 {
        let mut s = d.connect("forked");
        let msg = format!("forked {i}\n");
        s.write_all(msg.as_bytes()).expect("send");
        assert_eq!(s.read_line(), msg, "forked connection {i}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total: u64 = load
        .into_iter()
        .map(|t| t.join().expect("load thread"))
        .sum();
    assert!(total > 0, "the threaded listener was under load");
    stop_cleanly(d);
}

/// The descriptors a program sees: `ls` of /proc/self/fd, minus ls's own directory handle.
fn fds_seen(d: &Daemon, name: &str) -> HashSet<String> {
    let mut s = d.connect(name);
    s.shutdown_write();
    let out = lossy(&s.read_to_end_vec());
    out.split_whitespace().map(str::to_string).collect()
}

#[test]
fn a_child_holds_only_its_own_connection() {
    let ls = "exec = { argv = [\"/bin/ls\", \"/proc/self/fd\"], stderr = \"null\" }";
    let d = Daemon::start(&format!(
        "{}{}{ls}\n{}",
        forked("f", "tcp", "127.0.0.1:0", "exec", ls),
        listener("t", "tcp", "127.0.0.1:0", "exec"),
        forked("fu", "udp", "127.0.0.1:0", "echo", ""),
    ));
    // Another connection open meanwhile: its descriptor must not leak into the program.
    let held = d.connect("t");
    assert_eq!(d.dgram("fu").request(b"x"), b"x");
    for name in ["f", "t"] {
        let fds = fds_seen(&d, name);
        let want: HashSet<String> = ["0", "1", "2", "3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            fds, want,
            "{name}: stdin, stdout, stderr and ls's own directory only"
        );
    }
    drop(held);
    stop_cleanly(d);
}

#[test]
fn sigterm_gives_children_shutdown_timeout_then_kills_them() {
    // The program ignores SIGTERM (inherited by sleep), so only SIGKILL ends it.
    let stubborn =
        "exec = { argv = [\"/bin/sh\", \"-c\", \"trap '' TERM; echo started; sleep 600\"] }";
    let polite = "exec = { argv = [\"/bin/sleep\", \"600\"] }";
    let mut d = Daemon::start(&format!(
        "[daemon]\nshutdown_timeout = \"1s\"\n{}{}{stubborn}\n{}{}{polite}\n",
        forked("fs", "tcp", "127.0.0.1:0", "exec", stubborn),
        listener("ts", "tcp", "127.0.0.1:0", "exec"),
        forked("fp", "tcp", "127.0.0.1:0", "exec", polite),
        listener("tp", "tcp", "127.0.0.1:0", "exec"),
    ));
    let mut clients = Vec::new();
    for name in ["fs", "ts"] {
        let mut c = d.connect(name);
        assert_eq!(c.read_line(), "started\n");
        clients.push(c);
    }
    for name in ["fp", "tp"] {
        clients.push(d.connect(name));
    }
    wait_until("four programs running", READY_TIMEOUT, || {
        descendants(d.pid())
            .iter()
            .filter(|(p, _)| comm(*p) == "sleep")
            .count()
            == 4
    });
    let before: Vec<i32> = descendants(d.pid()).into_iter().map(|(p, _)| p).collect();
    let started = Instant::now();
    d.signal(libc::SIGTERM);
    assert!(
        !d.closed_soon(Duration::from_millis(500)),
        "children get shutdown_timeout first"
    );
    let status = d.wait_exit(Duration::from_secs(15));
    let took = started.elapsed();
    assert_exit_code(status, 0, &d);
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before shutdown_timeout"
    );
    assert!(took < Duration::from_secs(8), "exited after {took:?}");
    // Zombies are dead (their new parent, init, reaps them); anything else is left behind.
    let alive = |p: &i32| {
        processes()
            .iter()
            .any(|(pid, _, state)| pid == p && *state != 'Z')
    };
    let left: Vec<i32> = before.into_iter().filter(alive).collect();
    assert!(
        left.is_empty(),
        "processes left behind: {left:?}\n{}",
        d.log_dump()
    );
    assert_contains(
        &d.log(),
        &["SIGTERM sent to", "SIGKILL sent", "socketd stopped"],
    );
}

/// A process's command name, or "" when it is gone (or a zombie reaped meanwhile).
fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

trait ClosedSoon {
    fn closed_soon(&mut self, within: Duration) -> bool;
}

impl ClosedSoon for Daemon {
    /// Whether the daemon exits within `within`.
    fn closed_soon(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.try_status().is_some() {
                return true;
            }
            std::thread::sleep(POLL);
        }
        false
    }
}

#[test]
fn a_reload_reaches_new_forked_children() {
    let conf = |v: &str| {
        forked(
            "env",
            "tcp",
            "127.0.0.1:0",
            "exec",
            &format!("exec = {{ argv = [\"/usr/bin/env\"], env = {{ V = \"{v}\" }} }}"),
        )
    };
    let d = Daemon::start(&conf("one"));
    let read = |d: &Daemon| {
        let mut s = d.connect("env");
        s.shutdown_write();
        lossy(&s.read_to_end_vec())
    };
    assert!(read(&d).contains("V=one\n"));
    // The same address text keeps the very socket; only the settings change.
    d.write_config(&conf("two"));
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", READY_TIMEOUT);
    let out = read(&d);
    assert!(
        out.contains("V=two\n"),
        "new children use the reloaded settings: {out}"
    );
    stop_cleanly(d);
}
