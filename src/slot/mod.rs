//! One configured listener at run time: its socket, handler factory, worker pool and counters,
//! and the accept/receive loop that feeds the pool.
//!
//! A slot's id is its mio token and is never reused, so a late `Done` from a connection of a
//! listener that a reload removed can never be booked to a newer listener.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use mio::{Registry as PollRegistry, Token};

use crate::config::{ListenerConfig, WorkerModel};
use crate::handler::{Context, DatagramSocket, Factory};
use crate::listener::{Incoming, Listener};
use crate::worker::threaded::Pool;
use crate::worker::{serve_datagram, serve_stream, Done, Tracker};

mod forkdoor;
mod link;
mod tls;
mod wait;

use crate::listener::{out_of_descriptors, transient};
pub use crate::listener::{FAIR_BATCH, FD_RETRY};

pub use crate::conn::MAX_DATAGRAM;

pub use crate::worker::Shared;

/// socketserver's `verify_request`: judges a peer before any worker sees it.
pub type Verify = Arc<dyn Fn(&crate::conn::PeerAddr) -> bool + Send + Sync>;

/// How a listener's requests meet a worker model: chosen once per config (`Slot::new`,
/// `Slot::reconfigure`) and matched in one place per kind of request (`dispatch_stream`,
/// `dispatch_datagram`, `drain`), instead of `cfg.workers` tests spread around.
#[derive(Debug, Clone)]
enum Route {
    /// The listener's thread pool.
    Threaded,
    /// The fork servers, through the slot's `Link`.
    Forked,
    /// The listener's event loops.
    Event,
    /// inetd `wait`: the listening socket itself goes to the program, which was resolved once
    /// per config (accounts included) rather than on every drain.
    Wait(crate::exec::Program),
}

impl Route {
    fn of(cfg: &ListenerConfig) -> Route {
        if let Some(program) = crate::handler::exec::wait_program(cfg) {
            return Route::Wait(program);
        }
        match cfg.workers {
            WorkerModel::Threaded => Route::Threaded,
            WorkerModel::Forked => Route::Forked,
            WorkerModel::Event => Route::Event,
        }
    }
}

/// What the loop should do with a listener after draining it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Nothing more waiting right now; the next readiness event brings more.
    Empty,
    /// The fair batch ran out with more possibly waiting: revisit on the next pass.
    More,
    /// Every worker is busy: stopped watching until one frees.
    Full,
    /// Out of file descriptors: stopped watching until the retry time.
    RetryAt(Instant),
}

/// A listener at run time.
pub struct Slot {
    pub id: usize,
    pub cfg: Arc<ListenerConfig>,
    /// `None` once closed (stop, or removed by a reload) while its connections drain.
    pub listener: Option<Listener>,
    pub factory: Factory,
    pub ctx: Context,
    pub pool: Pool,
    pub reply: Option<DatagramSocket>,
    /// Jobs in flight.
    pub busy: usize,
    /// Jobs finished since start.
    pub served: u64,
    /// Registered for readiness on the poll.
    pub watching: bool,
    /// In an EMFILE episode (logged once).
    pub fd_starved: bool,
    /// Admission control, limits and timeouts (`protect`), checked before any dispatch.
    pub guard: crate::protect::Guard,
    /// `workers = "forked"`: this listener's registration with the fork server.
    pub fork: Option<link::Link>,
    /// `workers = "event"`: the listener's event loops (started on first use).
    events: crate::event::SlotEvents,
    /// Counters for status and metrics (by listener name: they outlive this slot).
    pub stats: Arc<crate::stats::ListenerStats>,
    /// Paused by `socketd pause`: the socket stays open (the kernel queues), nothing is
    /// accepted until `socketd resume`.
    pub paused: bool,
    /// A library server's `verify_request`: a peer it refuses is closed (or its datagram
    /// dropped) before any worker sees it.
    pub verify: Option<Verify>,
    /// How requests meet the worker model, chosen once per config.
    route: Route,
    /// Whether this listener's event loops may accept for themselves (a daemon's listeners,
    /// unless `SOCKETD_EVENT_ACCEPT=handoff`; see `event::accept`).
    pub loops_may_accept: bool,
    /// Set while (or since) the event loops accept for themselves.
    accepting: Option<Arc<crate::event::accept::LoopAccept>>,
    /// Whether the fork servers may accept for this listener when it is a `forked` stream
    /// one (a daemon's listeners, unless `SOCKETD_FORKED_ACCEPT=handoff`; see
    /// `worker::doorway`).
    pub forks_may_accept: bool,
    /// Set while (or since) the fork servers accept for this listener.
    door: Option<Arc<forkdoor::ForkDoor>>,
    /// `tls = {...}`: handshakes at the TLS front and finished ones waiting for a worker.
    tls: tls::Handshakes,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("id", &self.id)
            .field("name", &self.cfg.name)
            .field("busy", &self.busy)
            .finish()
    }
}

