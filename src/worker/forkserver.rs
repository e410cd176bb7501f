//! The fork server: a small single-threaded process that forks one child per forked job
//! (socketd starts two per CPU, see `forked::ForkServer`; each is this same loop).
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
//! When another fork server dies, the daemon (multi-threaded by then) asks a survivor to fork
//! the replacement (`ToServer::Spawn`, `State::spawn_sibling`).
//! Each child leads its own process group, so a signal to the group reaches the programs an
//! `exec` handler started in it too. The fork server is also the subreaper of their
//! descendants, so a program orphaned by a killed worker is reaped here rather than by init.
//!
//! An `exec` listener's connection (and a `wait` listener's socket) skips the worker: the child
//! becomes the program (`exec::direct`), so the pid reaped here is the program's and its exit
//! status is the program's own. Its stderr pipe and exit are logged from this loop
//! (`programs`), which therefore also polls those pipes and wakes for their drain deadlines.
//! A datagram for an `exec` listener without `wait` still goes through a worker, which relays
//! the program's stdout as the reply.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::doorway::{self, Doorway};
use super::programs::Programs;
use super::start::{prepare_exec, Job};
use super::wire::{self, Ending, FromServer, ToServer};
use crate::config::ListenerConfig;
use crate::exec::direct::Prepared;
use crate::handler::{Factory, Registry};

/// Exit codes of a forked worker, read back into an `Outcome` by the main loop.
pub const CHILD_OK: i32 = 0;
pub const CHILD_ERROR: i32 = 1;
pub const CHILD_PANIC: i32 = 2;

