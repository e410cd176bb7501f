//! The daemon's side of fork servers that accept for a `workers = "forked"` stream listener
//! (see `worker::doorway` for the fork servers' side): a `Door` that judges each connection a
//! fork server accepted, in that fork server's reader thread, with the listener's one `Guard`
//! (shared with the slot, as the event loops share it), then counts it against `max_workers`.
//!
//! What stays as in the hand-off path: the same admission and refusal log; the daemon keeps
//! its copy of the connection and its tracker entry until the child's exit is reported, so a
//! stop's deadline and `max_duration` shut it down as before; the job counts as busy in the
//! slot (`take_started`, as `event::accept`) until its `Done`, so drain, stop and status are
//! unchanged. At `max_workers` the fork servers are told to stop watching (the kernel's
//! backlog holds newcomers), unless `max_connections` is reached too: then they keep
//! accepting and every newcomer is refused at once. A connection admitted while every worker
//! place is taken (accepted before the fork servers heard) waits here for the next place.
//! The main loop decides when the socket is watched (start, pause, stop, reload).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::{ListenerConfig, Protocol};
use crate::conn::{Conn, PeerAddr};
use crate::protect::Guard;
use crate::worker::forked::{Answer, Door, ForkServer};
use crate::worker::Tracker;

/// Connection ids for connections the fork servers accepted: their own range (see
/// `event::accept` for the event loops' one).
static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 49);

/// One listener's door, shared by the slot and the fork servers' reader threads.
#[derive(Debug)]
pub struct ForkDoor {
    slot: usize,
    gate: Mutex<Gate>,
    /// Jobs admitted and not yet added to the slot's `busy`.
    started: AtomicUsize,
    /// Connections the fork servers accepted since the listener started (status).
    accepted: AtomicU64,
    tracker: Arc<Tracker>,
    forks: Arc<ForkServer>,
    notifier: crate::worker::Notifier,
    stats: Arc<crate::stats::ListenerStats>,
}

struct Gate {
    cfg: Arc<ListenerConfig>,
    guard: Guard,
    /// The main loop wants the socket watched (not paused, not stopped).
    wanted: bool,
    closed: bool,
    /// What the fork servers were last told.
    watching: bool,
    /// Jobs in flight (checked against `max_workers`).
    open: usize,
    /// Admitted, waiting for a worker place.
    waiting: VecDeque<(Answer, Box<Hold>)>,
    /// `Done`s reported without a wake-up since the last wake-up.
    quiet: usize,
    /// The daemon is out of descriptors (a connection came without its own): the fork servers
    /// stop accepting until then, when the main loop looks again (`retry`).
    starved: Option<Instant>,
}

/// Quiet `Done`s after which the main loop is woken anyway, so its channel stays short.
const QUIET_BATCH: usize = 64;

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("listener", &self.cfg.name)
            .field("open", &self.open)
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

/// What the daemon keeps of an admitted connection until its child's exit is reported: the
/// tracker entry (removed first), the admission ticket, then its copy of the connection.
struct Hold {
    tracker: Arc<Tracker>,
    conn_id: u64,
    _ticket: crate::protect::Ticket,
    conn: Conn,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.tracker.remove(self.conn_id);
    }
}

