//! Every config error an operator can make, through `socketd check` (exit 1, one
//! `file:line:col: message` per problem on stderr) and through starting the daemon (exit 1,
//! the same diagnostics in the log, nothing bound), plus the good files that must pass.
//!
//! Addresses in these files may use fixed ports: nothing here binds (a bad file stops the
//! daemon before any listener is bound).

use std::path::Path;

use crate::harness::*;

/// `toml` is refused: `check` exits 1 with a diagnostic at `line` that contains every one
/// of `parts`, and so does starting the daemon, which never gets to `ready`.
#[track_caller]
fn assert_rejected(toml: &str, line: usize, parts: &[&str]) {
    let (out, path, _dir) = check(toml);
    assert_eq!(
        out.code(),
        Some(1),
        "check should exit 1\n{}",
        out.describe()
    );
    assert!(
        !out.stdout.contains("ok"),
        "check printed ok\n{}",
        out.describe()
    );
    let wanted = format!("{}:{line}:", path.display());
    let diags = out.diagnostics(&path);
    let Some(diag) = diags.iter().find(|d| d.starts_with(&wanted)) else {
        panic!("no diagnostic at {wanted}\n{}", out.describe());
    };
    assert_contains(diag, parts);

    let mut d = Daemon::spawn(toml);
    let status = d.wait_exit(READY_TIMEOUT);
    assert_exit_code(status, 1, &d);
    let log = d.log();
    let wanted = format!("{}:{line}:", d.config_path().display());
    let Some(logged) = log.lines().find(|l| l.contains(&wanted)) else {
        panic!(
            "the daemon did not log a diagnostic at {wanted}\n{}",
            d.log_dump()
        );
    };
    assert_contains(logged, parts);
    assert!(!log.contains("socketd ready"), "{}", d.log_dump());
}

const GOOD_LISTENER: &str =
    "[[listener]]\nname = \"echo\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n";

#[test]
fn toml_syntax_error() {
    assert_rejected(
        "[daemon\nshutdown_timeout = \"1s\"\n",
        1,
        &["TOML syntax error"],
    );
    let missing_quote = "[daemon]\nshutdown_timeout = 1s\n";
    assert_rejected(missing_quote, 2, &["TOML syntax error"]);
}

#[test]
fn unknown_keys_at_every_level() {
    assert_rejected(
        "[daemon]\nshutdown_timeout = \"1s\"\ncolour = \"red\"\n",
        3,
        &[
            "[daemon]",
            "unknown key `colour`",
            "valid keys: shutdown_timeout",
        ],
    );
    assert_rejected(
        &format!("{GOOD_LISTENER}max_worker = 3\n"),
        6,
        &["listener `echo`", "unknown key `max_worker`", "max_workers"],
    );
    assert_rejected(
        &format!("listeners = []\n{GOOD_LISTENER}"),
        1,
        &["unknown key `listeners`", "valid keys: daemon, listener"],
    );
}

#[test]
fn unknown_protocol_lists_the_valid_ones() {
    assert_rejected(
        &GOOD_LISTENER.replace("\"tcp\"", "\"sctp\""),
        3,
        &[
            "listener `echo`",
            "key `protocol`",
            "\"sctp\"",
            "tcp, udp, unix, unix-dgram",
        ],
    );
}

#[test]
fn unknown_handler_lists_the_valid_ones() {
    assert_rejected(
        &GOOD_LISTENER.replace("handler = \"echo\"", "handler = \"ehco\""),
        5,
        &[
            "listener `echo`",
            "key `handler`",
            "\"ehco\"",
            "valid values:",
            "chargen",
            "daytime",
            "discard",
            "echo",
            "time",
        ],
    );
}

#[test]
fn unknown_workers_lists_the_valid_ones() {
    assert_rejected(
        &format!("{GOOD_LISTENER}workers = \"pooled\"\n"),
        6,
        &[
            "listener `echo`",
            "key `workers`",
            "\"pooled\"",
            "valid values:",
            "threaded",
        ],
    );
}

#[test]
fn duplicate_listener_names() {
    let toml = format!("{GOOD_LISTENER}\n{}", GOOD_LISTENER.replace("tcp", "udp"));
    assert_rejected(
        &toml,
        8,
        &["key `name`", "`echo` is already defined at line 2"],
    );
}