/// The daemon's signals, ignored here (see `setup`) and restored in every child.
pub(super) const IGNORED: [Signal; 5] = [
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// One listener as the fork server knows it.
pub(super) struct Entry {
    pub cfg: Arc<ListenerConfig>,
    pub factory: Result<Factory, String>,
    /// `handler = "exec"`: the program, ready for a child to become it.
    pub exec: Option<Result<Arc<Prepared>, String>>,
    /// A datagram listener's socket, for replies and for `wait` mode.
    pub socket: Option<OwnedFd>,
}

pub(super) struct State {
    registry: Registry,
    sock: OwnedFd,
    pub listeners: HashMap<u64, Entry>,
    /// Running children: pid -> (job, slot, whether it holds a `wait` listener's socket).
    pub children: HashMap<i32, (u64, u64, bool)>,
    pub programs: Programs,
    /// Process groups of finished children that still have members (a program that outlived
    /// its worker): signalled with the children at stop, and killed when the daemon is done.
    lingering: HashSet<i32>,
    /// The wait set, and the listeners this fork server accepts for (`doorway`).
    doorway: Doorway,
}

/// The fork server's whole life; never returns.
pub(super) fn run(sock: OwnedFd, registry: Registry, parent: Option<Pid>) -> ! {
    let code = match setup(&sock, parent).and_then(|sigfd| {
        serve(
            State {
                registry,
                sock,
                listeners: HashMap::new(),
                children: HashMap::new(),
                programs: Programs::new()?,
                lingering: HashSet::new(),
                doorway: Doorway::new()?,
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
fn setup(sock: &OwnedFd, parent: Option<Pid>) -> std::io::Result<SignalFd> {
    // The daemon's fork servers die with it (`parent`); a library server's end when their
    // socket closes.
    if let Some(parent) = parent {
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
        if nix::unistd::getppid() != parent {
            return Err(std::io::Error::other(
                "the daemon exited while the fork server started",
            ));
        }
    }
    reset_signals();
    lean_heap();
    // Programs orphaned when a worker dies (killed at stop) come here to be reaped, not to init.
    nix::sys::prctl::set_child_subreaper(true)?;
    for sig in IGNORED {
        // SAFETY: installing SIG_IGN runs no code in signal context.
        unsafe { signal::signal(sig, SigHandler::SigIgn) }?;
    }
    close_all_but(&[sock.as_raw_fd(), crate::access_log::forward_fd()]);
    open_standard_fds()?;
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask), None)?;
    Ok(SignalFd::with_flags(
        &mask,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}

/// Fewer heap pages written by each child (after a fork every first write to a page is a
/// copy-on-write fault, a large part of a forked connection's cost here): no fastbins, so a
/// child's first larger allocation does not consolidate free chunks all over the heap (writing
/// to each of their pages), and the heap inherited from the daemon trimmed.
fn lean_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc tuning calls; this process is single-threaded.
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0);
        libc::malloc_trim(0);
    }
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

/// Point any of fds 0, 1, 2 the daemon was started without at /dev/null, so every descriptor
/// this process opens or receives later is above 2 and a child can `dup2` it onto 0, 1 or 2
/// without clobbering another one it still needs.
fn open_standard_fds() -> std::io::Result<()> {
    for fd in 0..3 {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // Opens the lowest free descriptor, which is `fd`; kept open for good, and
            // inheritable like a standard descriptor (std opens it close-on-exec).
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            let null = OwnedFd::from(null);
            // SAFETY: clearing the descriptor flags of a descriptor this function owns.
            if unsafe { libc::fcntl(null.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::mem::forget(null);
        }
    }
    Ok(())
}

/// In a new child: the daemon's signals back to their defaults (SIGPIPE stays ignored for
/// Rust code; a program gets the default in `exec::direct`) and nothing blocked.
pub(super) fn child_signals() {
    for sig in IGNORED {
        // SAFETY: installing SIG_DFL runs no code in signal context.
        let _ = unsafe { signal::signal(sig, SigHandler::SigDfl) };
    }
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Close every descriptor above stderr except `keep` (sorted or not).
pub(super) fn close_all_but(keep: &[RawFd]) {
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
    let mut pipes_ready = Vec::new();
    let mut ready = Vec::new();
    st.doorway.add(st.sock.as_raw_fd(), doorway::SOCK)?;
    st.doorway.add(sigfd.as_raw_fd(), doorway::SIGNALS)?;
    st.doorway
        .add(st.programs.watch_fd().as_raw_fd(), doorway::PIPES)?;
    loop {
        // One epoll set for everything, so `EPOLLEXCLUSIVE` on the listeners' sockets wakes
        // one fork server per connection (a `poll` on the set would wake them all).
        st.doorway.wait(st.programs.next_deadline(), &mut ready)?;
        let sock_ready = ready.contains(&doorway::SOCK);
        let sig_ready = ready.contains(&doorway::SIGNALS);
        // Pipes before reaping, so a program's last stderr lines come before its exit line.
        if ready.contains(&doorway::PIPES) {
            let mut fds: Vec<PollFd> = st
                .programs
                .fds()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            if poll(&mut fds, PollTimeout::ZERO).is_ok() {
                let is_ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                pipes_ready.clear();
                pipes_ready.extend(fds.iter().map(is_ready));
                drop(fds);
                if pipes_ready.contains(&true) {
                    st.programs.readable(&pipes_ready);
                }
            }
        }
        let now = Instant::now();
        st.programs.expire(now);
        st.doorway.retry(now);
        st.doorway.expire(now);
        if sig_ready {
            // Drain, then reap: a child that exits after the drain is reaped now or leaves
            // SIGCHLD pending for the next poll, so none waits; a pass for a job alone costs no
            // waitpid.
            while let Ok(Some(_)) = sigfd.read_signal() {}
            st.reap();
        }
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
        // Last, so a `Watch` or `Unlisten` just read applies first.
        for token in &ready {
            if let Some(slot) = Doorway::slot_of(*token) {
                st.accept(slot);
            }
        }
    }
}

impl State {
    pub(super) fn report(&self, job: u64, slot: u64, pid: i32, ending: Ending) {
        let msg = FromServer::Done {
            job,
            slot,
            pid,
            ending,
        };
        if let Err(e) = wire::send_to_main(self.sock.as_fd(), &msg, None) {
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
        self.programs.finish();
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
            let (pid, mut ending) = ending;
            if let Some((job, slot, wait)) = self.children.remove(&pid.as_raw()) {
                if signal::killpg(pid, None).is_ok() {
                    self.lingering.insert(pid.as_raw());
                }
                if self.programs.ended(pid.as_raw(), &ending) {
                    ending = Ending::Program;
                }
                if wait {
                    // The program had the socket blocking; the loop watches it again after this.
                    let socket = self.listeners.get(&slot).and_then(|e| e.socket.as_ref());
                    if let Some(Err(e)) = socket.map(|s| crate::exec::set_blocking(s, false)) {
                        log::error!("fork server: slot {slot}: cannot make the socket non-blocking again: {e}");
                    }
                }
                self.report(job, slot, pid.as_raw(), ending);
            }
        }
    }

    /// A listener's socket is readable: accept, and ask the daemon about each connection.
    fn accept(&mut self, slot: u64) {
        let sock = self.sock.as_fd();
        self.doorway
            .accept(slot, &mut |knock, slot, peer, local, conn| {
                let msg = FromServer::Knock {
                    knock,
                    slot,
                    peer: peer.clone(),
                    local,
                };
                match wire::send_to_main(sock, &msg, Some(conn.as_fd())) {
                    Ok(()) => true,
                    Err(e) => {
                        log::error!("fork server: cannot ask the daemon about a connection: {e}");
                        false
                    }
                }
            });
    }

    /// Fork a new fork server for the daemon, which cannot fork safely itself (it has
    /// threads by now), and send it its socket. This process is single-threaded, so the copy
    /// starts from a consistent state, as the first fork servers did; `CLONE_PARENT` makes it
    /// the daemon's child, so the daemon reaps it and it gets the daemon's death signal. It
    /// then starts over as a fresh fork server (`run` closes every inherited descriptor).
    fn spawn_sibling(&mut self, index: u64) {
        let daemon = nix::unistd::getppid();
        let started = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)
        .and_then(|(ours, theirs)| {
            // SAFETY: this process never starts a thread, so the child inherits no lock held
            // by another one (as with fork). A raw clone skips glibc's fork handlers, which
            // only matter with other threads; glibc reads the tid for raise() from the kernel.
            // With no new stack the child runs on a copy of this one, like fork. The child
            // never returns from `run`.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            match pid {
                0 => {
                    drop(ours);
                    run(theirs, self.registry.clone(), Some(daemon))
                }
                p if p < 0 => Err(std::io::Error::last_os_error()),
                p => Ok((p as i32, ours)),
            }
        });
        let (msg, fd) = match started {
            Ok((pid, sock)) => (
                FromServer::Spawned {
                    index,
                    started: Ok(pid),
                },
                Some(sock),
            ),
            Err(e) => (
                FromServer::Spawned {
                    index,
                    started: Err(e.to_string()),
                },
                None,
            ),
        };
        if let Err(e) = wire::send_to_main(self.sock.as_fd(), &msg, fd.as_ref().map(|f| f.as_fd()))
        {
            log::error!("fork server: cannot hand a new fork server to the daemon: {e}");
        }
    }

    fn handle(&mut self, msg: ToServer, mut fds: Vec<OwnedFd>) {
        match msg {
            ToServer::Listener { slot, config } => {
                let entry = match toml::from_str::<ListenerConfig>(&config) {
                    Ok(cfg) => {
                        let mut socket = fds.pop();
                        // A stream listener's socket comes only for the fork servers to
                        // accept on (`doorway`); a datagram one's is for replies and `wait`.
                        if !cfg.protocol.is_datagram() {
                            if let Some(s) = socket.take() {
                                self.doorway.open(slot, s, &cfg);
                            }
                        }
                        Entry {
                            factory: self.registry.build_for(&cfg).map_err(|e| e.to_string()),
                            exec: prepare_exec(&cfg),
                            cfg: Arc::new(cfg),
                            socket,
                        }
                    }
                    Err(e) => {
                        log::error!("fork server: listener config for slot {slot} unreadable: {e}");
                        return;
                    }
                };
                self.listeners.insert(slot, entry);
            }
            ToServer::Forget { slot } => {
                self.doorway.close(slot);
                self.listeners.remove(&slot);
            }
            ToServer::Unlisten { slot } => {
                self.doorway.close(slot);
                let msg = FromServer::Unlistened { slot };
                if let Err(e) = wire::send_to_main(self.sock.as_fd(), &msg, None) {
                    log::error!("fork server: cannot confirm a closed listener: {e}");
                }
            }
            ToServer::Watch { slot, on } => self.doorway.watch(slot, on),
            ToServer::Verdict { knock, job } => {
                let Some(p) = self.doorway.unpark(knock) else {
                    return;
                };
                // Refused: the connection closes here, before any byte is sent.
                if let Some(job) = job {
                    self.start(Job {
                        job,
                        slot: p.slot,
                        kind: wire::JobKind::Stream,
                        conn: Some(p.conn),
                        peer: p.peer,
                        local: p.local,
                        data: Vec::new(),
                    });
                }
            }
            ToServer::Signal { signo } => {
                let Ok(sig) = Signal::try_from(signo) else {
                    return;
                };
                self.signal_all(sig);
            }
            ToServer::Spawn { index } => self.spawn_sibling(index),
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
                let job = Job {
                    job,
                    slot,
                    kind,
                    conn,
                    peer,
                    local,
                    data,
                };
                self.start(job);
            }
        }
    }
}