impl Slot {
    pub fn new(
        id: usize,
        cfg: ListenerConfig,
        listener: Listener,
        factory: Factory,
        stopping: Arc<AtomicBool>,
    ) -> io::Result<Slot> {
        let cfg = Arc::new(cfg);
        let reply = listener.reply_socket()?;
        let route = Route::of(&cfg);
        let stats = crate::stats::listener(&cfg.name);
        Ok(Slot {
            id,
            pool: Pool::new(&cfg.name, cfg.max_workers),
            ctx: Context::new(Arc::clone(&cfg), stopping),
            cfg,
            listener: Some(listener),
            factory,
            reply,
            busy: 0,
            served: 0,
            watching: false,
            fd_starved: false,
            guard: crate::protect::Guard::default(),
            fork: None,
            events: crate::event::SlotEvents::default(),
            stats,
            verify: None,
            route,
            tls: tls::Handshakes::default(),
            paused: false,
            loops_may_accept: false,
            accepting: None,
            forks_may_accept: false,
            door: None,
        })
    }

    /// Let the event loops accept for themselves when this listener qualifies (a stream
    /// `workers = "event"` listener of the daemon), or go back to accepting here when it no
    /// longer does (a reload changed its model). Call after `new` and `reconfigure`.
    pub fn setup_accept(&mut self, poll: &PollRegistry, shared: &Shared) {
        self.setup_fork_accept(poll, shared);
        let qualifies = self.loops_may_accept
            && matches!(self.route, Route::Event)
            && !self.cfg.protocol.is_datagram()
            && self.cfg.tls.is_none() // the TLS front is the main loop's (see `crate::tls`)
            && self.verify.is_none();
        if !qualifies || self.listener.is_none() {
            self.stop_loop_accept();
            return;
        }
        let was_watching = self.watching;
        if self.accepting.is_none() {
            self.unwatch(poll); // the main loop's own watch, handed over below
        }
        let Some(listener) = &self.listener else {
            return;
        };
        let started = self.events.start_accepting(
            self.id,
            &self.cfg,
            shared,
            listener,
            &self.guard,
            &self.stats,
        );
        match started {
            Ok(a) => {
                self.accepting = Some(a);
                if was_watching {
                    self.watch(poll);
                }
            }
            Err(e) => {
                log::error!(
                    "listener `{}`: {e}; the main loop accepts instead",
                    self.cfg.name
                );
                self.stop_loop_accept();
            }
        }
    }

    /// Let the fork servers accept for this listener when it qualifies (a daemon's `forked`
    /// stream listener without TLS), or take accepting back (a reload changed it).
    fn setup_fork_accept(&mut self, poll: &PollRegistry, shared: &Shared) {
        let qualifies = self.forks_may_accept
            && matches!(self.route, Route::Forked)
            && !self.cfg.protocol.is_datagram()
            && self.cfg.tls.is_none() // the TLS front is the main loop's (see `crate::tls`)
            && self.verify.is_none()
            && shared.budget.is_none();
        let forks = shared.forks.as_ref().filter(|_| qualifies);
        let Some(forks) = forks.filter(|_| self.listener.is_some()) else {
            self.stop_fork_accept();
            return;
        };
        let was_watching = self.watching;
        if self.door.is_none() {
            self.unwatch(poll); // the main loop's own watch, handed over below
        }
        let Some(listener) = &self.listener else {
            return;
        };
        let link = self
            .fork
            .get_or_insert_with(|| link::Link::new(Arc::clone(forks), self.id));
        if let Err(e) = link.sync(&self.cfg, Some(listener.as_fd())) {
            log::error!(
                "listener `{}`: cannot hand the socket to the fork servers: {e}; the main loop                  accepts instead",
                self.cfg.name
            );
            self.stop_fork_accept();
            if was_watching {
                self.watch(poll);
            }
            return;
        }
        match &self.door {
            Some(d) => d.reconfigure(Arc::clone(&self.cfg)),
            None => {
                let door = Arc::new(forkdoor::ForkDoor::new(
                    self.id,
                    Arc::clone(&self.cfg),
                    self.guard.clone(),
                    shared,
                    Arc::clone(forks),
                    Arc::clone(&self.stats),
                ));
                forks.open_door(self.id, Arc::clone(&door) as _);
                self.door = Some(door);
                if was_watching {
                    self.watch(poll);
                }
            }
        }
    }

