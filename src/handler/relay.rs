//! The blocking `proxy`'s byte relay (threaded and forked workers): the worker's thread hands
//! the client and upstream sockets to one of its process's relay threads, mio loops that copy
//! both ways for many proxied connections at once, and sleeps until its connection is done.
//! The first relay thread takes every connection while it keeps up; another starts (up to one
//! per core) only when all are saturated (`submit`).
//!
//! Why not copy on the worker's own thread (and a helper thread for the other direction):
//! each message then costs a sleep and a wake-up of a thread per direction, and a keep-alive
//! HTTP request two of each; the relay thread serves whatever is ready on every wake-up, as an
//! event loop does, and the worker is woken once, at the end. The worker keeps its place
//! (`max_workers` counts it), the connection stays in the daemon's tracker, and everything
//! that ends a connection still does: a stop's deadline or `max_duration` shuts the client
//! socket down both ways, which the relay sees as a hang-up and then cuts the upstream even if
//! it stays silent; `idle_timeout` (the client socket's receive timeout, set at admission) is
//! no byte either way for that long.
//!
//! Each EOF becomes a half-close of the other side; the relay ends when both directions are
//! shut, on the first error either way (both sockets are then shut down), on the client's
//! hang-up, or at the idle time. One bounded buffer per direction: a side whose peer cannot
//! take more is not read.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::conn::Conn;

/// Bytes buffered per direction.
const CHUNK: usize = 64 * 1024;
const WAKE: Token = Token(usize::MAX);

/// Relay `client` <-> `up` until both directions have finished (see the module doc); blocks
/// the calling thread meanwhile.
pub fn relay(client: Conn, up: Conn) -> io::Result<()> {
    use nix::sys::socket::{getsockopt, sockopt::ReceiveTimeout};
    let idle = getsockopt(&client, ReceiveTimeout)
        .ok()
        .map(|t| {
            Duration::from_secs(t.tv_sec().max(0) as u64)
                + Duration::from_micros(t.tv_usec().max(0) as u64)
        })
        .filter(|d| !d.is_zero());
    // Non-blocking on the file description the worker's handle shares: the caller sets it
    // back before it uses its handle again.
    client.set_nonblocking(true)?;
    up.set_nonblocking(true)?;
    let (done, result) = sync_channel(1);
    submit(Job {
        client,
        up,
        idle,
        done,
    })?;
    result
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("proxy relay thread ended")))
}

struct Job {
    client: Conn,
    up: Conn,
    idle: Option<Duration>,
    done: SyncSender<io::Result<()>>,
}

/// A relay thread, as callers reach it.
struct Handle {
    tx: Sender<Job>,
    waker: Arc<Waker>,
    load: Arc<Load>,
}

/// How busy a relay thread was (share of its time not waiting in `poll`) over its last
/// `LOAD_WINDOW`, and when that window ended.
#[derive(Default)]
struct Load {
    /// Milliseconds since `epoch()` at the window's end, and the busy share in per mille.
    at_ms: AtomicU64,
    permille: AtomicU64,
}

/// The window over which a relay thread measures how busy it is.
const LOAD_WINDOW: Duration = Duration::from_millis(100);
/// A relay thread busier than this takes no new connection while another can be used.
const SATURATED_PERMILLE: u64 = 900;

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Load {
    fn saturated(&self, now_ms: u64) -> bool {
        // A thread asleep in `poll` reports nothing: an old measure means idle since.
        let recent = now_ms.saturating_sub(self.at_ms.load(Ordering::Relaxed))
            <= 3 * LOAD_WINDOW.as_millis() as u64;
        recent && self.permille.load(Ordering::Relaxed) >= SATURATED_PERMILLE
    }
}

/// Hand a job to one of this process's relay threads: the first that is not saturated, a new
/// one (up to one per core) when all are, else the first. One thread serves every connection
/// it keeps up with, so a light load wakes one thread, not one per core. The threads are
/// recorded with the pid that started them: a forked child inherits the record but not the
/// threads, and starts its own; a thread that ended (a panic) is replaced.
fn submit(job: Job) -> io::Result<()> {
    static RELAYS: Mutex<Option<(u32, Vec<Handle>)>> = Mutex::new(None);
    let mut g = RELAYS.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    if g.as_ref().is_none_or(|(p, _)| *p != pid) {
        *g = Some((pid, Vec::new()));
    }
    let Some((_, relays)) = g.as_mut() else {
        return Err(io::Error::other("no proxy relay thread"));
    };
    let now_ms = epoch().elapsed().as_millis() as u64;
    let max = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut pick = relays.iter().position(|h| !h.load.saturated(now_ms));
    if pick.is_none() && relays.len() < max {
        relays.push(spawn()?);
        pick = Some(relays.len() - 1);
    }
    let i = pick.unwrap_or(0);
    let job = match relays.get(i).map(|h| h.tx.send(job)) {
        Some(Ok(())) => return relays[i].waker.wake(),
        Some(Err(std::sync::mpsc::SendError(j))) => j,
        None => return Err(io::Error::other("no proxy relay thread")),
    };
    // That thread is gone (a panic): a fresh one takes its place.
    relays[i] = spawn()?;
    relays[i]
        .tx
        .send(job)
        .map_err(|_| io::Error::other("cannot start a proxy relay thread"))?;
    relays[i].waker.wake()
}