#[test]
fn same_protocol_and_address_twice() {
    let first = GOOD_LISTENER.replace("127.0.0.1:0", "127.0.0.1:7007");
    let second = first.replace("\"echo\"\nprotocol", "\"echo2\"\nprotocol");
    let toml = format!("{first}\n{second}");
    assert_rejected(
        &toml,
        10,
        &[
            "listener `echo2`",
            "key `address`",
            "127.0.0.1:7007",
            "already used by listener `echo` at line 4",
        ],
    );
    // `[::]` is dual-stack, so it takes IPv4 on its port too: the daemon could not bind
    // both, so check must not pass them.
    let v4 = GOOD_LISTENER.replace("127.0.0.1:0", "0.0.0.0:7007");
    let v6 = v4
        .replace("0.0.0.0:7007", "[::]:7007")
        .replace("\"echo\"\nprotocol", "\"echo6\"\nprotocol");
    assert_rejected(
        &format!("{v4}\n{v6}"),
        10,
        &["listener `echo6`", "key `address`", "0.0.0.0:7007"],
    );
    // The same address on tcp and udp is fine (different protocols) — checked in good_files.
    let unix = "[[listener]]\nname = \"a\"\nprotocol = \"unix\"\naddress = \"{dir}/s.sock\"\nhandler = \"echo\"\n";
    let toml = format!(
        "{unix}{}",
        unix.replace("\"a\"", "\"b\"")
            .replace("\"unix\"", "\"unix-dgram\"")
    );
    assert_rejected(
        &toml,
        9,
        &[
            "listener `b`",
            "key `address`",
            "s.sock",
            "already used by listener `a`",
        ],
    );
}

#[test]
fn bad_addresses_for_their_protocol() {
    let host = GOOD_LISTENER.replace("127.0.0.1:0", "localhost:7");
    assert_rejected(
        &host,
        4,
        &[
            "listener `echo`",
            "key `address`",
            "never resolves",
            "127.0.0.1",
        ],
    );
    let no_port = GOOD_LISTENER.replace("127.0.0.1:0", "127.0.0.1");
    assert_rejected(&no_port, 4, &["key `address`", "port is missing"]);
    let v6 = GOOD_LISTENER.replace("127.0.0.1:0", "::1:7007");
    assert_rejected(&v6, 4, &["key `address`", "brackets", "[::1]:7007"]);
    let path = GOOD_LISTENER.replace("127.0.0.1:0", "/run/echo.sock");
    assert_rejected(&path, 4, &["key `address`", "not an ip:port address"]);
    let unix = GOOD_LISTENER.replace("\"tcp\"", "\"unix\"");
    assert_rejected(&unix, 4, &["key `address`", "filesystem path"]);
}

#[test]
fn max_workers_must_be_positive() {
    assert_rejected(
        &format!("{GOOD_LISTENER}max_workers = 0\n"),
        6,
        &[
            "listener `echo`",
            "key `max_workers`",
            "1 or more",
            "found 0",
        ],
    );
    assert_rejected(
        &format!("{GOOD_LISTENER}max_workers = -3\n"),
        6,
        &["key `max_workers`", "1 or more"],
    );
    assert_rejected(
        &format!("{GOOD_LISTENER}max_workers = \"8\"\n"),
        6,
        &["key `max_workers`", "expected an integer"],
    );
}

#[test]
fn bad_durations() {
    for bad in ["10 seconds", "10", "soon", "-1s"] {
        assert_rejected(
            &format!("[daemon]\nshutdown_timeout = \"{bad}\"\n"),
            2,
            &[
                "[daemon]",
                "key `shutdown_timeout`",
                "not a duration",
                "\"10s\"",
            ],
        );
    }
}

#[test]
fn missing_required_keys() {
    assert_rejected(
        "[[listener]]\nname = \"x\"\nprotocol = \"tcp\"\n",
        1,
        &["listener `x`", "missing required key `address`"],
    );
}

