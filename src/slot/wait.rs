//! inetd `wait` mode for datagram listeners (`exec = { ..., wait = true }`): the listening
//! socket itself becomes the program's stdin and stdout, and the loop stops watching it until
//! the program exits. Programs such as in.tftpd read the first datagram themselves and may keep
//! serving for a while before they exit.
//!
//! The loop only peeks (`MSG_PEEK | MSG_DONTWAIT`) to see that a datagram is waiting, so none is
//! consumed before the program runs. The socket is handed over blocking, as inetd does, and made
//! non-blocking again before the job reports done, since the loop and the program share it
//! (under forked workers the fork server does that when it reaps the program, see
//! `worker::programs`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use mio::Registry as PollRegistry;
use nix::sys::socket::{recv, MsgFlags};

use crate::conn::DatagramSocket;
use crate::conn::PeerAddr;
use crate::exec::{set_blocking, Program};
use crate::jobs::{Done, Outcome};
use crate::listener::Socket4;
use crate::slot::{Drained, Shared, Slot, FD_RETRY};
use crate::worker::forked::ForkJob;
use crate::worker::wire::JobKind;

/// Run the program with `socket` as stdin and stdout and wait for it.
pub fn run(program: &Program, listener: &str, socket: OwnedFd) -> io::Result<()> {
    let vars = crate::exec::socket_env(socket.as_fd());
    let mut cmd = program.command(listener, &vars)?;
    set_blocking(&socket, true)?;
    cmd.stdin(Stdio::from(socket.try_clone()?));
    cmd.stdout(Stdio::from(socket.try_clone()?));
    let result = program.spawn(cmd, listener).and_then(|r| r.wait());
    set_blocking(&socket, false)?;
    result.map(drop)
}

/// Whether a datagram is waiting, without taking it.
fn datagram_waiting(socket: &Socket4) -> io::Result<bool> {
    let fd = match socket {
        Socket4::Udp(u) => u.as_raw_fd(),
        Socket4::UnixDgram(d) => d.as_raw_fd(),
        _ => return Ok(false),
    };
    let mut byte = [0u8; 1];
    match recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Slot {
    /// `Slot::drain` for a `wait` listener: start the program when a datagram waits and none
    /// runs, and stay unwatched while it runs.
    pub(crate) fn drain_wait(
        &mut self,
        poll: &PollRegistry,
        shared: &mut Shared,
        program: Program,
    ) -> Drained {
        if self.busy > 0 {
            self.unwatch(poll);
            return Drained::Full;
        }
        let Some(listener) = &self.listener else {
            return Drained::Empty;
        };
        match datagram_waiting(listener.socket()) {
            Ok(true) => {}
            Ok(false) => return Drained::Empty,
            Err(e) => {
                log::warn!("listener `{}`: {e}", self.cfg.name);
                return Drained::Empty;
            }
        }
        self.unwatch(poll);
        if self.cfg.workers == crate::config::WorkerModel::Forked {
            let job = ForkJob {
                kind: JobKind::Wait,
                conn: None,
                peer: PeerAddr::Unix {
                    path: None,
                    cred: None,
                },
                local: None,
                data: Vec::new(),
            };
            if self.dispatch_forked(shared, job).is_none() {
                return Drained::RetryAt(Instant::now() + FD_RETRY);
            }
            return Drained::Full;
        }
        let Some(socket) = self.reply.as_ref() else {
            return Drained::Empty;
        };
        let fd = match socket {
            DatagramSocket::Udp(u) => u.as_fd().try_clone_to_owned(),
            DatagramSocket::Unix(d) => d.as_fd().try_clone_to_owned(),
        };
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("listener `{}`: {e}", self.cfg.name);
                return Drained::RetryAt(Instant::now() + FD_RETRY);
            }
        };
        let (name, notifier, id) = (self.cfg.name.clone(), shared.notifier.clone(), self.id);
        let program = Arc::new(program);
        let job = move || {
            let outcome = match run(&program, &name, fd) {
                Ok(()) => Outcome::Ok,
                Err(e) => {
                    log::error!("listener `{name}`: {e}");
                    Outcome::Error(e.to_string())
                }
            };
            notifier.done(Done {
                listener: id,
                outcome,
            });
        };
        match self.pool.execute(job) {
            Ok(()) => self.busy += 1,
            Err(e) => {
                log::error!(
                    "listener `{}`: cannot start a worker thread: {e}",
                    self.cfg.name
                );
                return Drained::RetryAt(Instant::now() + FD_RETRY);
            }
        }
        Drained::Full
    }
}