impl ForkDoor {
    pub fn new(
        slot: usize,
        cfg: Arc<ListenerConfig>,
        guard: Guard,
        shared: &crate::worker::Shared,
        forks: Arc<ForkServer>,
        stats: Arc<crate::stats::ListenerStats>,
    ) -> ForkDoor {
        ForkDoor {
            slot,
            gate: Mutex::new(Gate {
                cfg,
                guard,
                wanted: false,
                closed: false,
                watching: false,
                open: 0,
                waiting: VecDeque::new(),
                quiet: 0,
                starved: None,
            }),
            started: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            tracker: Arc::clone(&shared.tracker),
            forks,
            notifier: shared.notifier.clone(),
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
        self.sync(&mut g);
    }

    /// A reload's settings (new connections get them).
    pub fn reconfigure(&self, cfg: Arc<ListenerConfig>) {
        let mut g = self.gate();
        g.cfg = cfg;
        self.sync(&mut g);
    }

    /// Stop for good: the fork servers close their copies of the socket, connections still
    /// waiting for a place are closed, and knocks still on the way are refused.
    pub fn close(&self) {
        let waiting = {
            let mut g = self.gate();
            g.closed = true;
            g.wanted = false;
            self.sync(&mut g);
            std::mem::take(&mut g.waiting)
        };
        self.forks.close_door(self.slot);
        drop(waiting);
    }

    /// Jobs admitted since the last call (the main loop adds them to `busy`).
    pub fn take_started(&self) -> usize {
        self.started.swap(0, Ordering::SeqCst)
    }

    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Connections the fork servers accepted (status).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// When to look again after running out of descriptors.
    pub fn retry_at(&self) -> Option<Instant> {
        self.gate().starved
    }

    /// The retry time came: accept again if descriptors are free, else wait another round.
    pub fn retry(&self, now: Instant) {
        let mut g = self.gate();
        match g.starved {
            Some(t) if t <= now => {}
            _ => return,
        }
        if !crate::protect::fd_headroom() {
            g.starved = Some(now + crate::listener::FD_RETRY);
            return;
        }
        g.starved = None;
        crate::listener::log_accept_resumed(&g.cfg.name);
        self.sync(&mut g);
    }

    /// Take a worker place and send the admission; false if the fork server could not be
    /// told (the place is given back).
    fn start(&self, g: &mut Gate, answer: Answer, hold: Box<Hold>) {
        g.open += 1;
        self.started.fetch_add(1, Ordering::SeqCst);
        let fd = hold.conn.as_raw_fd();
        // SAFETY: `hold` owns the descriptor and is kept by the fork server handle (in the
        // pending job) for at least as long as `admit` uses this borrow.
        let conn = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if !answer.admit(hold, conn) {
            g.open -= 1;
            self.started.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Tell the fork servers to watch or not, as the state says: off when paused or closed,
    /// and at `max_workers` unless `max_connections` is reached (then newcomers are refused
    /// at once rather than left in the backlog).
    fn sync(&self, g: &mut Gate) {
        let full = g.open >= g.cfg.max_workers || !g.waiting.is_empty();
        let on = !g.closed
            && g.wanted
            && g.starved.is_none()
            && (!full || g.guard.at_max_connections(&g.cfg));
        if on != g.watching {
            g.watching = on;
            self.forks.watch(self.slot, on);
        }
    }
}

impl Door for ForkDoor {
    fn knock(&self, peer: PeerAddr, conn: Option<OwnedFd>, answer: Answer) {
        let mut g = self.gate();
        if g.closed {
            return; // `answer` dropped: refused
        }
        let Some(fd) = conn else {
            drop(g);
            self.out_of_descriptors();
            return; // `answer` dropped: this one is closed
        };
        if crate::protect::near_fd_limit(fd.as_raw_fd()) && g.starved.is_none() {
            // Serve this one, accept no more until there is room (as `Slot::pause_low_fds`).
            crate::listener::log_accept_paused(
                format_args!("listener `{}`", g.cfg.name),
                &"descriptors nearly exhausted (RLIMIT_NOFILE)",
            );
            g.starved = Some(Instant::now() + crate::listener::FD_RETRY);
            self.notifier.wake();
        }
        let conn = match g.cfg.protocol {
            Protocol::Tcp => Conn::Tcp(std::net::TcpStream::from(fd)),
            _ => Conn::Unix(std::os::unix::net::UnixStream::from(fd)),
        };
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let timers;
        let admitted = g.guard.admit_stream(&g.cfg, &peer, now);
        if let Some(ticket) = admitted {
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let conn_id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            self.tracker.insert(conn_id, conn.as_raw_fd());
            g.guard.arm(&g.cfg, &conn, conn_id, &self.tracker, now);
            timers = g.cfg.protect.max_duration.is_some();
            log::debug!("listener `{}`: connection from {peer}", g.cfg.name);
            let hold = Box::new(Hold {
                tracker: Arc::clone(&self.tracker),
                conn_id,
                _ticket: ticket,
                conn,
            });
            if g.open < g.cfg.max_workers && g.waiting.is_empty() {
                self.start(&mut g, answer, hold);
            } else {
                g.waiting.push_back((answer, hold));
            }
        } else {
            timers = true; // the refusal log may want a summary
        }
        self.sync(&mut g);
        drop(g);
        if timers {
            self.notifier.wake();
        }
    }

    /// Out of descriptors here: the fork servers stop accepting (the backlog holds
    /// newcomers) until the retry time; one log line per episode, as `Slot::drain`.
    fn out_of_descriptors(&self) {
        let mut g = self.gate();
        if g.closed {
            return;
        }
        if g.starved.is_none() {
            crate::listener::log_accept_paused(
                format_args!("listener `{}`", g.cfg.name),
                &"the daemon is out of descriptors (RLIMIT_NOFILE) for the connections the \
                  fork servers accept",
            );
        }
        g.starved = Some(Instant::now() + crate::listener::FD_RETRY);
        self.sync(&mut g);
        drop(g);
        self.notifier.wake(); // the main loop's timer for `retry`
    }

    fn left(&self) -> bool {
        let mut g = self.gate();
        g.open = g.open.saturating_sub(1);
        while g.open < g.cfg.max_workers {
            let Some((answer, hold)) = g.waiting.pop_front() else {
                break;
            };
            self.start(&mut g, answer, hold);
        }
        self.sync(&mut g);
        // The main loop needs each `Done` at once only when the listener is closed (drain,
        // stop); otherwise it counts them on its next turn, woken at least every
        // `QUIET_BATCH`, so a connection costs it no wake-up of its own.
        g.closed || {
            g.quiet += 1;
            g.quiet >= QUIET_BATCH && {
                g.quiet = 0;
                true
            }
        }
    }
}
