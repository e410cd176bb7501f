//! Under real systemd (the `sysd` container, root only): a connection flood far above
//! journald's rate limit cannot push socketd's own lines (reload results, errors) out of the
//! journal, because access lines have their own sink (off by default), while `socketd status`
//! still counts every connection; with `access_log = "stderr"` the same flood does trip
//! journald's limit, which is what the default avoids.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::deploy::{install_by_readme, show, tcp_echo, wait_journal};
use crate::sysd::Container;

const CONFIG: &str = "/etc/socketd/socketd.toml";
const SYSTEMD_CONFIG: &str = include_str!("../../config/socketd-systemd.toml");

/// `threads` x `each` echo exchanges on `port` as fast as they go (inside the container's
/// network namespace), bounded by 60s; returns how many succeeded.
fn flood(c: &Container, port: u16, threads: usize, each: usize) -> usize {
    let ok = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let ok = &ok;
            s.spawn(move || {
                c.enter_net();
                let deadline = Instant::now() + Duration::from_secs(60);
                for _ in 0..each {
                    if Instant::now() > deadline {
                        break;
                    }
                    if tcp_echo(port, b"flood").is_ok_and(|r| r == b"flood") {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    ok.into_inner()
}

fn status(c: &Container) -> Value {
    let out = c.exec(&["socketd", "--config", CONFIG, "status", "--json"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("status JSON");
    v["status"].clone()
}

fn accepted(s: &Value, name: &str) -> u64 {
    s["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .and_then(|l| l["accepted"].as_u64())
        .unwrap_or_else(|| panic!("no listener {name} in {s}"))
}

#[test]
fn a_connection_flood_cannot_push_reload_lines_out_of_the_journal_under_systemd() {
    let Some(c) = Container::boot_or_skip("flood") else {
        return;
    };
    install_by_readme(&c);
    // A tighter limit than journald's default (10,000 lines per 30s), so that the contrast
    // below shows within seconds.
    c.write(
        "/etc/systemd/journald.conf.d/rate.conf",
        "[Journal]\nRateLimitIntervalSec=5s\nRateLimitBurst=2000\n",
    );
    c.sh("systemctl restart systemd-journald");
    c.sh("systemctl start socketd");
    let s = status(&c);
    assert_eq!(s["process"]["pid"].to_string(), show(&c, "MainPID"));
    assert_eq!(s["access_log"]["target"], "off", "the shipped default");

    // 24,000 connections in a few seconds: far over 2,000 lines per 5s.
    let done = flood(&c, 17007, 4, 6_000);
    assert!(done >= 20_000, "only {done} exchanges");
    let out = c.exec(&["systemctl", "reload", "socketd"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    wait_journal(&c, "socketd", "reload: done", Duration::from_secs(20));
    let suppressed = |c: &Container| {
        c.sh("journalctl --no-pager -o cat")
            .lines()
            .any(|l| l.contains("Suppressed") && l.contains("socketd"))
    };
    assert!(!suppressed(&c), "journald suppressed socketd's lines");
    let s = status(&c);
    assert!(accepted(&s, "echo-tcp") >= done as u64, "{s}");
    assert_eq!(s["reloads"]["ok"], 1);

    // The same flood with the access lines on the journal's stream: journald's limit trips.
    let loud = SYSTEMD_CONFIG.replace("access_log = \"off\"", "access_log = \"stderr\"");
    assert_ne!(loud, SYSTEMD_CONFIG);
    c.write(CONFIG, &loud);
    let out = c.exec(&["systemctl", "reload", "socketd"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    flood(&c, 17007, 4, 6_000);
    // journald says how many it dropped with the first line after its interval: nudge it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !suppressed(&c) {
        assert!(
            Instant::now() < deadline,
            "journald never suppressed the stderr access lines"
        );
        c.exec(&["systemctl", "reload", "socketd"]);
        std::thread::sleep(Duration::from_secs(1));
    }
    c.stop();
}
