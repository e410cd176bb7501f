//! `handler = "exec"` under forked workers, where the fork server's child is the program itself
//! (posix_spawn, or fork+exec when it switches accounts), and the environment gaps closed with
//! it: the program's parent is a fork server and it leads its own process group, its stderr
//! lines (cut at 4096 bytes) and exit status or signal are logged by the fork server, a stderr
//! pipe a descendant keeps open does not hold anything up, a program that vanished before its
//! connection is logged and the connection closed, jobs spread over the fork servers, datagram
//! programs get the UDP variables, `wait` programs get the protocol of their socket, and
//! `user`/`group` bring the account's supplementary groups.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::Duration;

use crate::exec::{d_stop, exec_listener};
use crate::forked::{fork_servers, processes};
use crate::harness::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Field `n` (1-based, after the command name) of /proc/PID/stat.
fn stat_field(pid: i32, n: usize) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(n - 3)?.parse().ok()
}

/// "PID PPID" as printed by `sh -c 'echo $$ $PPID'`.
fn pid_and_parent(line: &str) -> (i32, i32) {
    let mut it = line
        .split_whitespace()
        .map(|s| s.parse::<i32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[test]
fn the_program_is_the_fork_servers_child_in_its_own_group() {
    let sh = "argv = [\"/bin/sh\", \"-c\", \"echo $$ $PPID; exec cat\"]";
    let mut toml = String::from("[daemon]\naccess_log = \"stderr\"\n");
    toml += &exec_listener(
        "spawned",
        "tcp",
        "127.0.0.1:0",
        "forked",
        &format!("{{ {sh} }}"),
    );
    if is_root() {
        // An account switch takes the fork+exec path.
        toml.push_str(&exec_listener(
            "switched",
            "tcp",
            "127.0.0.1:0",
            "forked",
            &format!("{{ {sh}, user = \"root\" }}"),
        ));
    }
    let d = Daemon::start(&toml);
    let servers = fork_servers(&d);
    let names: &[&str] = if is_root() {
        &["spawned", "switched"]
    } else {
        &["spawned"]
    };
    for name in names {
        let mut c = d.connect(name);
        let (pid, parent) = pid_and_parent(&c.read_line());
        assert!(
            servers.contains(&parent),
            "{name}: the program's parent {parent} is a fork server {servers:?}: one process per connection"
        );
        assert_eq!(
            stat_field(pid, 5),
            Some(pid),
            "{name}: it leads its own process group"
        );
        c.write_all(b"still the same connection\n").expect("send");
        assert_eq!(c.read_line(), "still the same connection\n", "{name}");
        c.shutdown_write();
        assert_eq!(c.read_to_end_vec(), b"", "{name}");
        d.wait_log(
            &format!("listener `{name}`: /bin/sh (pid {pid}) exited with status 0"),
            READY_TIMEOUT,
        );
        d.wait_log(&format!("access: listener `{name}` peer"), READY_TIMEOUT);
    }
    if !is_root() {
        eprintln!("not root: the fork+exec path (user = ...) was not exercised");
    }
    d_stop(d);
}

#[test]
fn program_signals_and_long_stderr_lines_are_logged_by_the_fork_server() {
    let killed = "{ argv = [\"/bin/sh\", \"-c\", \"kill -KILL $$\"] }";
    // 10000 bytes and no newline: two lines of 4096 and one of 1808, never one of 10000.
    let long = "{ argv = [\"/bin/sh\", \"-c\", \"head -c 10000 /dev/zero | tr '\\\\0' x >&2\"] }";
    let d = Daemon::start(&format!(
        "{}{}",
        exec_listener("killed", "tcp", "127.0.0.1:0", "forked", killed),
        exec_listener("long", "tcp", "127.0.0.1:0", "forked", long),
    ));
    assert_eq!(d.connect("killed").read_to_end_vec(), b"");
    d.wait_log("listener `killed`: /bin/sh (pid", READY_TIMEOUT);
    let line = d.wait_log("killed by signal 9 (SIGKILL)", READY_TIMEOUT);
    assert!(line.contains("listener `killed`"), "{line}");
    assert_eq!(d.connect("long").read_to_end_vec(), b"");
    d.wait_log("listener `long`: /bin/sh (pid", READY_TIMEOUT);
    let log = d.log();
    let runs: Vec<usize> = log
        .lines()
        .filter(|l| l.contains("listener `long` pid "))
        .map(|l| l.rsplit(": ").next().unwrap_or("").len())
        .collect();
    assert_eq!(
        runs,
        [4096, 4096, 1808],
        "stderr lines cut at 4096 bytes\n{log}"
    );
    d_stop(d);
}

#[test]
fn a_stderr_pipe_held_by_a_descendant_holds_nothing_up() {
    // The background sleep keeps only stderr open; its group is killed at stop.
    let prog =
        "{ argv = [\"/bin/sh\", \"-c\", \"sleep 600 </dev/null >/dev/null & echo bye >&2\"] }";
    let mut d = Daemon::start(&format!(
        "[daemon]\nshutdown_timeout = \"1s\"\n{}",
        exec_listener("held", "tcp", "127.0.0.1:0", "forked", prog)
    ));
    let mut c = d.connect("held");
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "the connection ends with the program"
    );
    d.wait_log("listener `held`: /bin/sh (pid", READY_TIMEOUT);
    assert_contains(&d.log(), &[": bye"]);
    // More connections are served meanwhile.
    let mut c = d.connect("held");
    assert!(c.closed_within(Duration::from_secs(5)));
    let sleeping: Vec<i32> = processes()
        .iter()
        .filter(|(p, _, _)| comm_of(*p) == "sleep")
        .filter(|(p, _, _)| fork_servers(&d).contains(&stat_field(*p, 4).unwrap_or(0)))
        .map(|(p, _, _)| *p)
        .collect();
    assert!(
        !sleeping.is_empty(),
        "the orphaned sleeps are the fork servers' (subreaper)"
    );
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(Duration::from_secs(15)), 0, &d);
    wait_until("the lingering groups are killed", READY_TIMEOUT, || {
        sleeping.iter().all(|p| {
            processes()
                .iter()
                .all(|(q, _, state)| q != p || *state == 'Z')
        })
    });
}

