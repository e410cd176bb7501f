//! The fork server's own accept, for `workers = "forked"` stream listeners (TCP and unix, not
//! TLS): the daemon sends the listening socket with the listener's config, and every fork
//! server watches it in its epoll set with `EPOLLEXCLUSIVE` (one connection wakes one fork
//! server). The one that wakes accepts, sends the daemon a `Knock` with the connection, and
//! parks it; the daemon's reader thread for this fork server runs the listener's one `Guard`
//! (ACL, `max_connections`, `max_per_source`, `rate`, refusal log, `max_duration`) and
//! `max_workers`, keeps its copy of the connection for stop and deadlines as in the hand-off
//! path, and answers `Verdict`: the job id to fork a child for, or none (the parked
//! connection is closed, no byte sent). The main loop takes no part per connection.
//!
//! The daemon decides when the socket is watched (`Watch`: start, pause, `max_workers`
//! reached, stop) and when it is closed (`Unlisten`, `Forget`). Parked connections are bounded
//! (`MAX_PARKED`): at the bound the fork server stops accepting until answers come, so neither
//! side can fill the other's socket buffer. Out of descriptors, it stops watching and retries
//! every `FD_RETRY`, as the daemon's main loop does.
//!
//! `SOCKETD_FORKED_ACCEPT=handoff` in the daemon's environment keeps the old path (the main
//! loop accepts and hands each connection over); the bench compares both.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use crate::config::{ListenerConfig, Protocol};
use crate::conn::PeerAddr;
use crate::listener::Acceptor;

/// Whether fork servers accept for `forked` stream listeners (the default) or the daemon's
/// main loop accepts and hands off (`SOCKETD_FORKED_ACCEPT=handoff`).
pub fn fork_servers_accept() -> bool {
    !matches!(
        std::env::var("SOCKETD_FORKED_ACCEPT").as_deref(),
        Ok("handoff")
    )
}

/// How an accepted connection is reported: (knock, slot, peer, local address, connection);
/// false if it could not be.
pub(super) type Knock<'a> =
    dyn FnMut(u64, u64, &PeerAddr, Option<std::net::SocketAddr>, &OwnedFd) -> bool + 'a;

/// Connections accepted and not yet answered, at most, per fork server.
const MAX_PARKED: usize = 64;

/// Epoll tokens: the daemon's socket, the signalfd, the stderr pipes' set, and listeners
/// from `LISTEN` up (plus the slot id).
pub(super) const SOCK: u64 = 0;
pub(super) const SIGNALS: u64 = 1;
pub(super) const PIPES: u64 = 2;
const LISTEN: u64 = 1 << 32;

/// A listener's socket in this fork server.
struct Door {
    acceptor: Acceptor,
    name: String,
    local: Option<std::net::SocketAddr>,
    /// The daemon wants it watched.
    watch: bool,
    /// In the epoll set now.
    registered: bool,
}

/// An accepted connection waiting for the daemon's verdict.
pub(super) struct Parked {
    pub slot: u64,
    pub conn: OwnedFd,
    pub peer: PeerAddr,
    pub local: Option<std::net::SocketAddr>,
    /// When it was accepted: one with no answer after `ANSWER_WAIT` is closed.
    at: Instant,
}

/// How long a parked connection waits for the daemon's answer. Answers come in microseconds;
/// one lost (the daemon out of descriptors could not receive the knock) must not hold the
/// connection, or a parking place, for ever.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The fork server's wait set and the listeners it accepts for.
pub(super) struct Doorway {
    epoll: OwnedFd,
    doors: HashMap<u64, Door>,
    parked: HashMap<u64, Parked>,
    next_knock: u64,
    /// Out of descriptors: not watching until then.
    starved_until: Option<Instant>,
    starved: bool,
}

