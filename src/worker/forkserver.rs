//! The fork server: a small single-threaded process that forks one child per forked job.
//!
//! Why a separate process: a child forked from a process that has other threads inherits every
//! lock as it was at that instant (the logger's, stderr's, the allocator's) with no thread left
//! to release it, so a forked worker could hang forever. The fork server is forked from the
//! daemon while the daemon still has exactly one thread (asserted in `ForkServer::start`), and it
//! never starts a thread itself, so every child it forks starts from a consistent,
//! single-threaded state — by construction, not by luck. It inherited the handler `Registry` at
//! fork time; the main loop sends it each listener's config (on start and on reload), and for
//! each job a small message plus the accepted socket over `SCM_RIGHTS` (see `wire`).
//!
//! It reaps its children from a `signalfd` for SIGCHLD, looping `waitpid(-1, WNOHANG)` because
//! signals coalesce, and reports every exit back to the main loop. It exits when the main loop's
//! end of the socketpair closes; `PR_SET_PDEATHSIG` is the backstop if the daemon dies hard.
//! Each child leads its own process group, so a signal to the group reaches the programs an
//! `exec` handler started in it too. The fork server is also the subreaper of their
//! descendants, so a program orphaned by a killed worker is reaped here rather than by init.

use std::collections::{HashMap, HashSet};
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use super::wire::{self, Ending, FromServer, JobKind, ToServer};
use crate::config::{ListenerConfig, Protocol};
use crate::conn::Conn;
use crate::handler::{Context, DatagramSocket, Factory, Registry};

/// Exit codes of a forked worker, read back into an `Outcome` by the main loop.
pub const CHILD_OK: i32 = 0;
pub const CHILD_ERROR: i32 = 1;
pub const CHILD_PANIC: i32 = 2;

/// One listener as the fork server knows it.
struct Entry {
    cfg: Arc<ListenerConfig>,
    factory: Result<Factory, String>,
    /// A datagram listener's socket, for replies and for `wait` mode.
    socket: Option<OwnedFd>,
}

struct State {
    registry: Registry,
    sock: OwnedFd,
    listeners: HashMap<u64, Entry>,
    /// Running children: pid -> (job, slot).
    children: HashMap<i32, (u64, u64)>,
    /// Process groups of finished children that still have members (a program that outlived
    /// its worker): signalled with the children at stop, and killed when the daemon is done.
    lingering: HashSet<i32>,
}

/// The fork server's whole life; never returns.
pub(super) fn run(sock: OwnedFd, registry: Registry, parent: Pid) -> ! {
    let code = match setup(&sock, parent).and_then(|sigfd| {
        serve(
            State {
                registry,
                sock,
                listeners: HashMap::new(),
                children: HashMap::new(),
                lingering: HashSet::new(),
            },
            sigfd,
        )
    }) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("fork server: {e}");
            1
        }
    };
    // SAFETY: `_exit` ends this process at once, without running the daemon's destructors or
    // atexit handlers it inherited (they belong to the main process).
    unsafe { libc::_exit(code) }
}

/// Dispositions the daemon set up (signal-hook's handlers) are reset; the daemon's own
/// signals (INT, QUIT, HUP, USR1) are ignored, since a terminal's ^C reaches the whole process
/// group and the daemon decides when children stop; SIGCHLD is blocked for the signalfd.
fn setup(sock: &OwnedFd, parent: Pid) -> std::io::Result<SignalFd> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
    if nix::unistd::getppid() != parent {
        return Err(std::io::Error::other(
            "the daemon exited while the fork server started",
        ));
    }
    reset_signals();
    // Programs orphaned when a worker dies (killed at stop) come here to be reaped, not to init.
    nix::sys::prctl::set_child_subreaper(true)?;
    for sig in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // SAFETY: installing SIG_IGN runs no code in signal context.
        unsafe { signal::signal(sig, SigHandler::SigIgn) }?;
    }
    close_all_but(&[sock.as_raw_fd()]);
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask), None)?;
    Ok(SignalFd::with_flags(
        &mask,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}

/// Every signal back to its default, except SIGPIPE, which Rust code expects ignored (writes
/// then fail with EPIPE); `std::process::Command` restores it for the programs it runs.
fn reset_signals() {
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        let to = if sig == Signal::SIGPIPE {
            SigHandler::SigIgn
        } else {
            SigHandler::SigDfl
        };
        // SAFETY: installing SIG_DFL/SIG_IGN runs no code in signal context.
        let _ = unsafe { signal::signal(sig, to) };
    }
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Close every descriptor above stderr except `keep` (sorted or not).
fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd > 2).collect();
    keep.sort_unstable();
    let mut from: libc::c_uint = 3;
    for fd in keep.iter().copied().chain(std::iter::once(-1)) {
        let to = if fd < 0 {
            libc::c_uint::MAX
        } else {
            (fd as libc::c_uint).saturating_sub(1)
        };
        if from <= to {
            // SAFETY: close_range only closes descriptors; the ones kept are outside the range
            // and nothing else in this single-threaded process is using the others.
            let r = unsafe { libc::syscall(libc::SYS_close_range, from, to, 0) };
            if r != 0 {
                close_listed(from, to);
            }
        }
        if fd >= 0 {
            from = fd as libc::c_uint + 1;
        }
    }
}

/// The slow way, for kernels before 5.9: walk /proc/self/fd.
fn close_listed(from: libc::c_uint, to: libc::c_uint) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<libc::c_uint> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| (from..=to).contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: as above; a descriptor of the directory walk itself is closed already.
        unsafe { libc::close(fd as RawFd) };
    }
}

