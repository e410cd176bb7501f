//! Accept where the work is: a `workers = "event"` stream listener's socket is registered in
//! its event loops' epoll sets (`EPOLLEXCLUSIVE`, so one connection wakes one loop), and the
//! loop that wakes accepts, admits and serves the connection itself. The main loop is not
//! involved per connection: no hand-off channel, no wake-up of a second thread.
//!
//! Which loops: the first one, plus one more each time the last accepting loop is saturated
//! (busy at least `SPREAD_BUSY` of a `LOAD_WINDOW`), one fewer when the last one is mostly
//! idle (`LoopAccept::load`). The kernel wakes the first waiting loop in the socket's wait
//! queue, so a loop beyond the first takes only the connections the ones before it had no
//! time for. With every loop accepting, a light or single-client load wakes a half-asleep loop
//! per connection on every core and pays a sleep and a wake-up for each, which costs more
//! CPU per connection than one loop that keeps up (on a 2-core machine whose other core runs
//! the client, 1.25× against 1.0× the single-threaded epoll echo's CPU per connection).
//!
//! What stays exactly as in the hand-off path: admission runs the listener's one `Guard`
//! (shared, not copied: ACL, `max_connections`, `max_per_source`, `rate`, refusal log,
//! `max_duration` deadlines); `idle_timeout` and access lines are the loops' as before; every
//! connection is in the daemon's `Tracker` (a stop's deadline shuts it down) and reports
//! `Done` when it closes, so the main loop's `busy` count, drain on stop, and drain of a
//! listener a reload removed work unchanged. The main loop decides when the listener is
//! watched (start, pause, stop, reload): `Gate::set_wanted` and `Gate::close` register or
//! remove the socket in the loops' epoll sets under the gate's lock, and a loop accepts only
//! while holding that lock and seeing the socket registered in its set, so after `close`
//! returns no loop accepts again. Back-pressure at `max_workers` and descriptor exhaustion
//! are handled here, by the loops: the socket is taken out of every set until a connection
//! closes (or the retry time comes), and the kernel's backlog holds newcomers meanwhile.
//!
//! Long-lived connections that arrive one at a time would all stay on the first accepting
//! loop: a loop clearly busier than the least busy accepting one (by open connections, more
//! than one plus an eighth) passes a connection on to it (`Gate::pass_on`), which costs what
//! the old hand-off cost, for those connections only. Loops that do not accept get none: a
//! load the first loop keeps up with stays on it, and connections opened before the load
//! grew stay where they are.
//!
//! `SOCKETD_EVENT_ACCEPT` in the daemon's environment selects another path for the bench's
//! A/B: `handoff` (the main loop accepts and hands off) or `every` (every loop accepts from
//! the start, never narrowed).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::ListenerConfig;
use crate::listener::Acceptor;
use crate::protect::Guard;
use crate::worker::Tracker;

use super::{Accepted, Handoff, LoopHandle, Msg, Service};

/// The token a loop's epoll set carries for the listening socket (even, so never a slab
/// token's upstream side, and far beyond any slab index).
pub(super) const LISTEN: mio::Token = mio::Token(usize::MAX - 1);

/// Connection ids for loop-accepted connections: their own range, so they never meet the
/// main loop's ids in the tracker.
static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 48);

/// Whether event loops accept for themselves (the default) or the main loop hands off.
pub fn loops_accept() -> bool {
    !matches!(
        std::env::var("SOCKETD_EVENT_ACCEPT").as_deref(),
        Ok("handoff")
    )
}

/// Whether every loop accepts from the start (`SOCKETD_EVENT_ACCEPT=every`) instead of the
/// first, widening under load.
fn every_loop() -> bool {
    matches!(
        std::env::var("SOCKETD_EVENT_ACCEPT").as_deref(),
        Ok("every")
    )
}