    /// The fork servers stop accepting; their count joins `busy`. The listener is left
    /// unwatched, and its config goes to the fork servers again (without the socket) before
    /// the next hand-off.
    fn stop_fork_accept(&mut self) {
        if let Some(d) = self.door.take() {
            d.close();
            self.busy += d.take_started();
            self.watching = false;
            self.fork = None;
        }
    }

    /// The loops stop accepting; their count joins `busy`. The listener is left unwatched:
    /// the caller watches it again (on the main loop's poll) if it should be.
    fn stop_loop_accept(&mut self) {
        if let Some(a) = self.accepting.take() {
            self.events.stop_accepting();
            a.close();
            self.busy += a.take_started();
            self.watching = false;
        }
    }

    /// Add the connections the loops accepted since the last call to `busy`.
    pub fn absorb(&mut self) {
        if let Some(a) = &self.accepting {
            self.busy += a.take_started();
        }
        if let Some(d) = &self.door {
            self.busy += d.take_started();
        }
    }

    /// Connections open now (jobs in flight), counting what the loops just accepted.
    pub fn in_flight(&self) -> usize {
        self.busy
            + self.accepting.as_ref().map_or(0, |a| a.started())
            + self.door.as_ref().map_or(0, |d| d.started())
    }

    /// When the fork servers, paused because the daemon ran out of descriptors, may be told
    /// to accept again (see `forkdoor`).
    pub fn fork_accept_retry_at(&self) -> Option<Instant> {
        self.door.as_ref().and_then(|d| d.retry_at())
    }

    /// Tell them if that time came and descriptors are free.
    pub fn fork_accept_retry(&self, now: Instant) {
        if let Some(d) = &self.door {
            d.retry(now);
        }
    }

    /// Connections the fork servers accepted, when they accept for this listener.
    pub fn accepted_by_fork_servers(&self) -> Option<u64> {
        self.door.as_ref().map(|d| d.accepted())
    }

    /// Connections accepted by each event loop and open on each, when the loops accept for
    /// themselves.
    pub fn accepted_per_loop(&self) -> Option<(Vec<u64>, Vec<usize>)> {
        self.accepting.as_ref().map(|a| a.per_loop())
    }

    /// Apply a reload's settings to this listener: new connections get them.
    pub fn reconfigure(&mut self, cfg: Arc<ListenerConfig>, factory: Factory, ctx: Context) {
        self.pool.set_max(cfg.max_workers);
        self.route = Route::of(&cfg);
        self.ctx = ctx;
        self.cfg = cfg;
        self.factory = factory;
    }

    /// Whether `verify_request` (if any) lets `peer` in.
    fn verified(&self, peer: &crate::conn::PeerAddr) -> bool {
        match &self.verify {
            Some(v) => {
                let ok = v(peer);
                if !ok {
                    log::debug!(
                        "listener `{}`: {peer} refused by verify_request",
                        self.cfg.name
                    );
                }
                ok
            }
            None => true,
        }
    }

    pub fn token(&self) -> Token {
        Token(self.id)
    }

    /// Start watching for readiness, if open and not already watching.
    pub fn watch(&mut self, poll: &PollRegistry) {
        if self.paused {
            return;
        }
        if let Some(d) = &self.door {
            if self.listener.is_some() {
                d.set_wanted(true);
                self.watching = true;
            }
            return;
        }
        if let Some(a) = &self.accepting {
            if self.listener.is_some() {
                a.set_wanted(true);
                self.watching = true;
            }
            return;
        }
        if let (Some(l), false) = (&self.listener, self.watching) {
            match l.register(poll, self.token()) {
                Ok(()) => self.watching = true,
                Err(e) => log::error!("listener `{}`: cannot watch socket: {e}", self.cfg.name),
            }
        }
    }

