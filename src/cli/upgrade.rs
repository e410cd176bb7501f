//! `socketd upgrade`: ask the running daemon to replace its binary, and wait for the outcome.
//!
//! The config file is checked first (a file the new process would refuse fails here, exit 1,
//! without disturbing the daemon). Then, with a control socket (`--control`, `[daemon]
//! control`), the request goes there and the answer is the outcome: the new pid, or why the
//! new binary did not take over with its last lines of output (exit 1). Without one, the
//! request is SIGUSR2 to the pid in the pidfile (the signal nginx uses for the same thing, so
//! scripts that signal directly get the same upgrade), and the outcome is read from the
//! pidfile: the new process writes its pid there only once it serves, so a new live pid there
//! means the upgrade took over; the old pid still there after `upgrade_timeout` means it did
//! not (exit 3; the daemon's log says why). The daemon starts the binary at the path it was
//! started from (a package upgrade replaces that file), or `--binary` (control socket only).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cli::{EXIT_CONFIG, EXIT_START, EXIT_USAGE};
use crate::config::Config;
use crate::handler::Registry;

/// `socketd upgrade`'s own options.
#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// Start this binary instead of the one the daemon runs (needs the control socket).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// How much longer than the daemon's `upgrade_timeout` the command waits for the outcome.
const MARGIN: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

/// Run `socketd upgrade`.
pub fn run(
    config_path: &Path,
    pidfile: Option<&Path>,
    control: Option<&Path>,
    args: &UpgradeArgs,
    registry: &Registry,
) -> ExitCode {
    if let Err(e) = Config::load(config_path, registry) {
        eprintln!("{e}");
        eprintln!(
            "socketd upgrade: {} is invalid: the new process would refuse it; nothing was done",
            config_path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let has_control = control.is_some() || configured_control(config_path);
    if has_control {
        use crate::control::client;
        let socket = match client::find_socket(config_path, control) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("socketd upgrade: {e}");
                return ExitCode::from(client::EXIT_UNREACHABLE);
            }
        };
        // The daemon resolves a relative path from its own working directory: send ours.
        let binary = args.binary.as_ref().map(|b| {
            std::env::current_dir()
                .map(|d| d.join(b))
                .unwrap_or_else(|_| b.clone())
        });
        return client::run(&socket, crate::control::Command::Upgrade { binary }, false);
    }
    match upgrade(config_path, pidfile, args, registry) {
        Ok((old, new)) => {
            println!("upgraded: pid {old} -> pid {new}");
            ExitCode::SUCCESS
        }
        Err((code, why)) => {
            eprintln!("socketd upgrade: {why}");
            ExitCode::from(code)
        }
    }
}

fn upgrade(
    config_path: &Path,
    pidfile: Option<&Path>,
    args: &UpgradeArgs,
    registry: &Registry,
) -> Result<(u32, u32), (u8, String)> {
    let config = Config::load(config_path, registry).map_err(|e| {
        (
            EXIT_CONFIG,
            format!(
                "{e}\ncannot read {}: it names the pidfile",
                config_path.display()
            ),
        )
    })?;
    let Some(pidfile) = pidfile.map(Path::to_path_buf).or(config.daemon.pidfile) else {
        return Err((
            EXIT_USAGE,
            format!(
                "no pidfile to find the daemon by: give --pidfile or set [daemon] pidfile in {}",
                config_path.display()
            ),
        ));
    };
    if let Some(b) = &args.binary {
        return Err((
            EXIT_USAGE,
            format!(
                "--binary {} needs the daemon's control socket ([daemon] control); without \
                 it the daemon starts the binary at its own path again: put the new binary \
                 there and run `socketd upgrade` without --binary",
                b.display()
            ),
        ));
    }
    let old = read_pid(&pidfile).ok_or_else(|| {
        (
            EXIT_START,
            format!("no daemon: {} holds no pid", pidfile.display()),
        )
    })?;
    let pid = nix::unistd::Pid::from_raw(old as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2)
        .map_err(|e| (EXIT_START, format!("cannot signal pid {old}: {e}")))?;
    let wait = config.daemon.upgrade_timeout + MARGIN;
    let deadline = Instant::now() + wait;
    loop {
        if let Some(new) = read_pid(&pidfile).filter(|p| *p != old && alive(*p)) {
            return Ok((old, new));
        }
        if !alive(old) {
            return Err((
                EXIT_START,
                format!(
                    "pid {old} exited and no new pid is in {}",
                    pidfile.display()
                ),
            ));
        }
        if Instant::now() >= deadline {
            return Err((
                EXIT_START,
                format!(
                    "the new binary did not take over within {}: pid {old} still serves; its \
                     log says why",
                    humantime::format_duration(wait)
                ),
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Whether the config file names a control socket (`[daemon] control`).
fn configured_control(config_path: &Path) -> bool {
    crate::control::client::find_socket(config_path, None).is_ok_and(|p| !p.as_os_str().is_empty())
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a running process (a zombie is not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
