//! Binary upgrade, the new process's side: it was started by a running socketd (see
//! `upgrade`) with the listening sockets as `LISTEN_FDS` (adopted by `activation` like
//! systemd's), a readiness pipe, and its stderr going to the old process until it is ready.
//!
//! `from_env` finds out whether this is such a start and takes the descriptors;
//! `restore_stderr` puts the real stderr back before any worker process starts; the readiness
//! pipe is a `detach::ReadyPipe`, so `ok` / `exit CODE why` go back exactly as to the parent
//! of `--daemon`.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use super::detach::ReadyPipe;
use super::upgrade::{ENV_FROM, ENV_PIDFILE_FD, ENV_READY_FD, ENV_STDERR_FD};

/// The old process's pid, when this process is the new one of an upgrade.
static FROM: OnceLock<u32> = OnceLock::new();

/// The pid of the process that handed its sockets over, when this is the new process of an
/// upgrade (set by `Handover::from_env`).
pub fn from_pid() -> Option<u32> {
    FROM.get().copied()
}

/// This process is the new one of an upgrade.
#[derive(Debug)]
pub struct Handover {
    /// Tells the old process `ok` once this one serves.
    pub ready: ReadyPipe,
    /// The real stderr, until `restore_stderr` puts it on fd 2.
    stderr: Option<OwnedFd>,
    /// The old process's open, locked pidfile (see `pidfile::Pidfile::adopt`).
    pub pidfile: Option<OwnedFd>,
}

impl Handover {
    /// `Some` when started by an upgrade. Reads and removes the variables (so programs this
    /// process starts never see them); call while single-threaded. Variables that name
    /// descriptors this process does not have are ignored.
    pub fn from_env() -> Option<Handover> {
        let fd = |var: &str| -> Option<RawFd> {
            let v = std::env::var(var).ok()?.parse().ok()?;
            // Only a descriptor that is open here (and not stdio) can be ours.
            (v > 2 && nix::fcntl::fcntl(unsafe_borrow(v), nix::fcntl::FcntlArg::F_GETFD).is_ok())
                .then_some(v)
        };
        let ready = fd(ENV_READY_FD);
        let stderr = fd(ENV_STDERR_FD);
        let pidfile = fd(ENV_PIDFILE_FD);
        let from = std::env::var(ENV_FROM).ok().and_then(|v| v.parse().ok());
        for var in [ENV_READY_FD, ENV_STDERR_FD, ENV_FROM, ENV_PIDFILE_FD] {
            std::env::remove_var(var);
        }
        let (ready, stderr, from) = (ready?, stderr?, from?);
        let _ = FROM.set(from);
        // SAFETY: as for the two below: put here by the old process for this one, taken once.
        let pidfile = pidfile.map(|p| unsafe { OwnedFd::from_raw_fd(p) });
        // SAFETY: the old process put these two descriptors here for this process alone
        // (checked open above); each is taken once, and made close-on-exec at once.
        let (ready, stderr) =
            unsafe { (OwnedFd::from_raw_fd(ready), OwnedFd::from_raw_fd(stderr)) };
        for fd in [Some(&ready), Some(&stderr), pidfile.as_ref()]
            .into_iter()
            .flatten()
        {
            let _ = nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
        }
        Some(Handover {
            ready: ReadyPipe::from_fd(ready),
            stderr: Some(stderr),
            pidfile,
        })
    }

    /// Put the real stderr back on fd 2 (the old process has read the start-up output): done
    /// before serving starts, so no worker process ever holds the old process's pipe.
    pub fn restore_stderr(&mut self) {
        if let Some(fd) = self.stderr.take() {
            let _ = nix::unistd::dup2_stderr(&fd);
        }
    }
}

/// A borrowed descriptor for a check that only asks the kernel about the number.
fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: used only for F_GETFD, which fails harmlessly on a closed number.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
