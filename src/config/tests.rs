//! Whole-file tests of `Config::from_str`: a full valid config, each error an operator can make
//! (asserting the line, the key and the fix in the message), and many errors reported at once.
//! The helpers are shared with the other files' tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::handler::{BuildContext, Factory, Handler, Registry};

/// Built-ins plus `greet`, a handler that requires `greet = { text = "..." }`.
fn registry() -> Registry {
    struct Greet;
    impl Handler for Greet {
        fn handle(
            &mut self,
            _: &mut crate::handler::Request,
            _: &crate::handler::Context,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut r = Registry::with_builtins();
    r.register("greet", |ctx: &BuildContext| {
        match ctx.settings.and_then(|t| t.get("text")) {
            Some(toml::Value::String(_)) => {
                Ok(Arc::new(|| Box::new(Greet) as Box<dyn Handler>) as Factory)
            }
            _ => Err("needs `text`, a string, e.g. greet = { text = \"hi\" }".into()),
        }
    });
    r.register_settings("typed", |_ctx: &BuildContext, s: TypedSettings| {
        if s.times > 10 {
            return Err(crate::config::SettingsError::at(
                "times",
                "`times` must be at most 10",
            ));
        }
        Ok(Arc::new(|| Box::new(Greet) as Box<dyn Handler>) as Factory)
    });
    r
}

/// A registered handler's own settings struct.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct TypedSettings {
    text: String,
    #[serde(default)]
    times: u32,
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(text, Path::new("socketd.toml"), &registry())
}

/// Every diagnostic, formatted as the operator sees it.
pub(super) fn errors(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(c) => panic!("expected errors, got {c:#?}"),
        Err(e) => e.diagnostics.iter().map(ToString::to_string).collect(),
    }
}

/// The only diagnostic; fails if there are none or several.
pub(super) fn error(text: &str) -> String {
    let all = errors(text);
    assert_eq!(all.len(), 1, "expected one error, got {all:#?}");
    all.into_iter().next().unwrap_or_default()
}

pub(super) fn assert_has(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "missing {part:?} in\n{message}");
    }
}

pub(super) const LISTENER: &str = "[[listener]]\nname = \"echo\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n";

#[test]
fn full_valid_config() {
    let text = r#"
[daemon]
shutdown_timeout = "500ms"
pidfile = "/run/socketd.pid"
user = "socketd"
group = "socketd"
log = "syslog"
log_level = "debug"

[[listener]]
name = "echo"
protocol = "tcp"
address = "127.0.0.1:7007"
handler = "echo"
workers = "forked"
max_workers = 8

[[listener]]
name = "echo-udp"
protocol = "udp"
address = "127.0.0.1:7007"
handler = "echo"

[[listener]]
name = "greet"
protocol = "unix"
address = "run/greet.sock"
handler = "greet"
greet = { text = "hello" }

[[listener]]
name = "v6"
protocol = "tcp"
address = "[::1]:7007"
handler = "daytime"

[[listener]]
name = "any6"
protocol = "udp"
address = "[::]:0"
handler = "time"
"#;
    let config = parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.origin, PathBuf::from("socketd.toml"));
    let d = &config.daemon;
    assert_eq!(d.shutdown_timeout, Duration::from_millis(500));
    assert_eq!(d.pidfile.as_deref(), Some(Path::new("/run/socketd.pid")));
    assert_eq!(
        (d.user.as_deref(), d.group.as_deref()),
        (Some("socketd"), Some("socketd"))
    );
    assert_eq!(
        (d.log, d.log_level),
        (LogTarget::Syslog, log::LevelFilter::Debug)
    );
    let l = &config.listeners;
    assert_eq!(l.len(), 5);
    assert_eq!(l[0].name, "echo");
    assert_eq!(l[0].protocol, Protocol::Tcp);
    assert_eq!(l[0].address.to_string(), "127.0.0.1:7007");
    assert_eq!((l[0].workers, l[0].max_workers), (WorkerModel::Forked, 8));
    assert_eq!(
        (l[1].workers, l[1].max_workers),
        (WorkerModel::Threaded, defaults::MAX_WORKERS)
    );
    assert_eq!(
        l[2].address,
        ListenAddr::Path(PathBuf::from("run/greet.sock"))
    );
    let greet = l[2].handler_settings.as_ref().and_then(|t| t.get("text"));
    assert_eq!(greet.and_then(|v| v.as_str()), Some("hello"));
    assert_eq!(l[3].address.to_string(), "[::1]:7007");
    assert_eq!(l[4].address.to_string(), "[::]:0");
}

