//! socketd deployed as an operator deploys it, under real systemd as PID 1 (`sysd::Container`):
//! installed the way README.md says (and from the Debian package), started, reloaded, stopped,
//! socket-activated, restarted by its watchdog and restarted with a broken config. Clients run
//! in the container's network namespace, outside the service, as root or as `nobody`.
//!
//! Root only (skipped with the reason otherwise; CI runs them). Every test boots its own
//! container and leaves nothing behind (`Container::stop` checks). Installing and probing
//! socketd is `deploy.rs`'s.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::deploy::*;
use crate::harness::*;
use crate::sysd::Container;

#[test]
fn installed_by_readme_start_reload_refuse_stop_under_systemd() {
    let Some(c) = Container::boot_or_skip("readme") else {
        return;
    };
    let t0 = Instant::now();
    install_by_readme(&c);
    // Nothing starts by itself; the socket unit is not pulled in by anything.
    assert_eq!(
        c.exec(&["systemctl", "is-active", "socketd"]).stdout.trim(),
        "inactive"
    );

    // Active only after READY=1: a start that fails before it (a port already taken) is a
    // failed `systemctl start`, never an active unit.
    let blocker = c.in_net(|| std::net::TcpListener::bind(local(17019)).unwrap());
    let failed = c.exec_timeout(&["systemctl", "start", "socketd"], SYSTEMCTL);
    assert!(!failed.status.success(), "{}", failed.describe());
    assert_ne!(show(&c, "ActiveState"), "active");
    assert_eq!(
        show(&c, "ExecMainStatus"),
        "3",
        "exit code 3: could not start"
    );
    wait_journal(
        &c,
        "socketd",
        "listener `chargen-tcp`: cannot listen on tcp 127.0.0.1:17019",
        Duration::from_secs(10),
    );
    drop(blocker);

    // Start: `systemctl` returns when socketd said READY=1, so everything answers at once.
    c.sh("systemctl enable --now socketd");
    assert_eq!(c.sh("systemctl is-active socketd").trim(), "active");
    assert_shipped_services_answer(&c);
    assert_eq!(
        c.sh("systemctl is-active socketd.socket || true").trim(),
        "inactive",
        "socketd.socket was started without being enabled"
    );
    assert_eq!(
        show(&c, "StatusText"),
        format!("{LISTENERS} listeners, 0 connections open")
    );
    let main_pid = show(&c, "MainPID");
    let journal = c.journal("socketd");
    assert!(
        !journal.contains("passed by the service manager"),
        "no socket unit, yet sockets were passed:\n{journal}"
    );

    // Reload under load: add a listener, remove one; the kept echo-tcp refuses nothing.
    let added = SYSTEMD_CONFIG.replace(
        "name = \"discard-tcp\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:17009\"\nhandler = \"discard\"",
        "name = \"echo-extra\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:17107\"\nhandler = \"echo\"",
    );
    assert_ne!(added, SYSTEMD_CONFIG);
    // ...and one listener per other worker model, so that the unit's hardening (system-call
    // filter, no new privileges, W^X memory, read-only /) is shown to let each one work.
    let added = format!(
        "{added}
[[listener]]
name = \"echo-forked\"
protocol = \"tcp\"
address = \"127.0.0.1:17108\"
handler = \"echo\"
workers = \"forked\"

[[listener]]
name = \"cat-exec\"
protocol = \"tcp\"
address = \"127.0.0.1:17109\"
handler = \"exec\"
exec = {{ argv = [\"/bin/cat\"] }}

[[listener]]
name = \"echo-event\"
protocol = \"tcp\"
address = \"127.0.0.1:17110\"
handler = \"echo\"
workers = \"event\"
"
    );
    let (done, failures, reload) = echo_load(&c, 17007, 4, || {
        c.write(CONFIG, &added);
        let out = c.exec_timeout(&["systemctl", "reload", "socketd"], SYSTEMCTL);
        wait_journal(&c, "socketd", "reload: done", Duration::from_secs(20));
        out
    });
    assert!(reload.status.success(), "{}", reload.describe());
    assert_load_clean(&c, "reload under load", done, &failures);
    assert_contains(
        &c.journal("socketd"),
        &["reload: done (10 kept, 4 added, 1 removed)"],
    );
    c.in_net(|| {
        assert_eq!(tcp_echo(17107, b"new").unwrap(), b"new");
        assert_eq!(tcp_echo(17108, b"forked").unwrap(), b"forked");
        assert_eq!(tcp_echo(17109, b"exec'd cat").unwrap(), b"exec'd cat");
        assert_eq!(tcp_echo(17110, b"event").unwrap(), b"event");
        let gone = tcp_echo(17009, b"x").unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::ConnectionRefused, "{gone}");
    });
    assert_eq!(show(&c, "MainPID"), main_pid, "a reload must not restart");

    // A broken file: `systemctl reload` fails, says why, and the running config keeps serving.
    let broken = added.replace("handler = \"daytime\"", "handler = \"daytime\"\nbogus = 1");
    c.write(CONFIG, &broken);
    let refused = c.exec_timeout(&["systemctl", "reload", "socketd"], SYSTEMCTL);
    assert!(
        !refused.status.success(),
        "reload of a broken file succeeded:\n{}",
        refused.describe()
    );
    let journal = wait_journal(
        &c,
        "socketd",
        "unknown key `bogus`",
        Duration::from_secs(10),
    );
    assert_contains(&journal, &[&format!("{CONFIG}:")]);
    assert_eq!(c.sh("systemctl is-active socketd").trim(), "active");
    assert_eq!(show(&c, "MainPID"), main_pid);
    c.in_net(|| assert_eq!(tcp_echo(17107, b"still").unwrap(), b"still"));
    // SIGHUP straight to the daemon (no check first): socketd refuses it itself, at error level.
    c.sh("systemctl kill --kill-whom=main -s SIGHUP socketd");
    wait_journal(
        &c,
        "socketd",
        "reload refused: the running configuration",
        Duration::from_secs(10),
    );
    let errors = c.sh("journalctl -u socketd -p err -o cat --no-pager");
    assert_contains(
        &errors,
        &["reload refused: the running configuration stays in force"],
    );
    c.in_net(|| assert_eq!(tcp_echo(17107, b"still").unwrap(), b"still"));
    // A valid file whose new listener cannot bind (the port is taken): `socketd check` passes,
    // socketd rolls the reload back and the running config keeps serving. (systemctl's exit
    // code cannot tell this case until ExecReload waits for socketd's own outcome: README.)
    let blocker = c.in_net(|| std::net::TcpListener::bind(local(17111)).unwrap());
    let taken = format!(
        "{added}\n[[listener]]\nname = \"taken\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:17111\"\nhandler = \"echo\"\n"
    );
    c.write(CONFIG, &taken);
    c.exec_timeout(&["systemctl", "reload", "socketd"], SYSTEMCTL);
    wait_journal(&c, "socketd", "reload rolled back", Duration::from_secs(20));
    assert_eq!(c.sh("systemctl is-active socketd").trim(), "active");
    assert_eq!(show(&c, "MainPID"), main_pid);
    c.in_net(|| assert_eq!(tcp_echo(17107, b"kept").unwrap(), b"kept"));
    drop(blocker);
    c.write(CONFIG, &added);

    // Stop drains: the listeners close at once, the open connection is served to its end.
    let mut held = c.in_net(|| TcpStream::connect_timeout(&local(17007), IO_TIMEOUT).unwrap());
    held.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let stop = c.spawn(&["systemctl", "stop", "socketd"]);
    wait_journal(
        &c,
        "socketd",
        "connections in flight, waiting up to",
        Duration::from_secs(20),
    );
    let refused = c.in_net(|| tcp_echo(17007, b"late").unwrap_err());
    assert_eq!(
        refused.kind(),
        io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    held.write_all(b"in flight").unwrap();
    let mut buf = [0u8; 9];
    held.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"in flight");
    drop(held);
    let out = stop.wait(SYSTEMCTL);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(show(&c, "Result"), "success");
    assert_eq!(show(&c, "ExecMainStatus"), "0");
    assert!(
        !c.host_path(UNIX_ECHO).exists(),
        "the unix socket outlived the service"
    );

    // The journal has the lifecycle, with levels kept (info for these).
    let journal = c.journal("socketd");
    let order = [
        "listener `echo-unix` listening on unix /run/socketd/echo.sock",
        &format!("socketd ready: {LISTENERS} listeners"),
        "reload: done (10 kept, 4 added, 1 removed)",
        "reload refused",
        "reload rolled back",
        "connections in flight, waiting up to",
        "socketd stopped",
    ];
    let mut at = 0;
    for line in order {
        let i = journal[at..]
            .find(line)
            .unwrap_or_else(|| panic!("{line:?} missing or out of order in:\n{journal}"));
        at += i + line.len();
    }
    // The hardening refused nothing socketd does (a filtered call fails with EPERM, logged).
    assert!(
        !journal.contains("Operation not permitted") && !journal.contains("panicked"),
        "{journal}"
    );
    let info = c.sh("journalctl -u socketd -p info..info -o cat --no-pager");
    assert_contains(&info, &["socketd ready", "socketd stopped"]);
    eprintln!("under systemd, installed by README: {:?}", t0.elapsed());
    c.stop();
}

#[test]
fn debian_package_installs_and_serves_under_systemd() {
    if let Some(why) = crate::sysd::skip_reason() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run this, but: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TestDir::new();
    let Some(deb) = build_deb(dir.path()) else {
        return;
    };
    let c = Container::boot("deb");
    let t0 = Instant::now();
    let staged = c.stage(&deb, "socketd.deb");
    // This host image (a container build) has a policy-rc.d that forbids maintainer scripts to
    // start or stop services (exit 101); a real machine has none. Removed in the overlay only.
    c.sh("rm -f /usr/sbin/policy-rc.d");
    // man-db's trigger rebuilds the whole man index on every install and removal (seconds);
    // `man socketd` below finds the page by its path without it.
    c.sh("rm -f /var/lib/man-db/auto-update");
    c.sh(&format!("dpkg -i {staged}"));

    let files = c.sh("dpkg -L socketd");
    for f in [
        "/usr/bin/socketd",
        "/lib/systemd/system/socketd.service",
        "/lib/systemd/system/socketd.socket",
        "/etc/socketd/socketd.toml",
        "/usr/share/man/man1/socketd.1.gz",
        "/usr/share/man/man1/socketd-check.1.gz",
        "/usr/share/bash-completion/completions/socketd",
        "/usr/share/zsh/vendor-completions/_socketd",
        "/usr/share/fish/vendor_completions.d/socketd.fish",
        "/usr/share/doc/socketd/README.md",
        "/usr/share/doc/socketd/examples/socketd.toml",
    ] {
        // dpkg lists what the package holds; /lib is /usr/lib on a merged-/usr system.
        let held = files.lines().any(|l| l == f || l == format!("/usr{f}"));
        assert!(held, "the package lacks {f}:\n{files}");
        c.sh(&format!("test -e {f}"));
    }
    assert_contains(
        &c.sh("dpkg-query -W -f='${Conffiles}' socketd"),
        &["/etc/socketd/socketd.toml"],
    );
    assert_eq!(c.read(CONFIG), SYSTEMD_CONFIG);
    assert_eq!(
        c.sh("socketd --version").trim(),
        format!("socketd {}", env!("CARGO_PKG_VERSION"))
    );
    // Installed, nothing enabled or started (the socket unit above all).
    for unit in ["socketd.service", "socketd.socket"] {
        let enabled = c.exec(&["systemctl", "is-enabled", unit]).stdout;
        assert_eq!(enabled.trim(), "disabled", "{unit}");
        let active = c.exec(&["systemctl", "is-active", unit]).stdout;
        assert_eq!(active.trim(), "inactive", "{unit}");
    }
    // The units as installed: no warning (the man page they name exists now), and hardened.
    let verify = c.exec(&[
        "systemd-analyze",
        "verify",
        "socketd.service",
        "socketd.socket",
    ]);
    assert!(
        verify.status.success() && !verify.stderr.contains("socketd"),
        "{}",
        verify.describe()
    );
    let security = c.sh("systemd-analyze security socketd.service --no-pager");
    let score: f64 = security
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for socketd.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{security}"));
    assert!(score <= 2.5, "exposure {score}:\n{security}");
    // The man page and the completions come from the CLI itself.
    let man = c.sh("MANPAGER=cat MANWIDTH=100 man socketd");
    assert_contains(
        &man,
        &[
            "--config",
            "EXIT STATUS",
            "SIGHUP",
            "/etc/socketd/socketd.toml",
        ],
    );
    let completion = c.sh(
        "bash -c '. /usr/share/bash-completion/completions/socketd; \
         COMP_WORDS=(socketd ch); COMP_CWORD=1; COMP_LINE=\"socketd ch\"; COMP_POINT=10; \
         _socketd socketd ch socketd; printf \"%s\\n\" \"${COMPREPLY[@]}\"'",
    );
    assert!(completion.lines().any(|l| l == "check"), "{completion:?}");
    // zsh and fish find theirs where the package put them (their default search paths).
    if c.exec(&["sh", "-c", "command -v zsh && command -v fish"])
        .status
        .success()
    {
        let fish = c.sh("fish -c 'complete -C\"socketd ch\"'");
        assert!(fish.starts_with("check\t"), "{fish:?}");
        let zsh = c.sh(
            "zsh -n /usr/share/zsh/vendor-completions/_socketd && \
             zsh -fc 'autoload -U compinit && compinit -u -d /run/zcompdump && print -r -- $_comps[socketd]'",
        );
        assert_eq!(zsh.trim(), "_socketd");
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs zsh and fish (.ci/run)"
        );
        eprintln!("zsh/fish completions not tried: zsh or fish is not installed");
    }

    c.sh("systemctl enable --now socketd");
    assert_shipped_services_answer(&c);

    // Installing the package again (an upgrade) keeps an edited config (a conffile) and
    // restarts the running service on it.
    c.write(
        CONFIG,
        &SYSTEMD_CONFIG.replace("log_level = \"info\"", "log_level = \"debug\""),
    );
    let pid = show(&c, "MainPID");
    c.sh(&format!("dpkg -i {staged}"));
    assert_contains(&c.read(CONFIG), &["log_level = \"debug\""]);
    assert_eq!(show(&c, "ActiveState"), "active");
    assert_ne!(
        show(&c, "MainPID"),
        pid,
        "postinst restarts a running service"
    );
    c.in_net(|| assert_eq!(tcp_echo(17007, b"upgraded").unwrap(), b"upgraded"));

    // Removal stops the service and keeps the edited config; purge removes it.
    c.sh("dpkg -r socketd");
    c.sh("test ! -e /usr/bin/socketd");
    assert_ne!(
        c.exec(&["systemctl", "is-active", "socketd"]).stdout.trim(),
        "active"
    );
    assert_contains(&c.read(CONFIG), &["log_level = \"debug\""]);
    c.sh("dpkg -P socketd");
    c.sh(&format!("test ! -e {CONFIG}"));
    eprintln!("deb under systemd: {:?}", t0.elapsed());
    c.stop();
}

#[test]
fn socket_unit_activates_and_restart_refuses_nothing_under_systemd() {
    let Some(c) = Container::boot_or_skip("socket") else {
        return;
    };
    let t0 = Instant::now();
    install_by_readme(&c);
    c.sh("systemctl enable --now socketd.socket");
    assert_eq!(
        c.exec(&["systemctl", "is-active", "socketd"]).stdout.trim(),
        "inactive"
    );
    // The first client starts the service, on the port the config names (no port moves).
    c.in_net(|| assert_eq!(tcp_echo(17007, b"wake up").unwrap(), b"wake up"));
    assert_eq!(c.sh("systemctl is-active socketd").trim(), "active");
    assert_shipped_services_answer(&c);
    let journal = c.journal("socketd");
    let passed = journal.matches("passed by the service manager").count();
    assert_eq!(
        passed, 10,
        "every TCP and UDP listener adopts its socket:\n{journal}"
    );
    assert!(!journal.contains("matches no listener"), "{journal}");
    let socket_log = c.journal("socketd.socket");
    assert!(!socket_log.contains("failed"), "{socket_log}");

    // With systemd holding the sockets, a restart refuses no connection.
    let pid = show(&c, "MainPID");
    let (done, failures, out) = echo_load(&c, 17007, 4, || {
        c.exec_timeout(&["systemctl", "restart", "socketd"], SYSTEMCTL)
    });
    assert!(out.status.success(), "{}", out.describe());
    assert_ne!(show(&c, "MainPID"), pid, "restarted");
    assert_load_clean(
        &c,
        "restart under load with socketd.socket",
        done,
        &failures,
    );

    c.sh("systemctl stop socketd.socket socketd");
    let refused = c.in_net(|| tcp_echo(17007, b"x").unwrap_err());
    assert_eq!(
        refused.kind(),
        io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    eprintln!("socket activation under systemd: {:?}", t0.elapsed());
    c.stop();
}

#[test]
fn watchdog_and_broken_restart_under_systemd() {
    let Some(c) = Container::boot_or_skip("watchdog") else {
        return;
    };
    let t0 = Instant::now();
    install_by_readme(&c);
    // The shipped WatchdogSec=30s, shortened by an operator's drop-in so the test is quick.
    c.write(
        "/etc/systemd/system/socketd.service.d/watchdog.conf",
        "[Service]\nWatchdogSec=2s\n",
    );
    c.sh("systemctl daemon-reload && systemctl start socketd");
    let pid = show(&c, "MainPID");
    // A hung daemon: it stops pinging WATCHDOG=1, systemd kills it and starts a new one.
    c.sh("systemctl kill --kill-whom=main -s SIGSTOP socketd");
    wait_journal(&c, "socketd", "Watchdog timeout", Duration::from_secs(20));
    wait_until("a restarted socketd", Duration::from_secs(30), || {
        let now = show(&c, "MainPID");
        now != pid && now != "0" && show(&c, "ActiveState") == "active"
    });
    assert_shipped_services_answer(&c);

    // restart with a broken file: it fails and the service is down (README says so), then
    // systemd's retries bring it back by themselves once the file is fixed.
    let good = c.read(CONFIG);
    c.write(
        CONFIG,
        &good.replace("protocol = \"udp\"", "protocol = \"sctp\""),
    );
    let restart = c.exec_timeout(&["systemctl", "restart", "socketd"], SYSTEMCTL);
    assert!(!restart.status.success(), "{}", restart.describe());
    let journal = wait_journal(
        &c,
        "socketd",
        "unknown protocol \"sctp\"",
        Duration::from_secs(10),
    );
    assert_contains(&journal, &[&format!("{CONFIG}:")]);
    assert_ne!(show(&c, "ActiveState"), "active");
    c.write(CONFIG, &good);
    wait_until(
        "socketd back after the fix",
        Duration::from_secs(30),
        || show(&c, "ActiveState") == "active",
    );
    assert_shipped_services_answer(&c);
    eprintln!(
        "watchdog and broken restart under systemd: {:?}",
        t0.elapsed()
    );
    c.stop();
}

/// The systemd config serves what the reference config serves (only the unix socket moves to
/// /run/socketd), and the socket unit lists exactly its TCP and UDP addresses.
#[test]
fn systemd_config_and_socket_unit_match_the_shipped_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let listeners = |file: &str| -> Vec<(String, String, String, String)> {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let table: toml::Table = text.parse().unwrap();
        table["listener"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let s = |k: &str| l[k].as_str().unwrap().to_string();
                (s("name"), s("protocol"), s("address"), s("handler"))
            })
            .collect()
    };
    let reference = listeners("config/socketd.toml");
    let systemd = listeners("config/socketd-systemd.toml");
    assert_eq!(systemd.len(), LISTENERS);
    let moved: Vec<_> = reference
        .iter()
        .map(|l| match l.1.as_str() {
            "unix" => (l.0.clone(), l.1.clone(), UNIX_ECHO.to_string(), l.3.clone()),
            _ => l.clone(),
        })
        .collect();
    assert_eq!(systemd, moved);
    let (out, _, _) = check(SYSTEMD_CONFIG);
    assert!(out.status.success(), "{}", out.describe());

    let unit = std::fs::read_to_string(root.join("systemd/socketd.socket")).unwrap();
    let mut listens: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let proto = match k {
                "ListenStream" => "tcp",
                "ListenDatagram" => "udp",
                _ if k.starts_with("Listen") => panic!("unexpected {l}"),
                _ => return None,
            };
            Some((proto.to_string(), v.to_string()))
        })
        .collect();
    let mut ip: Vec<(String, String)> = systemd
        .iter()
        .filter(|l| l.1 == "tcp" || l.1 == "udp")
        .map(|l| (l.1.clone(), l.2.clone()))
        .collect();
    listens.sort();
    ip.sort();
    assert_eq!(listens, ip, "socketd.socket and the config disagree");
    let service = std::fs::read_to_string(root.join("systemd/socketd.service")).unwrap();
    assert!(
        !service
            .lines()
            .any(|l| l.starts_with("Wants=socketd.socket")
                || l.starts_with("Requires=socketd.socket")),
        "socketd.service must not pull in the optional socket unit"
    );
}
