//! `handler = "exec"`: run a program per connection or datagram, inetd style.
//!
//! ```toml
//! exec = { argv = ["/usr/bin/rsync", "--daemon"], env = { LANG = "C" }, pass_env = ["TZ"],
//!          cwd = "/", user = "nobody", group = "nogroup", stderr = "log", wait = false }
//! ```
//! On a stream listener the connection is the program's stdin and stdout. On a datagram
//! listener the program gets one datagram on stdin and its stdout (up to `MAX_REPLY` bytes) is
//! sent back as the reply; with `wait = true` the listening socket itself is its stdin and
//! stdout and the loop leaves the socket alone until it exits (inetd's `wait`, how in.tftpd
//! runs; see `exec::wait`). `argv[0]` must be an absolute path: socketd never searches PATH and
//! never runs a shell, so `$(id)` or `;` in an argument is just text. Settings are checked here,
//! at `check` time: a missing program, an unknown account, or `user` without root is refused.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use super::{BuildContext, Context, DatagramRequest, Factory, Handler, Request, StreamRequest};
use crate::config::{ListenerConfig, SettingsError};
use crate::conn::Conn;
use crate::exec::{connection_env, Program, StderrMode};

/// The largest reply a datagram program's stdout can produce (the UDP payload limit over IPv4).
pub const MAX_REPLY: usize = 65_507;

/// The keys of the `exec` table.
pub const KEYS: &[&str] = &[
    "argv", "env", "pass_env", "cwd", "user", "group", "stderr", "wait",
];

/// The registry's builder for `exec`.
pub fn build(ctx: &BuildContext) -> Result<Factory, SettingsError> {
    let program = Arc::new(parse_settings(ctx)?);
    Ok(Arc::new(move || {
        Box::new(Exec {
            program: Arc::clone(&program),
        }) as Box<dyn Handler>
    }))
}

/// Runs the configured program for each request.
#[derive(Debug)]
pub struct Exec {
    program: Arc<Program>,
}

