//! `handler = "exec"`: the UCSPI environment over TCP and Unix in both worker models, argv
//! passed literally (no shell), a datagram program's stdout as the reply, real inetd programs
//! driven by their real clients (rsync --daemon, in.tftpd in `wait` mode), and `check`
//! refusing exec settings that cannot work.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use crate::services::listener;

/// A `[[listener]]` running `exec` (an inline table) under `workers`.
pub fn exec_listener(
    name: &str,
    protocol: &str,
    address: &str,
    workers: &str,
    exec: &str,
) -> String {
    format!(
        "{}workers = \"{workers}\"\nexec = {exec}\n",
        listener(name, protocol, address, "exec")
    )
}

/// The environment a listener's program prints (`/usr/bin/env`).
pub fn env_of(d: &Daemon, name: &str) -> HashMap<String, String> {
    let mut s = d.connect(name);
    s.shutdown_write();
    let out = lossy(&s.read_to_end_vec());
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn env_gets_every_connection_variable_over_tcp_and_unix() {
    let exec = "{ argv = [\"/usr/bin/env\"], env = { GREETING = \"hi there\" } }";
    let mut toml = String::new();
    for workers in ["threaded", "forked"] {
        toml.push_str(&exec_listener(
            &format!("tcp-{workers}"),
            "tcp",
            "127.0.0.1:0",
            workers,
            exec,
        ));
        toml.push_str(&exec_listener(
            &format!("unix-{workers}"),
            "unix",
            &format!("{{dir}}/{workers}.sock"),
            workers,
            exec,
        ));
    }
    let d = Daemon::start(&toml);
    for workers in ["threaded", "forked"] {
        let name = format!("tcp-{workers}");
        let mut s = d.connect(&name);
        let client = s.local_addr_tcp();
        s.shutdown_write();
        let out = lossy(&s.read_to_end_vec());
        let env: HashMap<String, String> = out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let server = d.addr(&name);
        let want = [
            ("PROTO", "TCP".to_string()),
            ("TCPREMOTEIP", client.ip().to_string()),
            ("TCPREMOTEPORT", client.port().to_string()),
            ("TCPLOCALIP", server.ip().to_string()),
            ("TCPLOCALPORT", server.port().to_string()),
            ("REMOTE_ADDR", client.ip().to_string()),
            ("REMOTE_PORT", client.port().to_string()),
            ("SOCKETD_LISTENER", name.clone()),
            ("GREETING", "hi there".to_string()),
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
        ];
        for (k, v) in &want {
            assert_eq!(env.get(*k), Some(v), "{name}: {k}\n{out}");
        }
        assert_eq!(
            env.len(),
            want.len(),
            "{name}: a clean environment, nothing else\n{out}"
        );

        let name = format!("unix-{workers}");
        let env = env_of(&d, &name);
        let me = std::process::id().to_string();
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let want = [
            ("PROTO", "UNIX".to_string()),
            ("UNIXREMOTEUID", uid.to_string()),
            ("UNIXREMOTEGID", gid.to_string()),
            ("UNIXREMOTEPID", me),
            ("SOCKETD_LISTENER", name.clone()),
        ];
        for (k, v) in &want {
            assert_eq!(env.get(*k), Some(v), "{name}: {k}\n{env:?}");
        }
        assert!(
            !env.contains_key("REMOTE_ADDR") && !env.contains_key("TCPREMOTEIP"),
            "{env:?}"
        );
    }
    d_stop(d);
}

/// SIGTERM, and the daemon exits 0 within the budget.
pub fn d_stop(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn pass_env_copies_only_the_named_variables() {
    let toml = exec_listener(
        "e",
        "tcp",
        "127.0.0.1:0",
        "forked",
        "{ argv = [\"/usr/bin/env\"], pass_env = [\"SOCKETD_TEST_PASS\", \"NOT_SET_ANYWHERE\"] }",
    );
    // The daemon inherits this process's environment; only the named variable may pass.
    std::env::set_var("SOCKETD_TEST_PASS", "passed");
    let d = Daemon::start(&toml);
    let env = env_of(&d, "e");
    assert_eq!(
        env.get("SOCKETD_TEST_PASS").map(String::as_str),
        Some("passed"),
        "{env:?}"
    );
    assert!(
        std::env::var_os("HOME").is_none() || !env.contains_key("HOME"),
        "{env:?}"
    );
    assert!(!env.contains_key("NOT_SET_ANYWHERE"), "{env:?}");
    d_stop(d);
}

#[test]
fn shell_metacharacters_arrive_literally() {
    let args = [
        "$(id)",
        ";",
        "rm -rf /nonexistent",
        "`id`",
        "a|b",
        "*",
        "$HOME",
    ];
    let argv: Vec<String> = std::iter::once("/bin/echo".to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    let exec = format!("{{ argv = {:?} }}", argv);
    let d = Daemon::start(&format!(
        "{}{}",
        exec_listener("t", "tcp", "127.0.0.1:0", "threaded", &exec),
        exec_listener("f", "tcp", "127.0.0.1:0", "forked", &exec)
    ));
    for name in ["t", "f"] {
        let mut s = d.connect(name);
        assert_eq!(
            lossy(&s.read_to_end_vec()),
            format!("{}\n", args.join(" ")),
            "{name}"
        );
    }
    d_stop(d);
}

#[test]
fn datagram_program_gets_one_datagram_and_its_stdout_is_the_reply() {
    let tr = "{ argv = [\"/usr/bin/tr\", \"a-z\", \"A-Z\"] }";
    let d = Daemon::start(&format!(
        "{}{}{}",
        exec_listener("ut", "udp", "127.0.0.1:0", "threaded", tr),
        exec_listener("uf", "udp", "127.0.0.1:0", "forked", tr),
        exec_listener("xf", "unix-dgram", "{dir}/x.dgram", "forked", tr),
    ));
    for name in ["ut", "uf", "xf"] {
        let c = d.dgram(name);
        assert_eq!(
            lossy(&c.request(b"hello datagram")),
            "HELLO DATAGRAM",
            "{name}"
        );
        let env = d.dgram(name);
        assert_eq!(env.request(b"x"), b"X");
    }
    d_stop(d);
}

#[test]
fn stderr_lines_and_exit_status_are_logged() {
    let prog = "{ argv = [\"/bin/sh\", \"-c\", \"echo oops >&2; exit 3\"] }";
    let d = Daemon::start(&format!(
        "{}{}",
        exec_listener("t", "tcp", "127.0.0.1:0", "threaded", prog),
        exec_listener("f", "tcp", "127.0.0.1:0", "forked", prog)
    ));
    for name in ["t", "f"] {
        let mut s = d.connect(name);
        assert_eq!(s.read_to_end_vec(), b"");
        d.wait_log(&format!("listener `{name}`: /bin/sh (pid "), READY_TIMEOUT);
    }
    d.wait_log_count("exited with status 3", 2, READY_TIMEOUT);
    let log = d.log();
    assert!(
        log.contains("listener `t` pid ") && log.contains("listener `f` pid "),
        "{log}"
    );
    assert_contains(&d.log(), &[": oops"]);
    d_stop(d);
}

#[test]
fn check_refuses_exec_settings_that_cannot_work() {
    let cases = [
        ("{ argv = [\"cat\"] }", "tcp", "must be an absolute path"),
        ("{ env = {} }", "tcp", "`argv` is required"),
        (
            "{ argv = [\"/bin/cat\"], wait = true }",
            "tcp",
            "udp and unix-dgram listeners only",
        ),
        (
            "{ argv = [\"/bin/cat\"], stderr = \"loud\" }",
            "tcp",
            "valid values: log, null, inherit",
        ),
        (
            "{ argv = [\"/bin/cat\"], user = \"no-such-user-socketd\" }",
            "tcp",
            "user",
        ),
        (
            "{ argv = [\"/bin/cat\"], bogus = 1 }",
            "udp",
            "unknown key `exec.bogus`",
        ),
    ];
    for (exec, proto, want) in cases {
        let toml = exec_listener("bad", proto, "127.0.0.1:0", "threaded", exec);
        let (out, path, _dir) = check(&toml);
        assert_eq!(out.code(), Some(1), "{exec}\n{}", out.describe());
        let diags = out.diagnostics(&path);
        assert!(
            diags
                .iter()
                .any(|l| l.contains(":7:") && l.contains("listener `bad`") && l.contains(want)),
            "{exec}: want {want:?} at line 7 (the exec key)\n{}",
            out.describe()
        );
    }
}

#[test]
fn rsync_daemon_in_inetd_mode_serves_the_real_client() {
    let Some(rsync) = which("rsync") else {
        eprintln!("skipped: rsync is not installed");
        return;
    };
    let dir = TestDir::new();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let payload = pseudo_random(200_000, 7);
    std::fs::write(data.join("blob.bin"), &payload).expect("write blob");
    let conf = dir.path().join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\nlog file = {}/rsyncd.log\n[module]\npath = {}\nread only = yes\n",
            dir.path().display(),
            data.display()
        ),
    )
    .expect("rsyncd.conf");
    for workers in ["threaded", "forked"] {
        let exec = format!(
            "{{ argv = [\"{rsync}\", \"--daemon\", \"--config={}\"] }}",
            conf.display()
        );
        let d = Daemon::start(&exec_listener(
            "rsync",
            "tcp",
            "127.0.0.1:0",
            workers,
            &exec,
        ));
        let port = d.addr("rsync").port();
        let out_dir = dir.path().join(format!("out-{workers}"));
        let mut cmd = Command::new(&rsync);
        cmd.arg("-a")
            .arg(format!("rsync://127.0.0.1:{port}/module/blob.bin"))
            .arg(&out_dir);
        std::fs::create_dir(&out_dir).expect("out dir");
        let out = run_with_timeout(cmd, Duration::from_secs(30));
        assert_eq!(
            out.code(),
            Some(0),
            "{workers}: {}\n{}",
            out.describe(),
            d.log_dump()
        );
        let got = std::fs::read(out_dir.join("blob.bin")).expect("fetched file");
        assert_bytes_eq(&payload, &got);
        d.wait_log("/usr/bin/rsync (pid", READY_TIMEOUT);
        d_stop(d);
    }
}

#[test]
fn tftpd_in_wait_mode_serves_the_real_client() {
    let (Some(tftp), true) = (which("tftp"), Path::new("/usr/sbin/in.tftpd").exists()) else {
        eprintln!("skipped: tftp-hpa client or in.tftpd is not installed");
        return;
    };
    let dir = TestDir::new();
    let root = dir.path().join("tftproot");
    std::fs::create_dir(&root).expect("tftp root");
    let payload = pseudo_random(100_000, 11);
    std::fs::write(root.join("file.bin"), &payload).expect("write file");
    // in.tftpd drops to `nobody` and chroots into the root: it must be world-readable.
    use std::os::unix::fs::PermissionsExt;
    for p in [dir.path(), root.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::set_permissions(
        root.join("file.bin"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    for workers in ["threaded", "forked"] {
        let exec = format!(
            "{{ argv = [\"/usr/sbin/in.tftpd\", \"-t\", \"1\", \"-s\", \"{}\"], wait = true }}",
            root.display()
        );
        let d = Daemon::start(&exec_listener("tftp", "udp", "127.0.0.1:0", workers, &exec));
        let port = d.addr("tftp").port();
        for round in 0..2 {
            let target = dir.path().join(format!("got-{workers}-{round}"));
            let mut cmd = Command::new(&tftp);
            cmd.current_dir(dir.path())
                .args([
                    "127.0.0.1",
                    &port.to_string(),
                    "-m",
                    "binary",
                    "-c",
                    "get",
                    "file.bin",
                ])
                .arg(&target);
            let out = run_with_timeout(cmd, Duration::from_secs(30));
            assert_eq!(
                out.code(),
                Some(0),
                "{workers} round {round}: {}\n{}",
                out.describe(),
                d.log_dump()
            );
            let got = std::fs::read(&target).unwrap_or_default();
            assert_bytes_eq(&payload, &got);
            // -t 1: in.tftpd exits a second after its last request; the loop then watches again.
            d.wait_log_count(
                "/usr/sbin/in.tftpd (pid",
                round + 1,
                Duration::from_secs(15),
            );
        }
        d_stop(d);
    }
}

/// The program's path if it is installed in a usual place.
pub fn which(prog: &str) -> Option<String> {
    ["/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| format!("{d}/{prog}"))
        .find(|p| Path::new(p).exists())
}

trait LocalAddr {
    fn local_addr_tcp(&self) -> std::net::SocketAddr;
}

impl LocalAddr for Stream {
    fn local_addr_tcp(&self) -> std::net::SocketAddr {
        match self {
            Stream::Tcp(s) => s.local_addr().expect("local addr"),
            _ => panic!("not a TCP stream"),
        }
    }
}