#[test]
fn defaults_apply_and_an_empty_file_is_valid() {
    let config = parse("").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.daemon, DaemonConfig::default());
    assert!(config.listeners.is_empty());
    let config = parse(LISTENER).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.daemon.shutdown_timeout, defaults::SHUTDOWN_TIMEOUT);
    assert_eq!(config.listeners[0].handler_settings, None);
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let e = error("[daemon]\nuser = socketd\n");
    assert_has(&e, &["socketd.toml:2:8: TOML syntax error", "quoted"]);
    let e = error("[daemon]\nuser = \"a\"\nuser = \"b\"\n");
    assert_has(&e, &["socketd.toml:3:1:", "duplicate key `user`"]);
}

#[test]
fn unknown_keys_at_every_level_list_the_valid_ones() {
    let text =
        format!("colour = 1\n[daemon]\nshutdown_timout = \"1s\"\n{LISTENER}adress = \"x\"\n");
    let all = errors(&text);
    assert_eq!(all.len(), 3, "{all:#?}");
    assert_has(
        &all[0],
        &[
            "socketd.toml:1:1: top level: unknown key `colour`",
            "valid keys: daemon, listener",
        ],
    );
    assert_has(
        &all[1],
        &[
            "socketd.toml:3:1: [daemon]: unknown key `shutdown_timout`",
            "did you mean `shutdown_timeout`? valid keys: shutdown_timeout, pidfile",
        ],
    );
    assert_has(
        &all[2],
        &[
            "socketd.toml:9:1: listener `echo`: unknown key `adress`; did you mean `address`?",
            "name, protocol, address, handler, workers, max_workers",
            "or a `echo` table with settings for handler `echo`",
        ],
    );
}

#[test]
fn a_handler_table_must_match_the_handler() {
    let e = error(&format!("{LISTENER}greet = {{ text = \"hi\" }}\n"));
    assert_has(
        &e,
        &[
            "socketd.toml:6:1: listener `echo`: unknown key `greet`",
            "(a `greet` table is read only by a listener with handler = \"greet\")",
        ],
    );
}

#[test]
fn bad_enum_values_list_the_valid_ones() {
    let text = "[daemon]\nlog = \"file\"\nlog_level = \"loud\"\n[[listener]]\nname = \"x\"\nprotocol = \"sctp\"\naddress = \"127.0.0.1:1\"\nhandler = \"ech\"\nworkers = \"pool\"\n";
    let all = errors(text);
    assert_eq!(all.len(), 5, "{all:#?}");
    assert_has(&all[0], &["socketd.toml:2:7: [daemon]: key `log`: unknown log target \"file\"; valid values: stderr, syslog"]);
    assert_has(
        &all[1],
        &[
            "socketd.toml:3:13:",
            "key `log_level`",
            "valid values: error, warn, info, debug, trace",
        ],
    );
    assert_has(&all[2], &["socketd.toml:6:12: listener `x`: key `protocol`: unknown protocol \"sctp\"; valid values: tcp, udp, unix, unix-dgram"]);
    let handlers = format!(
        "key `handler`: unknown handler \"ech\"; did you mean \"echo\"? valid values: {}",
        registry().names().join(", ")
    );
    assert_has(&all[3], &["socketd.toml:8:11:", &handlers]);
    assert_has(
        &all[4],
        &[
            "socketd.toml:9:11:",
            &format!(
                "key `workers`: unknown worker model \"pool\"; valid values: {}",
                WorkerModel::NAMES.join(", ")
            ),
        ],
    );
}

#[test]
fn missing_required_keys_are_all_reported_at_the_header() {
    let all = errors("[[listener]]\nworkers = \"threaded\"\n");
    assert_eq!(all.len(), 4, "{all:#?}");
    for (line, key) in all.iter().zip(["name", "protocol", "address", "handler"]) {
        assert_has(
            line,
            &[
                "socketd.toml:1:1: listener #1: missing required key",
                &format!("`{key}`; add e.g. {key} = "),
            ],
        );
    }
}