fn comm_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn a_program_gone_before_its_connection_is_logged_and_the_connection_closed() {
    let dir = TestDir::new();
    let prog = dir.path().join("prog");
    std::fs::write(&prog, "#!/bin/sh\necho hi\n").expect("write prog");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let d = Daemon::start(&exec_listener(
        "gone",
        "tcp",
        "127.0.0.1:0",
        "forked",
        &format!("{{ argv = [\"{}\"] }}", prog.display()),
    ));
    assert_eq!(lossy(&d.connect("gone").read_to_end_vec()), "hi\n");
    std::fs::remove_file(&prog).expect("remove prog");
    let mut c = d.connect("gone");
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "closed, not left hanging"
    );
    d.wait_log("listener `gone`: cannot run", READY_TIMEOUT);
    assert_eq!(
        lossy(&d.connect("gone").read_to_end_vec()),
        "",
        "still serving, still failing"
    );
    d_stop(d);
}

#[test]
fn forked_jobs_spread_over_the_fork_servers() {
    let d = Daemon::start(&exec_listener(
        "slow",
        "tcp",
        "127.0.0.1:0",
        "forked",
        "{ argv = [\"/bin/sh\", \"-c\", \"echo $PPID; exec cat\"] }",
    ));
    let servers = fork_servers(&d);
    let mut clients = Vec::new();
    let mut parents = HashSet::new();
    for _ in 0..2 * servers.len() {
        let mut c = d.connect("slow");
        parents.insert(c.read_line().trim().parse::<i32>().unwrap_or(0));
        clients.push(c);
    }
    let want: HashSet<i32> = servers.iter().copied().collect();
    assert_eq!(parents, want, "each fork server runs some of the programs");
    drop(clients);
    d_stop(d);
}

