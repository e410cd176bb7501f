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
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
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
///
/// A fork server that dies is reaped at once by its reader thread, its jobs booked as failed,
/// and a replacement is asked of a surviving fork server (`ToServer::Spawn`): the daemon has
/// threads by then and must not fork, but a fork server is single-threaded and can, making the
/// new one the daemon's child with `CLONE_PARENT`. The replacement gets every listener's
/// current config (and datagram socket) from `configs` before it takes jobs.
#[derive(Debug)]
pub struct ForkServer(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// Indexed by place; a place's process is swapped for its replacement.
    servers: RwLock<Vec<Arc<Process>>>,
    next_job: AtomicU64,
    /// Jobs in flight, so a dead fork server's jobs can still be booked.
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set by `shutdown`: a fork server ending after that is expected, not an error.
    closing: AtomicBool,
    notifier: Notifier,
    /// Every listener's config as last sent, with a copy of its datagram socket: what a
    /// replacement fork server is given. Held while sending, so a replacement never misses
    /// a config sent meanwhile.
    configs: Mutex<HashMap<u64, Sent>>,
    /// Stream listeners the fork servers accept for, by slot: who judges their knocks.
    doors: RwLock<HashMap<u64, Arc<dyn Door>>>,
    /// Fork servers that confirmed closing a listener's socket, by slot (see `close_door`),
    /// and the condition `close_door` waits on (also signalled when a fork server is lost).
    closed: Mutex<HashMap<u64, Vec<Pid>>>,
    closed_cv: Condvar,
}

/// How long `close_door` waits for the fork servers to confirm: a stuck one does not hold
/// the daemon's loop longer (its copy then closes when it handles the message, or dies).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A listener as the fork servers were last told: its config, a copy of the socket that went
/// with it, and (a stream listener they accept for) whether they watch it.
#[derive(Debug)]
struct Sent {
    config: String,
    socket: Option<OwnedFd>,
    watch: bool,
}

/// The daemon's side of a listener the fork servers accept for (`worker::doorway`): the slot
/// implements it with the listener's `Guard`. Called from the fork servers' reader threads.
pub trait Door: Send + Sync + std::fmt::Debug {
    /// A fork server accepted a connection (`conn`: the daemon's copy, `None` if it was lost
    /// on the way): admit it through `answer`, or drop `answer` to refuse it.
    fn knock(&self, peer: PeerAddr, conn: Option<OwnedFd>, answer: Answer);
    /// The daemon could not receive a fork server's message for want of descriptors (a
    /// knock lost): stop the fork servers accepting until there is room again.
    fn out_of_descriptors(&self);
    /// A connection this door admitted ended (its job's exit was reported). Returns whether
    /// the main loop must see its `Done` at once (otherwise it is collected on the loop's
    /// next turn, without a wake-up of its own).
    fn left(&self) -> bool;
}

/// The answer owed to a fork server for one accepted connection: `admit` it as a new job, or
/// drop this to refuse it (the fork server closes it unserved).
pub struct Answer {
    inner: Arc<Inner>,
    process: Arc<Process>,
    index: usize,
    knock: u64,
    slot: usize,
    door: Arc<dyn Door>,
    answered: bool,
    peer: PeerAddr,
    local: Option<SocketAddr>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("knock", &self.knock)
            .field("slot", &self.slot)
            .finish()
    }
}