#[test]
fn addresses_must_fit_their_protocol() {
    let with = |protocol: &str, address: &str| {
        LISTENER
            .replace("\"tcp\"", &format!("\"{protocol}\""))
            .replace("\"127.0.0.1:0\"", &format!("{address:?}"))
    };
    let e = error(&with("tcp", "localhost:7007"));
    assert_has(
        &e,
        &[
            "socketd.toml:4:11: listener `echo`: key `address`:",
            "never resolves names",
            "127.0.0.1 or [::1]",
        ],
    );
    let e = error(&with("udp", "::1:53"));
    assert_has(&e, &["key `address`", "brackets", "\"[::1]:7007\""]);
    let e = error(&with("unix", ""));
    assert_has(
        &e,
        &[
            "key `address`: the socket path is empty",
            "\"/run/socketd/echo.sock\"",
        ],
    );
    let e = error(&with("unix-dgram", &format!("/{}", "x".repeat(120))));
    assert_has(&e, &["key `address`", "at most 107 bytes"]);
}

#[test]
fn max_workers_must_be_a_positive_integer() {
    for (value, found) in [
        ("0", "found 0"),
        ("-3", "found -3"),
        ("2.5", "expected an integer"),
        ("\"8\"", "expected an integer"),
    ] {
        let e = error(&format!("{LISTENER}max_workers = {value}\n"));
        assert_has(
            &e,
            &[
                "socketd.toml:6:15: listener `echo`: key `max_workers`",
                found,
            ],
        );
    }
    let e = error(&format!("{LISTENER}max_workers = 0\n"));
    assert_has(&e, &["whole number of 1 or more", "max_workers = 64"]);
}

#[test]
fn bad_durations_say_the_format() {
    for bad in ["10 seconds", "abc", "-1s"] {
        let e = error(&format!("[daemon]\nshutdown_timeout = \"{bad}\"\n"));
        assert_has(
            &e,
            &[
                "socketd.toml:2:20: [daemon]: key `shutdown_timeout`",
                &format!("{bad:?} is not a duration"),
                "\"500ms\", \"10s\", \"5m\"",
            ],
        );
    }
    let e = error("[daemon]\nshutdown_timeout = 10\n");
    assert_has(
        &e,
        &["key `shutdown_timeout`: invalid type: integer `10`, expected a string"],
    );
}

#[test]
fn wrong_value_types_name_the_expected_type() {
    let e = error(&LISTENER.replace("\"echo\"\nprotocol", "7\nprotocol"));
    assert_has(&e, &["socketd.toml:2:8: listener #1: key `name`: invalid type: integer `7`, expected a string"]);
    let e = error("daemon = 5\n");
    assert_has(&e, &["top level: key `daemon`: must be a table"]);
    let e = error("[listener]\nname = \"x\"\n");
    assert_has(
        &e,
        &["key `listener`: must be an array of tables", "[[listener]]"],
    );
}