/// A listener's accepting state, shared by the slot (main loop) and its event loops.
#[derive(Debug)]
pub struct LoopAccept {
    gate: Mutex<Gate>,
    /// Connections accepted by the loops and not yet added to the slot's `busy`.
    started: AtomicUsize,
    /// Open connections the loops accepted (checked against `max_workers`).
    open: AtomicUsize,
    /// Set while the socket is out of the loops' sets for `max_workers`: a close re-adds it.
    full: AtomicBool,
    /// The main loop wants every `Done` at once (listener closed, daemon stopping).
    urgent: AtomicBool,
    /// `Done`s reported without a wake-up since the last wake-up.
    quiet: AtomicUsize,
    /// The listener's counters (status, metrics).
    stats: Arc<crate::stats::ListenerStats>,
}

#[derive(Debug)]
struct Gate {
    /// `None` once the listener is closed (stop, reload) or no longer event.
    acceptor: Option<Acceptor>,
    cfg: Arc<ListenerConfig>,
    service: Arc<Service>,
    guard: Guard,
    /// The main loop wants the listener watched (not paused, not stopped).
    wanted: bool,
    full: bool,
    /// In an out-of-descriptors episode (logged once, like `Slot::fd_starved`).
    starved: bool,
    /// Out of descriptors: out of the loops' sets until this time.
    starved_until: Option<Instant>,
    /// How many loops (the first ones) accept now: 1 while the first loop keeps up, one
    /// more each time the last accepting loop is saturated (see `LoopAccept::load`).
    spread: usize,
    /// Every loop accepts, always (`SOCKETD_EVENT_ACCEPT=every`).
    every: bool,
    /// In how many loops' epoll sets (the first ones) the socket is now.
    registered: usize,
    /// A duplicate of each loop's epoll descriptor (same epoll instance).
    epolls: Vec<OwnedFd>,
    /// Connections accepted by each loop since its start (status).
    accepted: Vec<u64>,
    /// The loops, for passing a connection on to a less loaded one.
    siblings: Vec<LoopHandle>,
}

/// A loop busier than this share of its time makes one more loop accept (see `load`).
pub(super) const SPREAD_BUSY: f64 = 0.9;
/// The last accepting loop busy less than this: it stops accepting.
const NARROW_BUSY: f64 = 0.25;

/// Quiet `Done`s after which a loop wakes the main loop anyway, so its channel stays short.
const QUIET_BATCH: usize = 64;