impl Answer {
    /// Serve the connection in a new child; `hold` is kept until the child's exit is reported
    /// (then `Door::left` is called). False if the fork server could not be told (nothing
    /// is in flight then, and `left` is not called).
    ///
    /// The kernel wakes whichever fork server waits, so connections that come one at a time
    /// would all be served by one of them: when the accepting fork server has clearly more
    /// jobs than the least loaded one (more than one plus an eighth), the connection (the
    /// daemon's copy, `conn`) is handed to that one as in the hand-off path, and the
    /// accepting one closes its copy.
    pub fn admit(mut self, hold: Box<dyn Send>, conn: BorrowedFd<'_>) -> bool {
        self.answered = true;
        let inner = Arc::clone(&self.inner);
        let mine = self.process.load.load(Ordering::Relaxed);
        let to = match inner.least_loaded() {
            Ok((i, p))
                if p.pid != self.process.pid
                    && mine > p.load.load(Ordering::Relaxed) * 9 / 8 + 1 =>
            {
                Some((i, p))
            }
            _ => None,
        };
        let (index, process) = to
            .clone()
            .unwrap_or((self.index, Arc::clone(&self.process)));
        let id = inner.next_job.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = inner.pending.lock() {
            p.insert(
                id,
                Pending {
                    slot: self.slot,
                    server: index,
                    pid: process.pid,
                    hold: Some(hold),
                    door: Some(Arc::clone(&self.door)),
                },
            );
        }
        process.load.fetch_add(1, Ordering::Relaxed);
        let sent = match to {
            None => {
                let msg = ToServer::Verdict {
                    knock: self.knock,
                    job: Some(id),
                };
                send_to(&process, &msg, None)
            }
            Some(_) => {
                let msg = ToServer::Job {
                    job: id,
                    slot: self.slot as u64,
                    kind: JobKind::Stream,
                    peer: self.peer.clone(),
                    local: self.local,
                    data: Vec::new(),
                };
                let sent = send_to(&process, &msg, Some(conn));
                // The accepting fork server closes its copy either way.
                let close = ToServer::Verdict {
                    knock: self.knock,
                    job: None,
                };
                let _ = send_to(&self.process, &close, None);
                sent
            }
        };
        if sent.is_ok() {
            return true;
        }
        // Booked as failed already if the fork server's loss was seen meanwhile (with `left`).
        let removed = inner.pending.lock().ok().and_then(|mut p| p.remove(&id));
        match removed {
            Some(p) => {
                process.load.fetch_sub(1, Ordering::Relaxed);
                drop(p);
                false
            }
            None => true,
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if !self.answered {
            let msg = ToServer::Verdict {
                knock: self.knock,
                job: None,
            };
            let _ = send_to(&self.process, &msg, None);
        }
    }
}

/// One fork server process.
#[derive(Debug)]
struct Process {
    sock: OwnedFd,
    pid: Pid,
    alive: AtomicBool,
    /// Jobs in flight in this process.
    load: AtomicUsize,
    /// When it was forked, and whether as a replacement: a replacement that dies young is not
    /// replaced again (no crash loop of forks).
    born: Instant,
    replacement: bool,
}

/// A replacement fork server that dies sooner than this after its start is not replaced:
/// whatever killed it would likely kill the next one too, and a loop of forks helps nobody.
const MIN_LIFE: Duration = Duration::from_secs(1);

impl Process {
    fn new(sock: OwnedFd, pid: Pid, replacement: bool) -> io::Result<Arc<Process>> {
        setsockopt(
            &sock,
            sockopt::SendTimeout,
            &TimeVal::new(SEND_TIMEOUT.as_secs() as _, 0),
        )?;
        Ok(Arc::new(Process {
            sock,
            pid,
            alive: AtomicBool::new(true),
            load: AtomicUsize::new(0),
            born: Instant::now(),
            replacement,
        }))
    }
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
fn fork_one(registry: &Registry, parent: Option<Pid>) -> io::Result<Arc<Process>> {
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
            Process::new(ours, child, false)
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
            // Ones already started see their socket close when `servers` drops, and exit.
            servers.push(fork_one(registry, Some(parent))?);
        }
        let server = ForkServer::with(servers, notifier)?;
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
        let server = ForkServer::with(vec![process], notifier)?;
        log::debug!("fork server started, pid {:?}", server.pids());
        Ok(server)
    }

    /// Start reading the reports of fork servers just forked.
    fn with(servers: Vec<Arc<Process>>, notifier: Notifier) -> io::Result<ForkServer> {
        let n = servers.len();
        let inner = Arc::new(Inner {
            servers: RwLock::new(servers),
            next_job: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            notifier,
            configs: Mutex::new(HashMap::new()),
            doors: RwLock::new(HashMap::new()),
            closed: Mutex::new(HashMap::new()),
            closed_cv: Condvar::new(),
        });
        for index in 0..n {
            Inner::spawn_reader(&inner, index)?;
        }
        Ok(ForkServer(inner))
    }

    /// The fork servers' pids, for status and tests.
    pub fn pids(&self) -> Vec<i32> {
        self.0.servers().iter().map(|p| p.pid.as_raw()).collect()
    }

