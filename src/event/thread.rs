//! One event-loop thread: a mio `Poll`, a slab of connections (token = index * 2 + side, side 1
//! being a proxy's upstream), a timer heap for proxy connect deadlines, and the UDP proxy's
//! associations. It never blocks on a peer, and reports `Done` for every connection it closes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};

use super::proxy::{Assoc, Relay, Wake};
use super::stream::{self, EvStream, Machine, Pending, Step};
use super::{Handoff, Msg, Service};

mod timers;
mod udp;
use crate::conn::PeerAddr;
use crate::worker::{Done, Notifier, Outcome, Tracker};

const WAKE: Token = Token(usize::MAX);
/// Shared read buffer: the most any machine reads per call.
const SCRATCH: usize = 64 * 1024;
/// The window over which a loop measures how busy it is (see `LoopAccept::load`).
const LOAD_WINDOW: Duration = Duration::from_millis(100);
/// How often idle UDP associations are looked for while any exist.
const SWEEP: Duration = Duration::from_secs(1);

/// What a loop knows about the listener it serves.
pub(super) struct LoopContext {
    /// Set when this loop accepts for itself: the listener's shared state and our index.
    pub accept: Option<(Arc<super::accept::LoopAccept>, usize)>,
    pub listener: usize,
    pub name: String,
    pub notifier: Notifier,
    pub tracker: Arc<Tracker>,
    pub live: Arc<AtomicUsize>,
    /// True while the loop may be blocked in `poll` (see `LoopHandle::send`).
    pub sleeping: Arc<std::sync::atomic::AtomicBool>,
}

struct Conn {
    client: EvStream,
    machine: Machine,
    conn_id: u64,
    peer: PeerAddr,
    started: Instant,
    /// `idle_timeout`, and when the connection last had an event.
    idle: Option<Duration>,
    last: Instant,
    _ticket: crate::protect::Ticket,
    tls: Option<std::sync::Arc<crate::tls::TlsInfo>>,
}

enum Entry {
    Conn(Box<Conn>),
    Assoc(Box<Assoc>),
}

/// Start a loop thread; returns the waker the main loop uses after sending it a message, and
/// a duplicate of the loop's epoll descriptor (for `accept::Gate` to add the listener to).
pub(super) fn spawn(
    name: String,
    rx: Receiver<Msg>,
    ctx: LoopContext,
) -> io::Result<(Arc<Waker>, std::os::fd::OwnedFd)> {
    let poll = Poll::new()?;
    use std::os::fd::AsRawFd;
    // SAFETY: the poll's descriptor is open while `poll` lives (this whole function).
    let epoll =
        unsafe { std::os::fd::BorrowedFd::borrow_raw(poll.as_raw_fd()) }.try_clone_to_owned()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
    // The loop keeps its own handle on the waker: if the last one went with the main loop's
    // `LoopHandle` (a retire drops it right after sending), the eventfd would close and take
    // a wake-up still in the ready list with it, leaving the loop asleep for good.
    let own_waker = Arc::clone(&waker);
    std::thread::Builder::new().name(name).spawn(move || {
        let _waker = own_waker;
        // A loop runs in the daemon and never forks: its access lines need no pid check.
        crate::access_log::mark_daemon_thread();
        let mut l = Loop {
            poll,
            rx,
            ctx,
            slab: Vec::new(),
            free: Vec::new(),
            timers: BinaryHeap::new(),
            assocs: HashMap::new(),
            scratch: vec![0; SCRATCH],
            pattern: crate::handler::chargen::pattern(),
            retiring: false,
            idle_sweep: None,
            accepted: Vec::new(),
            accept_retry: None,
        };
        // A bug in a state machine must not leak the listener's places: report every
        // connection this loop held as ended, so busy counts and limits come back.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.run())).is_err() {
            l.abandon_all();
        }
    })?;
    Ok((waker, epoll))
}