fn spawn() -> io::Result<Handle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
    let (tx, rx) = channel();
    let load = Arc::new(Load::default());
    let mine = Arc::clone(&load);
    std::thread::Builder::new()
        .name("socketd:relay".into())
        .spawn(move || Reactor::new(poll, rx, mine).run())?;
    Ok(Handle { tx, waker, load })
}

/// One direction: what was read and not yet written; readiness remembered (edge-triggered)
/// until a call meets `EAGAIN`.
struct Dir {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    readable: bool,
    writable: bool,
    /// The source's end (or an error) was seen in an event: read on to it after short reads.
    closing: bool,
    eof: bool,
    shut: bool,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            buf: vec![0u8; CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
            readable: true,
            writable: true,
            closing: false,
            eof: false,
            shut: false,
        }
    }

    /// Move what can move now from `from` to `to`. Returns whether any byte moved.
    fn pump(&mut self, from: RawFd, to: &Conn) -> io::Result<bool> {
        use nix::errno::Errno;
        use nix::sys::socket::{recv, send, MsgFlags};
        let mut moved = false;
        loop {
            while self.start < self.end {
                if !self.writable {
                    return Ok(moved);
                }
                match send(
                    to.as_raw_fd(),
                    &self.buf[self.start..self.end],
                    MsgFlags::MSG_NOSIGNAL,
                ) {
                    Ok(n) => {
                        // A short write: the socket buffer is full; its edge says when not.
                        self.writable = self.start + n == self.end;
                        self.start += n;
                        moved = true;
                    }
                    Err(Errno::EAGAIN) => self.writable = false,
                    Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if self.eof {
                if !self.shut {
                    let _ = to.shutdown(Shutdown::Write);
                    self.shut = true;
                }
                return Ok(moved);
            }
            if !self.readable {
                return Ok(moved);
            }
            match recv(from, &mut self.buf, MsgFlags::empty()) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    // A short read took all there was: the next arrival raises a new edge
                    // (Linux signals every arrival), so no read just to meet EAGAIN; but an
                    // end that came with this edge raises none, so read on to it.
                    self.readable = n == self.buf.len() || self.closing;
                    (self.start, self.end) = (0, n);
                    moved = true;
                }
                Err(Errno::EAGAIN) => self.readable = false,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

struct Relay {
    client: Conn,
    up: Conn,
    to_up: Dir,
    to_client: Dir,
    idle: Option<Duration>,
    last: Instant,
    done: SyncSender<io::Result<()>>,
}

struct Reactor {
    poll: Poll,
    rx: Receiver<Job>,
    load: Arc<Load>,
    slab: Vec<Option<Relay>>,
    free: Vec<usize>,
    /// When to look for relays past their idle time, while any has one.
    sweep: Option<Instant>,
}

impl Reactor {
    fn new(poll: Poll, rx: Receiver<Job>, load: Arc<Load>) -> Reactor {
        Reactor {
            poll,
            rx,
            load,
            slab: Vec::new(),
            free: Vec::new(),
            sweep: None,
        }
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut window = Instant::now();
        let mut waited = Duration::ZERO;
        loop {
            let before = Instant::now();
            let timeout = self.sweep.map(|t| t.saturating_duration_since(before));
            let polled = self.poll.poll(&mut events, timeout);
            let now = Instant::now();
            waited += now - before;
            if now - window >= LOAD_WINDOW {
                let busy = 1.0 - waited.as_secs_f64() / (now - window).as_secs_f64();
                self.load
                    .permille
                    .store((busy.max(0.0) * 1000.0) as u64, Ordering::Relaxed);
                self.load.at_ms.store(
                    now.saturating_duration_since(epoch()).as_millis() as u64,
                    Ordering::Relaxed,
                );
                (window, waited) = (now, Duration::ZERO);
            }
            if let Err(e) = polled {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("proxy relay thread: poll failed: {e}");
                    self.fail_all(&e);
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKE {
                    continue;
                }
                let (idx, side) = (ev.token().0 / 2, ev.token().0 % 2);
                let Some(Some(r)) = self.slab.get_mut(idx) else {
                    continue;
                };
                let err = ev.is_error();
                let rd = ev.is_readable() || ev.is_read_closed() || err;
                let wr = ev.is_writable() || ev.is_write_closed() || err;
                let (src, dst) = if side == 0 {
                    (&mut r.to_up, &mut r.to_client)
                } else {
                    (&mut r.to_client, &mut r.to_up)
                };
                src.readable |= rd;
                src.closing |= ev.is_read_closed() || err;
                dst.writable |= wr;
                let hung_up = side == 0 && ev.is_read_closed() && ev.is_write_closed();
                self.drive(idx, hung_up || (side == 0 && err));
            }
            while let Ok(job) = self.rx.try_recv() {
                self.start(job);
            }
            if self.sweep.is_some_and(|t| t <= Instant::now()) {
                self.sweep_idle();
            }
        }
    }

    fn start(&mut self, job: Job) {
        let Job {
            client,
            up,
            idle,
            done,
        } = job;
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(None);
                self.slab.len() - 1
            }
        };
        let both = Interest::READABLE | Interest::WRITABLE;
        let reg = self.poll.registry();
        let ok = reg
            .register(&mut SourceFd(&client.as_raw_fd()), Token(idx * 2), both)
            .and_then(|()| reg.register(&mut SourceFd(&up.as_raw_fd()), Token(idx * 2 + 1), both));
        if let Err(e) = ok {
            let _ = reg.deregister(&mut SourceFd(&client.as_raw_fd()));
            self.free.push(idx);
            let _ = done.send(Err(e));
            return;
        }
        let now = Instant::now();
        if let Some(i) = idle {
            let t = now + (i / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            self.sweep = Some(self.sweep.map_or(t, |s| s.min(t)));
        }
        self.slab[idx] = Some(Relay {
            client,
            up,
            to_up: Dir::new(),
            to_client: Dir::new(),
            idle,
            last: now,
            done,
        });
        // Bytes may have come before the registration: the edge is not seen again.
        self.drive(idx, false);
    }

    /// Move what can move for relay `idx`; finish it when both directions are shut, on an
    /// error, or when the client hung up for good.
    fn drive(&mut self, idx: usize, client_gone: bool) {
        let Some(Some(r)) = self.slab.get_mut(idx) else {
            return;
        };
        let moved = r
            .to_up
            .pump(r.client.as_raw_fd(), &r.up)
            .and_then(|a| Ok(a | r.to_client.pump(r.up.as_raw_fd(), &r.client)?));
        let end = match moved {
            Ok(moved) => {
                if moved && r.idle.is_some() {
                    r.last = Instant::now();
                }
                if r.to_up.shut && r.to_client.shut {
                    Some(Ok(()))
                } else if client_gone {
                    // Nothing more can reach the client: cut the upstream rather than wait.
                    let _ = r.up.shutdown(Shutdown::Both);
                    Some(Ok(()))
                } else {
                    None
                }
            }
            Err(e) => {
                let _ = r.up.shutdown(Shutdown::Both);
                let _ = r.client.shutdown(Shutdown::Both);
                Some(Err(e))
            }
        };
        if let Some(result) = end {
            self.finish(idx, result);
        }
    }

    fn finish(&mut self, idx: usize, result: io::Result<()>) {
        let Some(r) = self.slab.get_mut(idx).and_then(Option::take) else {
            return;
        };
        // The worker holds another descriptor on the client socket: deregister, or the
        // registration would outlive our close.
        let reg = self.poll.registry();
        let _ = reg.deregister(&mut SourceFd(&r.client.as_raw_fd()));
        let _ = reg.deregister(&mut SourceFd(&r.up.as_raw_fd()));
        self.free.push(idx);
        let _ = r.done.send(result);
    }

    fn sweep_idle(&mut self) {
        let now = Instant::now();
        let mut tick: Option<Duration> = None;
        let mut expired = Vec::new();
        for (i, r) in self.slab.iter().enumerate() {
            if let Some(Relay {
                idle: Some(idle),
                last,
                ..
            }) = r
            {
                if now.duration_since(*last) >= *idle {
                    expired.push(i);
                }
                tick = Some(tick.map_or(*idle, |t| t.min(*idle)));
            }
        }
        for i in expired {
            if let Some(Some(r)) = self.slab.get(i) {
                let _ = r.up.shutdown(Shutdown::Both);
                let _ = r.client.shutdown(Shutdown::Both);
            }
            self.finish(
                i,
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no data either way for idle_timeout",
                )),
            );
        }
        self.sweep =
            tick.map(|t| now + (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    }

    fn fail_all(&mut self, e: &io::Error) {
        for i in 0..self.slab.len() {
            self.finish(i, Err(io::Error::new(e.kind(), e.to_string())));
        }
    }
}