    /// Forked jobs not yet reported finished.
    pub fn in_flight(&self) -> usize {
        self.0.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Send to every fork server still running (one that died gets no more jobs either); the
    /// first error, if any, or an error when none is running.
    pub(crate) fn broadcast(&self, msg: &ToServer, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if let ToServer::Forget { slot } = msg {
            // Under the lock, so a replacement being set up is not given it afterwards.
            let mut configs = self.0.configs.lock().unwrap_or_else(|e| e.into_inner());
            configs.remove(slot);
            return self.0.broadcast(msg, fd);
        }
        self.0.broadcast(msg, fd)
    }

    /// Tell the fork servers a listener's current config (and its datagram socket).
    pub fn send_listener(
        &self,
        slot: usize,
        cfg: &ListenerConfig,
        socket: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        let config = toml::to_string(cfg).map_err(io::Error::other)?;
        let kept = socket.map(|s| s.try_clone_to_owned()).transpose()?;
        let mut configs = self.0.configs.lock().unwrap_or_else(|e| e.into_inner());
        let msg = ToServer::Listener {
            slot: slot as u64,
            config,
        };
        let sent = self.0.broadcast(&msg, socket);
        let ToServer::Listener { config, .. } = msg else {
            unreachable!("built just above")
        };
        let watch = configs.get(&(slot as u64)).is_some_and(|s| s.watch) && kept.is_some();
        configs.insert(
            slot as u64,
            Sent {
                config,
                socket: kept,
                watch,
            },
        );
        sent
    }

    /// The fork servers accept for stream listener `slot` (its socket went with its config),
    /// judged by `door`.
    pub fn open_door(&self, slot: usize, door: Arc<dyn Door>) {
        let mut doors = self.0.doors.write().unwrap_or_else(|e| e.into_inner());
        doors.insert(slot as u64, door);
    }

    /// Tell the fork servers to watch listener `slot`'s socket or not.
    pub fn watch(&self, slot: usize, on: bool) {
        let mut configs = self.0.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = configs.get_mut(&(slot as u64)) {
            s.watch = on;
        }
        let msg = ToServer::Watch {
            slot: slot as u64,
            on,
        };
        if let Err(e) = self.0.broadcast(&msg, None) {
            log::error!("cannot tell the fork servers to watch a listener or not: {e}");
        }
    }

    /// The fork servers stop accepting for listener `slot` and close their copies of its
    /// socket (so is the daemon's kept copy); knocks still on the way are refused. Returns
    /// once every running fork server confirmed (or after `CLOSE_WAIT`), so the caller may
    /// take the socket as closed everywhere but in the daemon.
    pub fn close_door(&self, slot: usize) {
        let slot = slot as u64;
        let inner = &self.0;
        let door = {
            let mut doors = inner.doors.write().unwrap_or_else(|e| e.into_inner());
            doors.remove(&slot)
        };
        inner.closed().insert(slot, Vec::new());
        let mut configs = inner.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = configs.get_mut(&slot) {
            s.watch = false;
            s.socket = None;
        }
        let _ = inner.broadcast(&ToServer::Unlisten { slot }, None);
        drop(configs);
        drop(door);
        let deadline = Instant::now() + CLOSE_WAIT;
        let mut closed = inner.closed();
        loop {
            let confirmed = closed.get(&slot).cloned().unwrap_or_default();
            let pending = inner
                .servers()
                .iter()
                .filter(|p| p.alive.load(Ordering::Relaxed) && !confirmed.contains(&p.pid))
                .count();
            let now = Instant::now();
            if pending == 0 || now >= deadline {
                if pending > 0 {
                    log::warn!(
                        "{pending} fork servers did not confirm closing a listener's socket \
                         within {CLOSE_WAIT:?}"
                    );
                }
                break;
            }
            closed = inner
                .closed_cv
                .wait_timeout(closed, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        closed.remove(&slot);
    }

    /// Hand one job to a new child; returns its id. On error nothing is in flight.
    pub fn dispatch(&self, slot: usize, job: ForkJob<'_>) -> io::Result<u64> {
        let inner = &self.0;
        let (index, process) = inner.least_loaded()?;
        let id = inner.next_job.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = inner.pending.lock() {
            p.insert(
                id,
                Pending {
                    slot,
                    server: index,
                    pid: process.pid,
                    hold: None,
                    door: None,
                },
            );
        }
        process.load.fetch_add(1, Ordering::Relaxed);
        let msg = ToServer::Job {
            job: id,
            slot: slot as u64,
            kind: job.kind,
            peer: job.peer,
            local: job.local,
            data: job.data,
        };
        let sent = send_to(&process, &msg, job.conn);
        if sent.is_err() {
            let removed = inner.pending.lock().ok().and_then(|mut p| p.remove(&id));
            if removed.is_some() {
                process.load.fetch_sub(1, Ordering::Relaxed);
            }
        }
        sent.map(|()| id)
    }

    /// Keep `hold` until job `id` ends (dropped at once if it already has).
    pub fn hold(&self, id: u64, hold: Box<dyn Send>) {
        let mut hold = Some(hold);
        if let Ok(mut p) = self.0.pending.lock() {
            if let Some(entry) = p.get_mut(&id) {
                entry.hold = hold.take();
            }
        }
        drop(hold);
    }

    /// Signal every forked child and the process group it leads.
    pub fn signal_children(&self, sig: Signal) {
        if self.in_flight() > 0 {
            if let Err(e) = self
                .0
                .broadcast(&ToServer::Signal { signo: sig as i32 }, None)
            {
                log::warn!("cannot ask the fork servers to send {sig}: {e}");
            }
        }
    }

    /// Close the sockets (the fork servers then exit) and wait for them, SIGKILL if they linger.
    pub fn shutdown(&self) {
        self.0.closing.store(true, Ordering::Relaxed);
        let servers = self.0.servers();
        for p in &servers {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&p.sock),
                nix::sys::socket::Shutdown::Both,
            );
        }
        let deadline = Instant::now() + EXIT_WAIT;
        for p in &servers {
            wait_exit(p.pid, deadline);
        }
    }
}

fn send_to(process: &Process, msg: &ToServer, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    if !process.alive.load(Ordering::Relaxed) {
        return Err(io::Error::other("the fork server is not running"));
    }
    wire::send_to_server(process.sock.as_fd(), msg, fd)
}

impl Inner {
    fn closed(&self) -> MutexGuard<'_, HashMap<u64, Vec<Pid>>> {
        self.closed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the places' processes.
    fn servers(&self) -> Vec<Arc<Process>> {
        self.servers
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn broadcast(&self, msg: &ToServer, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let (mut running, mut first_error) = (0, None);
        for p in self.servers() {
            if p.alive.load(Ordering::Relaxed) {
                running += 1;
                if let Err(e) = send_to(&p, msg, fd) {
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

    /// The running fork server with the fewest jobs in flight, and its place.
    fn least_loaded(&self) -> io::Result<(usize, Arc<Process>)> {
        self.servers()
            .into_iter()
            .enumerate()
            .filter(|(_, p)| p.alive.load(Ordering::Relaxed))
            .min_by_key(|(_, p)| p.load.load(Ordering::Relaxed))
            .ok_or_else(|| io::Error::other("no fork server is running"))
    }

    /// Read the reports of the fork server at place `index` until it is gone; then reap it,
    /// book its jobs as failed, and ask a survivor for a replacement.
    fn spawn_reader(inner: &Arc<Inner>, index: usize) -> io::Result<()> {
        let process = inner
            .servers()
            .get(index)
            .cloned()
            .ok_or_else(|| io::Error::other("no such fork server"))?;
        let sock = process.sock.try_clone()?;
        let inner = Arc::clone(inner);
        std::thread::Builder::new()
            .name("socketd:forkserver".into())
            .spawn(move || {
                let mut starved = false;
                loop {
                    let received = wire::recv_in_main(sock.as_fd());
                    if starved && received.is_ok() {
                        starved = false;
                    }
                    match received {
                        Ok(Some((
                            FromServer::Done {
                                job,
                                slot,
                                pid,
                                ending,
                            },
                            _,
                        ))) => {
                            // Dropping the entry releases what the slot held for the job.
                            let known = inner.pending.lock().ok().and_then(|mut p| p.remove(&job));
                            if let Some(mut known) = known {
                                let door = known.door.take();
                                drop(known);
                                process.load.fetch_sub(1, Ordering::Relaxed);
                                let urgent = door.is_none_or(|d| d.left());
                                let done = Done {
                                    listener: slot as usize,
                                    outcome: outcome(pid, &ending),
                                };
                                if urgent {
                                    inner.notifier.done(done);
                                } else {
                                    inner.notifier.done_quiet(done);
                                }
                            }
                        }
                        Ok(Some((FromServer::Unlistened { slot }, _))) => {
                            if let Some(pids) = inner.closed().get_mut(&slot) {
                                pids.push(process.pid);
                            }
                            inner.closed_cv.notify_all();
                        }
                        Ok(Some((FromServer::Spawned { index, started }, fd))) => {
                            Inner::install(&inner, index as usize, started, fd);
                        }
                        Ok(Some((
                            FromServer::Knock {
                                knock,
                                slot,
                                peer,
                                local,
                            },
                            fd,
                        ))) => {
                            let door = inner.doors.read().ok().and_then(|d| d.get(&slot).cloned());
                            match door {
                                Some(door) => {
                                    let answer = Answer {
                                        inner: Arc::clone(&inner),
                                        process: Arc::clone(&process),
                                        index,
                                        knock,
                                        slot: slot as usize,
                                        door: Arc::clone(&door),
                                        answered: false,
                                        peer: peer.clone(),
                                        local,
                                    };
                                    door.knock(peer, fd, answer);
                                }
                                None => {
                                    // The listener closed meanwhile: close the connection,
                                    // as a close would reset one left in the backlog.
                                    let msg = ToServer::Verdict { knock, job: None };
                                    let _ = send_to(&process, &msg, None);
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) if out_of_room(&e) => {
                            // The daemon is out of descriptors (or memory) for what a message
                            // carried: that message is lost (a fork server closes a knocked
                            // connection that gets no answer, see `doorway`), the fork server
                            // is not. Wait a little, as an accept loop would.
                            if !starved {
                                log::error!(
                                    "fork server (pid {}): a message could not be received: \
                                     {e}; retrying",
                                    process.pid
                                );
                            }
                            starved = true;
                            let doors: Vec<Arc<dyn Door>> = inner
                                .doors
                                .read()
                                .map(|d| d.values().cloned().collect())
                                .unwrap_or_default();
                            for door in doors {
                                door.out_of_descriptors();
                            }
                            std::thread::sleep(crate::listener::FD_RETRY / 20);
                            continue;
                        }
                        Err(e) => {
                            log::error!("fork server: {e}");
                            break;
                        }
                    }
                }
                inner.lost(index, &process);
            })?;
        Ok(())
    }

    /// The fork server at `index` is gone: book its jobs, reap it, and unless the daemon is
    /// stopping, ask a surviving fork server for a replacement.
    fn lost(self: &Arc<Inner>, index: usize, process: &Process) {
        process.alive.store(false, Ordering::Relaxed);
        // A `close_door` waiting for this one's confirmation need not wait any more.
        drop(self.closed());
        self.closed_cv.notify_all();
        let pid = process.pid;
        let closing = self.closing.load(Ordering::Relaxed);
        if !closing {
            log::error!(
                "fork server (pid {pid}) is gone; its jobs are booked as failed and the other \
                 fork servers take the new ones"
            );
        }
        let lost: Vec<Pending> = self
            .pending
            .lock()
            .map(|mut p| {
                let ids: Vec<u64> = p
                    .iter()
                    .filter(|(_, v)| v.server == index && v.pid == pid)
                    .map(|(k, _)| *k)
                    .collect();
                ids.into_iter().filter_map(|id| p.remove(&id)).collect()
            })
            .unwrap_or_default();
        for mut p in lost {
            let slot = p.slot;
            let door = p.door.take();
            drop(p);
            if let Some(door) = door {
                door.left(); // this `Done` wakes the main loop anyway
            }
            self.notifier.done(Done {
                listener: slot,
                outcome: Outcome::Error("the fork server exited".into()),
            });
        }
        if closing {
            return; // `shutdown` reaps it.
        }
        // Its socket closed, so it is exiting (or dead): reap it now, not at stop.
        match reap(pid, Instant::now() + EXIT_WAIT) {
            Some(how) => log::warn!("fork server (pid {pid}) reaped: {how}"),
            None => log::warn!("fork server (pid {pid}) was already reaped"),
        }
        if process.replacement && process.born.elapsed() < MIN_LIFE {
            log::error!(
                "fork server (pid {pid}), itself a replacement, died within {MIN_LIFE:?} of its \
                 start; not replacing it again"
            );
            return;
        }
        let survivor = self
            .servers()
            .into_iter()
            .find(|p| p.alive.load(Ordering::Relaxed));
        let asked = match &survivor {
            Some(s) => send_to(
                s,
                &ToServer::Spawn {
                    index: index as u64,
                },
                None,
            ),
            None => Err(io::Error::other("no fork server is left to fork one")),
        };
        if let Err(e) = asked {
            log::error!("fork server (pid {pid}) cannot be replaced: {e}");
        }
    }

    /// A survivor's answer to `Spawn`: give the new fork server every listener's config, put
    /// it in place `index`, and start reading its reports.
    fn install(
        inner: &Arc<Inner>,
        index: usize,
        started: Result<i32, String>,
        fd: Option<OwnedFd>,
    ) {
        let (pid, sock) = match (started, fd) {
            (Ok(pid), Some(fd)) => (Pid::from_raw(pid), fd),
            (Ok(pid), None) => {
                log::error!("new fork server (pid {pid}) came without its socket");
                return;
            }
            (Err(e), _) => {
                log::error!("a fork server could not be replaced: {e}");
                return;
            }
        };
        let process = match Process::new(sock, pid, true) {
            Ok(p) => p,
            Err(e) => {
                log::error!("new fork server (pid {pid}): {e}");
                let _ = signal::kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return;
            }
        };
        let configs = inner.configs.lock().unwrap_or_else(|e| e.into_inner());
        for (slot, sent) in configs.iter() {
            let msg = ToServer::Listener {
                slot: *slot,
                config: sent.config.clone(),
            };
            if let Err(e) = send_to(&process, &msg, sent.socket.as_ref().map(|s| s.as_fd())) {
                log::error!("new fork server (pid {pid}): cannot send slot {slot}'s config: {e}");
            }
            if sent.watch {
                let msg = ToServer::Watch {
                    slot: *slot,
                    on: true,
                };
                if let Err(e) = send_to(&process, &msg, None) {
                    log::error!("new fork server (pid {pid}): cannot watch slot {slot}: {e}");
                }
            }
        }
        let old = {
            let mut servers = inner.servers.write().unwrap_or_else(|e| e.into_inner());
            match servers.get_mut(index) {
                Some(place) => Some(std::mem::replace(place, process)),
                None => None,
            }
        };
        drop(configs);
        let Some(old) = old else {
            log::error!("new fork server (pid {pid}): no place {index}");
            return;
        };
        log::warn!("fork server (pid {}) replaced by pid {pid}", old.pid);
        if let Err(e) = Inner::spawn_reader(inner, index) {
            log::error!("new fork server (pid {pid}): cannot read its reports: {e}");
        }
        // A stop that began meanwhile did not see this one: close it too.
        if inner.closing.load(Ordering::Relaxed) {
            if let Some(p) = inner.servers().get(index) {
                let _ = nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(&p.sock),
                    nix::sys::socket::Shutdown::Both,
                );
            }
        }
    }
}

/// A receive that failed for want of descriptors or memory in the daemon, not because the
/// fork server's socket broke.
fn out_of_room(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOBUFS | libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

/// Wait for a fork server whose socket closed until `deadline`, then SIGKILL it; how it ended,
/// or `None` if it was not (or no longer) our child.
fn reap(pid: Pid, deadline: Instant) -> Option<String> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(WaitStatus::StillAlive) => {
                let _ = signal::kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Some("did not exit; killed".into());
            }
            Ok(WaitStatus::Exited(_, code)) => return Some(format!("exited with status {code}")),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Some(format!("killed by {sig}")),
            Ok(other) => return Some(format!("{other:?}")),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
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
    /// The fork server it went to: its place and pid.
    server: usize,
    pid: Pid,
    hold: Option<Box<dyn Send>>,
    /// A connection a fork server accepted: its door hears when it ends.
    door: Option<Arc<dyn Door>>,
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