#[test]
fn datagram_programs_get_udp_variables_and_wait_programs_their_socket_protocol() {
    let env = "{ argv = [\"/usr/bin/env\"] }";
    // A wait program reads one datagram itself (dd) after writing its environment down.
    let wait = |name: &str| {
        format!(
            "{{ argv = [\"/bin/sh\", \"-c\", \"env > {{dir}}/env-{name}; dd bs=65536 count=1 of=/dev/null status=none\"], wait = true }}"
        )
    };
    let mut toml = String::new();
    for workers in ["threaded", "forked"] {
        toml.push_str(&exec_listener(
            &format!("u-{workers}"),
            "udp",
            "127.0.0.1:0",
            workers,
            env,
        ));
        toml.push_str(&exec_listener(
            &format!("x-{workers}"),
            "unix-dgram",
            &format!("{{dir}}/x-{workers}.dgram"),
            workers,
            env,
        ));
        for (proto, address) in [
            ("udp", "127.0.0.1:0".to_string()),
            ("unix-dgram", format!("{{dir}}/w-{workers}.dgram")),
        ] {
            let name = format!("w{proto}-{workers}");
            toml.push_str(&exec_listener(
                &name,
                proto,
                &address,
                workers,
                &wait(&name),
            ));
        }
    }
    let d = Daemon::start(&toml);
    let parse = |text: &str| -> HashMap<String, String> {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    for workers in ["threaded", "forked"] {
        let name = format!("u-{workers}");
        let c = d.dgram(&name);
        let client = match &c {
            Dgram::Udp(s) => s.local_addr().expect("client address"),
            Dgram::Unix(..) => unreachable!("udp listener"),
        };
        let got = parse(&lossy(&c.request(b"x")));
        let server = d.addr(&name);
        for (k, v) in [
            ("PROTO", "UDP".to_string()),
            ("UDPREMOTEIP", client.ip().to_string()),
            ("UDPREMOTEPORT", client.port().to_string()),
            ("UDPLOCALIP", server.ip().to_string()),
            ("UDPLOCALPORT", server.port().to_string()),
            ("REMOTE_ADDR", client.ip().to_string()),
            ("REMOTE_PORT", client.port().to_string()),
        ] {
            assert_eq!(got.get(k), Some(&v), "{name}: {k}\n{got:?}");
        }
        let got = parse(&lossy(&d.dgram(&format!("x-{workers}")).request(b"x")));
        assert_eq!(
            got.get("PROTO").map(String::as_str),
            Some("UNIX"),
            "{got:?}"
        );
        assert!(!got.contains_key("UDPREMOTEIP"), "{got:?}");

        for proto in ["udp", "unix-dgram"] {
            let name = format!("w{proto}-{workers}");
            d.dgram(&name).send(b"wake up");
            let file = d.dir().join(format!("env-{name}"));
            d.wait_log_count(
                &format!("listener `{name}`: /bin/sh (pid"),
                1,
                READY_TIMEOUT,
            );
            let got = parse(&std::fs::read_to_string(&file).unwrap_or_default());
            if proto == "udp" {
                let server = d.addr(&name);
                assert_eq!(
                    got.get("PROTO").map(String::as_str),
                    Some("UDP"),
                    "{name}: {got:?}"
                );
                assert_eq!(
                    got.get("UDPLOCALPORT"),
                    Some(&server.port().to_string()),
                    "{name}"
                );
                assert_eq!(
                    got.get("UDPLOCALIP"),
                    Some(&server.ip().to_string()),
                    "{name}"
                );
            } else {
                assert_eq!(
                    got.get("PROTO").map(String::as_str),
                    Some("UNIX"),
                    "{name}: {got:?}"
                );
                assert!(!got.contains_key("UDPLOCALPORT"), "{name}: {got:?}");
            }
        }
    }
    d_stop(d);
}

/// A user that is a member of some group other than its own primary group, from the
/// account files: (name, primary gid, every gid it should run with).
fn user_with_supplementary_groups() -> Option<(String, u32, HashSet<u32>)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let group = std::fs::read_to_string("/etc/group").ok()?;
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let (Some(gid), Some(members)) = (f.get(2).and_then(|g| g.parse::<u32>().ok()), f.get(3))
        else {
            continue;
        };
        for user in members.split(',').filter(|m| !m.is_empty()) {
            let Some(primary) = passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|p| p.first() == Some(&user))
                .and_then(|p| p.get(3).and_then(|g| g.parse::<u32>().ok()))
            else {
                continue;
            };
            if primary == gid {
                continue;
            }
            let mut all: HashSet<u32> = group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .filter(|g| g.get(3).is_some_and(|m| m.split(',').any(|m| m == user)))
                .filter_map(|g| g.get(2).and_then(|g| g.parse().ok()))
                .collect();
            all.insert(primary);
            return Some((user.to_string(), primary, all));
        }
    }
    None
}

