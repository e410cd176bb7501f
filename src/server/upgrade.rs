//! Binary upgrade in the loop (SIGUSR2, `socketd upgrade`): Running -> Upgrading -> either
//! Draining (the new process serves; this one stops accepting and finishes what it has) or
//! Running again (rollback: the new process failed, exited or was not ready in time).
//!
//! The old process keeps accepting while the new one starts: both hold the same listening
//! sockets, so the kernel's queues never lack a reader and nothing is refused. Only on the new
//! process's `ok` does this one close its copies (leaving unix socket files in place), tell
//! the service manager the new main pid, and drain under `shutdown_timeout`, then exit 0.
//! The mechanics of starting and watching the new process are in `daemon::upgrade`.

use std::path::PathBuf;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::stop::State;
use super::Server;
use crate::daemon::upgrade::{self, Handed, Progress, Started};

/// Poll tokens for the new process's readiness pipe, output pipe and pidfd; slot tokens count
/// up from 2 and never get near these.
pub(super) const READY: Token = Token(usize::MAX - 1);
pub(super) const OUTPUT: Token = Token(usize::MAX - 2);
pub(super) const EXITED: Token = Token(usize::MAX - 3);

/// How an upgrade ended: the new process's pid, or why it did not take over.
pub(crate) type Outcome = Result<u32, String>;

/// Called once with the outcome (the control socket answers its client with it).
pub(crate) type Reply = Box<dyn FnOnce(Outcome) + Send>;

/// An upgrade in progress.
pub(super) struct InProgress {
    started: Started,
    reply: Option<Reply>,
}

impl std::fmt::Debug for InProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProgress")
            .field("pid", &self.started.pid)
            .finish()
    }
}

