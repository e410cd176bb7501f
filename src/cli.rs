//! The command line, shared by the `socketd` binary and any daemon a programmer builds with
//! their own handlers: `main_with(registry)` is the whole of such a program's `main`.
//!
//! Exit codes (documented in README.md): 0 clean stop or valid config, 1 invalid config,
//! 2 usage error, 3 could not start (bind, permissions), 4 failed while running.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::handler::Registry;
use crate::server::{ServeError, Server};

mod upgrade;

/// Default config path for a system install.
pub const DEFAULT_CONFIG: &str = "/etc/socketd/socketd.toml";

/// Exit code: the config file is invalid.
pub const EXIT_CONFIG: u8 = 1;
/// Exit code: bad command line (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: could not start (bind, permissions, resources).
pub const EXIT_START: u8 = 3;
/// Exit code: failed while running.
pub const EXIT_RUNTIME: u8 = 4;

#[derive(Debug, Parser)]
#[command(
    name = "socketd",
    version,
    about = "A configurable socket daemon: TCP, UDP and Unix listeners from one TOML file"
)]
struct Cli {
    /// The config file to run (or check).
    #[arg(long, short = 'c', global = true, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,

    /// Detach from the terminal and run in the background. Everything is bound first, so
    /// start-up errors still print here; the command exits 0 once the daemon is serving.
    #[arg(long)]
    daemon: bool,

    /// Write the daemon's pid to FILE (locked: a second instance is refused), removed on exit.
    /// Overrides `[daemon] pidfile`. `upgrade` finds the daemon by it.
    #[arg(long, global = true, value_name = "FILE")]
    pidfile: Option<PathBuf>,

    /// The running daemon's control socket, for the client subcommands (status, reload, …);
    /// default: `[daemon] control` read from the config file.
    #[arg(long, global = true, value_name = "PATH")]
    control: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the config file without binding anything; prints `ok` and exits 0, or lists
    /// every problem and exits 1 (for systemd's ExecStartPre).
    Check,
    /// Show the running daemon: every listener's address, worker model, state and counters;
    /// the process's uptime, descriptors, memory, config checksum and last reload.
    Status {
        /// Print the JSON answer (schema in README, "Control socket").
        #[arg(long)]
        json: bool,
    },
    /// Make the running daemon re-read its config file; waits for the outcome, prints why a
    /// refused file was refused and exits 1 (for systemd's ExecReload).
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// Stop the running daemon gracefully (in-flight connections finish, up to
    /// shutdown_timeout) and wait until it has exited.
    Stop {
        /// Stop at once: close open connections, kill worker processes.
        #[arg(long)]
        now: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop accepting on a listener; its socket stays open and the kernel queues connections.
    Pause {
        listener: String,
        #[arg(long)]
        json: bool,
    },
    /// Accept again on a paused listener.
    Resume {
        listener: String,
        #[arg(long)]
        json: bool,
    },
    /// Close a listener's socket and let its connections finish; a reload binds it again.
    Drain {
        listener: String,
        #[arg(long)]
        json: bool,
    },
    /// Reopen the access log file (after logrotate moved it away).
    ReopenLogs {
        #[arg(long)]
        json: bool,
    },
    /// Replace the running daemon's binary without refusing a connection: the daemon starts
    /// the new binary with every listening socket, and stops accepting and drains only once
    /// the new process serves. Exits 0 with the new pid, or non-zero with why the new binary
    /// did not take over (the old one keeps serving). Through the control socket if there is
    /// one, else by SIGUSR2 to the pid in the pidfile.
    Upgrade(upgrade::UpgradeArgs),
}

impl Command {
    /// The control request for a client subcommand, and whether to print JSON.
    fn control(&self) -> Option<(crate::control::Command, bool)> {
        use crate::control::Command as C;
        Some(match self {
            Command::Check | Command::Upgrade(_) => return None,
            Command::Status { json } => (C::Status, *json),
            Command::Reload { json } => (C::Reload, *json),
            Command::Stop { now, json } => (C::Stop { now: *now }, *json),
            Command::Pause { listener, json } => (
                C::Pause {
                    listener: listener.clone(),
                },
                *json,
            ),
            Command::Resume { listener, json } => (
                C::Resume {
                    listener: listener.clone(),
                },
                *json,
            ),
            Command::Drain { listener, json } => (
                C::Drain {
                    listener: listener.clone(),
                },
                *json,
            ),
            Command::ReopenLogs { json } => (C::ReopenLogs, *json),
        })
    }
}

/// The command line as a clap `Command`: what the man page and the shell completions are
/// generated from (`examples/package_assets.rs`), so they always match the parser.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Parse the command line and run: the whole `main` of socketd and of custom daemons.
pub fn main_with(registry: Registry) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Some(Command::Check) => check(&cli.config, &registry),
        Some(Command::Upgrade(args)) => upgrade::run(
            &cli.config,
            cli.pidfile.as_deref(),
            cli.control.as_deref(),
            &args,
            &registry,
        ),
        None => run(&cli.config, registry, cli.daemon, cli.pidfile),
        Some(other) => {
            let Some((request, json)) = other.control() else {
                return ExitCode::from(EXIT_USAGE);
            };
            use crate::control::client;
            // A client's output may be piped into `head`: end quietly on a closed pipe like
            // other Unix tools, not with a panic (the daemon itself keeps SIGPIPE ignored).
            // SAFETY: signal(2) restoring the default action; this process is a short-lived
            // client with no other thread yet.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            match client::find_socket(&cli.config, cli.control.as_deref()) {
                Ok(socket) => client::run(&socket, request, json),
                Err(e) => {
                    eprintln!("socketd: {e}");
                    ExitCode::from(client::EXIT_UNREACHABLE)
                }
            }
        }
    }
}

