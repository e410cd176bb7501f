//! SIGHUP reload end to end: listeners added, removed, changed and unchanged, with a client
//! hammering the unchanged one through 20 reloads; invalid files and failed binds leave the
//! running config serving; SIGUSR1's status snapshot.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;

const RELOAD_WAIT: Duration = Duration::from_secs(10);

const BEFORE: &str = r#"
[daemon]
shutdown_timeout = "2s"

[[listener]]
name = "stay"
protocol = "tcp"
address = "127.0.0.1:0"
handler = "echo"

[[listener]]
name = "change"
protocol = "tcp"
address = "127.0.0.1:0"
handler = "echo"

[[listener]]
name = "gone"
protocol = "tcp"
address = "127.0.0.1:0"
handler = "echo"
"#;

const AFTER: &str = r#"
[daemon]
shutdown_timeout = "2s"

[[listener]]
name = "stay"
protocol = "tcp"
address = "127.0.0.1:0"
handler = "echo"

[[listener]]
name = "change"
protocol = "tcp"
address = "127.0.0.1:0"
handler = "daytime"

[[listener]]
name = "new"
protocol = "unix"
address = "{dir}/new.sock"
handler = "echo"
"#;

fn echo_once(addr: std::net::SocketAddr, n: usize) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let msg = format!("ping {n}\n");
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut back = String::new();
    s.read_to_string(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    if back == msg {
        Ok(())
    } else {
        Err(format!("echoed {back:?}, sent {msg:?}"))
    }
}

