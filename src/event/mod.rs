//! `workers = "event"`: the built-in services as non-blocking state machines on mio event
//! loops, no thread per connection.
//!
//! Accept and admission stay in the main loop (`Slot::drain`), the same for every worker
//! model; an admitted connection is then handed off to the least-loaded of the listener's
//! `threads` event loops (each its own `Poll`, `Waker` and channel). A loop reports `Done` for
//! each closed connection exactly like a worker thread does, so `max_workers` (here: open
//! connections), back-pressure on the listener, graceful stop and reload work unchanged.
//! Datagrams of the simple services are answered inline on the main loop; the UDP proxy's
//! per-client associations live on the loops. Registered (blocking) handlers cannot run here:
//! `check` refuses them (`Registry::has_event`).

pub mod accept;
pub mod proxy;
mod splice;
pub mod stream;
mod thread;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use mio::Waker;

use crate::config::ListenerConfig;
use crate::conn::{Conn, PeerAddr};
use crate::handler::file::FileSettings;
use crate::handler::proxy::ProxySettings;
use crate::handler::{BuildContext, DatagramSocket};
use crate::worker::Shared;

/// The handler names that have an event-loop implementation.
pub use crate::handler::EVENT_HANDLERS as HANDLERS;

/// What an event loop serves for one listener, built from its config.
#[derive(Debug)]
pub enum Service {
    Echo,
    Discard,
    Chargen,
    Daytime,
    Time,
    File(FileSettings),
    Proxy(Arc<ProxySettings>),
}

impl Service {
    /// The state machine for a listener's handler, or why there is none.
    pub fn for_listener(cfg: &ListenerConfig) -> Result<Service, String> {
        let ctx = BuildContext {
            listener: &cfg.name,
            protocol: cfg.protocol,
            settings: cfg.handler_settings.as_ref(),
        };
        Ok(match cfg.handler.as_str() {
            "echo" => Service::Echo,
            "discard" => Service::Discard,
            "chargen" => Service::Chargen,
            "daytime" => Service::Daytime,
            "time" => Service::Time,
            "file" => Service::File(FileSettings::from_build(&ctx)?),
            "proxy" => Service::Proxy(Arc::new(ProxySettings::from_build(&ctx)?)),
            other => {
                return Err(format!(
                    "handler `{other}` has no event-loop implementation; workers = \"event\" \
                     serves {}; use workers = \"threaded\" or \"forked\" for it",
                    HANDLERS.join(", ")
                ))
            }
        })
    }
}

/// An admitted connection, as the main loop hands it over.
pub struct Accepted {
    pub conn: Conn,
    pub peer: PeerAddr,
    /// The tracker id (the tracker entry goes before the fd closes).
    pub conn_id: u64,
    /// The admission place (max_connections, max_per_source), held until the close.
    pub ticket: crate::protect::Ticket,
    /// A TLS listener's connection (the plaintext end of the TLS front's socketpair): the
    /// listening address (for PROXY headers) and the session, for the access line.
    pub tls: Option<(
        Option<std::net::SocketAddr>,
        std::sync::Arc<crate::tls::TlsInfo>,
    )>,
}

/// A connection handed to a loop.
struct Handoff {
    accepted: Accepted,
    service: Arc<Service>,
    /// `idle_timeout`: no byte either way for this long closes the connection.
    idle: Option<std::time::Duration>,
    /// The socket is non-blocking already (accepted so by a loop).
    nonblocking: bool,
}

/// A UDP client's datagram for the proxy's associations.
struct DatagramJob {
    data: Vec<u8>,
    client: std::net::SocketAddr,
    reply: DatagramSocket,
    settings: Arc<ProxySettings>,
    max: usize,
}

enum Msg {
    Stream(Handoff),
    Datagram(DatagramJob),
    /// The listener is gone or resized: finish open connections, then exit.
    Retire,
}

/// One loop thread as seen from the main loop (and, when loops accept, from its siblings).
#[derive(Clone)]
struct LoopHandle {
    tx: Sender<Msg>,
    waker: Arc<Waker>,
    live: Arc<AtomicUsize>,
    /// Set by the loop just before it drains its channel and blocks in `poll`.
    sleeping: Arc<AtomicBool>,
}

impl std::fmt::Debug for LoopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopHandle")
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish()
    }
}

