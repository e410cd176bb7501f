//! `--daemon`: detach from the terminal the classic way (fork, `setsid`, fork again) through the
//! `daemonize` crate, kept behind this one module because the crate is unmaintained
//! (RUSTSEC-2025-0069) and has gaps closed here:
//!
//! - its parent returns as soon as the first child exits, before the daemon has written its
//!   pidfile or is serving. Here the parent then waits on a pipe: the daemon writes `ok` once it
//!   is serving (or its exit code if start-up failed), and only then does the parent exit, 0 or
//!   that code. A daemon that dies silently makes the parent exit non-zero too.
//! - it never calls `setgroups` and never removes its pidfile: socketd does not use its
//!   user/group or pidfile options (see `privileges` and `pidfile`).
//!
//! Everything that can fail at start (binding, accounts) happens before `detach`, so those
//! errors reach the terminal directly. The working directory is kept (relative paths in the
//! config mean the same before and after), stdin becomes /dev/null at once, stdout and stderr
//! just before serving starts (`ReadyPipe::detach_stdio`); a failure after that is printed by
//! the starting process, which gets it through the pipe.

use std::fs::File;
use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;

use daemonize::{Daemonize, Outcome};

/// The write end of the readiness pipe, held by the detached daemon.
#[derive(Debug)]
pub struct ReadyPipe {
    pipe: Option<File>,
}

/// Which side of the fork this is.
#[derive(Debug)]
pub enum Detached {
    /// The detached daemon: carry on starting, then call `ReadyPipe::ready`.
    Daemon(ReadyPipe),
}

/// Detach. In the starting process this never returns: it waits for the daemon's word and
/// exits with the matching code (via `std::process::exit`, so no destructor runs there: the
/// listeners and the pidfile lock belong to the daemon now).
pub fn detach(exit_failed_start: u8) -> Result<Detached, String> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot create a pipe: {e}"))?;
    let cwd =
        std::env::current_dir().map_err(|e| format!("cannot read the working directory: {e}"))?;
    let daemonize = Daemonize::new()
        .working_directory(cwd)
        .umask(0o022)
        .stdout(daemonize::Stdio::keep())
        .stderr(daemonize::Stdio::keep());
    match daemonize.execute() {
        Outcome::Parent(Ok(_)) => {
            drop(write_end);
            std::process::exit(i32::from(wait_for_daemon(read_end, exit_failed_start)));
        }
        Outcome::Parent(Err(e)) => Err(format!("cannot detach: {e}")),
        Outcome::Child(Ok(_)) => {
            drop(read_end);
            Ok(Detached::Daemon(ReadyPipe {
                pipe: Some(File::from(write_end)),
            }))
        }
        Outcome::Child(Err(e)) => {
            let mut pipe = ReadyPipe {
                pipe: Some(File::from(write_end)),
            };
            log::error!("cannot detach: {e}");
            pipe.failed(exit_failed_start, &format!("cannot detach: {e}"));
            std::process::exit(i32::from(exit_failed_start));
        }
    }
}

/// The starting process's side: the daemon's exit code, 0 once it is serving.
fn wait_for_daemon(read_end: OwnedFd, exit_failed_start: u8) -> u8 {
    // One line, not "until EOF": a process forked from the daemon may hold the pipe open.
    let mut text = String::new();
    let _ = std::io::BufReader::new(File::from(read_end)).read_line(&mut text);
    match text.trim() {
        "ok" => 0,
        word => {
            let (code, why) = word
                .strip_prefix("exit ")
                .map(|rest| rest.split_once(' ').unwrap_or((rest, "")))
                .unwrap_or(("", ""));
            if !why.is_empty() {
                eprintln!("socketd: {why}");
            }
            code.parse().unwrap_or_else(|_| {
                eprintln!("socketd: the daemon exited before it was ready");
                exit_failed_start
            })
        }
    }
}

impl ReadyPipe {
    /// A readiness pipe handed to this process some other way (a binary upgrade).
    pub fn from_fd(fd: OwnedFd) -> ReadyPipe {
        ReadyPipe {
            pipe: Some(File::from(fd)),
        }
    }

    /// The daemon is serving: release the starting process with exit code 0.
    pub fn ready(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(b"ok\n");
        }
    }

    /// Point stdout and stderr at /dev/null: the terminal may go away at any time now. Done
    /// before serving starts, so worker processes forked then (the fork servers) never hold
    /// the terminal either; a start-up failure after this reaches the terminal through
    /// `failed`.
    pub fn detach_stdio(&self) {
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
            let _ = nix::unistd::dup2_stderr(&null);
        }
    }

    /// Start-up failed after detaching: the starting process prints `why` and exits with
    /// `code`.
    pub fn failed(&mut self, code: u8, why: &str) {
        if let Some(mut pipe) = self.pipe.take() {
            let why = why.replace('\n', " ");
            let _ = pipe.write_all(format!("exit {code} {why}\n").as_bytes());
        }
    }
}