    /// Stop watching: the kernel queues new connections in the backlog meanwhile.
    pub fn unwatch(&mut self, poll: &PollRegistry) {
        if let Some(d) = &self.door {
            d.set_wanted(false);
            self.watching = false;
            return;
        }
        if let Some(a) = &self.accepting {
            a.set_wanted(false);
            self.watching = false;
            return;
        }
        if let (Some(l), true) = (&self.listener, self.watching) {
            let _ = l.deregister(poll);
        }
        self.watching = false;
    }

    /// Stop accepting for good: the socket is closed and its unix file removed.
    pub fn close(&mut self, poll: &PollRegistry) -> Option<Listener> {
        self.unwatch(poll);
        if let Some(a) = &self.accepting {
            a.close(); // no loop accepts once this returns
            self.events.stop_accepting();
        }
        if let Some(d) = &self.door {
            d.close(); // the fork servers close their copies; later knocks are refused
        }
        self.listener.take()
    }

    /// Whether another job may start.
    pub fn has_capacity(&self) -> bool {
        // Loops and fork servers that accept hold back at `max_workers` on their own.
        self.accepting.is_some() || self.door.is_some() || self.busy < self.cfg.max_workers
    }

    /// Whether to accept another connection: a worker place, or for a TLS listener a
    /// handshake place (handshakes never hold a worker; see `crate::tls`).
    fn has_room(&self) -> bool {
        match self.cfg.tls {
            Some(_) => self.tls.held() < tls::handshake_room(self.cfg.max_workers),
            None => self.has_capacity(),
        }
    }

    /// TLS handshakes in progress or finished and waiting for a worker.
    pub fn tls_held(&self) -> usize {
        self.tls.held()
    }

    /// Dispatch TLS connections whose handshake finished, while workers are free. Returns
    /// whether the listener has room to accept again.
    pub fn tls_turn(&mut self, shared: &mut Shared) -> bool {
        if self.cfg.tls.is_none() {
            return false;
        }
        self.tls.collect();
        while self.has_capacity() {
            let Some(r) = self.tls.next_ready() else {
                break;
            };
            let session = tls::Session {
                info: r.info,
                local: r.local,
                accepted: r.accepted,
            };
            self.dispatch_stream(shared, r.conn, r.peer, r.local, r.ticket, Some(session));
        }
        self.has_room()
    }

