//! How the fork server starts one job: a worker child for a handler, or the program itself for
//! an `exec` listener's connection or `wait` socket.
//!
//! A program without an account switch is started with `posix_spawn` (`exec::spawn`: no copy of
//! the fork server's memory map); one with `user`/`group` through `fork` and `exec::direct`, so
//! the child can set its groups and ids first. Either way the pid the fork server books is the
//! program's own, its stderr pipe (for `stderr = "log"`) is created here and read by the poll
//! loop (`programs`), and the job is reported done when that pid is reaped. A job that cannot
//! start at all is reported at once as not started, so the loop never waits for it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::ForkResult;

use super::child::Child;
use super::forkserver::{Entry, State, IGNORED};
use super::programs::{self, Programs, Started};
use super::wire::{Ending, JobKind};
use crate::config::{ListenerConfig, Protocol};
use crate::conn::{Conn, PeerAddr};
use crate::exec::direct::Prepared;
use crate::exec::StderrMode;
use crate::handler::BuildContext;

/// One job as the main loop sent it, with the connection that came along.
pub(super) struct Job {
    pub job: u64,
    pub slot: u64,
    pub kind: JobKind,
    pub conn: Option<OwnedFd>,
    pub peer: PeerAddr,
    pub local: Option<std::net::SocketAddr>,
    pub data: Vec<u8>,
}

/// `handler = "exec"`: the program a child becomes, or why it cannot be run.
pub(super) fn prepare_exec(cfg: &ListenerConfig) -> Option<Result<Arc<Prepared>, String>> {
    if cfg.handler != "exec" {
        return None;
    }
    let ctx = BuildContext {
        listener: &cfg.name,
        protocol: cfg.protocol,
        settings: cfg.handler_settings.as_ref(),
    };
    let program = match crate::handler::exec::parse(&ctx) {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    Some(
        Prepared::new(&program, &cfg.name)
            .map(Arc::new)
            .map_err(|e| e.to_string()),
    )
}

/// The fork server's copy of a program's connection, kept for the access line's byte counters
/// and `idle_timeout` (both read from TCP_INFO), and to tell at the program's exit whether its
/// client had already left (`exec::Client`), which decides the exit line's level.
fn access_copy(cfg: &ListenerConfig, fd: OwnedFd) -> Option<Conn> {
    Some(match cfg.protocol {
        Protocol::Tcp => Conn::Tcp(std::net::TcpStream::from(fd)),
        _ => Conn::Unix(UnixStream::from(fd)),
    })
}

/// The program an exec job runs, None for a worker job, or why the job cannot start.
fn program_for(entry: &Entry, kind: JobKind) -> Result<Option<Arc<Prepared>>, String> {
    match (&entry.exec, kind) {
        (Some(Ok(p)), JobKind::Stream) => Ok(Some(Arc::clone(p))),
        (Some(Ok(p)), JobKind::Wait) if p.wait => Ok(Some(Arc::clone(p))),
        (Some(Err(e)), JobKind::Stream | JobKind::Wait) => Err(e.clone()),
        (_, JobKind::Wait) => Err("the listener is no longer in exec wait mode".into()),
        _ => Ok(None),
    }
}

/// The descriptor a program gets as fd 2 (None: the fork server's own stderr).
fn stderr_fd<'a>(
    program: &Prepared,
    pipe: &'a Option<(OwnedFd, OwnedFd)>,
    programs: &'a Programs,
) -> Option<BorrowedFd<'a>> {
    match program.stderr {
        StderrMode::Log => pipe.as_ref().map(|(_, w)| w.as_fd()),
        StderrMode::Null => Some(programs.null()),
        StderrMode::Inherit => None,
    }
}

