//! The control socket and its client subcommands (`socketd status|reload|stop|pause|resume|
//! drain|reopen-logs`), run as an operator would: the real binary as client, talking to a real
//! daemon over its socket; and what the socket does with clients that misbehave.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// `[daemon]` with a control socket in the test's dir.
pub const CONTROL: &str = "[daemon]\ncontrol = \"{dir}/control\"\nshutdown_timeout = \"5s\"\n";

pub fn echo(name: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n"
    )
}

/// Run `socketd --config FILE ARGS…` against the daemon's config (which names the socket).
pub fn ctl(d: &Daemon, args: &[&str]) -> CmdOutput {
    let mut cmd = socketd_cmd();
    cmd.arg("--config").arg(d.config_path()).args(args);
    run_with_timeout(cmd, CLIENT_TIMEOUT)
}

/// `socketd status --json`'s `status` object.
pub fn status(d: &Daemon) -> Value {
    let out = ctl(d, &["status", "--json"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", out.describe()));
    assert_eq!(v["version"], 1, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    v["status"].clone()
}

pub fn listener<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["listeners"]
        .as_array()
        .and_then(|ls| {
            ls.iter()
                .find(|l| l["name"] == name && !l["address"].is_null())
        })
        .unwrap_or_else(|| panic!("no open listener {name:?} in {status}"))
}

fn round_trip(d: &Daemon, name: &str, text: &str) {
    let mut s = d.connect(name);
    s.write_all(text.as_bytes()).expect("send");
    s.shutdown_write();
    assert_eq!(lossy(&s.read_to_end_vec()), text);
}

fn sha256sum(path: &Path) -> String {
    let mut cmd = std::process::Command::new("sha256sum");
    cmd.arg(path);
    let out = run_with_timeout(cmd, CLIENT_TIMEOUT);
    out.stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn stop(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn status_reports_listeners_counters_and_the_config_checksum() {
    let d = Daemon::start(&format!("{CONTROL}{}{}", echo("echo"), echo("other")));
    for i in 0..3 {
        round_trip(&d, "echo", &format!("hello {i}\n"));
    }
    let s = status(&d);
    assert_eq!(s["state"], "running");
    assert_eq!(s["process"]["pid"], d.pid());
    assert!(s["process"]["fds"].as_u64().is_some_and(|n| n > 3), "{s}");
    assert!(
        s["process"]["rss_bytes"].as_u64().is_some_and(|n| n > 0),
        "{s}"
    );
    assert_eq!(
        s["config"]["sha256"].as_str(),
        Some(sha256sum(d.config_path()).as_str()),
        "the checksum is the file's sha256"
    );
    assert_eq!(s["reloads"]["last"], Value::Null);
    let e = listener(&s, "echo");
    assert_eq!(e["address"], d.addr("echo").to_string());
    assert_eq!(
        (e["protocol"].as_str(), e["workers"].as_str()),
        (Some("tcp"), Some("threaded"))
    );
    assert_eq!(e["state"], "accepting");
    assert_eq!(e["accepted"], 3);
    assert_eq!(e["served"], 3);
    assert_eq!(e["open"], 0);
    // "hello N\n" is 8 bytes each way.
    assert_eq!(
        (e["bytes_in"].as_u64(), e["bytes_out"].as_u64()),
        (Some(24), Some(24))
    );
    assert_eq!(listener(&s, "other")["accepted"], 0);
    // The same for a person.
    let human = ctl(&d, &["status"]);
    assert_eq!(human.code(), Some(0), "{}", human.describe());
    assert_contains(
        &human.stdout,
        &[
            &format!("pid {}: running", d.pid()),
            "LISTENER",
            &d.addr("echo").to_string(),
            "accepting",
        ],
    );
    stop(d);
}

#[test]
fn reload_reports_the_outcome_and_a_refused_file_exits_non_zero() {
    let d = Daemon::start(&format!("{CONTROL}{}", echo("echo")));
    d.write_config(&format!("{CONTROL}{}{}", echo("echo"), echo("added")));
    let ok = ctl(&d, &["reload"]);
    assert_eq!(ok.code(), Some(0), "{}", ok.describe());
    assert_contains(&ok.stdout, &["reloaded: 1 kept, 1 added, 0 removed"]);
    round_trip(&d, "added", "new\n");

    d.write_config(&format!("{CONTROL}{}bogus_key = 1\n", echo("echo")));
    let refused = ctl(&d, &["reload"]);
    assert_eq!(refused.code(), Some(1), "{}", refused.describe());
    assert_contains(
        &refused.stderr,
        &["reload refused", "unknown key `bogus_key`", "socketd.toml:"],
    );
    round_trip(&d, "added", "still serving\n");
    let s = status(&d);
    assert_eq!(
        (
            s["reloads"]["ok"].as_u64(),
            s["reloads"]["refused"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(s["reloads"]["last"]["ok"], false, "{s}");
    // SIGHUP goes through the same path and counts too.
    d.signal(libc::SIGHUP);
    d.wait_log_count(
        "reload refused: the running configuration",
        2,
        READY_TIMEOUT,
    );
    assert_eq!(status(&d)["reloads"]["refused"], 2);

    // A valid file whose new socket cannot bind is rolled back: that too exits non-zero (this
    // is what makes `systemctl reload` fail), and the running config keeps serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let port = taken.local_addr().expect("its address").port();
    d.write_config(&format!(
        "{CONTROL}{}[[listener]]\nname = \"blocked\"\nprotocol = \"tcp\"\n\
         address = \"127.0.0.1:{port}\"\nhandler = \"echo\"\n",
        echo("echo")
    ));
    let rolled = ctl(&d, &["reload"]);
    assert_eq!(rolled.code(), Some(1), "{}", rolled.describe());
    assert_contains(&rolled.stderr, &["blocked"]);
    round_trip(&d, "added", "still serving after the rollback\n");
    drop(taken);
    stop(d);
}

#[test]
fn pause_keeps_the_socket_and_resume_serves_what_queued() {
    let d = Daemon::start(&format!("{CONTROL}{}", echo("echo")));
    let out = ctl(&d, &["pause", "echo"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(listener(&status(&d), "echo")["state"], "paused");
    // The socket is still open: the kernel completes the connection, nobody serves it.
    let mut queued = d.connect("echo");
    queued.write_all(b"waiting\n").expect("send");
    assert!(
        queued.silent_for(Duration::from_millis(300)),
        "served while paused"
    );
    let out = ctl(&d, &["resume", "echo"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(queued.read_line(), "waiting\n");
    assert_eq!(listener(&status(&d), "echo")["state"], "accepting");
    let unknown = ctl(&d, &["pause", "nope"]);
    assert_eq!(unknown.code(), Some(1), "{}", unknown.describe());
    assert_contains(
        &unknown.stderr,
        &["no open listener named \"nope\"", "echo"],
    );
    drop(queued);
    stop(d);
}

#[test]
fn drain_closes_a_listener_lets_its_connection_finish_and_a_reload_rebinds_it() {
    let d = Daemon::start(&format!("{CONTROL}{}{}", echo("echo"), echo("keep")));
    let addr = d.addr("echo");
    let mut open = d.connect("echo");
    open.write_all(b"one\n").expect("send");
    assert_eq!(open.read_line(), "one\n");
    let out = ctl(&d, &["drain", "echo"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_contains(&out.stdout, &["draining 1 connections"]);
    let refused = std::net::TcpStream::connect_timeout(&addr, IO_TIMEOUT);
    assert!(refused.is_err(), "the socket is closed after drain");
    open.write_all(b"two\n").expect("send");
    assert_eq!(open.read_line(), "two\n", "the open connection still works");
    drop(open);
    d.wait_log("listener `echo`: drained", READY_TIMEOUT);
    let out = ctl(&d, &["reload"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_contains(&out.stdout, &["1 kept, 1 added"]);
    round_trip(&d, "echo", "back\n");
    stop(d);
}

#[test]
fn stop_waits_until_the_daemon_has_exited() {
    let mut d = Daemon::start(&format!("{CONTROL}{}", echo("echo")));
    let out = ctl(&d, &["stop"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_contains(&out.stdout, &["stopping", "stopped"]);
    // "stopped" is printed on EOF, which comes when the process is gone.
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(
        !d.dir().join("control").exists(),
        "the socket file is removed"
    );
}

#[test]
fn stop_now_cuts_open_connections() {
    let mut d = Daemon::start(&format!(
        "[daemon]\ncontrol = \"{{dir}}/control\"\nshutdown_timeout = \"60s\"\n{}",
        echo("echo")
    ));
    let mut open = d.connect("echo");
    open.write_all(b"x\n").expect("send");
    assert_eq!(open.read_line(), "x\n");
    let out = ctl(&d, &["stop", "--now"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    assert!(open.closed_within(IO_TIMEOUT));
}

#[test]
fn reopen_logs_and_sighup_reopen_the_access_log_file() {
    let d = Daemon::start(&format!(
        "[daemon]\ncontrol = \"{{dir}}/control\"\naccess_log = \"file:{{dir}}/access.log\"\n{}",
        echo("echo")
    ));
    let log = d.dir().join("access.log");
    let wait_lines = |path: &Path, n: usize| {
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text
                .lines()
                .filter(|l| l.contains("access: listener `echo`"))
                .count()
                >= n
            {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} lines in {path:?}: {text}"
            );
            std::thread::sleep(POLL);
        }
    };
    round_trip(&d, "echo", "a\n");
    wait_lines(&log, 1);
    // logrotate: move the file away, then tell socketd.
    std::fs::rename(&log, d.dir().join("access.log.1")).expect("rotate");
    let out = ctl(&d, &["reopen-logs"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    d.wait_log("access log: reopened", READY_TIMEOUT);
    round_trip(&d, "echo", "b\n");
    let text = wait_lines(&log, 1);
    assert!(text.contains(" in 2 out 2 outcome ok"), "{text}");
    std::fs::rename(&log, d.dir().join("access.log.2")).expect("rotate");
    d.signal(libc::SIGHUP);
    d.wait_log_count("access log: reopened", 2, READY_TIMEOUT);
    round_trip(&d, "echo", "c\n");
    wait_lines(&log, 1);
    let old = std::fs::read_to_string(d.dir().join("access.log.1")).expect("rotated file");
    assert_eq!(
        old.lines().count(),
        1,
        "the rotated file got no more lines: {old}"
    );
    // Not in the daemon's own log.
    assert!(!d.log().contains("access: listener"), "{}", d.log());
    stop(d);
}

/// A raw client on the control socket: send `bytes`, read the answer line.
fn raw(path: &Path, bytes: &[u8], close_write: bool) -> String {
    let mut s = UnixStream::connect(path).expect("connect to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // A daemon that refuses at once ("busy") may have answered and closed before the request
    // is written: the send then fails with EPIPE, and the answer is still there to read.
    if s.write_all(bytes).is_ok() && close_write {
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

#[test]
fn garbage_half_requests_and_silence_get_errors_and_never_block_the_daemon() {
    let d = Daemon::start(&format!("{CONTROL}{}", echo("echo")));
    let path = d.dir().join("control");
    // Silence and half a request: held open by the client; each gets a timeout answer
    // (READ_DEADLINE, 5s), while the daemon goes on serving and answering others.
    let silent_path = path.clone();
    let silent = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&silent_path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    });
    let half_path = path.clone();
    let half = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&half_path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.write_all(br#"{"version":1,"comm"#).expect("send");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    });
    round_trip(&d, "echo", "meanwhile\n");
    assert_eq!(status(&d)["state"], "running", "status answers meanwhile");

    let garbage = raw(&path, b"\x00\xffGET / HTTP/1.0\r\n\r\n", false);
    assert!(garbage.contains("\"ok\":false"), "{garbage}");
    assert!(
        garbage.contains("not UTF-8") || garbage.contains("not JSON"),
        "{garbage}"
    );
    let unknown = raw(&path, b"{\"version\":1,\"command\":\"explode\"}\n", false);
    assert!(
        unknown.contains("unknown command \\\"explode\\\""),
        "{unknown}"
    );
    let version = raw(&path, b"{\"version\":9,\"command\":\"status\"}\n", false);
    assert!(
        version.contains("unsupported protocol version 9"),
        "{version}"
    );
    let cut = raw(&path, br#"{"version":1,"command":"sta"#, true);
    assert!(cut.contains("not JSON"), "a request cut by EOF: {cut}");
    let huge = raw(&path, &vec![b'x'; 200 * 1024], false);
    assert!(huge.contains("longer than 65536 bytes"), "{huge}");

    let silent = silent.join().expect("silent client");
    assert!(
        silent.contains("timed out: no request within 5s"),
        "{silent}"
    );
    let half = half.join().expect("half client");
    assert!(
        half.contains("did not end with a newline within 5s"),
        "{half}"
    );
    round_trip(&d, "echo", "after\n");
    stop(d);
}

#[test]
fn the_control_socket_mode_keeps_other_users_out() {
    let d = Daemon::start(&format!("{CONTROL}{}", echo("echo")));
    let path = d.dir().join("control");
    let mode = std::fs::metadata(&path)
        .expect("socket file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the default mode is 0600");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root, cannot run the client as another user");
        stop(d);
        return;
    }
    // The test dir is 0700 by default; open the way to the socket so only its mode decides.
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let as_nobody = |args: &[&str]| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            SOCKETD,
        ])
        .arg("--control")
        .arg(&path)
        .args(args);
        run_with_timeout(cmd, CLIENT_TIMEOUT)
    };
    let out = as_nobody(&["status"]);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert_contains(&out.stderr, &["Permission denied"]);
    let out = as_nobody(&["stop", "--now"]);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert!(d.is_running(), "nobody could not stop it");
    stop(d);
}

#[test]
fn a_group_may_be_let_in() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root, cannot run the client as another user");
        return;
    }
    let d = Daemon::start(&format!(
        "[daemon]\ncontrol = \"{{dir}}/control\"\ncontrol_group = \"nogroup\"\n{}",
        echo("echo")
    ));
    let path = d.dir().join("control");
    let meta = std::fs::metadata(&path).expect("socket file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        SOCKETD,
    ])
    .arg("--control")
    .arg(&path)
    .args(["status", "--json"]);
    let out = run_with_timeout(cmd, CLIENT_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_contains(&out.stdout, &["\"ok\":true"]);
    stop(d);
}

#[test]
fn clients_without_a_socket_are_told_how_to_get_one() {
    let d = Daemon::start(&echo("echo"));
    let out = ctl(&d, &["status"]);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert_contains(
        &out.stderr,
        &[
            "has no control socket",
            "control = \"/run/socketd/control\"",
        ],
    );
    let mut cmd = socketd_cmd();
    cmd.args(["--control", "/nonexistent/control", "reload"]);
    let out = run_with_timeout(cmd, CLIENT_TIMEOUT);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert_contains(
        &out.stderr,
        &["cannot connect to the control socket /nonexistent/control"],
    );
    stop(d);
}

#[test]
fn check_names_the_file_line_and_key_of_bad_operating_settings() {
    let (out, path, _dir) = check(
        "[daemon]\ncontrol = \"\"\ncontrol_mode = \"rw\"\ncontrol_group = \"no-such-group-here\"\n\
         access_log = \"file:relative.log\"\n[daemon.metrics]\naddress = \"localhost:9107\"\nport = 1\n",
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let d = out.diagnostics(&path).join("\n");
    assert_contains(
        &d,
        &[
            ":2:11: [daemon]: key `control`: the socket path is empty",
            ":3:16: [daemon]: key `control_mode`: \"rw\" is not an octal file mode",
            ":4:17: [daemon]: key `control_group`: no group \"no-such-group-here\"",
            ":5:14: [daemon]: key `access_log`: \"relative.log\" is not an absolute path; valid values: \"off\"",
            ":7:11: [daemon]: key `metrics.address`: \"localhost:9107\" is not an ip:port address",
            "e.g. address = \"127.0.0.1:9107\"",
            "unknown key `port`",
        ],
    );
    let (ok, _, _dir) = check(
        "[daemon]\ncontrol = \"/run/socketd/control\"\ncontrol_mode = \"0660\"\n\
         access_log = \"syslog\"\n[daemon.metrics]\naddress = \"127.0.0.1:9107\"\n",
    );
    assert_eq!(ok.code(), Some(0), "{}", ok.describe());
}

/// Clients are served by at most 16 threads: with 16 silent clients holding them, the 17th is
/// told "busy" at once (not queued, not a 17th thread); the daemon serves on, and once the
/// silent ones time out the socket answers again.
#[test]
fn silent_clients_are_bounded_and_a_busy_socket_says_so() {
    let d = Daemon::start(&format!("{CONTROL}{}", echo("echo")));
    let path = d.dir().join("control");
    let silent: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&path).expect("connect"))
        .collect();
    // The accept thread takes them in order; wait until all 16 are being served.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let busy = loop {
        let answer = raw(&path, b"{\"version\":1,\"command\":\"status\"}\n", false);
        if answer.contains("busy") {
            break answer;
        }
        assert!(std::time::Instant::now() < deadline, "never busy: {answer}");
        std::thread::sleep(POLL);
    };
    assert!(busy.contains("\"ok\":false"), "{busy}");
    round_trip(&d, "echo", "served meanwhile\n");
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.contains("timed out"), "{answer}");
    }
    assert_eq!(status(&d)["state"], "running", "answers again");
    stop(d);
}

/// A binary upgrade hands the control socket over too: the new process binds beside the old
/// one's file and renames its own into place when it serves, so `socketd status` answers
/// throughout and, afterwards, from the new pid; the metrics address is shared meanwhile
/// (SO_REUSEPORT), so the new process can bind it while the old one still serves it.
#[test]
fn an_upgrade_hands_the_control_socket_and_the_metrics_address_over() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("addr").port()
    };
    let mut d = Daemon::start(&format!(
        "[daemon]\ncontrol = \"{{dir}}/control\"\npidfile = \"{{dir}}/socketd.pid\"\n\
         shutdown_timeout = \"5s\"\n[daemon.metrics]\naddress = \"127.0.0.1:{port}\"\n{}",
        echo("echo")
    ));
    let old = d.pid();
    assert_eq!(status(&d)["process"]["pid"], old);
    let up = ctl(&d, &["upgrade"]);
    // The new process is not the test's child: killed on the way out if a check fails.
    struct Reap(i32);
    impl Drop for Reap {
        fn drop(&mut self) {
            // SAFETY: kill(2) has no memory effects; 0 checks the pid is still there.
            if self.0 > 0 && unsafe { libc::kill(self.0, 0) } == 0 {
                unsafe { libc::kill(self.0, libc::SIGKILL) };
            }
        }
    }
    let pidfile = std::fs::read_to_string(d.dir().join("socketd.pid")).unwrap_or_default();
    let _reap = Reap(pidfile.trim().parse().unwrap_or(0));
    assert_eq!(up.code(), Some(0), "{}", up.describe());
    assert_exit_code(d.wait_exit(Duration::from_secs(20)), 0, &d);
    let s = status(&d);
    let new = s["process"]["pid"].as_i64().expect("pid");
    assert_ne!(new, i64::from(old), "the new process answers: {s}");
    assert_eq!(s["metrics"], format!("127.0.0.1:{port}"));
    round_trip(&d, "echo", "after the upgrade\n");
    assert_eq!(
        pidfile.trim(),
        new.to_string(),
        "the pidfile names the new process"
    );
    let out = ctl(&d, &["stop"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        !d.dir().join("control").exists(),
        "the new process removed its socket"
    );
}

/// A reload switches the access log on (and off again) without a restart.
#[test]
fn a_reload_turns_the_access_log_on_and_off() {
    let d = Daemon::start(&format!("{CONTROL}{}", echo("echo")));
    round_trip(&d, "echo", "unlogged\n");
    assert_eq!(status(&d)["access_log"]["target"], "off");
    d.write_config(&format!(
        "{CONTROL}access_log = \"file:{{dir}}/access.log\"\n{}",
        echo("echo")
    ));
    let out = ctl(&d, &["reload"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let log = d.dir().join("access.log");
    assert_eq!(
        status(&d)["access_log"]["target"],
        format!("file:{}", log.display())
    );
    round_trip(&d, "echo", "logged\n");
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains(" in 7 out 7 outcome ok")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the line after the reload"
        );
        std::thread::sleep(POLL);
    }
    d.write_config(&format!("{CONTROL}{}", echo("echo")));
    assert_eq!(ctl(&d, &["reload"]).code(), Some(0));
    assert_eq!(status(&d)["access_log"]["target"], "off");
    round_trip(&d, "echo", "unlogged again\n");
    let s = status(&d);
    assert_eq!(listener(&s, "echo")["served"], 3);
    let text = std::fs::read_to_string(&log).expect("access log");
    assert_eq!(
        text.lines().count(),
        1,
        "only the connection while it was on: {text}"
    );
    stop(d);
}

/// The access lines of the last connections before a stop are written before the process
/// exits (the writer is flushed), not lost with it.
#[test]
fn a_stop_flushes_the_access_log() {
    let mut d = Daemon::start(&format!(
        "{CONTROL}access_log = \"file:{{dir}}/access.log\"\n{}",
        echo("echo")
    ));
    for i in 0..200 {
        round_trip(&d, "echo", &format!("{i}\n"));
    }
    let out = ctl(&d, &["stop"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    let text = std::fs::read_to_string(d.dir().join("access.log")).expect("access log");
    assert_eq!(text.lines().count(), 200, "{text}");
}