#[test]
fn user_brings_its_supplementary_groups_and_group_alone_drops_the_daemons() {
    if !is_root() {
        eprintln!("skipped: switching accounts needs root");
        return;
    }
    let Some((user, primary, groups)) = user_with_supplementary_groups() else {
        eprintln!("skipped: no account here is a member of a group besides its primary one");
        return;
    };
    let id = |extra: &str| {
        format!("{{ argv = [\"/bin/sh\", \"-c\", \"id -u; id -g; id -G\"], {extra} }}")
    };
    let mut toml = String::new();
    for workers in ["threaded", "forked"] {
        toml.push_str(&exec_listener(
            &format!("user-{workers}"),
            "tcp",
            "127.0.0.1:0",
            workers,
            &id(&format!("user = \"{user}\"")),
        ));
        toml.push_str(&exec_listener(
            &format!("group-{workers}"),
            "tcp",
            "127.0.0.1:0",
            workers,
            &id("group = \"nogroup\""),
        ));
    }
    let d = Daemon::start(&toml);
    for workers in ["threaded", "forked"] {
        let name = format!("user-{workers}");
        let out = lossy(&d.connect(&name).read_to_end_vec());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.get(1),
            Some(&primary.to_string().as_str()),
            "{name}: gid\n{out}"
        );
        let got: HashSet<u32> = lines
            .get(2)
            .unwrap_or(&"")
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect();
        assert_eq!(
            got, groups,
            "{name}: `id -G` is the account's groups, as initgroups sets them\n{out}"
        );

        let name = format!("group-{workers}");
        let out = lossy(&d.connect(&name).read_to_end_vec());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.first(), Some(&"0"), "{name}: still root\n{out}");
        assert_eq!(
            lines.get(2),
            lines.get(1),
            "{name}: only the group itself\n{out}"
        );
    }
    d_stop(d);
}

#[test]
fn max_duration_and_idle_timeout_reach_a_forked_program() {
    let cat = "{ argv = [\"/bin/cat\"], stderr = \"null\" }";
    let d = Daemon::start(&format!(
        "{}max_duration = \"1s\"\n{}idle_timeout = \"1s\"\n",
        exec_listener("short", "tcp", "127.0.0.1:0", "forked", cat),
        exec_listener("idle", "tcp", "127.0.0.1:0", "forked", cat),
    ));
    // A busy connection is cut at max_duration: the program sees its socket shut down.
    let mut c = d.connect("short");
    let start = std::time::Instant::now();
    loop {
        if c.write_all(b"tick\n").is_err() {
            break;
        }
        c.set_read_timeout(Duration::from_secs(2));
        let mut buf = [0u8; 5];
        if !matches!(std::io::Read::read(&mut c, &mut buf), Ok(n) if n > 0) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never cut");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "cut early: {:?}",
        start.elapsed()
    );
    d.wait_log("listener `short`: /bin/cat (pid", READY_TIMEOUT);
    // A silent one ends at idle_timeout: the program's read on the shared socket times out.
    let mut c = d.connect("idle");
    let start = std::time::Instant::now();
    assert!(c.closed_within(Duration::from_secs(8)), "never closed");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed early: {:?}",
        start.elapsed()
    );
    d.wait_log("listener `idle`: /bin/cat (pid", READY_TIMEOUT);
    d_stop(d);
}

#[test]
fn a_dead_fork_server_leaves_the_others_serving() {
    let d = Daemon::start(&crate::forked::forked(
        "echo",
        "tcp",
        "127.0.0.1:0",
        "echo",
        "",
    ));
    let servers = fork_servers(&d);
    assert!(servers.len() >= 2, "two fork servers per CPU: {servers:?}");
    // SAFETY: kill(2) on a pid that is this test daemon's child, alive (just listed).
    assert_eq!(unsafe { libc::kill(servers[0], libc::SIGKILL) }, 0);
    d.wait_log("is gone; its jobs are booked as failed", READY_TIMEOUT);
    for i in 0..20 {
        let mut c = d.connect("echo");
        let msg = format!("after the loss {i}\n");
        c.write_all(msg.as_bytes()).expect("send");
        assert_eq!(c.read_line(), msg, "connection {i}\n{}", d.log_dump());
    }
    d_stop(d);
}

