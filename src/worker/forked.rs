//! `workers = "forked"` on the daemon's side: starting the fork servers (two per CPU, see
//! `ForkServer`), handing them jobs, and turning their exit reports into the same `Done` a
//! worker thread sends.
//!
//! The main loop keeps the counting (a job is busy from dispatch until its child's exit is
//! reported), so back-pressure works exactly as with threads. A listener's config goes to the
//! fork server before its first job and again whenever a reload gave the slot a new config, so
//! new children always use the current settings; a datagram listener's socket goes along once,
//! for replies and `wait` mode. Dropping a slot's `Link` tells the fork server to forget it, so
//! a removed UDP listener's port is not kept bound there. The daemon waits for the fork server's
//! pid only (never `waitpid(-1)`), so `std::process::Command::wait` in threads keeps working.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::sys::socket::{setsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};
use nix::sys::time::TimeVal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use super::forkserver::{CHILD_OK, CHILD_PANIC};
use super::wire::{self, Ending, FromServer, JobKind, ToServer};
use super::{Done, Notifier, Outcome};
use crate::config::ListenerConfig;
use crate::conn::PeerAddr;
use crate::handler::Registry;

/// A job message that cannot be sent within this long means the fork server is stuck; the
/// job fails instead of stalling the loop.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the fork server gets to exit once its socket closed, before SIGKILL.
const EXIT_WAIT: Duration = Duration::from_secs(2);

pub(super) use crate::process::mark_child;
pub use crate::process::{cloexec_all, in_forked_child};

/// The most fork servers started, whatever the number of CPUs.
const MAX_FORK_SERVERS: usize = 8;

/// The daemon's handle on its fork servers: two per CPU (up to `MAX_FORK_SERVERS`), each a
/// single-threaded process. Jobs go to the one with the fewest in flight, so a fork server
/// that is busy starting one program (`posix_spawn` holds it until the program's `execve`)
/// never holds up the next connection while another CPU is free. Listener configs, signals
/// and the stop go to all of them.
#[derive(Debug)]
pub struct ForkServer {
    servers: Vec<Process>,
    next_job: AtomicU64,
    /// Jobs in flight, so a dead fork server's jobs can still be booked.
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    /// Set by `shutdown`: a fork server ending after that is expected, not an error.
    closing: Arc<AtomicBool>,
}

/// One fork server process.
#[derive(Debug)]
struct Process {
    sock: OwnedFd,
    pid: Pid,
    alive: Arc<AtomicBool>,
    /// Jobs in flight in this process.
    load: Arc<AtomicUsize>,
}

/// The number of threads this process has, from /proc.
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// How many fork servers to start: two per CPU this process may use, at most
/// `MAX_FORK_SERVERS`. Two, because `posix_spawn` holds a fork server until its child has
/// called `execve`, and on a busy machine that child may wait for a CPU meanwhile; measured
/// with `bench/forked_vs_xinetd.sh`, two per CPU served more exec'd connections per second
/// than one.
fn server_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .saturating_mul(2)
        .clamp(1, MAX_FORK_SERVERS)
}

/// Fork one fork server (the caller is single-threaded, or holds the locks `start_threaded`
/// names).
fn fork_one(registry: &Registry, parent: Option<Pid>) -> io::Result<Process> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: the caller checked that this process has a single thread (or holds the locks the
    // child will take, see `start_threaded`), so the child inherits no lock held by another
    // thread that it waits for; it runs the fork server and `_exit`s.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            drop(ours);
            super::forkserver::run(theirs, registry.clone(), parent)
        }
        ForkResult::Parent { child } => {
            drop(theirs);
            setsockopt(
                &ours,
                sockopt::SendTimeout,
                &TimeVal::new(SEND_TIMEOUT.as_secs() as _, 0),
            )?;
            Ok(Process {
                sock: ours,
                pid: child,
                alive: Arc::new(AtomicBool::new(true)),
                load: Arc::new(AtomicUsize::new(0)),
            })
        }
    }
}

impl ForkServer {
    /// Fork the fork servers. The caller must still be single-threaded: that is the whole
    /// point, and it is checked here rather than trusted. All of them are forked before the
    /// first reader thread starts.
    pub fn start(registry: &Registry, notifier: Notifier) -> io::Result<ForkServer> {
        let threads = thread_count()?;
        if threads != 1 {
            return Err(io::Error::other(format!(
                "the fork server must be started while socketd has one thread, but it has {threads}; \
                 start no thread before Server::serve"
            )));
        }
        let parent = nix::unistd::getpid();
        let mut servers = Vec::new();
        for _ in 0..server_count() {
            match fork_one(registry, Some(parent)) {
                Ok(p) => servers.push(p),
                // Ones already started see their socket close when `servers` drops, and exit.
                Err(e) => return Err(e),
            }
        }
        let server = ForkServer {
            servers,
            next_job: AtomicU64::new(0),
            pending: Arc::new(Mutex::new(HashMap::new())),
            closing: Arc::new(AtomicBool::new(false)),
        };
        for index in 0..server.servers.len() {
            server.spawn_reader(index, notifier.clone())?;
        }
        log::debug!("fork servers started, pids {:?}", server.pids());
        Ok(server)
    }