impl Server {
    /// Start an upgrade to `binary` (default: the binary this process was started from).
    /// `reply` gets the outcome: at once if the upgrade is refused or cannot start, else when
    /// the new process is serving or has been given up on.
    pub(crate) fn upgrade(&mut self, binary: Option<PathBuf>, reply: Option<Reply>) {
        let refuse = |why: String, reply: Option<Reply>| {
            log::warn!("upgrade refused: {why}");
            if let Some(r) = reply {
                r(Err(why));
            }
        };
        if let Some(up) = &self.upgrading {
            let why = format!(
                "an upgrade is already in progress (new process pid {})",
                up.started.pid
            );
            return refuse(why, reply);
        }
        if self.state != State::Running {
            return refuse("this process is stopping".to_string(), reply);
        }
        let Some(binary) = binary.or_else(upgrade::own_binary) else {
            return refuse(
                "cannot tell which binary this process runs; give one with --binary".to_string(),
                reply,
            );
        };
        let handed: Vec<Handed<'_>> = self
            .slots
            .values()
            .filter_map(|s| {
                let l = s.listener.as_ref()?;
                Some(Handed {
                    name: &s.cfg.name,
                    fd: std::os::fd::AsFd::as_fd(l),
                    owned_file: l.own_socket_file().is_some(),
                    from_manager: l.from_manager(),
                    paused: s.paused,
                    path: match l.local_addr() {
                        crate::config::ListenAddr::Path(p) => Some(p.as_path()),
                        crate::config::ListenAddr::Inet(_) => None,
                    },
                })
            })
            .collect();
        let timeout = self.config.daemon.upgrade_timeout;
        let env = self.notify.child_env();
        let started = match upgrade::spawn(&binary, &handed, &env, timeout) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("cannot start {}: {e}", binary.display());
                log::error!("upgrade failed: {why}; still serving");
                if let Some(r) = reply {
                    r(Err(why));
                }
                return;
            }
        };
        drop(handed);
        self.notify.reloading();
        log::info!(
            "upgrade: started {} as pid {} with {} listening sockets; waiting up to {} for it \
             to be ready",
            binary.display(),
            started.pid,
            self.slots.values().filter(|s| s.listener.is_some()).count(),
            humantime::format_duration(timeout)
        );
        let registry = self.poll.registry();
        let watched = [
            (std::os::fd::AsRawFd::as_raw_fd(&started.ready), READY),
            (std::os::fd::AsRawFd::as_raw_fd(&started.output), OUTPUT),
            (std::os::fd::AsRawFd::as_raw_fd(&started.pidfd), EXITED),
        ];
        for (fd, token) in watched {
            if let Err(e) = registry.register(&mut SourceFd(&fd), token, Interest::READABLE) {
                log::error!("upgrade: cannot watch the new process: {e}");
                self.upgrading = Some(InProgress { started, reply });
                return self.upgrade_failed(format!("cannot watch the new process: {e}"));
            }
        }
        self.upgrading = Some(InProgress { started, reply });
    }

    /// A readiness event from the new process.
    pub(super) fn on_upgrade_event(&mut self, token: Token) {
        let Some(up) = self.upgrading.as_mut() else {
            return;
        };
        let progress = match token {
            READY => up.started.on_ready_pipe(),
            OUTPUT => {
                up.started.on_output();
                Progress::Waiting
            }
            EXITED => up.started.on_exit(),
            _ => Progress::Waiting,
        };
        match progress {
            Progress::Waiting => {}
            Progress::Ready => self.upgrade_done(),
            Progress::Failed(why) => self.upgrade_failed(why),
        }
    }

    /// When the loop must wake for the new process's deadline.
    pub(super) fn upgrade_deadline(&self) -> Option<Instant> {
        self.upgrading.as_ref().map(|u| u.started.deadline)
    }

    /// Give up on a new process that is not ready in time.
    pub(super) fn check_upgrade(&mut self) {
        let Some(up) = self.upgrading.as_mut() else {
            return;
        };
        if let Some(why) = up.started.expired(Instant::now()) {
            self.upgrade_failed(why);
        }
    }

    fn unwatch_upgrade(&mut self) -> Option<InProgress> {
        let up = self.upgrading.take()?;
        let registry = self.poll.registry();
        for fd in [
            std::os::fd::AsRawFd::as_raw_fd(&up.started.ready),
            std::os::fd::AsRawFd::as_raw_fd(&up.started.output),
            std::os::fd::AsRawFd::as_raw_fd(&up.started.pidfd),
        ] {
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
        Some(up)
    }

    /// Call off an upgrade in progress (this process is stopping).
    pub(super) fn abort_upgrade(&mut self, why: &str) {
        if self.upgrading.is_some() {
            self.upgrade_failed(format!("called off: {why}"));
        }
    }

    /// Rollback: the new process goes, this one carries on as before.
    fn upgrade_failed(&mut self, why: String) {
        let Some(up) = self.unwatch_upgrade() else {
            return;
        };
        let pid = up.started.pid;
        up.started.abandon();
        log::error!(
            "upgrade failed: {why}; pid {pid} killed, still serving as pid {}",
            std::process::id()
        );
        let status = self.status_line();
        self.notify.ready(&status);
        if let Some(r) = up.reply {
            r(Err(why));
        }
    }

    /// The new process serves: hand over, then stop accepting and drain.
    fn upgrade_done(&mut self) {
        let Some(mut up) = self.unwatch_upgrade() else {
            return;
        };
        // Its output from now on goes to the real stderr; whatever is still in the pipe is
        // start-up output and belongs in the log.
        up.started.on_output();
        // Re-parented to the service manager before it is named the main process.
        up.started.release();
        let pid = u32::try_from(up.started.pid.as_raw()).unwrap_or_default();
        self.notify
            .handed_over(pid, &format!("upgraded: pid {pid} serves"));
        for slot in self.slots.values_mut() {
            if let Some(l) = slot.listener.as_mut() {
                l.release_file();
            }
        }
        log::info!(
            "upgrade: pid {pid} ({}) is serving; this process (pid {}) stops accepting and \
             drains",
            up.started.binary.display(),
            std::process::id()
        );
        drop(up.started);
        self.begin_stop();
        if let Some(r) = up.reply {
            r(Ok(pid));
        }
    }
}