impl Handler for Exec {
    fn handle(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()> {
        match req {
            Request::Stream(s) => run_stream(&self.program, ctx, s),
            Request::Datagram(d) => run_datagram(&self.program, ctx.listener_name(), d),
        }
    }
}

fn run_stream(program: &Program, ctx: &Context, req: &StreamRequest) -> io::Result<()> {
    let listener = ctx.listener_name();
    let conn = req.conn();
    let local = match conn {
        Conn::Tcp(t) => t.local_addr().ok(),
        Conn::Unix(_) => req.local_addr(),
    };
    let mut vars = connection_env(true, req.peer(), local);
    if let Some(tls) = req.tls() {
        vars.extend(tls.env());
    }
    let mut cmd = program.command(listener, &vars)?;
    cmd.stdin(Stdio::from(conn.as_fd().try_clone_to_owned()?));
    cmd.stdout(Stdio::from(conn.as_fd().try_clone_to_owned()?));
    // The exit status is logged by `wait`; a failing program is not also a failing handler.
    program
        .spawn(cmd, listener)?
        .wait_limited(
            ctx.config().protect.max_duration,
            ctx.config().protect.idle_timeout,
            conn,
        )
        .map(drop)
}

fn run_datagram(program: &Program, listener: &str, req: &DatagramRequest) -> io::Result<()> {
    let vars = connection_env(false, req.peer(), req.local_addr());
    let mut cmd = program.command(listener, &vars)?;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut running = program.spawn(cmd, listener)?;
    let (stdin, stdout) = (running.child.stdin.take(), running.child.stdout.take());
    let mut reply = Vec::new();
    std::thread::scope(|s| {
        // Written from a second thread: a program that answers before reading all its input
        // must not deadlock against us.
        if let Some(mut stdin) = stdin {
            let data = req.data();
            s.spawn(move || {
                let _ = stdin.write_all(data);
            });
        }
        if let Some(stdout) = stdout {
            let _ = stdout.take(MAX_REPLY as u64).read_to_end(&mut reply);
        }
    });
    running.wait()?;
    if !reply.is_empty() {
        req.reply(&reply)?;
    }
    Ok(())
}

/// The program of a `wait = true` exec listener, if this is one.
pub fn wait_program(cfg: &ListenerConfig) -> Option<Program> {
    if cfg.handler != "exec" || !cfg.protocol.is_datagram() {
        return None;
    }
    let settings = cfg.handler_settings.as_ref()?;
    if settings.get("wait").and_then(toml::Value::as_bool) != Some(true) {
        return None;
    }
    let ctx = BuildContext {
        listener: &cfg.name,
        protocol: cfg.protocol,
        settings: Some(settings),
    };
    parse(&ctx).ok()
}

/// The `exec` table's shape, for serde: every key and its type (unknown keys refused). The
/// values are then checked and resolved by `parse_all` (absolute program, usable variable
/// names, existing directory, known accounts, a valid `stderr`, `wait` only on datagrams).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read for its shape only
struct ExecTable {
    argv: Option<Vec<String>>,
    env: Option<std::collections::BTreeMap<String, String>>,
    pass_env: Option<Vec<String>>,
    cwd: Option<String>,
    user: Option<String>,
    group: Option<String>,
    stderr: Option<String>,
    wait: Option<bool>,
}

/// Check and resolve the `exec` table, with every problem on its own key.
pub fn parse_settings(ctx: &BuildContext) -> Result<Program, SettingsError> {
    super::read_shape_then::<ExecTable, _>("exec", ctx.settings, || {
        parse_all(ctx).map_err(|all| SettingsError::from_messages("exec", ctx.settings, all))
    })
}

/// Check and resolve the `exec` table (every problem, in one line).
pub(crate) fn parse(ctx: &BuildContext) -> Result<Program, String> {
    parse_settings(ctx).map_err(|e| e.to_string())
}

fn parse_all(ctx: &BuildContext) -> Result<Program, Vec<String>> {
    let empty = toml::Table::new();
    let t = ctx.settings.unwrap_or(&empty);
    let mut errors = Vec::new();
    for key in t.keys().filter(|k| !KEYS.contains(&k.as_str())) {
        errors.push(format!(
            "unknown key `exec.{key}`; valid keys: {}",
            KEYS.join(", ")
        ));
    }
    let argv = match t.get("argv") {
        None => {
            errors.push("`argv` is required: the program and its arguments, e.g. exec = { argv = [\"/usr/bin/env\"] }".into());
            Vec::new()
        }
        Some(v) => strings(v, "argv", &mut errors),
    };
    if let Some(first) = argv.first() {
        if let Err(e) = check_program(first) {
            errors.push(e);
        }
    } else if t.contains_key("argv") {
        errors.push("`argv` must not be empty; e.g. argv = [\"/usr/bin/env\"]".into());
    }
    let mut env = Vec::new();
    match t.get("env") {
        None => {}
        Some(toml::Value::Table(vars)) => {
            for (k, v) in vars {
                match v.as_str() {
                    Some(s) if env_name_ok(k) => env.push((k.clone(), s.to_string())),
                    Some(_) => {
                        errors.push(format!("`env` name {k:?} is not a usable variable name"))
                    }
                    None => errors.push(format!("`env.{k}` must be a string in quotes")),
                }
            }
        }
        Some(_) => errors.push("`env` must be a table, e.g. env = { LANG = \"C\" }".into()),
    }
    let pass_env = t
        .get("pass_env")
        .map(|v| strings(v, "pass_env", &mut errors))
        .unwrap_or_default();
    for name in pass_env.iter().filter(|n| !env_name_ok(n)) {
        errors.push(format!(
            "`pass_env` name {name:?} is not a usable variable name"
        ));
    }
    let cwd = match t.get("cwd").map(|v| v.as_str()) {
        None => PathBuf::from("/"),
        Some(Some(p)) if Path::new(p).is_absolute() && Path::new(p).is_dir() => PathBuf::from(p),
        Some(Some(p)) => {
            errors.push(format!(
                "`cwd` {p:?} must be an absolute path to an existing directory"
            ));
            PathBuf::from("/")
        }
        Some(None) => {
            errors.push("`cwd` must be a string in quotes".into());
            PathBuf::from("/")
        }
    };
    let (uid, gid, groups) = accounts(t, &mut errors);
    let stderr = match t.get("stderr").map(|v| v.as_str()) {
        None => StderrMode::Log,
        Some(Some(s)) => StderrMode::from_name(s).unwrap_or_else(|| {
            errors.push(format!(
                "`stderr` {s:?} is not valid; valid values: {}",
                StderrMode::NAMES.join(", ")
            ));
            StderrMode::Log
        }),
        Some(None) => {
            errors.push(format!(
                "`stderr` must be a string; valid values: {}",
                StderrMode::NAMES.join(", ")
            ));
            StderrMode::Log
        }
    };
    let wait = match t.get("wait") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => {
            errors.push("`wait` must be true or false".into());
            false
        }
    };
    if wait && !ctx.protocol.is_datagram() {
        errors.push(format!(
            "`wait = true` is for udp and unix-dgram listeners only (this one is {}); remove it",
            ctx.protocol
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Program {
        argv,
        env,
        pass_env,
        cwd,
        uid,
        gid,
        groups,
        stderr,
        wait,
    })
}

fn strings(v: &toml::Value, key: &str, errors: &mut Vec<String>) -> Vec<String> {
    let all: Option<Vec<String>> = v
        .as_array()
        .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect());
    all.unwrap_or_else(|| {
        errors.push(format!(
            "`{key}` must be a list of strings, e.g. {key} = [\"...\"]"
        ));
        Vec::new()
    })
}

fn env_name_ok(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

fn check_program(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!(
            "`argv[0]` {path:?} must be an absolute path (socketd never searches PATH), e.g. \"/usr/bin/{path}\""
        ));
    }
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!("`argv[0]` {path:?} is not an executable file")),
        Err(e) => Err(format!("`argv[0]` {path:?}: {e}")),
    }
}