impl State {
    /// Start `j` in a new process; every outcome ends in a `Done` report, now or at reap.
    pub(super) fn start(&mut self, j: Job) {
        let Some(entry) = self.listeners.get(&j.slot) else {
            let why = "the listener is unknown to the fork server";
            self.report(j.job, j.slot, 0, Ending::NotStarted(why.into()));
            return;
        };
        let name = entry.cfg.name.as_str();
        let not_started = |st: &State, why: String| {
            log::error!("listener `{name}`: {why}");
            st.report(j.job, j.slot, 0, Ending::NotStarted(why));
        };
        let program = match program_for(entry, j.kind) {
            Ok(p) => p,
            Err(why) => return not_started(self, why),
        };
        let pipe = match program.as_ref().map(|p| p.stderr) {
            Some(StderrMode::Log) => match programs::stderr_pipe() {
                Ok(pipe) => Some(pipe),
                Err(e) => return not_started(self, format!("cannot make a stderr pipe: {e}")),
            },
            _ => None,
        };
        // A stream job's data carries its TLS session, if any (for the access line).
        let tls = match j.kind {
            JobKind::Stream if program.is_some() && !j.data.is_empty() => {
                crate::tls::TlsInfo::decode(&j.data).ok()
            }
            _ => None,
        };
        let spawned = match &program {
            Some(p) if p.can_spawn() => {
                let stderr = stderr_fd(p, &pipe, &self.programs);
                Some(spawn(entry, p, &j, stderr))
            }
            _ => None,
        };
        let (pid, conn, peer) = match spawned {
            Some(Ok(pid)) => (pid, j.conn, j.peer),
            Some(Err(why)) => return not_started(self, why),
            None => {
                let child = Child {
                    entry,
                    kind: j.kind,
                    conn: j.conn,
                    peer: j.peer,
                    local: j.local,
                    data: j.data,
                };
                // SAFETY: this process has a single thread (it never starts one), so the child
                // starts with every lock free; it ends with `_exit` or `execve` and never
                // returns here.
                match unsafe { nix::unistd::fork() } {
                    Ok(ForkResult::Child) => match &program {
                        Some(p) => child.exec(p, stderr_fd(p, &pipe, &self.programs)),
                        None => child.run(),
                    },
                    Ok(ForkResult::Parent { child: pid }) => {
                        // Both sides set the group, so a signal right after fork reaches it.
                        let _ = nix::unistd::setpgid(pid, pid);
                        (pid.as_raw(), child.conn, child.peer)
                    }
                    Err(e) => return not_started(self, format!("cannot fork: {e}")),
                }
            }
        };
        let wait = j.kind == JobKind::Wait;
        self.children.insert(pid, (j.job, j.slot, wait));
        if let Some(p) = program {
            let conn = match j.kind {
                JobKind::Stream => Some((peer, conn.and_then(|c| access_copy(&entry.cfg, c)))),
                _ => None,
            };
            let at = Instant::now();
            let kill_at = match j.kind {
                JobKind::Stream => entry.cfg.protect.max_duration,
                _ => None,
            }
            .map(|d| (at + d + programs::CUT_GRACE, Signal::SIGTERM));
            let idle = match (j.kind, entry.cfg.protect.idle_timeout) {
                (JobKind::Stream, Some(d)) => Some((d, at + d)),
                _ => None,
            };
            let started = Started {
                listener: name.into(),
                name: p.name.as_str().into(),
                conn,
                at,
                kill_at,
                idle,
                reason: "max_duration",
                tls,
            };
            // The write end closes here: the program holds the only one.
            self.programs.started(pid, started, pipe.map(|(r, _)| r));
        }
    }
}

/// `posix_spawn` the program for a connection or a `wait` socket; the pid, or why not.
fn spawn(
    entry: &Entry,
    program: &Prepared,
    j: &Job,
    stderr: Option<BorrowedFd<'_>>,
) -> Result<i32, String> {
    let mut to_default = IGNORED.to_vec();
    to_default.push(Signal::SIGPIPE);
    let cannot = |e: std::io::Error| format!("cannot run {}: {e}", program.name);
    match (j.kind, &j.conn, &entry.socket) {
        (JobKind::Stream, Some(c), _) => {
            let mut vars = crate::exec::connection_env(true, &j.peer, j.local);
            vars.extend(crate::tls::TlsInfo::env_from_job(&j.data));
            program
                .spawn(&vars, c.as_fd(), c.as_fd(), stderr, &to_default)
                .map_err(cannot)
        }
        (JobKind::Wait, _, Some(s)) => {
            // inetd hands the socket over blocking; the reaper makes it non-blocking again.
            crate::exec::set_blocking(s, true).map_err(cannot)?;
            let vars = crate::exec::socket_env(s.as_fd());
            let spawned = program.spawn(&vars, s.as_fd(), s.as_fd(), stderr, &to_default);
            if spawned.is_err() {
                let _ = crate::exec::set_blocking(s, false);
            }
            spawned.map_err(cannot)
        }
        _ => Err("no socket was passed for this job".into()),
    }
}