    /// Fork one fork server from a process that may already have other threads (a library
    /// server in someone's program). The one fork from a multi-threaded process happens here,
    /// once per server; every request's child is then forked by that single-threaded fork
    /// server, never by the threaded process.
    ///
    /// A thread that holds a lock at the instant of this fork leaves it held in the fork server
    /// and in every child, for good. So the fork happens with stdout and stderr locked by the
    /// forking thread (the `pthread_atfork` "prepare" pattern: the children inherit them held
    /// by their own thread, and release them), which covers socketd's logger and `println!`.
    /// Locks of the program's own that another thread holds at that moment are not covered:
    /// a forked handler must not wait for those (Python's `ForkingMixIn` promises less: it
    /// forks the threaded process for every request).
    pub fn start_threaded(registry: &Registry, notifier: Notifier) -> io::Result<ForkServer> {
        let process = {
            let out = std::io::stdout();
            let err = std::io::stderr();
            let _out = out.lock();
            let _err = err.lock();
            // Not tied to this thread by PR_SET_PDEATHSIG (a library server may be served
            // from a thread that ends): the fork server ends when its socket closes, which
            // `server_close` (or the process's end) does.
            fork_one(registry, None)?
        };
        let server = ForkServer {
            servers: vec![process],
            next_job: AtomicU64::new(0),
            pending: Arc::new(Mutex::new(HashMap::new())),
            closing: Arc::new(AtomicBool::new(false)),
        };
        server.spawn_reader(0, notifier)?;
        log::debug!("fork server started, pid {:?}", server.pids());
        Ok(server)
    }

    /// The fork servers' pids, for status and tests.
    pub fn pids(&self) -> Vec<i32> {
        self.servers.iter().map(|p| p.pid.as_raw()).collect()
    }

    fn spawn_reader(&self, index: usize, notifier: Notifier) -> io::Result<()> {
        let process = &self.servers[index];
        let sock = process.sock.try_clone()?;
        let (pid, closing) = (process.pid, Arc::clone(&self.closing));
        let (pending, alive, load) = (
            Arc::clone(&self.pending),
            Arc::clone(&process.alive),
            Arc::clone(&process.load),
        );
        std::thread::Builder::new()
            .name("socketd:forkserver".into())
            .spawn(move || {
                loop {
                    match wire::recv_in_main(sock.as_fd()) {
                        Ok(Some(FromServer::Done {
                            job,
                            slot,
                            pid,
                            ending,
                        })) => {
                            // Dropping the entry releases what the slot held for the job.
                            let known = pending.lock().ok().and_then(|mut p| p.remove(&job));
                            if known.is_some() {
                                drop(known);
                                load.fetch_sub(1, Ordering::Relaxed);
                                notifier.done(Done {
                                    listener: slot as usize,
                                    outcome: outcome(pid, &ending),
                                });
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            log::error!("fork server: {e}");
                            break;
                        }
                    }
                }
                // This fork server is gone: its jobs will never report, so book them now.
                alive.store(false, Ordering::Relaxed);
                if !closing.load(Ordering::Relaxed) {
                    log::error!(
                        "fork server (pid {pid}) is gone; its jobs are booked as failed and the \
                         other fork servers take the new ones"
                    );
                }
                let lost: Vec<Pending> = pending
                    .lock()
                    .map(|mut p| {
                        let ids: Vec<u64> = p
                            .iter()
                            .filter(|(_, v)| v.server == index)
                            .map(|(k, _)| *k)
                            .collect();
                        ids.into_iter().filter_map(|id| p.remove(&id)).collect()
                    })
                    .unwrap_or_default();
                for p in lost {
                    let slot = p.slot;
                    drop(p);
                    notifier.done(Done {
                        listener: slot,
                        outcome: Outcome::Error("the fork server exited".into()),
                    });
                }
            })?;
        Ok(())
    }

    /// Forked jobs not yet reported finished.
    pub fn in_flight(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    fn send_to(&self, index: usize, msg: &ToServer, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let process = &self.servers[index];
        if !process.alive.load(Ordering::Relaxed) {
            return Err(io::Error::other("the fork server is not running"));
        }
        wire::send_to_server(process.sock.as_fd(), msg, fd)
    }

    /// Send to every fork server still running (one that died gets no more jobs either); the
    /// first error, if any, or an error when none is running.
    pub(crate) fn broadcast(&self, msg: &ToServer, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let (mut running, mut first_error) = (0, None);
        for (index, p) in self.servers.iter().enumerate() {
            if p.alive.load(Ordering::Relaxed) {
                running += 1;
                if let Err(e) = self.send_to(index, msg, fd) {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None if running == 0 => Err(io::Error::other("no fork server is running")),
            None => Ok(()),
        }
    }

    /// Tell the fork servers a listener's current config (and its datagram socket).
    pub fn send_listener(
        &self,
        slot: usize,
        cfg: &ListenerConfig,
        socket: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        let config = toml::to_string(cfg).map_err(io::Error::other)?;
        self.broadcast(
            &ToServer::Listener {
                slot: slot as u64,
                config,
            },
            socket,
        )
    }

    /// The running fork server with the fewest jobs in flight.
    fn least_loaded(&self) -> io::Result<usize> {
        self.servers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.alive.load(Ordering::Relaxed))
            .min_by_key(|(_, p)| p.load.load(Ordering::Relaxed))
            .map(|(i, _)| i)
            .ok_or_else(|| io::Error::other("no fork server is running"))
    }

    /// Hand one job to a new child; returns its id. On error nothing is in flight.
    pub fn dispatch(&self, slot: usize, job: ForkJob<'_>) -> io::Result<u64> {
        let index = self.least_loaded()?;
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.pending.lock() {
            p.insert(
                id,
                Pending {
                    slot,
                    server: index,
                    hold: None,
                },
            );
        }
        self.servers[index].load.fetch_add(1, Ordering::Relaxed);
        let msg = ToServer::Job {
            job: id,
            slot: slot as u64,
            kind: job.kind,
            peer: job.peer,
            local: job.local,
            data: job.data,
        };
        let sent = self.send_to(index, &msg, job.conn);
        if sent.is_err() {
            let removed = self.pending.lock().ok().and_then(|mut p| p.remove(&id));
            if removed.is_some() {
                self.servers[index].load.fetch_sub(1, Ordering::Relaxed);
            }
        }
        sent.map(|()| id)
    }

    /// Keep `hold` until job `id` ends (dropped at once if it already has).
    pub fn hold(&self, id: u64, hold: Box<dyn Send>) {
        let mut hold = Some(hold);
        if let Ok(mut p) = self.pending.lock() {
            if let Some(entry) = p.get_mut(&id) {
                entry.hold = hold.take();
            }
        }
        drop(hold);
    }

    /// Signal every forked child and the process group it leads.
    pub fn signal_children(&self, sig: Signal) {
        if self.in_flight() > 0 {
            if let Err(e) = self.broadcast(&ToServer::Signal { signo: sig as i32 }, None) {
                log::warn!("cannot ask the fork servers to send {sig}: {e}");
            }
        }
    }

    /// Close the sockets (the fork servers then exit) and wait for them, SIGKILL if they linger.
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::Relaxed);
        for p in &self.servers {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&p.sock),
                nix::sys::socket::Shutdown::Both,
            );
        }
        let deadline = Instant::now() + EXIT_WAIT;
        for p in &self.servers {
            wait_exit(p.pid, deadline);
        }
    }
}