#[test]
fn a_program_outliving_max_duration_gets_sigterm_then_sigkill() {
    program_outliving_max_duration("forked");
}

/// The same under threaded workers: the worker thread waits on the program's pidfd and
/// signals its process group.
#[test]
fn a_threaded_program_outliving_max_duration_gets_sigterm_then_sigkill() {
    program_outliving_max_duration("threaded");
}

fn program_outliving_max_duration(model: &str) {
    let polite = "{ argv = [\"/bin/sleep\", \"600\"] }";
    let stubborn = "{ argv = [\"/bin/sh\", \"-c\", \"trap '' TERM; echo started; sleep 600\"] }";
    let d = Daemon::start(&format!(
        "{}max_duration = \"1s\"\n{}max_duration = \"1s\"\n",
        exec_listener("polite", "tcp", "127.0.0.1:0", model, polite),
        exec_listener("stubborn", "tcp", "127.0.0.1:0", model, stubborn),
    ));
    let start = std::time::Instant::now();
    let mut p = d.connect("polite");
    let mut s = d.connect("stubborn");
    assert_eq!(s.read_line(), "started\n");
    assert!(
        p.closed_within(Duration::from_secs(5)),
        "the connection is cut at max_duration"
    );
    let line = d.wait_log("killed by signal 15 (SIGTERM)", Duration::from_secs(10));
    assert!(
        line.contains("listener `polite`: /bin/sleep (pid"),
        "{line}"
    );
    let line = d.wait_log("killed by signal 9 (SIGKILL)", Duration::from_secs(10));
    assert!(line.contains("listener `stubborn`: /bin/sh (pid"), "{line}");
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "signalled only after max_duration and its grace"
    );
    assert_contains(
        &d.log(),
        &[
            "still running after max_duration: SIGTERM sent",
            "still running after max_duration: SIGKILL sent",
        ],
    );
    d_stop(d);
}

/// A program that never touches its connection is idle by `idle_timeout` (read from the
/// kernel's TCP counters, since the program does the I/O): the connection is closed, and the
/// program, still running `CUT_GRACE` later, gets SIGTERM — under both worker models.
#[test]
fn a_program_idle_past_idle_timeout_is_cut_and_signalled() {
    for model in ["threaded", "forked"] {
        let sleeper = "{ argv = [\"/bin/sleep\", \"600\"] }";
        let busy = "{ argv = [\"/bin/cat\"] }";
        let d = Daemon::start(&format!(
            "{}idle_timeout = \"1s\"\n{}idle_timeout = \"1s\"\n",
            exec_listener("sleeper", "tcp", "127.0.0.1:0", model, sleeper),
            exec_listener("busy", "tcp", "127.0.0.1:0", model, busy),
        ));
        let start = std::time::Instant::now();
        let mut s = d.connect("sleeper");
        // A conversation that keeps data moving is never idle, however long it lasts.
        let mut b = d.connect("busy");
        for i in 0..6 {
            let msg = format!("tick {i}\n");
            b.write_all(msg.as_bytes()).expect("send");
            assert_eq!(
                b.read_line(),
                msg,
                "{model}: busy connection cut\n{}",
                d.log_dump()
            );
            std::thread::sleep(Duration::from_millis(400));
        }
        assert!(
            s.closed_within(Duration::from_secs(5)),
            "{model}: the idle connection is closed"
        );
        let line = d.wait_log("killed by signal 15 (SIGTERM)", Duration::from_secs(10));
        assert!(
            line.contains("listener `sleeper`: /bin/sleep (pid"),
            "{model}: {line}"
        );
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "{model}: signalled only after idle_timeout and its grace"
        );
        assert_contains(
            &d.log(),
            &[
                "no data for 1s, connection closed",
                "still running after idle_timeout: SIGTERM sent",
            ],
        );
        assert!(
            !d.log().contains("listener `busy`: /bin/cat (pid"),
            "{model}: the busy program was cut\n{}",
            d.log_dump()
        );
        d_stop(d);
    }
}