impl Doorway {
    pub fn new() -> io::Result<Doorway> {
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just created, owned by nothing else.
        let epoll = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Doorway {
            epoll,
            doors: HashMap::new(),
            parked: HashMap::new(),
            next_knock: 0,
            starved_until: None,
            starved: false,
        })
    }

    /// Watch `fd` (level-triggered) under `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            libc::EPOLLIN,
            token,
        )
    }

    /// Wait for events until `deadline` (or for ever); the tokens that are ready.
    pub fn wait(&self, deadline: Option<Instant>, ready: &mut Vec<u64>) -> io::Result<()> {
        let deadline = [deadline, self.starved_until, self.answer_due()]
            .into_iter()
            .flatten()
            .min();
        let timeout = match deadline {
            None => -1,
            Some(t) => t
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000)
                .min(i32::MAX as u128) as i32,
        };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        ready.clear();
        // SAFETY: `events` is a valid buffer of the length passed.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(e),
            };
        }
        ready.extend(events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }

    /// The slot a ready token is a listener of.
    pub fn slot_of(token: u64) -> Option<u64> {
        token.checked_sub(LISTEN)
    }

    /// A stream listener's socket came with its config: accept on it when told to. A socket
    /// sent again (a reload) replaces the old one and keeps its watch state.
    pub fn open(&mut self, slot: u64, socket: OwnedFd, cfg: &ListenerConfig) {
        let watch = self.close(slot);
        let acceptor = match cfg.protocol {
            Protocol::Tcp => Acceptor::Tcp(std::net::TcpListener::from(socket)),
            _ => Acceptor::Unix(std::os::unix::net::UnixListener::from(socket)),
        };
        let local = match &acceptor {
            Acceptor::Tcp(l) => l.local_addr().ok(),
            Acceptor::Unix(_) => None,
        };
        self.doors.insert(
            slot,
            Door {
                acceptor,
                name: cfg.name.clone(),
                local,
                watch,
                registered: false,
            },
        );
        self.sync(slot);
    }

    /// Close a listener's socket (out of the set first: the daemon and the other fork servers
    /// still hold it, so closing alone would leave it registered). Returns its watch state.
    pub fn close(&mut self, slot: u64) -> bool {
        let Some(mut door) = self.doors.remove(&slot) else {
            return false;
        };
        self.set(&mut door, slot, false);
        door.watch
    }

    pub fn watch(&mut self, slot: u64, on: bool) {
        if let Some(d) = self.doors.get_mut(&slot) {
            d.watch = on;
        }
        self.sync(slot);
    }

    /// Close parked connections that got no answer within `ANSWER_WAIT`.
    pub fn expire(&mut self, now: Instant) {
        let Some(t) = self.answer_due() else { return };
        if t > now {
            return;
        }
        let full = self.parked.len() >= MAX_PARKED;
        let before = self.parked.len();
        self.parked
            .retain(|_, p| now.duration_since(p.at) < ANSWER_WAIT);
        let dropped = before - self.parked.len();
        log::warn!(
            "fork server {}: {dropped} accepted connections got no answer from the daemon \
             within {ANSWER_WAIT:?}; closed",
            std::process::id()
        );
        if full && self.parked.len() < MAX_PARKED {
            self.sync_all();
        }
    }

    /// When the oldest parked connection's wait runs out.
    fn answer_due(&self) -> Option<Instant> {
        self.parked.values().map(|p| p.at + ANSWER_WAIT).min()
    }

    /// The retry time after descriptor exhaustion came: watch again if there is room.
    pub fn retry(&mut self, now: Instant) {
        match self.starved_until {
            Some(t) if t <= now => {}
            _ => return,
        }
        if !crate::protect::fd_headroom() {
            self.starved_until = Some(now + crate::listener::FD_RETRY);
            return;
        }
        self.starved_until = None;
        self.sync_all();
    }

    /// The daemon's verdict on a parked connection.
    pub fn unpark(&mut self, knock: u64) -> Option<Parked> {
        let full = self.parked.len() >= MAX_PARKED;
        let p = self.parked.remove(&knock);
        if full && self.parked.len() < MAX_PARKED {
            self.sync_all();
        }
        p
    }

    /// Accept up to a fair batch on slot `slot`'s socket; each connection is sent to the
    /// daemon with `send` (which returns false if it could not be) and parked.
    pub fn accept(&mut self, slot: u64, send: &mut Knock<'_>) {
        for _ in 0..crate::listener::FAIR_BATCH {
            if self.parked.len() >= MAX_PARKED {
                self.sync_all();
                return;
            }
            let Some(door) = self.doors.get(&slot) else {
                return;
            };
            if !door.registered {
                return;
            }
            match door.acceptor.accept() {
                Ok((conn, peer)) => {
                    let conn = match conn {
                        crate::conn::Conn::Tcp(s) => OwnedFd::from(s),
                        crate::conn::Conn::Unix(s) => OwnedFd::from(s),
                    };
                    let low = crate::protect::near_fd_limit(conn.as_raw_fd());
                    if std::mem::take(&mut self.starved) {
                        crate::listener::log_accept_resumed(&door.name);
                    }
                    let local = door.local;
                    let knock = self.next_knock;
                    self.next_knock += 1;
                    // Not sent: the connection is closed here, unserved.
                    if send(knock, slot, &peer, local, &conn) {
                        self.parked.insert(
                            knock,
                            Parked {
                                slot,
                                conn,
                                peer,
                                local,
                                at: Instant::now(),
                            },
                        );
                    }
                    if low {
                        self.starve(slot, &"descriptors nearly exhausted (RLIMIT_NOFILE)");
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if crate::listener::transient(&e) => {}
                Err(e) => {
                    self.starve(slot, &e);
                    return;
                }
            }
        }
    }

    /// Out of descriptors (or another accept error): stop watching every socket and retry
    /// every `FD_RETRY`; one log line per episode.
    fn starve(&mut self, slot: u64, why: &dyn std::fmt::Display) {
        if !std::mem::replace(&mut self.starved, true) {
            let name = self.doors.get(&slot).map_or("?", |d| d.name.as_str());
            let pid = std::process::id();
            crate::listener::log_accept_paused(
                format_args!("listener `{name}`: fork server {pid}"),
                why,
            );
        }
        self.starved_until = Some(Instant::now() + crate::listener::FD_RETRY);
        self.sync_all();
    }

    fn sync_all(&mut self) {
        let slots: Vec<u64> = self.doors.keys().copied().collect();
        for slot in slots {
            self.sync(slot);
        }
    }

    /// Put the socket in the set or take it out, as the state says.
    fn sync(&mut self, slot: u64) {
        let open = self.starved_until.is_none() && self.parked.len() < MAX_PARKED;
        let epoll = self.epoll.as_raw_fd();
        if let Some(door) = self.doors.get_mut(&slot) {
            let on = open && door.watch;
            set(epoll, door, slot, on);
        }
    }

    fn set(&self, door: &mut Door, slot: u64, on: bool) {
        set(self.epoll.as_raw_fd(), door, slot, on);
    }
}

fn set(epoll: RawFd, door: &mut Door, slot: u64, on: bool) {
    if on == door.registered {
        return;
    }
    let fd = door.acceptor.as_raw_fd();
    let r = if on {
        epoll_ctl(
            epoll,
            libc::EPOLL_CTL_ADD,
            fd,
            libc::EPOLLIN | libc::EPOLLEXCLUSIVE,
            LISTEN + slot,
        )
    } else {
        epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, 0, 0)
    };
    match r {
        Ok(()) => door.registered = on,
        Err(e) => log::error!(
            "listener `{}`: fork server {}: cannot {} its socket: {e}",
            door.name,
            std::process::id(),
            if on { "watch" } else { "stop watching" }
        ),
    }
}

fn epoll_ctl(
    epoll: RawFd,
    op: libc::c_int,
    fd: RawFd,
    events: libc::c_int,
    token: u64,
) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: events as u32,
        u64: token,
    };
    // SAFETY: both descriptors are open (owned by the caller); `ev` outlives the call.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
