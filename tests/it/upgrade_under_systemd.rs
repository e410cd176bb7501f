//! Binary upgrade and the fd store under real systemd as PID 1 (`sysd::Container`), installed
//! the way README.md says: after an upgrade systemd knows the new main pid, the watchdog keeps
//! being fed and `systemctl stop` stops the new process cleanly; with `fd_store = true`,
//! `systemctl restart` refuses nothing. Root only (skipped with the reason otherwise).

use std::time::Duration;

use crate::deploy::{
    assert_load_clean, assert_shipped_services_answer, echo_load, install_by_readme, show,
    tcp_echo, udp_request, unix_echo, wait_journal, CONFIG, SYSTEMCTL, UNIX_ECHO,
};
use crate::harness::*;
use crate::sysd::Container;

/// Put a fresh copy of the binary at /usr/local/bin/socketd the way a package does: a new file
/// renamed over the old one (the running binary stays intact).
fn replace_binary(c: &Container) {
    c.stage(std::path::Path::new(SOCKETD), "socketd-new");
    c.sh("cp /mnt/host/socketd-new /usr/local/bin/.socketd.new && \
         mv -f /usr/local/bin/.socketd.new /usr/local/bin/socketd");
}

#[test]
fn upgrade_under_systemd_moves_the_main_pid_and_stops_cleanly() {
    let Some(c) = Container::boot_or_skip("upgrade") else {
        return;
    };
    install_by_readme(&c);
    // A short watchdog, so that a new process that did not feed it would be caught here (4s,
    // not less: on a loaded 2-core machine a 1s keep-alive interval can be starved).
    c.write(
        "/etc/systemd/system/socketd.service.d/watchdog.conf",
        "[Service]\nWatchdogSec=4s\n",
    );
    c.sh("systemctl daemon-reload && systemctl start socketd");
    let old = show(&c, "MainPID");
    replace_binary(&c);

    // `socketd upgrade` as an operator types it: through the control socket of the shipped
    // systemd config, answered once the new process serves.
    let (done, failures, out) = echo_load(&c, 17007, 4, || {
        c.exec_timeout(&["socketd", "--config", CONFIG, "upgrade"], SYSTEMCTL)
    });
    assert_eq!(
        out.code(),
        Some(0),
        "{}\n{}",
        out.describe(),
        c.journal("socketd")
    );
    let new = show(&c, "MainPID");
    assert_ne!(new, old);
    assert_contains(&out.stdout, &[&format!("upgraded: pid {old} -> pid {new}")]);
    assert_load_clean(&c, "upgrade under systemd", done, &failures);
    let status = c.exec(&["systemctl", "status", "socketd"]).stdout;
    assert_contains(&status, &[&format!("Main PID: {new}"), "active (running)"]);
    wait_until("the old process to exit", Duration::from_secs(20), || {
        c.exec(&["test", "-e", &format!("/proc/{old}")])
            .code()
            .is_some_and(|code| code != 0)
    });
    assert_shipped_services_answer(&c);

    // Again, the way scripts do it: SIGUSR2 to the main process only.
    replace_binary(&c);
    let out = c.exec(&[
        "systemctl",
        "kill",
        "--kill-whom=main",
        "--signal=SIGUSR2",
        "socketd",
    ]);
    assert!(out.status.success(), "{}", out.describe());
    let mut newer = String::new();
    wait_until("systemd to know the next main pid", SYSTEMCTL, || {
        newer = show(&c, "MainPID");
        newer != new && newer != "0"
    });
    let new = newer;
    assert_shipped_services_answer(&c);

    // Over two watchdog intervals later: still the same process, never restarted.
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(
        show(&c, "MainPID"),
        new,
        "{}\n{}",
        c.journal("socketd"),
        c.journal_tail()
    );
    assert_eq!(show(&c, "ActiveState"), "active");
    let journal = c.journal("socketd");
    assert!(!journal.contains("Watchdog timeout"), "{journal}");
    // No notification of either process was refused (NotifyAccess=main).
    let manager = c.journal_tail();
    assert!(
        !manager.contains("reception only permitted for main PID"),
        "{manager}"
    );

    let out = c.exec_timeout(&["systemctl", "stop", "socketd"], SYSTEMCTL);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(
        (show(&c, "ActiveState"), show(&c, "Result")),
        ("inactive".to_string(), "success".to_string()),
        "{}\n{}",
        c.journal("socketd"),
        c.journal_tail()
    );
    let by_new = c
        .exec(&[
            "journalctl",
            "--no-pager",
            "-o",
            "cat",
            &format!("_PID={new}"),
        ])
        .stdout;
    assert_contains(
        &by_new,
        &["stopping: 0 connections in flight", "socketd stopped"],
    );
    let manager = c.journal("socketd");
    assert!(!manager.contains("not our child"), "{manager}");
    c.stop();
}

#[test]
fn restart_with_the_fd_store_refuses_nothing_under_systemd() {
    let Some(c) = Container::boot_or_skip("fdstore") else {
        return;
    };
    install_by_readme(&c);
    c.write(
        "/etc/systemd/system/socketd.service.d/fdstore.conf",
        "[Service]\nFileDescriptorStoreMax=64\nRuntimeDirectoryPreserve=restart\n",
    );
    let config = c
        .read(CONFIG)
        .replace("[daemon]\n", "[daemon]\nfd_store = true\n");
    c.write(CONFIG, &config);
    c.sh("systemctl daemon-reload && systemctl start socketd");
    wait_journal(
        &c,
        "socketd",
        "fd store: 11 listening sockets kept",
        Duration::from_secs(10),
    );
    let pid = show(&c, "MainPID");
    let (done, failures, out) = echo_load(&c, 17007, 4, || {
        c.exec_timeout(&["systemctl", "restart", "socketd"], SYSTEMCTL)
    });
    assert!(out.status.success(), "{}", out.describe());
    assert_ne!(show(&c, "MainPID"), pid, "restarted");
    assert_load_clean(
        &c,
        "restart with the fd store under systemd",
        done,
        &failures,
    );
    let journal = c.journal("socketd");
    assert_eq!(
        journal.matches("passed by the service manager").count(),
        11,
        "every listener adopts its stored socket after the restart:\n{journal}"
    );
    assert_eq!(
        unix_echo(&c.host_path(UNIX_ECHO), b"after").expect("unix echo"),
        b"after"
    );
    // (Not `assert_shipped_services_answer`: with DynamicUser=yes, systemd moves a preserved
    // RuntimeDirectory under /run/private, mode 0700, so only root reaches its unix sockets.)
    c.in_net(|| {
        assert_eq!(tcp_echo(17007, b"tcp").expect("tcp echo"), b"tcp");
        assert_eq!(udp_request(17007, b"udp").expect("udp echo"), b"udp");
    });
    c.sh("systemctl stop socketd");
    c.stop();
}