/// Every problem in the file at once, in file order, with a count at the end.
#[test]
fn all_errors_in_a_file_are_reported_at_once() {
    let toml = r#"[daemon]
shutdown_timeout = "forever"
bogus = 1

[[listener]]
name = "a"
protocol = "sctp"
address = "127.0.0.1:0"
handler = "ehco"
workers = "pooled"
max_workers = 0

[[listener]]
name = "a"
protocol = "tcp"
address = "localhost:7"
handler = "echo"
colour = "red"

[[listener]]
name = "b"
protocol = "udp"
address = "127.0.0.1:7007"
handler = "echo"

[[listener]]
name = "c"
protocol = "udp"
address = "127.0.0.1:7007"
handler = "echo"
"#;
    let expected: &[(usize, &str)] = &[
        (2, "key `shutdown_timeout`"),
        (3, "unknown key `bogus`"),
        (7, "key `protocol`"),
        (9, "key `handler`"),
        (10, "key `workers`"),
        (11, "key `max_workers`"),
        (14, "already defined at line 6"),
        (16, "key `address`"),
        (18, "unknown key `colour`"),
        (29, "already used by listener `b`"),
    ];
    let (out, path, _dir) = check(toml);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let diags = out.diagnostics(&path);
    assert_eq!(
        diags.len(),
        expected.len(),
        "one diagnostic per problem\n{}",
        out.describe()
    );
    for (diag, (line, part)) in diags.iter().zip(expected) {
        assert_contains(diag, &[&format!("{}:{line}:", path.display()), part]);
    }
    assert_contains(&out.stderr, &[&format!("{} errors found", expected.len())]);

    let mut d = Daemon::spawn(toml);
    assert_exit_code(d.wait_exit(READY_TIMEOUT), 1, &d);
    let log = d.log();
    for (line, part) in expected {
        let at = format!("{}:{line}:", d.config_path().display());
        assert!(
            log.lines().any(|l| l.contains(&at) && l.contains(part)),
            "no {part:?} at {at} in the log\n{}",
            d.log_dump()
        );
    }
}

#[test]
fn a_missing_config_file_is_an_error() {
    let dir = TestDir::new();
    let path = dir.path().join("nope.toml");
    let mut cmd = socketd_cmd();
    cmd.arg("check").arg("--config").arg(&path);
    let out = run_with_timeout(cmd, READY_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_contains(&out.stderr, &[&path.display().to_string(), "cannot read"]);
}

#[test]
fn usage_errors_exit_2() {
    let mut cmd = socketd_cmd();
    cmd.arg("--no-such-flag");
    let out = run_with_timeout(cmd, READY_TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
}

#[test]
fn a_listener_that_cannot_bind_exits_3_naming_it() {
    // Occupy a port, then ask the daemon for it: a start failure, not a config error.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let toml = GOOD_LISTENER.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let (out, _path, _dir) = check(&toml);
    assert_eq!(
        out.code(),
        Some(0),
        "check binds nothing\n{}",
        out.describe()
    );
    let mut d = Daemon::spawn(&toml);
    assert_exit_code(d.wait_exit(READY_TIMEOUT), 3, &d);
    assert_contains(&d.log(), &["listener `echo`", &format!("127.0.0.1:{port}")]);
}

#[test]
fn good_files_pass_check() {
    let toml = format!(
        "[daemon]\nshutdown_timeout = \"1500ms\"\n\n{GOOD_LISTENER}workers = \"threaded\"\nmax_workers = 8\n\n{}",
        GOOD_LISTENER
            .replace("\"echo\"\nprotocol = \"tcp\"", "\"echo-udp\"\nprotocol = \"udp\"")
            .replace("127.0.0.1:0", "127.0.0.1:7007")
    );
    let (out, _path, _dir) = check(&toml);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "ok", "{}", out.describe());
    let (out, _path, _dir) = check("");
    assert_eq!(
        (out.code(), out.stdout.trim()),
        (Some(0), "ok"),
        "an empty file is valid\n{}",
        out.describe()
    );
}

/// The shipped, fully commented example config must always be valid.
#[test]
fn shipped_config_passes_check() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/socketd.toml");
    let mut cmd = socketd_cmd();
    cmd.arg("check").arg("--config").arg(&path);
    let out = run_with_timeout(cmd, READY_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "ok", "{}", out.describe());
}

/// A handler's table is read key by key like the core keys: an `exec` table with three
/// mistakes gives three diagnostics, each at its own line and column, and "3 errors found".
#[test]
fn exec_table_with_three_mistakes_gives_three_errors_at_their_keys() {
    let toml = "[[listener]]\nname = \"x\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:7\"\n\
                handler = \"exec\"\n[listener.exec]\nargv = [\"relative\"]\n\
                stderr = \"loud\"\n  bogus = 1\n";
    let (out, path, _dir) = check(toml);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let diags = out.diagnostics(&path);
    let at = |line_col: &str, parts: &[&str]| {
        let wanted = format!("{}:{line_col}:", path.display());
        let Some(d) = diags.iter().find(|d| d.starts_with(&wanted)) else {
            panic!("no diagnostic at {wanted}\n{}", out.describe());
        };
        assert_contains(d, parts);
    };
    assert_eq!(diags.len(), 3, "{}", out.describe());
    at("7:1", &["key `exec.argv`", "must be an absolute path"]);
    at(
        "8:1",
        &["key `exec.stderr`", "valid values: log, null, inherit"],
    );
    at("9:3", &["key `exec.bogus`", "valid keys: argv, env"]);
    assert!(out.stderr.contains("3 errors found"), "{}", out.describe());
}