impl LoopHandle {
    /// Queue a message; wake the loop only if it may be blocked in `poll`. A busy loop drains
    /// its channel on every turn, so under load hand-offs cost no eventfd write. (The loop
    /// stores `sleeping` before its last drain and we store the message before reading it,
    /// both SeqCst, so a message is never left behind a sleeping loop.)
    fn send(&self, msg: Msg) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        !self.sleeping.swap(false, Ordering::SeqCst) || self.waker.wake().is_ok()
    }
}

/// A listener's event loops and the service built from its current config.
#[derive(Default)]
pub struct SlotEvents {
    loops: Vec<LoopHandle>,
    service: Option<(Arc<ListenerConfig>, Arc<Service>)>,
    next: usize,
    /// Set when the loops accept for themselves (see `accept`).
    accept: Option<Arc<accept::LoopAccept>>,
}

impl std::fmt::Debug for SlotEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotEvents")
            .field("loops", &self.loops.len())
            .finish()
    }
}

impl Drop for SlotEvents {
    fn drop(&mut self) {
        for l in &self.loops {
            l.send(Msg::Retire);
        }
    }
}

impl SlotEvents {
    /// The service for `cfg`, rebuilt when a reload swapped the config (new connections only).
    fn service(&mut self, cfg: &Arc<ListenerConfig>) -> Result<Arc<Service>, String> {
        if let Some((c, s)) = &self.service {
            if Arc::ptr_eq(c, cfg) {
                return Ok(Arc::clone(s));
            }
        }
        let s = Arc::new(Service::for_listener(cfg)?);
        self.service = Some((Arc::clone(cfg), Arc::clone(&s)));
        Ok(s)
    }

    /// Start (or, after a reload changed `threads`, replace) the loops.
    fn ensure_loops(
        &mut self,
        listener: usize,
        cfg: &ListenerConfig,
        shared: &Shared,
    ) -> std::io::Result<()> {
        let want = cfg.threads.max(1);
        if self.loops.len() == want {
            return Ok(());
        }
        let mut fresh = Vec::with_capacity(want);
        let mut epolls = Vec::with_capacity(want);
        for i in 0..want {
            let (tx, rx) = channel();
            let live = Arc::new(AtomicUsize::new(0));
            let sleeping = Arc::new(AtomicBool::new(false));
            let ctx = thread::LoopContext {
                accept: self.accept.as_ref().map(|a| (Arc::clone(a), i)),
                listener,
                name: cfg.name.clone(),
                notifier: shared.notifier.clone(),
                tracker: Arc::clone(&shared.tracker),
                live: Arc::clone(&live),
                sleeping: Arc::clone(&sleeping),
            };
            let (waker, epoll) = thread::spawn(format!("socketd:{}:ev{i}", cfg.name), rx, ctx)?;
            epolls.push(epoll);
            fresh.push(LoopHandle {
                tx,
                waker,
                live,
                sleeping,
            });
        }
        if let Some(a) = &self.accept {
            a.set_loops(epolls, fresh.clone());
        }
        for old in std::mem::replace(&mut self.loops, fresh) {
            old.send(Msg::Retire);
        }
        self.next = 0;
        Ok(())
    }

    /// Let the loops accept on `listener` themselves (see `accept`), or update their settings
    /// after a reload. Returns the shared accepting state the slot drives.
    pub fn start_accepting(
        &mut self,
        id: usize,
        cfg: &Arc<ListenerConfig>,
        shared: &Shared,
        listener: &crate::listener::Listener,
        guard: &crate::protect::Guard,
        stats: &Arc<crate::stats::ListenerStats>,
    ) -> Result<Arc<accept::LoopAccept>, String> {
        let service = self.service(cfg)?;
        if let Some(a) = &self.accept {
            a.reconfigure(Arc::clone(cfg), service);
        } else {
            let acceptor = listener
                .acceptor()
                .map_err(|e| format!("cannot share the socket with the event loops: {e}"))?
                .ok_or("not a stream socket")?;
            self.accept = Some(Arc::new(accept::LoopAccept::new(
                acceptor,
                Arc::clone(cfg),
                service,
                guard.clone(),
                Arc::clone(stats),
            )));
            // Loops started for hand-off know nothing of the socket: start a fresh set.
            for old in self.loops.drain(..) {
                old.send(Msg::Retire);
            }
        }
        self.ensure_loops(id, cfg, shared)
            .map_err(|e| format!("cannot start an event loop thread: {e}"))?;
        Ok(Arc::clone(self.accept.as_ref().expect("set above")))
    }