/// `user` and `group` to ids and the supplementary groups to set; both need root to switch to.
/// With `user`, the groups are the account's (from the group database, as `initgroups` reads
/// them) plus the group it runs as; with `group` alone, just that group, so the daemon's own
/// supplementary groups never reach the program.
fn accounts(
    t: &toml::Table,
    errors: &mut Vec<String>,
) -> (Option<u32>, Option<u32>, Option<Vec<u32>>) {
    let name = |key: &str, errors: &mut Vec<String>| match t.get(key).map(|v| v.as_str()) {
        None => None,
        Some(Some(s)) if !s.is_empty() => Some(s.to_string()),
        Some(_) => {
            errors.push(format!("`{key}` must be a non-empty string in quotes"));
            None
        }
    };
    let (user, group) = (name("user", errors), name("group", errors));
    if user.is_none() && group.is_none() {
        return (None, None, None);
    }
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        errors.push(format!(
            "`user`/`group` need socketd to run as root to switch accounts, but it runs as uid {euid}; \
             remove them or start socketd as root"
        ));
        return (None, None, None);
    }
    let mut uid = None;
    let mut gid = None;
    if let Some(u) = &user {
        match nix::unistd::User::from_name(u) {
            Ok(Some(pw)) => {
                uid = Some(pw.uid.as_raw());
                gid = Some(pw.gid.as_raw());
            }
            _ => errors.push(format!("`user` {u:?}: no such account")),
        }
    }
    if let Some(g) = &group {
        match nix::unistd::Group::from_name(g) {
            Ok(Some(gr)) => gid = Some(gr.gid.as_raw()),
            _ => errors.push(format!("`group` {g:?}: no such group")),
        }
    }
    let groups = match (&user, gid) {
        (Some(u), Some(g)) => match supplementary_groups(u, g) {
            Ok(list) => Some(list),
            Err(e) => {
                errors.push(format!("`user` {u:?}: cannot read its groups: {e}"));
                None
            }
        },
        (None, Some(g)) => Some(vec![g]),
        _ => None,
    };
    (uid, gid, groups)
}

/// What `initgroups(user, gid)` would set: every group listing `user` as a member, and `gid`.
fn supplementary_groups(user: &str, gid: u32) -> Result<Vec<u32>, String> {
    let name = std::ffi::CString::new(user).map_err(|e| e.to_string())?;
    let list = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        .map_err(|e| e.to_string())?;
    Ok(list.into_iter().map(|g| g.as_raw()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn check(protocol: Protocol, text: &str) -> Result<Program, String> {
        let table: toml::Table = toml::from_str(text).unwrap();
        parse(&BuildContext {
            listener: "t",
            protocol,
            settings: Some(&table),
        })
    }

    #[test]
    fn accepts_a_full_table() {
        let p = check(
            Protocol::Udp,
            "argv = ['/bin/cat', '-u']\nenv = { A = '1' }\npass_env = ['TZ']\ncwd = '/tmp'\nstderr = 'null'\nwait = true",
        )
        .unwrap();
        assert_eq!(p.argv, ["/bin/cat", "-u"]);
        assert_eq!(p.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(
            (p.stderr, p.wait, p.cwd),
            (StderrMode::Null, true, PathBuf::from("/tmp"))
        );
    }

    #[test]
    fn refuses_what_cannot_work() {
        let cases = [
            ("env = {}", "`argv` is required"),
            ("argv = []", "must not be empty"),
            ("argv = ['cat']", "must be an absolute path"),
            ("argv = ['/nonexistent/prog']", "No such file"),
            ("argv = ['/tmp']", "not an executable file"),
            (
                "argv = ['/bin/cat']\nstderr = 'loud'",
                "valid values: log, null, inherit",
            ),
            (
                "argv = ['/bin/cat']\nwait = true",
                "for udp and unix-dgram listeners only",
            ),
            (
                "argv = ['/bin/cat']\nuser = 'no-such-user-here'",
                "no such account",
            ),
            ("argv = ['/bin/cat']\nbogus = 1", "unknown key `exec.bogus`"),
            (
                "argv = ['/bin/cat']\ncwd = 'relative'",
                "absolute path to an existing directory",
            ),
        ];
        for (text, want) in cases {
            let err = check(Protocol::Tcp, text).expect_err(text);
            let root_only = want == "no such account" && !nix::unistd::geteuid().is_root();
            let want = if root_only {
                "need socketd to run as root"
            } else {
                want
            };
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