fn check(path: &std::path::Path, registry: &Registry) -> ExitCode {
    match Config::load(path, registry) {
        Ok(config) => match crate::daemon::privileges::resolve(&config.daemon) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("{}: {message}", path.display());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Err(e) => {
            eprintln!("{e}");
            let n = e.diagnostics.len();
            eprintln!(
                "{}: {n} error{} found",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Start in the order the lifecycle promises: validate -> lock the pidfile -> bind (or adopt)
/// every listener -> drop privileges -> detach if asked -> write the pidfile -> switch to
/// syslog -> serve (which starts worker processes and threads, then says READY).
fn run(
    path: &std::path::Path,
    registry: Registry,
    detach: bool,
    pidfile: Option<PathBuf>,
) -> ExitCode {
    use crate::daemon::{detach::Detached, pidfile::Pidfile, privileges};

    // The new process of a binary upgrade: take its descriptors before anything else opens one.
    let mut handover = crate::daemon::handover::Handover::from_env();
    crate::logging::init_stderr(log::LevelFilter::Info);
    std::panic::set_hook(Box::new(|info| log::error!("{info}")));
    let config = match Config::load(path, &registry) {
        Ok(c) => c,
        Err(e) => {
            for d in &e.diagnostics {
                log::error!("{d}");
            }
            log::error!(
                "not starting: the config file {} is invalid",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    log::set_max_level(config.daemon.log_level);
    let ids = match privileges::resolve(&config.daemon) {
        Ok(ids) => ids,
        Err(message) => {
            log::error!("{}: {message}", path.display());
            log::error!(
                "not starting: the config file {} is invalid",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let pidfile_path = pidfile.or_else(|| config.daemon.pidfile.clone());
    // The new process of an upgrade shares the old one's locked pidfile, when it is the same.
    let shared = handover.as_mut().and_then(|h| h.pidfile.take());
    let lock_pidfile = |p: &std::path::Path| match shared.and_then(|fd| Pidfile::adopt(fd, p)) {
        Some(adopted) => Ok(adopted),
        None => Pidfile::lock(p),
    };
    let mut pidfile = match pidfile_path.as_deref().map(lock_pidfile).transpose() {
        Ok(p) => p,
        Err(message) => {
            log::error!("not starting: {message}");
            return ExitCode::from(EXIT_START);
        }
    };
    if let Some(p) = &pidfile {
        crate::daemon::upgrade::share_pidfile(p.as_fd());
    }
    let (log_target, syslog) = (config.daemon.log, config.daemon.syslog.clone());
    let mut server = match Server::bind_daemon(config, registry) {
        Ok(s) => s,
        Err(e) => {
            log::error!("not starting: {}", chain(&e));
            return ExitCode::from(EXIT_START);
        }
    };
    if let Some(ids) = ids {
        if let Err(message) = privileges::drop_to(ids) {
            log::error!("not starting: {message}");
            return ExitCode::from(EXIT_START);
        }
        log::info!("running as uid {} gid {}", ids.uid, ids.gid);
    }
    let ready = std::sync::Arc::new(std::sync::Mutex::new(None));
    // The new process of an upgrade is already detached (or not) as the old one was.
    if detach && handover.is_none() {
        if log_target == crate::config::LogTarget::Stderr {
            log::warn!(
                "--daemon with log = \"stderr\": messages after start-up go to /dev/null; set \
                 log = \"syslog\" in [daemon] to keep them"
            );
        }
        match crate::daemon::detach::detach(EXIT_START) {
            Ok(Detached::Daemon(pipe)) => *lock(&ready) = Some(pipe),
            Err(message) => {
                log::error!("not starting: {message}");
                return ExitCode::from(EXIT_START);
            }
        }
    }
    if let Some(p) = pidfile.as_mut() {
        if let Err(e) = p.write_pid() {
            let why = format!(
                "not starting: cannot write the pidfile {}: {e}",
                p.path().display()
            );
            log::error!("{why}");
            if let Some(pipe) = lock(&ready).as_mut() {
                pipe.failed(EXIT_START, &why);
            }
            return ExitCode::from(EXIT_START);
        }
    }
    if log_target == crate::config::LogTarget::Syslog {
        crate::logging::use_syslog(&syslog);
    }
    if let Some(pipe) = lock(&ready).as_ref() {
        pipe.detach_stdio();
    }
    if let Some(mut h) = handover.take() {
        h.restore_stderr();
        *lock(&ready) = Some(h.ready);
    }
    // The daemon owns the process-wide start: its fork servers are forked here, while it still
    // has its only thread, so no forked worker can inherit a lock.
    if let Err(e) = server.start_fork_servers() {
        let why = chain(&e);
        log::error!("not starting: {why}");
        if let Some(pipe) = lock(&ready).as_mut() {
            pipe.failed(EXIT_RUNTIME, &why);
        }
        return ExitCode::from(EXIT_RUNTIME);
    }
    let pidfile = std::sync::Arc::new(std::sync::Mutex::new(pidfile));
    let (on_ready, ready_pidfile) = (
        std::sync::Arc::clone(&ready),
        std::sync::Arc::clone(&pidfile),
    );
    server.on_ready(move || {
        let Some(mut pipe) = lock(&on_ready).take() else {
            return;
        };
        // The new process of an upgrade writes its pid into the shared pidfile only now.
        if let Some(p) = lock(&ready_pidfile).as_mut() {
            if let Err(e) = p.commit() {
                let why = format!("cannot write the pidfile {}: {e}", p.path().display());
                log::error!("{why}");
                return pipe.failed(EXIT_START, &why);
            }
        }
        pipe.ready();
    });
    let code = match server.serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let why = chain(&e);
            log::error!("{why}");
            if let Some(pipe) = lock(&ready).as_mut() {
                pipe.failed(EXIT_RUNTIME, &why);
            }
            ExitCode::from(EXIT_RUNTIME)
        }
    };
    drop(pidfile);
    code
}

/// The readiness pipe's lock; a poisoned one is still the pipe (nothing panics holding it).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The error and its causes on one line, each said once.
fn chain(e: &ServeError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}