    /// Stop the loops accepting (closed listener, or no longer `workers = "event"`); their
    /// open connections go on.
    pub fn stop_accepting(&mut self) {
        if let Some(a) = self.accept.take() {
            a.close();
        }
    }

    /// Hand an accepted connection to the least-loaded loop. `Err` says why no loop could
    /// take it (the connection is closed; the caller frees the tracker entry).
    pub fn dispatch_stream(
        &mut self,
        listener: usize,
        cfg: &Arc<ListenerConfig>,
        shared: &Shared,
        accepted: Accepted,
    ) -> Result<(), String> {
        let service = self.service(cfg)?;
        self.ensure_loops(listener, cfg, shared)
            .map_err(|e| format!("cannot start an event loop thread: {e}"))?;
        let n = self.loops.len();
        // Least loaded, starting after the last pick so ties rotate.
        let pick = (0..n)
            .map(|k| (self.next + 1 + k) % n)
            .min_by_key(|&i| self.loops[i].live.load(Ordering::Relaxed))
            .unwrap_or(0);
        self.next = pick;
        let l = &self.loops[pick];
        l.live.fetch_add(1, Ordering::Relaxed);
        if l.send(Msg::Stream(Handoff {
            accepted,
            service,
            idle: cfg.protect.idle_timeout,
            nonblocking: false,
        })) {
            Ok(())
        } else {
            l.live.fetch_sub(1, Ordering::Relaxed);
            // Its thread ended (a panic): forget it; the next connection starts a fresh set.
            self.loops.remove(pick);
            Err(
                "event loop thread was gone; this connection is closed, the next starts a new loop"
                    .into(),
            )
        }
    }

    /// A datagram on an event listener. The simple services answer inline here on the main
    /// loop (no thread hop, no allocation for echo); the proxy's go to a loop chosen by the
    /// client address so each client keeps one association.
    pub fn datagram(
        &mut self,
        listener: usize,
        cfg: &Arc<ListenerConfig>,
        shared: &Shared,
        data: &[u8],
        peer: &PeerAddr,
        reply: &DatagramSocket,
    ) -> Result<(), String> {
        let service = self.service(cfg)?;
        match &*service {
            Service::Proxy(settings) => {
                let PeerAddr::Inet(client) = peer else {
                    return Ok(());
                };
                self.ensure_loops(listener, cfg, shared)
                    .map_err(|e| format!("cannot start an event loop thread: {e}"))?;
                let pick = hash_addr(client) % self.loops.len().max(1);
                let job = DatagramJob {
                    data: data.to_vec(),
                    client: *client,
                    reply: reply.clone(),
                    settings: Arc::clone(settings),
                    max: cfg.max_workers,
                };
                if !self.loops[pick].send(Msg::Datagram(job)) {
                    self.loops.remove(pick); // gone (a panic): a fresh set starts next time
                }
                Ok(())
            }
            simple => {
                answer_datagram(simple, data, peer, reply);
                Ok(())
            }
        }
    }
}

fn hash_addr(a: &std::net::SocketAddr) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.hash(&mut h);
    h.finish() as usize
}

/// The RFC 862-868 datagram answers, sent with the listener's non-blocking socket: a full
/// socket buffer drops the reply, which UDP allows.
fn answer_datagram(service: &Service, data: &[u8], peer: &PeerAddr, reply: &DatagramSocket) {
    let owned;
    let out: &[u8] = match service {
        Service::Echo => data,
        Service::Discard => return,
        Service::Daytime => {
            owned = crate::clock::daytime_line(std::time::SystemTime::now()).into_bytes();
            &owned
        }
        Service::Time => {
            owned = crate::clock::rfc868_seconds(std::time::SystemTime::now())
                .to_be_bytes()
                .to_vec();
            &owned
        }
        Service::Chargen => {
            owned = crate::handler::chargen::datagram_reply();
            &owned
        }
        Service::File(_) | Service::Proxy(_) => return,
    };
    let sent = match (reply, peer) {
        (DatagramSocket::Udp(s), PeerAddr::Inet(a)) => s.send_to(out, a),
        (DatagramSocket::Unix(s), PeerAddr::Unix { path: Some(p), .. }) => s.send_to(out, p),
        _ => return,
    };
    if let Err(e) = sent {
        log::debug!("datagram reply to {peer}: {e}");
    }
}