#[test]
fn handler_builders_check_their_settings() {
    let e = error(&LISTENER.replace("handler = \"echo\"", "handler = \"greet\""));
    assert_has(
        &e,
        &["socketd.toml:5:11: listener `echo`: key `handler`: needs `text`"],
    );
    let e = error(&LISTENER.replace(
        "handler = \"echo\"",
        "handler = \"greet\"\ngreet = { text = 1 }",
    ));
    assert_has(
        &e,
        &["socketd.toml:6:1: listener `echo`: key `greet`: needs `text`"],
    );
    let e = error(&format!("{LISTENER}echo = {{ x = 1 }}\n"));
    assert_has(&e, &["key `echo`: handler `echo` takes no settings"]);
    let e = error(&format!("{LISTENER}echo = 1\n"));
    assert_has(
        &e,
        &["key `echo`: the settings for handler `echo` must be a table"],
    );
    // The [listener.NAME] spelling works too.
    let text = LISTENER.replace(
        "handler = \"echo\"",
        "handler = \"greet\"\n[listener.greet]\ntext = \"hi\"",
    );
    parse(&text).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn all_errors_in_a_file_are_reported_in_file_order() {
    let text = r#"[daemon]
shutdown_timeout = "10 seconds"
log = "journal"

[[listener]]
protocol = "tcp"
address = "localhost:7007"
handler = "echo"

[[listener]]
name = "b"
protocol = "udp"
address = "127.0.0.1:7"
handler = "nope"
max_workers = 0
extra = true
"#;
    let all = errors(text);
    let at: Vec<&str> = all
        .iter()
        .map(|e| e.split(": ").next().unwrap_or(""))
        .collect();
    assert_eq!(
        at,
        [
            "socketd.toml:2:20",
            "socketd.toml:3:7",
            "socketd.toml:5:1",
            "socketd.toml:7:11",
            "socketd.toml:14:11",
            "socketd.toml:15:15",
            "socketd.toml:16:1"
        ],
        "{all:#?}"
    );
    assert_has(&all[2], &["listener #1: missing required key `name`"]);
    assert_has(&all[3], &["listener #1: key `address`"]);
    assert_has(&all[6], &["listener `b`: unknown key `extra`"]);
}

#[test]
fn odd_documents_give_diagnostics_not_panics() {
    let odd = [
        "listener = [1, {}]\n",
        "listener = []\n",
        "[[listener]]\n[listener.x.y]\nz = 1\n",
        "[[listener]]\nname.first = \"a\"\n",
        "[[listener]]\nhandler = \"name\"\nname = { a = 1 }\n",
        "[daemon.syslog]\nhost = 1\n",
        "daemon.user = \"é\"\n",
        "[[listener]]\nname = \"é:x\"\nprotocol = \"unix\"\naddress = \"é\"\nhandler = \"echo\"\n",
        "\u{feff}[daemon]\n",
        "[daemon\n",
        "x = \"\\u{zz}\"",
    ];
    for text in odd {
        match parse(text) {
            Ok(_) => {}
            Err(e) => {
                assert!(!e.diagnostics.is_empty(), "{text:?}");
                for d in &e.diagnostics {
                    assert!(d.line.is_some() && d.column.is_some(), "{text:?}: {d}");
                }
            }
        }
    }
}

/// (file, line, column) of each diagnostic, in order.
fn places(all: &[String]) -> Vec<(String, String)> {
    all.iter()
        .map(|d| {
            let mut parts = d.splitn(4, ':');
            let file = parts.next().unwrap_or_default();
            let line = parts.next().unwrap_or_default();
            let col = parts.next().unwrap_or_default();
            (file.to_string(), format!("{line}:{col}"))
        })
        .collect()
}

const EXEC_LISTENER: &str = "[[listener]]\nname = \"x\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"exec\"\n";

#[test]
fn exec_table_with_three_mistakes_gives_three_errors_each_at_its_key() {
    let text = format!(
        "{EXEC_LISTENER}[listener.exec]\nargv = [\"relative\"]\nstderr = \"loud\"\nbogus = 1\n"
    );
    let all = errors(&text);
    assert_eq!(all.len(), 3, "{all:#?}");
    assert_eq!(
        places(&all),
        [
            ("socketd.toml".to_string(), "7:1".to_string()),
            ("socketd.toml".to_string(), "8:1".to_string()),
            ("socketd.toml".to_string(), "9:1".to_string()),
        ],
        "{all:#?}"
    );
    assert_has(&all[0], &["key `exec.argv`", "must be an absolute path"]);
    assert_has(
        &all[1],
        &["key `exec.stderr`", "valid values: log, null, inherit"],
    );
    assert_has(&all[2], &["key `exec.bogus`", "valid keys: argv"]);
}

#[test]
fn a_missing_required_exec_key_is_reported_on_the_table() {
    let text = format!("{EXEC_LISTENER}[listener.exec]\ncwd = \"/\"\n");
    let one = error(&text);
    assert_has(&one, &["socketd.toml:6:", "`argv` is required"]);
}

#[test]
fn registered_settings_struct_reports_each_bad_key_at_its_place() {
    let text = "[[listener]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"typed\"\n[listener.typed]\ntext = 5\ncolour = \"red\"\n";
    let all = errors(text);
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_has(
        &all[0],
        &["socketd.toml:7:", "key `typed.text`", "invalid type"],
    );
    assert_has(
        &all[1],
        &[
            "socketd.toml:8:",
            "key `typed.colour`",
            "unknown key `typed.colour`; valid keys: text, times",
        ],
    );
    // A missing required key: one error, on the table.
    let missing = "[[listener]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"typed\"\ntyped = { times = 1 }\n";
    assert_has(
        &error(missing),
        &["socketd.toml:6:", "missing field `text`"],
    );
    // The builder's own refusal, on its key.
    let many = "[[listener]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"typed\"\n[listener.typed]\ntext = \"hi\"\ntimes = 11\n";
    assert_has(
        &error(many),
        &["socketd.toml:8:", "key `typed.times`", "at most 10"],
    );
    // And a good table parses.
    let good = "[[listener]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"typed\"\ntyped = { text = \"hi\", times = 2 }\n";
    assert!(parse(good).is_ok());
}