struct Loop {
    poll: Poll,
    rx: Receiver<Msg>,
    ctx: LoopContext,
    slab: Vec<Option<Entry>>,
    free: Vec<usize>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    assocs: HashMap<std::net::SocketAddr, usize>,
    scratch: Vec<u8>,
    pattern: Vec<u8>,
    retiring: bool,
    /// When to look for connections past their `idle_timeout`, while any have one.
    idle_sweep: Option<Instant>,
    /// Connections this loop just accepted (reused buffer).
    accepted: Vec<super::Handoff>,
    /// Out of descriptors: when to try accepting again.
    accept_retry: Option<Instant>,
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        // Busy share over windows, for the accepting spread (see `LoopAccept::load`).
        let mut window = Instant::now();
        let mut waited = Duration::ZERO;
        loop {
            // Announce the sleep, then take what was queued before it (see `LoopHandle`).
            self.ctx.sleeping.store(true, Ordering::SeqCst);
            self.receive();
            if self.retiring && self.ctx.live.load(Ordering::Relaxed) == 0 {
                return;
            }
            let timeout = self.next_timeout();
            let before = Instant::now();
            let polled = self.poll.poll(&mut events, timeout);
            self.ctx.sleeping.store(false, Ordering::SeqCst);
            if let Some((acc, me)) = &self.ctx.accept {
                let now = Instant::now();
                waited += now - before;
                let span = now - window;
                if span >= LOAD_WINDOW {
                    let busy = 1.0 - waited.as_secs_f64() / span.as_secs_f64();
                    acc.load(*me, busy);
                    window = now;
                    waited = Duration::ZERO;
                }
            }
            if let Err(e) = polled {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("listener `{}`: event loop failed: {e}", self.ctx.name);
                return;
            }
            for ev in events.iter() {
                if ev.token() == WAKE {
                    continue; // the channel is drained at the top of every turn
                }
                if ev.token() == super::accept::LISTEN {
                    self.accept();
                    continue;
                }
                let (idx, side) = (ev.token().0 / 2, ev.token().0 % 2);
                // Both directions closed (e.g. the stop deadline shut the socket down).
                let hung_up = side == 0 && ev.is_read_closed() && ev.is_write_closed();
                let wake = Wake::from_event(side, ev);
                self.drive(idx, hung_up, ev.is_read_closed(), wake);
            }
            self.fire_timers();
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut next = self.timers.peek().map(|Reverse((t, _, _))| *t);
        for t in [self.idle_sweep, self.accept_retry].into_iter().flatten() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if !self.assocs.is_empty() {
            let sweep = now + SWEEP;
            next = Some(next.map_or(sweep, |n| n.min(sweep)));
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn insert(&mut self, e: Entry) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(e);
                i
            }
            None => {
                self.slab.push(Some(e));
                self.slab.len() - 1
            }
        }
    }

    /// The listening socket is ready: accept, admit and open what the batch brings.
    fn accept(&mut self) {
        let Some((acc, me)) = self.ctx.accept.clone() else {
            return;
        };
        let mut batch = std::mem::take(&mut self.accepted);
        let outcome = acc.accept_batch(me, &self.ctx.live, &self.ctx.tracker, &mut batch);
        if outcome.timers {
            self.ctx.notifier.wake();
        }
        if let Some(t) = outcome.retry_at {
            self.accept_retry = Some(t);
        }
        for h in batch.drain(..) {
            self.open(h);
        }
        self.accepted = batch;
    }

    /// The retry time after descriptor exhaustion.
    fn retry_accept(&mut self, now: Instant) {
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = self.ctx.accept.as_ref().and_then(|(a, _)| a.retry());
        }
    }

    fn receive(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Stream(h) => self.open(h),
                Msg::Datagram(d) => self.datagram(d),
                Msg::Retire => {
                    self.retiring = true;
                    let ids: Vec<usize> = self.assocs.drain().map(|(_, i)| i).collect();
                    for i in ids {
                        self.remove_assoc(i);
                    }
                }
            }
        }
    }

    fn open(&mut self, h: Handoff) {
        let Handoff {
            accepted,
            service,
            idle,
            nonblocking,
        } = h;
        let crate::event::Accepted {
            conn,
            peer,
            conn_id,
            ticket,
            tls,
        } = accepted;
        let (tls_local, tls) = tls.map_or((None, None), |(l, t)| (l, Some(t)));
        // getsockname only when a PROXY header will need the local address.
        let local = match &*service {
            Service::Proxy(p) if p.proxy_protocol.is_some() => {
                crate::handler::proxy::local_of(&conn).or(tls_local)
            }
            _ => None,
        };
        let started = Instant::now();
        let client = match EvStream::from_conn(conn, nonblocking) {
            Ok(c) => c,
            Err(e) => return self.finish_early(conn_id, &peer, Outcome::Error(e.to_string())),
        };
        let now = std::time::SystemTime::now();
        let machine = match &*service {
            Service::Echo => Machine::Echo {
                pending: Pending::default(),
                eof: false,
            },
            Service::Discard => Machine::Discard,
            Service::Chargen => Machine::Chargen { pos: 0 },
            Service::Daytime | Service::Time => {
                let mut pending = Pending::default();
                match &*service {
                    Service::Daytime => pending.set(crate::clock::daytime_line(now).as_bytes()),
                    _ => pending.set(&crate::clock::rfc868_seconds(now).to_be_bytes()),
                }
                Machine::Reply { pending }
            }
            Service::File(f) => match f.open() {
                Ok((file, len)) => Machine::File {
                    file,
                    offset: 0,
                    len,
                },
                Err(e) => {
                    let why = format!("file: {e}; closing the connection");
                    drop(client);
                    return self.finish_early(conn_id, &peer, Outcome::Error(why));
                }
            },
            Service::Proxy(p) => match Relay::start(p, &peer, local) {
                Ok(r) => Machine::Proxy(Box::new(r)),
                Err(e) => {
                    let why = format!("proxy: upstream {:?}: {e}; closing the client", p.upstream);
                    drop(client);
                    return self.finish_early(conn_id, &peer, Outcome::Error(why));
                }
            },
        };
        let c = Box::new(Conn {
            client,
            machine,
            conn_id,
            peer,
            started,
            idle,
            last: started,
            _ticket: ticket,
            tls,
        });
        let idx = self.insert(Entry::Conn(c));
        let both = Interest::READABLE | Interest::WRITABLE;
        let Some(Some(Entry::Conn(c))) = self.slab.get_mut(idx) else {
            return;
        };
        let mut ok = self
            .poll
            .registry()
            .register(&mut c.client, Token(idx * 2), both);
        if let (Ok(()), Machine::Proxy(r)) = (&ok, &mut c.machine) {
            ok = self
                .poll
                .registry()
                .register(&mut r.up, Token(idx * 2 + 1), both);
            self.timers.push(Reverse((r.deadline, idx, conn_id)));
        }
        if let Some(i) = idle {
            let t = started + (i / 4).clamp(Duration::from_millis(10), SWEEP);
            self.idle_sweep = Some(self.idle_sweep.map_or(t, |s| s.min(t)));
        }
        if let Err(e) = ok {
            self.close(
                idx,
                Outcome::Error(format!("cannot watch the connection: {e}")),
            );
        }
    }

    /// A connection that ended before it was registered.
    fn finish_early(&mut self, conn_id: u64, peer: &PeerAddr, outcome: Outcome) {
        self.ctx.tracker.remove(conn_id);
        self.report(peer, outcome);
    }

    fn report(&self, peer: &PeerAddr, outcome: Outcome) {
        if let Outcome::Error(e) = &outcome {
            log::warn!("listener `{}` peer {peer}: {e}", self.ctx.name);
        }
        self.ctx.live.fetch_sub(1, Ordering::Relaxed);
        let done = Done {
            listener: self.ctx.listener,
            outcome,
        };
        match &self.ctx.accept {
            // Loop-accepted: the main loop needs the `Done` only for its counts, so it is
            // woken for it only when it waits on it (stop, closed listener) or now and then.
            Some((acc, _)) if !acc.closed() => self.ctx.notifier.done_quiet(done),
            _ => self.ctx.notifier.done(done),
        }
    }

    fn drive(&mut self, idx: usize, hung_up: bool, peer_shut: bool, wake: Wake) {
        let scratch = &mut self.scratch;
        let step = match self.slab.get_mut(idx) {
            Some(Some(Entry::Conn(c))) if hung_up => {
                let _ = c;
                Step::Close(Outcome::Ok)
            }
            Some(Some(Entry::Conn(c))) => {
                if c.idle.is_some() {
                    c.last = Instant::now();
                }
                let Conn {
                    client, machine, ..
                } = &mut **c;
                match machine {
                    Machine::Echo { pending, eof } => {
                        stream::echo(client, pending, eof, scratch, peer_shut)
                    }
                    Machine::Discard => stream::discard(client, scratch).unwrap_or(Step::Wait),
                    Machine::Chargen { pos } => {
                        stream::chargen(client, pos, &self.pattern, scratch)
                    }
                    Machine::Reply { pending } => stream::reply(client, pending),
                    Machine::File { file, offset, len } => {
                        stream::send_file(client, file, offset, *len)
                    }
                    Machine::Proxy(r) => r.drive(client, scratch, wake),
                }
            }
            Some(Some(Entry::Assoc(a))) => {
                a.relay_back(scratch);
                Step::Wait
            }
            _ => Step::Wait,
        };
        if let Step::Close(outcome) = step {
            self.close(idx, outcome);
        }
    }

    /// After a panic: close every connection (reporting each) and drop the associations.
    fn abandon_all(&mut self) {
        log::error!(
            "listener `{}`: an event loop panicked; closing its connections",
            self.ctx.name
        );
        for idx in 0..self.slab.len() {
            let why = Outcome::Panic("event loop panicked".into());
            self.close(idx, why);
        }
        self.assocs.clear();
        self.slab.clear();
    }

    fn close(&mut self, idx: usize, outcome: Outcome) {
        let Some(Some(Entry::Conn(_))) = self.slab.get(idx) else {
            return;
        };
        let Some(Some(Entry::Conn(c))) = self.slab.get_mut(idx).map(Option::take) else {
            return;
        };
        self.free.push(idx);
        // No deregister: these descriptors are never duplicated, so closing them removes
        // them from the epoll set; that saves an epoll_ctl per connection.
        // The tracker entry goes before the descriptor closes (see `Tracker`).
        self.ctx.tracker.remove(c.conn_id);
        // The access line, as the other worker models log it (bytes from TCP_INFO, read only
        // when the line is logged).
        {
            let bytes = match &c.client {
                EvStream::Tcp(s) => crate::access::tcp_bytes(s.as_fd()),
                EvStream::Unix(_) => crate::access::Bytes::default(),
            };
            crate::access::log_stream(
                &self.ctx.name,
                &c.peer,
                c.started.elapsed(),
                bytes,
                &outcome,
                c.tls.as_deref(),
            );
        }
        let peer = c.peer.clone();
        drop(c);
        self.report(&peer, outcome);
    }
}