fn serve(mut st: State, sigfd: SignalFd) -> std::io::Result<()> {
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    loop {
        let (sock_ready, sig_ready) = {
            let mut fds = [
                PollFd::new(st.sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            while let Ok(Some(_)) = sigfd.read_signal() {}
        }
        // Reap on every pass: cheap, and no exit waits for the next SIGCHLD.
        st.reap();
        if sock_ready {
            loop {
                match wire::recv_in_server(st.sock.as_fd(), &mut buf) {
                    Ok(Some((msg, fds))) => st.handle(msg, fds),
                    Ok(None) => {
                        st.finish();
                        return Ok(());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                        st.finish();
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

impl State {
    fn report(&self, job: u64, slot: u64, pid: i32, ending: Ending) {
        let msg = FromServer::Done {
            job,
            slot,
            pid,
            ending,
        };
        if let Err(e) = wire::send_to_main(self.sock.as_fd(), &msg) {
            log::error!("fork server: cannot report job {job} to the daemon: {e}");
        }
    }

    /// Signal every child, its process group, and the groups that outlived their child.
    fn signal_all(&mut self, sig: Signal) {
        for pid in self.children.keys() {
            let pid = Pid::from_raw(*pid);
            let _ = signal::killpg(pid, sig);
            let _ = signal::kill(pid, sig);
        }
        self.lingering
            .retain(|pgid| signal::killpg(Pid::from_raw(*pgid), sig).is_ok());
    }

    /// The daemon is done with us: nothing we started may outlive it.
    fn finish(&mut self) {
        self.signal_all(Signal::SIGKILL);
        self.reap();
    }

    fn reap(&mut self) {
        loop {
            let ending = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Ending::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Ending::Signaled(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("fork server: waitpid: {e}");
                    return;
                }
            };
            let (pid, ending) = ending;
            if let Some((job, slot)) = self.children.remove(&pid.as_raw()) {
                if signal::killpg(pid, None).is_ok() {
                    self.lingering.insert(pid.as_raw());
                }
                self.report(job, slot, pid.as_raw(), ending);
            }
        }
    }

    fn handle(&mut self, msg: ToServer, mut fds: Vec<OwnedFd>) {
        match msg {
            ToServer::Listener { slot, config } => {
                let entry = match toml::from_str::<ListenerConfig>(&config) {
                    Ok(cfg) => Entry {
                        factory: self.registry.build_for(&cfg),
                        cfg: Arc::new(cfg),
                        socket: fds.pop(),
                    },
                    Err(e) => {
                        log::error!("fork server: listener config for slot {slot} unreadable: {e}");
                        return;
                    }
                };
                self.listeners.insert(slot, entry);
            }
            ToServer::Forget { slot } => {
                self.listeners.remove(&slot);
            }
            ToServer::Signal { signo } => {
                let Ok(sig) = Signal::try_from(signo) else {
                    return;
                };
                self.signal_all(sig);
            }
            ToServer::Job {
                job,
                slot,
                kind,
                peer,
                local,
                data,
            } => {
                let conn = fds.pop();
                drop(fds);
                let Some(entry) = self.listeners.get(&slot) else {
                    self.report(
                        job,
                        slot,
                        0,
                        Ending::NotStarted("the listener is unknown to the fork server".into()),
                    );
                    return;
                };
                let child = Child {
                    entry,
                    kind,
                    conn,
                    peer,
                    local,
                    data,
                };
                // SAFETY: this process has a single thread (it never starts one), so the child
                // starts with every lock free; it ends with `_exit` and never returns here.
                match unsafe { nix::unistd::fork() } {
                    Ok(ForkResult::Child) => child.run(),
                    Ok(ForkResult::Parent { child: pid }) => {
                        // Both sides set the group, so a signal right after fork still reaches it.
                        let _ = nix::unistd::setpgid(pid, pid);
                        self.children.insert(pid.as_raw(), (job, slot));
                    }
                    Err(e) => {
                        log::error!("listener `{}`: cannot fork a worker: {e}", entry.cfg.name);
                        self.report(
                            job,
                            slot,
                            0,
                            Ending::NotStarted(format!("fork failed: {e}")),
                        );
                    }
                }
            }
        }
    }
}

/// What a new child needs, borrowed from the fork server's state before the fork.
struct Child<'a> {
    entry: &'a Entry,
    kind: JobKind,
    conn: Option<OwnedFd>,
    peer: crate::conn::PeerAddr,
    local: Option<std::net::SocketAddr>,
    data: Vec<u8>,
}

impl Child<'_> {
    fn run(self) -> ! {
        let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
        reset_signals();
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

    /// Keep only this job's socket, then serve it like a worker thread would.
    fn serve(self) -> std::io::Result<super::Outcome> {
        let cfg = &self.entry.cfg;
        let fd: OwnedFd = match (self.kind, self.conn, &self.entry.socket) {
            (JobKind::Stream, Some(c), _) => c,
            (JobKind::Datagram | JobKind::Wait, None, Some(s)) => s.try_clone()?,
            _ => return Err(std::io::Error::other("no socket was passed for this job")),
        };
        close_all_but(&[fd.as_raw_fd()]);
        if self.kind == JobKind::Wait {
            return crate::exec::wait::serve_in_child(cfg, fd);
        }
        let factory = self
            .entry
            .factory
            .as_ref()
            .map_err(|e| std::io::Error::other(e.clone()))?;
        let ctx = Context::new(Arc::clone(cfg), Arc::new(AtomicBool::new(false)));
        Ok(match self.kind {
            JobKind::Stream => {
                let conn = match cfg.protocol {
                    Protocol::Tcp => Conn::Tcp(std::net::TcpStream::from(fd)),
                    _ => Conn::Unix(UnixStream::from(fd)),
                };
                super::serve_stream(factory, &ctx, conn, self.peer, self.local, ())
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