#[test]
fn reload_storm_keeps_unchanged_listener_and_applies_add_remove_change() {
    let mut d = Daemon::start(BEFORE);
    let stay = d.addr("stay");
    let gone = d.addr("gone");
    let change = d.addr("change");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let hammer = {
        let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok));
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                match echo_once(stay, n) {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(format!("request {n}: {e}")),
                }
                n += 1;
            }
            failures
        })
    };

    for i in 1..=20 {
        d.write_config(if i % 2 == 1 { AFTER } else { BEFORE });
        d.signal(libc::SIGHUP);
        d.wait_log_count("reload: done", i, RELOAD_WAIT);
        if i == 1 {
            // Added: the unix listener answers. Changed: same socket, new handler.
            let mut s = Stream::unix(&d.dir().join("new.sock"));
            s.write_all(b"new\n").unwrap();
            assert_eq!(s.read_line(), "new\n");
            assert_eq!(
                d.addr("change"),
                change,
                "a changed listener keeps its socket"
            );
            let mut s = Stream::tcp(change);
            let line = s.read_line();
            assert!(
                line.contains(':') && line.ends_with("\r\n"),
                "daytime answers now: {line:?}"
            );
            // Removed: the old port refuses.
            assert!(
                std::net::TcpStream::connect_timeout(&gone, IO_TIMEOUT).is_err(),
                "`gone` still accepts"
            );
        }
    }
    // Ensure traffic overlapped the whole storm, then stop the hammer.
    let before = ok.load(Ordering::Relaxed);
    wait_until("the hammer to make progress", RELOAD_WAIT, || {
        ok.load(Ordering::Relaxed) > before
    });
    stop.store(true, Ordering::Relaxed);
    let failures = hammer.join().expect("hammer thread");
    assert!(
        failures.is_empty(),
        "{} failures on the unchanged listener:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        d.log_dump()
    );
    assert!(
        ok.load(Ordering::Relaxed) >= 20,
        "too few requests overlapped the reloads"
    );
    assert_eq!(
        d.addr("stay"),
        stay,
        "the unchanged listener was never re-bound"
    );
    assert_contains(&d.log(), &["reload: done (2 kept, 1 added, 1 removed)"]);
    // After 20 reloads (even count) the BEFORE config is in force: `gone` is back, `new` left.
    assert!(
        !d.dir().join("new.sock").exists(),
        "removed unix listener's file was unlinked"
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn reload_with_bad_syntax_keeps_old_config_serving() {
    let mut d = Daemon::start(BEFORE);
    let stay = d.addr("stay");
    d.write_config("[[listener]\nname = \"stay\"\n");
    d.signal(libc::SIGHUP);
    d.wait_log(
        "reload refused: the running configuration stays in force",
        RELOAD_WAIT,
    );
    assert_contains(&d.log(), &["reload refused: ", "socketd.toml:1:"]);
    echo_once(stay, 1).unwrap();
    echo_once(d.addr("gone"), 2).unwrap();
    // And a good file afterwards still applies.
    d.write_config(AFTER);
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", RELOAD_WAIT);
    echo_once(stay, 3).unwrap();
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn reload_with_port_in_use_rolls_back() {
    let mut d = Daemon::start(BEFORE);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let with_conflict = format!(
        "{AFTER}\n[[listener]]\nname = \"clash\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:{port}\"\nhandler = \"echo\"\n"
    );
    d.write_config(&with_conflict);
    d.signal(libc::SIGHUP);
    let line = d.wait_log("reload rolled back", RELOAD_WAIT);
    assert_contains(
        &line,
        &[
            "listener `clash`",
            &format!("127.0.0.1:{port}"),
            "stays in force",
        ],
    );
    // Nothing of the new config applied: `gone` serves, `new` was never bound, `change` echoes.
    echo_once(d.addr("stay"), 1).unwrap();
    echo_once(d.addr("gone"), 2).unwrap();
    echo_once(d.addr("change"), 3).unwrap();
    assert!(
        !d.dir().join("new.sock").exists(),
        "the rolled-back unix listener left a file"
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn reload_logs_daemon_changes_needing_restart_and_applies_level() {
    let mut d = Daemon::start(BEFORE);
    let changed = BEFORE.replace(
        "shutdown_timeout = \"2s\"",
        "shutdown_timeout = \"2s\"\npidfile = \"{dir}/x.pid\"\nlog_level = \"debug\"",
    );
    d.write_config(&changed);
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", RELOAD_WAIT);
    assert_contains(
        &d.log(),
        &["[daemon] pidfile changed; that takes a restart to apply"],
    );
    // log_level = "debug" applies at once: a datagram-free check is the debug connection line.
    let mut s = d.connect("stay");
    s.write_all(b"x").unwrap();
    s.shutdown_write();
    s.read_to_end_vec();
    d.wait_log("connection from", RELOAD_WAIT);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn sigusr1_logs_status_per_listener() {
    let mut d = Daemon::start(BEFORE);
    let mut held = d.connect("stay");
    held.write_all(b"a").unwrap();
    assert_eq!(held.read_n(1), b"a");
    d.signal(libc::SIGUSR1);
    let line = d.wait_log("status: listener `stay`", RELOAD_WAIT);
    assert_contains(
        &line,
        &[
            &d.addr("stay").to_string(),
            "1 connections open",
            "0 served",
            "1 workers busy of 64",
        ],
    );
    assert_contains(
        &d.wait_log("status: 3 listeners", RELOAD_WAIT),
        &["1 connections open"],
    );
    drop(held);
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

fn worker_config(model: &str) -> String {
    format!(
        r#"
[daemon]
shutdown_timeout = "2s"

[[listener]]
name = "w"
protocol = "tcp"
address = "127.0.0.1:0"
handler = "echo"
workers = "{model}"
"#
    )
}

/// A listener's worker model is a setting like any other: a reload switches it on the same
/// socket, and the next connection is served by the new model.
#[test]
fn reload_switches_worker_models_on_the_same_socket() {
    let d = Daemon::start(&worker_config("threaded"));
    let addr = d.addr("w");
    for (i, model) in ["forked", "event", "threaded", "forked"].iter().enumerate() {
        d.write_config(&worker_config(model));
        d.signal(libc::SIGHUP);
        d.wait_log_count("reload: done", i + 1, RELOAD_WAIT);
        assert_eq!(d.addr("w"), addr, "the listener keeps its socket");
        let mut s = Stream::tcp(addr);
        s.write_all(format!("{model}\n").as_bytes()).unwrap();
        assert_eq!(s.read_line(), format!("{model}\n"));
        // The connection is still open: look at what serves it.
        let pid = d.pid();
        match *model {
            "forked" => {
                let workers: Vec<i32> =
                    children_of(pid).into_iter().flat_map(children_of).collect();
                assert!(
                    !workers.is_empty(),
                    "no forked worker under the fork server\n{}",
                    d.log_dump()
                );
            }
            "event" => {
                let names = thread_names(pid);
                assert!(
                    names.iter().any(|n| n.starts_with("socketd:w:ev")),
                    "no event loop thread: {names:?}"
                );
            }
            _ => {
                let names = thread_names(pid);
                assert!(
                    names.iter().any(|n| n == "socketd:w"),
                    "no worker thread: {names:?}"
                );
            }
        }
        drop(s);
    }
}

/// A kept unix listener whose `mode` changes gets it on its very socket file at the reload.
#[test]
fn reload_applies_a_new_mode_to_a_kept_unix_socket() {
    use std::os::unix::fs::PermissionsExt;
    let config = |mode: &str| {
        format!(
            "[[listener]]\nname = \"u\"\nprotocol = \"unix\"\naddress = \"{{dir}}/u.sock\"\nhandler = \"echo\"\nmode = \"{mode}\"\n"
        )
    };
    let d = Daemon::start(&config("0600"));
    let path = d.path("u");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    let mut s = Stream::unix(&path);
    d.write_config(&config("0660"));
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", RELOAD_WAIT);
    assert_eq!(mode(&path), 0o660, "{}", d.log_dump());
    // Same socket: the connection opened before the reload still works.
    s.write_all(b"still here\n").unwrap();
    assert_eq!(s.read_line(), "still here\n");
}