    /// Accept or receive until drained, full, out of descriptors, or the fair batch is used.
    pub fn drain(&mut self, poll: &PollRegistry, shared: &mut Shared, buf: &mut [u8]) -> Drained {
        if self.paused {
            self.unwatch(poll);
            return Drained::Empty;
        }
        if self.accepting.is_some() || self.door.is_some() {
            // The event loops or the fork servers accept (`event::accept`, `worker::doorway`).
            return Drained::Empty;
        }
        if let Route::Wait(program) = &self.route {
            let program = program.clone();
            return self.drain_wait(poll, shared, program); // inetd `wait`: see slot/wait.rs
        }
        // After EMFILE, accept again only with room to serve: at the margin an accept would
        // succeed and the handler then fail for want of its next descriptor, every retry.
        if self.fd_starved && !crate::protect::fd_headroom() {
            self.unwatch(poll);
            return Drained::RetryAt(Instant::now() + FD_RETRY);
        }
        let mut low_fds = false;
        for _ in 0..FAIR_BATCH {
            if low_fds {
                return self.pause_low_fds(poll);
            }
            // Full, unless every newcomer would be refused anyway (`max_connections` reached):
            // then refusing at once beats leaving them in the backlog.
            if !self.has_room() && !self.guard.at_max_connections(&self.cfg) {
                self.unwatch(poll);
                return Drained::Full;
            }
            if shared.budget == Some(0) {
                self.unwatch(poll);
                return Drained::Full;
            }
            let Some(listener) = &self.listener else {
                return Drained::Empty;
            };
            let incoming = listener.next(buf);
            if let (Ok(_), Some(n)) = (&incoming, shared.budget.as_mut()) {
                *n = n.saturating_sub(1);
            }
            match incoming {
                Ok(Incoming::Stream(conn, peer)) => {
                    low_fds = crate::protect::near_fd_limit(conn.as_raw_fd());
                    if std::mem::take(&mut self.fd_starved) {
                        crate::listener::log_accept_resumed(&self.cfg.name);
                    }
                    let local = listener.local_inet();
                    // Refused: `conn` is dropped here, closed before any byte is sent.
                    let Some(ticket) = self.guard.admit_stream(&self.cfg, &peer, Instant::now())
                    else {
                        continue;
                    };
                    if !self.verified(&peer) {
                        continue;
                    }
                    self.stats.accepted.fetch_add(1, Relaxed);
                    if self.cfg.tls.is_some() {
                        // Admitted first (no crypto for refused peers); the handshake runs at
                        // the TLS front, and `tls_turn` dispatches the plaintext end.
                        let notifier = shared.notifier.clone();
                        let wake = Box::new(move || notifier.wake());
                        self.tls.start(&self.cfg, conn, peer, local, ticket, wake);
                        continue;
                    }
                    self.dispatch_stream(shared, conn, peer, local, ticket, None);
                }
                Ok(Incoming::Datagram(n, peer)) => {
                    if !self.guard.admit_datagram(&self.cfg, &peer, Instant::now())
                        || !self.verified(&peer)
                    {
                        continue;
                    }
                    self.stats.accepted.fetch_add(1, Relaxed);
                    self.dispatch_datagram(shared, &buf[..n], peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if out_of_descriptors(&e) => return self.pause_starved(poll, &e),
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    // Unknown trouble: the socket may still hold connections, and an
                    // edge-triggered poll would not say so again; look again shortly.
                    log::warn!(
                        "listener `{}`: {e}; retrying in {}ms",
                        self.cfg.name,
                        FD_RETRY.as_millis()
                    );
                    return Drained::RetryAt(Instant::now() + FD_RETRY);
                }
            }
        }
        if low_fds {
            return self.pause_low_fds(poll);
        }
        Drained::More
    }

    /// The last accept left fewer than `FD_HEADROOM` descriptors: serve what was accepted but
    /// accept no more until there is room, so accepted connections are not starved of the
    /// descriptors their handlers need (the same episode as EMFILE, logged once).
    fn pause_low_fds(&mut self, poll: &PollRegistry) -> Drained {
        self.pause_starved(poll, &"descriptors nearly exhausted (RLIMIT_NOFILE)")
    }

    /// Out of descriptors (or nearly): stop watching and retry on a timer; one log line per
    /// episode, so a long exhaustion cannot flood the log.
    fn pause_starved(&mut self, poll: &PollRegistry, why: &dyn std::fmt::Display) -> Drained {
        if !self.fd_starved {
            crate::listener::log_accept_paused(format_args!("listener `{}`", self.cfg.name), why);
            self.fd_starved = true;
        }
        self.unwatch(poll);
        Drained::RetryAt(Instant::now() + FD_RETRY)
    }

    /// An admitted connection meets this listener's worker model: the one place that decides.
    fn dispatch_stream(
        &mut self,
        shared: &mut Shared,
        conn: crate::conn::Conn,
        peer: crate::conn::PeerAddr,
        local: Option<std::net::SocketAddr>,
        ticket: crate::protect::Ticket,
        tls: Option<tls::Session>,
    ) {
        let forked = match self.route {
            Route::Event => return self.dispatch_event(shared, conn, peer, ticket, tls),
            Route::Forked => true,
            Route::Threaded => false,
            // `wait` is for datagram listeners only (validation refuses it elsewhere).
            Route::Wait(_) => return,
        };
        let conn_id = shared.next_conn;
        shared.next_conn += 1;
        shared.tracker.insert(conn_id, conn.as_raw_fd());
        // A TLS connection's max_duration counts from its accept (the handshake included).
        let since = tls.as_ref().map_or_else(Instant::now, |t| t.accepted);
        self.guard
            .arm(&self.cfg, &conn, conn_id, &shared.tracker, since);
        let tls = tls.map(|t| t.info);
        let (factory, ctx) = (Arc::clone(&self.factory), self.ctx.clone());
        let (notifier, tracker, id) = (
            shared.notifier.clone(),
            Arc::clone(&shared.tracker),
            self.id,
        );
        log::debug!("listener `{}`: connection from {peer}", self.cfg.name);
        if forked {
            // The daemon keeps its copy of the connection (and the tracker entry, for stop and
            // timeouts) until the child's exit is reported.
            let guard = TrackGuard {
                tracker,
                conn_id,
                _ticket: ticket,
            };
            self.dispatch_forked_stream(shared, conn, peer, local, Box::new(guard), tls);
            return;
        }
        let job = move || {
            // The handler gets the connection; the tracker entry goes before the fd closes.
            let guard = TrackGuard {
                tracker,
                conn_id,
                _ticket: ticket,
            };
            let outcome = serve_stream(&factory, &ctx, conn, peer, local, guard, tls);
            notifier.done(Done {
                listener: id,
                outcome,
            });
        };
        self.start(job, shared, Some(conn_id));
    }

    /// `workers = "event"`: hand the connection to an event loop; it counts as busy until
    /// the loop reports it closed, so `max_workers` bounds open connections.
    fn dispatch_event(
        &mut self,
        shared: &mut Shared,
        conn: crate::conn::Conn,
        peer: crate::conn::PeerAddr,
        ticket: crate::protect::Ticket,
        tls: Option<tls::Session>,
    ) {
        let conn_id = shared.next_conn;
        shared.next_conn += 1;
        shared.tracker.insert(conn_id, conn.as_raw_fd());
        let since = tls.as_ref().map_or_else(Instant::now, |t| t.accepted);
        self.guard
            .arm(&self.cfg, &conn, conn_id, &shared.tracker, since);
        let tls = tls.map(|t| (t.local, t.info));
        let (id, cfg) = (self.id, &self.cfg);
        let accepted = crate::event::Accepted {
            conn,
            peer,
            conn_id,
            ticket,
            tls,
        };
        match self.events.dispatch_stream(id, cfg, shared, accepted) {
            Ok(()) => self.busy += 1,
            Err(e) => {
                shared.tracker.remove(conn_id);
                log::error!("listener `{}`: {e}", self.cfg.name);
            }
        }
    }

    /// An admitted datagram meets this listener's worker model.
    fn dispatch_datagram(&mut self, shared: &mut Shared, data: &[u8], peer: crate::conn::PeerAddr) {
        let Some(socket) = self.reply.clone() else {
            return;
        };
        match self.route {
            Route::Event => {
                let (id, cfg) = (self.id, &self.cfg);
                if let Err(e) = self.events.datagram(id, cfg, shared, data, &peer, &socket) {
                    log::warn!("listener `{}` peer {peer}: {e}", self.cfg.name);
                }
                return;
            }
            Route::Forked => return self.dispatch_forked_datagram(shared, data.to_vec(), peer),
            Route::Threaded => {}
            Route::Wait(_) => return,
        }
        let data = data.to_vec();
        let (factory, ctx) = (Arc::clone(&self.factory), self.ctx.clone());
        let (notifier, id) = (shared.notifier.clone(), self.id);
        let job = move || {
            let outcome = serve_datagram(&factory, &ctx, data, peer, socket);
            notifier.done(Done {
                listener: id,
                outcome,
            });
        };
        self.start(job, shared, None);
    }

    fn start<F: FnOnce() + Send + 'static>(
        &mut self,
        job: F,
        shared: &mut Shared,
        conn: Option<u64>,
    ) {
        debug_assert!(matches!(self.route, Route::Threaded));
        match self.pool.execute(job) {
            Ok(()) => self.busy += 1,
            Err(e) => {
                if let Some(c) = conn {
                    shared.tracker.remove(c);
                }
                log::error!(
                    "listener `{}`: cannot start a worker thread: {e}",
                    self.cfg.name
                );
            }
        }
    }
}

/// Removes a connection from the tracker when its job ends, even by panic, and frees its
/// admission place (max_connections, max_per_source) before the fd closes.
struct TrackGuard {
    tracker: Arc<Tracker>,
    conn_id: u64,
    _ticket: crate::protect::Ticket,
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        self.tracker.remove(self.conn_id);
    }
}