impl LoopAccept {
    pub(super) fn new(
        acceptor: Acceptor,
        cfg: Arc<ListenerConfig>,
        service: Arc<Service>,
        guard: Guard,
        stats: Arc<crate::stats::ListenerStats>,
    ) -> LoopAccept {
        LoopAccept {
            gate: Mutex::new(Gate {
                acceptor: Some(acceptor),
                cfg,
                service,
                guard,
                wanted: false,
                full: false,
                starved: false,
                starved_until: None,
                spread: 1,
                every: every_loop(),
                registered: 0,
                epolls: Vec::new(),
                accepted: Vec::new(),
                siblings: Vec::new(),
            }),
            started: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            full: AtomicBool::new(false),
            urgent: AtomicBool::new(false),
            quiet: AtomicUsize::new(0),
            stats,
        }
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The main loop: watch (`true`) or pause (`false`).
    pub fn set_wanted(&self, on: bool) {
        let mut g = self.gate();
        g.wanted = on;
        g.sync();
    }

    /// The main loop: stop accepting for good; once this returns no loop accepts again.
    pub fn close(&self) {
        self.urgent.store(true, Ordering::SeqCst);
        let mut g = self.gate();
        g.wanted = false;
        g.sync();
        g.acceptor = None;
    }

    /// A reload's new settings and service (new connections get them).
    pub(super) fn reconfigure(&self, cfg: Arc<ListenerConfig>, service: Arc<Service>) {
        let mut g = self.gate();
        g.cfg = cfg;
        g.service = service;
    }

    /// The loops changed (first start, or a reload changed `threads`).
    pub(super) fn set_loops(&self, epolls: Vec<OwnedFd>, siblings: Vec<LoopHandle>) {
        let mut g = self.gate();
        let wanted = g.wanted;
        g.wanted = false;
        g.sync();
        g.accepted = vec![0; epolls.len()];
        g.spread = if g.every { epolls.len() } else { 1 };
        g.epolls = epolls;
        g.siblings = siblings;
        // The loop that owned a retry timer may be among the old ones: the new set tries now.
        g.starved_until = None;
        g.wanted = wanted;
        g.sync();
    }

    /// The main loop: connections the loops accepted since the last call (added to `busy`).
    pub fn take_started(&self) -> usize {
        self.started.swap(0, Ordering::SeqCst)
    }

    /// Accepted but not yet taken (for an exact in-flight count).
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Connections accepted by each loop, and open on each now (status).
    pub fn per_loop(&self) -> (Vec<u64>, Vec<usize>) {
        let g = self.gate();
        let open = g
            .siblings
            .iter()
            .map(|l| l.live.load(Ordering::Relaxed))
            .collect();
        (g.accepted.clone(), open)
    }

    /// A loop: accept and admit up to a fair batch; the admitted connections go to `out`.
    /// Returns whether the main loop must look at its timers (a refusal summary or a
    /// `max_duration` deadline may have been added).
    pub(super) fn accept_batch(
        &self,
        me: usize,
        live: &AtomicUsize,
        tracker: &Tracker,
        out: &mut Vec<Handoff>,
    ) -> AcceptOutcome {
        let mut g = self.gate();
        let mut outcome = AcceptOutcome::default();
        if me >= g.registered {
            return outcome; // paused, closed or spread narrowed since the event
        }
        for _ in 0..crate::listener::FAIR_BATCH {
            let g = &mut *g;
            let Some(acceptor) = &g.acceptor else { break };
            // Full, unless every newcomer would be refused anyway (see `Slot::drain`).
            if self.open.load(Ordering::SeqCst) >= g.cfg.max_workers
                && !g.guard.at_max_connections(&g.cfg)
            {
                g.full = true;
                self.full.store(true, Ordering::SeqCst);
                g.sync();
                // A close may have come between the check and the flag: look again.
                if self.open.load(Ordering::SeqCst) < g.cfg.max_workers {
                    g.full = false;
                    self.full.store(false, Ordering::SeqCst);
                    g.sync();
                    continue;
                }
                break;
            }
            match acceptor.accept_for_loop() {
                Ok((conn, peer, nonblocking)) => {
                    let low = crate::protect::near_fd_limit(conn.as_raw_fd());
                    if std::mem::take(&mut g.starved) {
                        crate::listener::log_accept_resumed(&g.cfg.name);
                    }
                    let now = Instant::now();
                    if let Some(ticket) = g.guard.admit_stream(&g.cfg, &peer, now) {
                        let conn_id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                        tracker.insert(conn_id, conn.as_raw_fd());
                        g.guard.arm(&g.cfg, &conn, conn_id, tracker, now);
                        if g.cfg.protect.max_duration.is_some() {
                            outcome.timers = true;
                        }
                        self.open.fetch_add(1, Ordering::SeqCst);
                        self.started.fetch_add(1, Ordering::SeqCst);
                        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                        if let Some(n) = g.accepted.get_mut(me) {
                            *n += 1;
                        }
                        let h = Handoff {
                            accepted: Accepted {
                                conn,
                                peer,
                                conn_id,
                                ticket,
                                tls: None, // TLS listeners keep the main loop's path
                            },
                            service: Arc::clone(&g.service),
                            idle: g.cfg.protect.idle_timeout,
                            nonblocking,
                        };
                        if let Some(h) = g.pass_on(me, live, h) {
                            live.fetch_add(1, Ordering::Relaxed);
                            out.push(h);
                        }
                    } else {
                        outcome.timers = true; // the refusal log may want a summary
                    }
                    if low {
                        g.starve(&"descriptors nearly exhausted (RLIMIT_NOFILE)", now);
                        outcome.retry_at = g.starved_until;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if crate::listener::out_of_descriptors(&e) => {
                    g.starve(&e, Instant::now());
                    outcome.retry_at = g.starved_until;
                    break;
                }
                Err(e) if crate::listener::transient(&e) => continue,
                Err(e) => {
                    g.starve(&e, Instant::now());
                    outcome.retry_at = g.starved_until;
                    break;
                }
            }
        }
        outcome
    }

    /// A loop's retry time after descriptor exhaustion came: accept again if there is room
    /// now; otherwise the next retry time.
    pub(super) fn retry(&self) -> Option<Instant> {
        let mut g = self.gate();
        g.starved_until?;
        // As `Slot::drain`: accept again only with room to serve.
        if g.starved && !crate::protect::fd_headroom() {
            let t = Instant::now() + crate::listener::FD_RETRY;
            g.starved_until = Some(t);
            return Some(t);
        }
        g.starved_until = None;
        g.sync();
        None
    }

    /// A loop's share of busy time (not waiting in `poll`) over its last window. The socket is
    /// in the first `spread` loops' sets: the kernel wakes the first of them that waits, so
    /// a second loop only takes connections the first had no time for, and the loops do not
    /// wake each other per connection when one could serve them all (on a machine whose
    /// other cores run the clients, a second loop half asleep costs more than it serves).
    /// The last accepting loop saturated: one more loop accepts. It was mostly idle: it stops
    /// accepting (its open connections go on).
    pub(super) fn load(&self, me: usize, busy: f64) {
        let mut g = self.gate();
        if g.every {
            return;
        }
        let spread = next_spread(g.spread, g.epolls.len(), me, busy);
        if spread != g.spread {
            g.spread = spread;
            g.sync();
        }
    }

    /// A loop closed a connection it accepted. Returns whether the main loop must see its
    /// `Done` at once (otherwise it is collected on the main loop's next turn).
    pub(super) fn closed(&self) -> bool {
        self.open.fetch_sub(1, Ordering::SeqCst);
        if self.full.load(Ordering::SeqCst) {
            let mut g = self.gate();
            if g.full && self.open.load(Ordering::SeqCst) < g.cfg.max_workers {
                g.full = false;
                self.full.store(false, Ordering::SeqCst);
                g.sync();
            }
        }
        if self.urgent.load(Ordering::SeqCst) {
            return true;
        }
        self.quiet.fetch_add(1, Ordering::Relaxed) + 1 >= QUIET_BATCH
            && self.quiet.swap(0, Ordering::Relaxed) > 0
    }
}

/// How many loops accept after loop `me` reported its busy share: one more when the last
/// accepting loop is saturated, one fewer when it is mostly idle (never fewer than one).
fn next_spread(spread: usize, loops: usize, me: usize, busy: f64) -> usize {
    if me + 1 != spread {
        spread // only the last accepting loop decides
    } else if busy >= SPREAD_BUSY && spread < loops {
        spread + 1
    } else if busy < NARROW_BUSY && spread > 1 {
        spread - 1
    } else {
        spread
    }
}

/// What a loop must do after a batch.
#[derive(Debug, Default)]
pub(super) struct AcceptOutcome {
    /// Wake the main loop so it recomputes its timers.
    pub timers: bool,
    /// Out of descriptors: call `retry` at this time.
    pub retry_at: Option<Instant>,
}

impl Gate {
    /// Balance: the kernel wakes whichever accepting loop is waiting, so connections that
    /// arrive one at a time all land on the first. A loop clearly busier than the least busy
    /// accepting one (by open connections, more than one plus an eighth) passes the connection
    /// on through that loop's channel, as the main loop's hand-off does. `None`: passed on;
    /// otherwise ours.
    fn pass_on(&self, me: usize, live: &AtomicUsize, h: Handoff) -> Option<Handoff> {
        let mine = live.load(Ordering::Relaxed);
        let (i, least) = self
            .siblings
            .iter()
            .take(self.registered)
            .enumerate()
            .map(|(i, l)| (i, l.live.load(Ordering::Relaxed)))
            .min_by_key(|&(_, n)| n)?;
        if i == me || mine <= least + 1 + least / 8 {
            return Some(h);
        }
        let to = &self.siblings[i];
        to.live.fetch_add(1, Ordering::Relaxed);
        match to.tx.send(Msg::Stream(h)) {
            Ok(()) => {
                // Wake it only if it may be asleep (see `LoopHandle::send`).
                if to.sleeping.swap(false, Ordering::SeqCst) {
                    let _ = to.waker.wake();
                }
                None
            }
            // That loop is gone (a panic): keep the connection here.
            Err(std::sync::mpsc::SendError(Msg::Stream(h))) => {
                to.live.fetch_sub(1, Ordering::Relaxed);
                Some(h)
            }
            Err(_) => None,
        }
    }

    /// Out of descriptors (or nearly): out of the loops' sets until the retry time; one log
    /// line per episode.
    fn starve(&mut self, why: &dyn std::fmt::Display, now: Instant) {
        if !std::mem::replace(&mut self.starved, true) {
            crate::listener::log_accept_paused(format_args!("listener `{}`", self.cfg.name), why);
        }
        self.starved_until = Some(now + crate::listener::FD_RETRY);
        self.sync();
    }

    /// Put the socket in the first `spread` loops' epoll sets, or take it out, as the state
    /// says.
    fn sync(&mut self) {
        let on =
            self.acceptor.is_some() && self.wanted && !self.full && self.starved_until.is_none();
        let want = if on {
            self.spread.min(self.epolls.len())
        } else {
            0
        };
        if want == self.registered {
            return;
        }
        let Some(fd) = self.acceptor.as_ref().map(AsRawFd::as_raw_fd) else {
            self.registered = 0;
            return;
        };
        let (add, range) = if want > self.registered {
            (true, self.registered..want)
        } else {
            (false, want..self.registered)
        };
        for ep in &self.epolls[range] {
            if let Err(e) = epoll_ctl(ep.as_raw_fd(), fd, add) {
                log::error!(
                    "listener `{}`: cannot {} an event loop: {e}",
                    self.cfg.name,
                    if add {
                        "watch the socket in"
                    } else {
                        "take the socket out of"
                    }
                );
            }
        }
        self.registered = want;
    }
}

/// Add `fd` to an epoll set (level-triggered, `EPOLLEXCLUSIVE`: one waiting loop is woken per
/// connection, not all), or remove it.
fn epoll_ctl(epfd: RawFd, fd: RawFd, add: bool) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
        u64: LISTEN.0 as u64,
    };
    let op = if add {
        libc::EPOLL_CTL_ADD
    } else {
        libc::EPOLL_CTL_DEL
    };
    // SAFETY: both descriptors are open (owned by the caller's gate); `ev` outlives the call.
    let r = unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match (add, e.raw_os_error()) {
        (true, Some(libc::EEXIST)) | (false, Some(libc::ENOENT)) => Ok(()),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::next_spread;

    #[test]
    fn a_saturated_last_loop_widens_the_spread_and_an_idle_one_narrows_it() {
        // One of three accepts; it is saturated: two accept.
        assert_eq!(next_spread(1, 3, 0, 0.95), 2);
        // The second, now last, is saturated too: three; no fourth loop to add.
        assert_eq!(next_spread(2, 3, 1, 0.99), 3);
        assert_eq!(next_spread(3, 3, 2, 1.0), 3);
        // Busy but not saturated: unchanged.
        assert_eq!(next_spread(2, 3, 1, 0.5), 2);
        // Only the last accepting loop decides: the first, idle or saturated, does not.
        assert_eq!(next_spread(2, 3, 0, 0.0), 2);
        assert_eq!(next_spread(2, 3, 0, 1.0), 2);
        // A loop that no longer accepts does not either.
        assert_eq!(next_spread(1, 3, 2, 1.0), 1);
        // The last one mostly idle: it stops accepting, but the first never does.
        assert_eq!(next_spread(3, 3, 2, 0.1), 2);
        assert_eq!(next_spread(1, 3, 0, 0.0), 1);
        // A single loop stays one.
        assert_eq!(next_spread(1, 1, 0, 1.0), 1);
    }
}