/// Wait for one fork server to exit until `deadline`, then SIGKILL it.
fn wait_exit(pid: Pid, deadline: Instant) {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(WaitStatus::StillAlive) => {
                log::warn!("fork server (pid {pid}) did not exit; killing it");
                let _ = signal::kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return;
            }
            Ok(WaitStatus::Exited(_, 0)) => return,
            Ok(status) => {
                log::warn!("fork server ended: {status:?}");
                return;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// A job in flight and what the daemon keeps for it until it ends (the connection and its
/// tracker entry and admission ticket, for stream jobs).
struct Pending {
    slot: usize,
    /// The fork server it went to.
    server: usize,
    hold: Option<Box<dyn Send>>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("slot", &self.slot)
            .field("server", &self.server)
            .finish()
    }
}

/// One forked job as the slot describes it.
#[derive(Debug)]
pub struct ForkJob<'a> {
    pub kind: JobKind,
    /// The accepted connection (stream jobs).
    pub conn: Option<BorrowedFd<'a>>,
    pub peer: PeerAddr,
    pub local: Option<SocketAddr>,
    /// The datagram (datagram jobs).
    pub data: Vec<u8>,
}

fn outcome(pid: i32, ending: &Ending) -> Outcome {
    match ending {
        Ending::Exited(CHILD_OK) => Outcome::Ok,
        Ending::Exited(CHILD_PANIC) => Outcome::Panic(format!("forked worker pid {pid} panicked")),
        Ending::Exited(code) => {
            Outcome::Error(format!("forked worker pid {pid} exited with status {code}"))
        }
        Ending::Signaled(sig) => {
            let name = Signal::try_from(*sig)
                .map(|s| s.as_str())
                .unwrap_or("unknown");
            log::warn!("forked worker pid {pid} killed by signal {sig} ({name})");
            Outcome::Error(format!("forked worker pid {pid} killed by signal {sig}"))
        }
        Ending::NotStarted(why) => {
            log::error!("forked job not started: {why}");
            Outcome::Error(why.clone())
        }
        Ending::Program => Outcome::Ok,
    }
}
