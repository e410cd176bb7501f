//! What a child of the fork server does with its one job, between `fork` and `_exit`/`execve`.
//!
//! A child leads its own process group (the fork server sets it too, so a stop signal sent
//! right after the fork still reaches it) and gets the daemon's signals back at their defaults.
//! Then either it serves the job with the listener's handler, like a worker thread would,
//! holding only its own socket (`run`), or, for an `exec` listener's connection or `wait`
//! socket, it becomes the program (`exec`, see `exec::direct`).

use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nix::unistd::Pid;

use super::forkserver::{child_signals, close_all_but, Entry, CHILD_ERROR, CHILD_OK, CHILD_PANIC};
use super::wire::JobKind;
use crate::config::Protocol;
use crate::conn::{Conn, PeerAddr};
use crate::exec::direct::{Prepared, CANNOT_RUN};
use crate::handler::{Context, DatagramSocket};

/// What a new child needs, borrowed from the fork server's state before the fork.
pub(super) struct Child<'a> {
    pub entry: &'a Entry,
    pub kind: JobKind,
    pub conn: Option<OwnedFd>,
    pub peer: PeerAddr,
    pub local: Option<std::net::SocketAddr>,
    pub data: Vec<u8>,
}

fn own_group_and_signals() {
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    child_signals();
}

impl Child<'_> {
    /// Serve the job with the listener's handler and exit with a `CHILD_*` code.
    pub fn run(self) -> ! {
        own_group_and_signals();
        super::forked::mark_child();
        let (name, peer) = (self.entry.cfg.name.clone(), self.peer.clone());
        let code = match self.serve() {
            Ok(super::Outcome::Ok) => CHILD_OK,
            Ok(super::Outcome::Error(_)) => CHILD_ERROR,
            Ok(super::Outcome::Panic(_)) => CHILD_PANIC,
            Err(e) => {
                log::error!("listener `{name}` peer {peer}: forked worker: {e}");
                CHILD_ERROR
            }
        };
        // SAFETY: end the child without running the fork server's destructors.
        unsafe { libc::_exit(code) }
    }

    /// Become `program`: the connection (or a `wait` listener's socket) on stdin and stdout,
    /// `stderr` on fd 2 (None keeps the daemon's).
    pub fn exec(self, program: &Prepared, stderr: Option<BorrowedFd<'_>>) -> ! {
        own_group_and_signals();
        let name = &self.entry.cfg.name;
        match (self.kind, &self.conn, &self.entry.socket) {
            (JobKind::Stream, Some(c), _) => {
                let mut vars = crate::exec::connection_env(true, &self.peer, self.local);
                vars.extend(crate::tls::TlsInfo::env_from_job(&self.data));
                program.exec(name, &vars, c.as_fd(), c.as_fd(), stderr)
            }
            (JobKind::Wait, _, Some(s)) => {
                // inetd hands the socket over blocking; the fork server restores it at reap.
                if let Err(e) = crate::exec::set_blocking(s, true) {
                    log::error!("listener `{name}`: cannot make the socket blocking: {e}");
                } else {
                    let vars = crate::exec::socket_env(s.as_fd());
                    program.exec(name, &vars, s.as_fd(), s.as_fd(), stderr)
                }
            }
            _ => log::error!("listener `{name}`: no socket was passed for this job"),
        }
        // SAFETY: end the child without running the fork server's destructors.
        unsafe { libc::_exit(CANNOT_RUN) }
    }

    /// Keep only this job's socket, then serve it like a worker thread would.
    fn serve(self) -> std::io::Result<super::Outcome> {
        let cfg = &self.entry.cfg;
        let fd: OwnedFd = match (self.kind, self.conn, &self.entry.socket) {
            (JobKind::Stream, Some(c), _) => c,
            (JobKind::Datagram, None, Some(s)) => s.try_clone()?,
            _ => return Err(std::io::Error::other("no socket was passed for this job")),
        };
        close_all_but(&[fd.as_raw_fd(), crate::access_log::forward_fd()]);
        let factory = self
            .entry
            .factory
            .as_ref()
            .map_err(|e| std::io::Error::other(e.clone()))?;
        let ctx = Context::new(Arc::clone(cfg), Arc::new(AtomicBool::new(false)));
        Ok(match self.kind {
            JobKind::Stream => {
                let conn = match cfg.protocol {
                    // A TLS listener's connection is the plaintext end of a socketpair.
                    Protocol::Tcp if cfg.tls.is_none() => Conn::Tcp(std::net::TcpStream::from(fd)),
                    _ => Conn::Unix(UnixStream::from(fd)),
                };
                let tls = (!self.data.is_empty())
                    .then(|| crate::tls::TlsInfo::decode(&self.data).ok())
                    .flatten()
                    .map(Arc::new);
                super::serve_stream(factory, &ctx, conn, self.peer, self.local, (), tls)
            }
            _ => {
                let socket = match cfg.protocol {
                    Protocol::Udp => DatagramSocket::Udp(Arc::new(UdpSocket::from(fd))),
                    _ => DatagramSocket::Unix(Arc::new(UnixDatagram::from(fd))),
                };
                super::serve_datagram(factory, &ctx, self.data, self.peer, socket)
            }
        })
    }
}
