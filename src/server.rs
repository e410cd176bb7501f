//! The event loop and the daemon's lifecycle: Running -> (Reloading ->) Running -> Draining ->
//! Stopped (socketserver's `serve_forever`, `shutdown` and `server_close`).
//!
//! One mio `Poll` in the main thread owns every listening socket, the signal source and the
//! `Waker` that workers use to report finished jobs. Nothing here blocks on a peer: sockets are
//! drained to `WouldBlock`, handlers run on workers, and a stop is a state of the loop that
//! waits for in-flight work up to `shutdown_timeout` and then closes what is left.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use crate::config::Config;
use crate::handler::Registry;
use crate::listener::{BindError, Listener};
use crate::slot::{Drained, Shared, Slot, MAX_DATAGRAM};
use crate::worker::{Done, Notifier, Tracker};

mod fdstore;
mod handle;
mod ops;
mod reload;
mod status;
mod stop;
mod upgrade;

pub(crate) use upgrade::Outcome as UpgradeOutcome;

pub use handle::ShutdownHandle;
use stop::State;

const SIGNALS: Token = Token(0);
const WAKER: Token = Token(1);
/// Slot ids (and so tokens) start here and only grow.
const FIRST_SLOT: usize = 2;

/// Why the daemon could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Bind(#[from] BindError),
    #[error("listener `{listener}`: {message}")]
    Handler { listener: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ServeError {
    move |source| ServeError::Io { context, source }
}

/// A bound, not yet serving daemon. Binding is separate from serving so that everything that
/// can fail at start (addresses, permissions) fails before the process detaches or says READY.
pub struct Server {
    poll: Poll,
    /// The daemon's signals (`bind_daemon`); a library server has none.
    signals: Option<Signals>,
    /// What `ShutdownHandle`s share with the loop.
    control: Arc<handle::Control>,
    /// The daemon starts fork servers for every config (a reload may add a forked listener)
    /// and only while single-threaded; a library server starts them only for a forked one.
    daemon: bool,
    /// `start` has run: fork servers started, listeners watched, READY said.
    started: bool,
    done_rx: Receiver<Done>,
    shared: Shared,
    registry: Registry,
    config: Config,
    slots: BTreeMap<usize, Slot>,
    next_id: usize,
    state: State,
    /// Listeners whose fair batch ran out with more maybe waiting.
    again: Vec<usize>,
    /// Listeners paused for lack of file descriptors, with when to try again.
    retry: Vec<(Instant, usize)>,
    buf: Vec<u8>,
    /// During a forced stop: when child processes that ignored SIGTERM get SIGKILL.
    kill_at: Option<Instant>,
    /// The SIGKILL round has been sent.
    killed: bool,
    /// The service manager's notify socket (no-op without `NOTIFY_SOCKET`).
    notify: crate::daemon::notify::Notify,
    /// Run once when the daemon is serving (release a detaching parent, …).
    on_ready: Vec<Box<dyn FnOnce() + Send>>,
    /// A binary upgrade waiting for its new process (`upgrade`).
    upgrading: Option<upgrade::InProgress>,
    /// Listening sockets in the service manager's fd store (`fdstore`).
    fd_stored: fdstore::Stored,
    /// The store has been brought in line once; when to try again for the rest.
    fd_store_synced: bool,
    fd_store_retry: Option<Instant>,
    /// The control socket, metrics endpoint and what they report (`ops`).
    ops: ops::Ops,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("slots", &self.slots)
            .field("state", &self.state)
            .finish()
    }
}

impl Server {
    /// Bind every listener and set up the loop, touching nothing process-wide: no signal
    /// disposition, no resource limit, no inherited socket, no service-manager message. What a
    /// library server is made of; nothing is accepted until `serve_forever`.
    pub fn bind(config: Config, registry: Registry) -> Result<Server, ServeError> {
        Server::build(config, registry, false)
    }

    /// The daemon's `bind`: raise the descriptor limit, take over the signals (TERM and INT
    /// stop, QUIT stops at once, HUP reloads, USR1 logs status), adopt sockets the service
    /// manager passed, and talk to it (`NOTIFY_SOCKET`). Call it while the process has one
    /// thread: every thread started later inherits the signal mask.
    pub fn bind_daemon(config: Config, registry: Registry) -> Result<Server, ServeError> {
        // Before anything opens a descriptor or forks: every process of the daemon gets it.
        crate::protect::raise_fd_limit();
        crate::daemon::upgrade::remember_own_binary();
        Server::build(config, registry, true)
    }

    fn build(config: Config, registry: Registry, daemon: bool) -> Result<Server, ServeError> {
        let poll = Poll::new().map_err(io_err("cannot create the event loop"))?;
        let signals = if daemon {
            let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2])
                .map_err(io_err("cannot set up signal handling"))?;
            poll.registry()
                .register(&mut signals, SIGNALS, mio::Interest::READABLE)
                .map_err(io_err("cannot watch signals"))?;
            Some(signals)
        } else {
            None
        };
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER).map_err(io_err("cannot create the waker"))?,
        );
        let (tx, done_rx) = channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let control = handle::Control::new(Arc::clone(&waker));
        let ops = ops::Ops::bind(&config, Arc::clone(&waker))?;
        let mut server = Server {
            poll,
            signals,
            control,
            daemon,
            started: false,
            done_rx,
            shared: Shared {
                notifier: Notifier::new(tx, waker),
                tracker: Arc::new(Tracker::default()),
                stopping,
                next_conn: 0,
                forks: None,
                budget: None,
            },
            registry,
            config: Config {
                origin: config.origin.clone(),
                daemon: config.daemon.clone(),
                listeners: vec![],
            },
            slots: BTreeMap::new(),
            next_id: FIRST_SLOT,
            state: State::Running,
            again: Vec::new(),
            retry: Vec::new(),
            buf: vec![0; MAX_DATAGRAM],
            kill_at: None,
            killed: false,
            notify: if daemon {
                crate::daemon::notify::Notify::from_env()
            } else {
                crate::daemon::notify::Notify::default()
            },
            on_ready: Vec::new(),
            upgrading: None,
            fd_stored: fdstore::Stored::new(),
            fd_store_synced: false,
            fd_store_retry: None,
            ops,
        };
        if crate::daemon::handover::from_pid().is_some() {
            server.notify.defer_first_ready();
        }
        // Sockets from the service manager first; a listener none was passed for binds its own.
        let mut inherited = if daemon {
            crate::daemon::activation::Inherited::from_env()
        } else {
            crate::daemon::activation::Inherited::default()
        };
        for cfg in &config.listeners {
            let mut paused = false;
            let listener = match inherited.take_for(cfg) {
                Some(taken) => {
                    paused = taken.paused;
                    match taken.upgrade_from {
                        Some(pid) => log::info!(
                            "listener `{}`: using the socket `{}` handed over by pid {pid}",
                            cfg.name,
                            taken.name
                        ),
                        None => log::info!(
                            "listener `{}`: using the socket `{}` passed by the service manager",
                            cfg.name,
                            taken.name
                        ),
                    }
                    let mut l = Listener::adopt(taken.fd, cfg)?;
                    l.set_origin(taken.owned_file, taken.from_manager, taken.path);
                    l
                }
                None => Listener::bind(cfg)?,
            };
            let id = server.add_slot(cfg.clone(), listener)?;
            if let (true, Some(slot)) = (paused, server.slots.get_mut(&id)) {
                slot.paused = true; // as the old process of an upgrade had it
                log::info!("listener `{}`: paused, as before the upgrade", cfg.name);
            }
        }
        inherited.report_unmatched();
        server.config = config;
        Ok(server)
    }

    /// The addresses actually bound, by listener name (port 0 resolved).
    pub fn bound(&self) -> Vec<(String, String)> {
        self.slots
            .values()
            .filter_map(|s| {
                s.listener
                    .as_ref()
                    .map(|l| (s.cfg.name.clone(), l.local_addr().to_string()))
            })
            .collect()
    }

    fn add_slot(
        &mut self,
        cfg: crate::config::ListenerConfig,
        listener: Listener,
    ) -> Result<usize, ServeError> {
        let factory = self
            .registry
            .build_for(&cfg)
            .map_err(|e| ServeError::Handler {
                listener: cfg.name.clone(),
                message: e.to_string(),
            })?;
        let id = self.next_id;
        self.next_id += 1;
        let slot = Slot::new(
            id,
            cfg,
            listener,
            factory,
            Arc::clone(&self.shared.stopping),
        )
        .map_err(io_err("cannot set up a datagram reply socket"))?;
        let mut slot = slot;
        slot.loops_may_accept = self.daemon && crate::event::accept::loops_accept();
        slot.forks_may_accept = self.daemon && crate::worker::doorway::fork_servers_accept();
        if self.started {
            // Loop threads start only after the fork servers (see `start`).
            slot.setup_accept(self.poll.registry(), &self.shared);
        }
        self.slots.insert(id, slot);
        Ok(id)
    }

    /// Run until stopped: the daemon's whole life (`serve_forever`, then `server_close`).
    /// Returns once every listener is closed and in-flight work has finished or been cut off.
    pub fn serve(mut self) -> Result<(), ServeError> {
        self.serve_forever(&mut || {})?;
        self.server_close();
        // The last connections' access lines, before the process (and its writer) goes.
        crate::access_log::flush(Duration::from_secs(2));
        log::info!("socketd stopped");
        Ok(())
    }

    /// A handle that stops `serve_forever` from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle::new(Arc::clone(&self.control))
    }

    /// The daemon's fork servers, for every config (a reload may add a forked listener): call
    /// while the process still has its only thread, which `ForkServer::start` checks (bind,
    /// detach, privilege drop and logging start none). Pool threads, event loops and everything
    /// else start after this. Also marks inherited descriptors close-on-exec. Idempotent.
    pub fn start_fork_servers(&mut self) -> Result<(), ServeError> {
        if self.shared.forks.is_some() {
            return Ok(());
        }
        crate::process::cloexec_all();
        // Worker processes send ended connections to the daemon over this (they inherit it).
        crate::access_log::prepare().map_err(io_err("cannot set up the access log"))?;
        let forks =
            crate::worker::forked::ForkServer::start(&self.registry, self.shared.notifier.clone())
                .map_err(io_err("cannot start the fork server for forked workers"))?;
        self.shared.forks = Some(Arc::new(forks));
        Ok(())
    }

    /// Start what serving needs, once: fork servers, readiness watches, `READY=1`.
    fn start(&mut self) -> Result<(), ServeError> {
        if self.started {
            return Ok(());
        }
        self.started = true;
        let forked = self
            .slots
            .values()
            .any(|s| s.cfg.workers == crate::config::WorkerModel::Forked);
        if self.daemon {
            self.start_fork_servers()?;
        } else if forked && self.shared.forks.is_none() {
            // A library server may live in a process with other threads: see
            // `ForkServer::start_threaded` for what its children can and cannot inherit.
            let forks = crate::worker::forked::ForkServer::start_threaded(
                &self.registry,
                self.shared.notifier.clone(),
            )
            .map_err(io_err("cannot start the fork server for forked workers"))?;
            self.shared.forks = Some(Arc::new(forks));
        }
        for slot in self.slots.values_mut() {
            slot.setup_accept(self.poll.registry(), &self.shared);
            slot.watch(self.poll.registry());
            if let Some(l) = &slot.listener {
                log::info!(
                    "listener `{}` listening on {} {}",
                    slot.cfg.name,
                    slot.cfg.protocol,
                    l.local_addr()
                );
            }
        }
        for l in self.slots.values_mut().filter_map(|s| s.listener.as_mut()) {
            l.claim_file(); // an upgrade's new process has taken over
        }
        if self.daemon {
            self.start_ops()?;
            log::info!("socketd ready: {} listeners", self.slots.len());
        }
        let status = self.status_line();
        self.notify.ready(&status);
        self.sync_fd_store();
        for hook in std::mem::take(&mut self.on_ready) {
            hook();
        }
        Ok(())
    }

    /// One turn of the loop: wait for readiness (at most `limit`), accept and dispatch, collect
    /// finished jobs, run timers, and advance a stop.
    fn turn(&mut self, events: &mut Events, limit: Option<Duration>) -> Result<(), ServeError> {
        let now = Instant::now();
        self.notify.tick(now);
        if self.state == State::Running && self.notify.status_due(now) {
            let line = self.status_line();
            self.notify.refresh_status(&line);
        }
        let timeout = match (self.next_timeout(), limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Err(e) = self.poll.poll(events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(ServeError::Io {
                context: "event loop failed",
                source: e,
            });
        }
        for event in events.iter() {
            match event.token() {
                SIGNALS => self.on_signals(),
                WAKER => {}
                t @ (upgrade::READY | upgrade::OUTPUT | upgrade::EXITED) => {
                    self.on_upgrade_event(t)
                }
                Token(id) => self.drain(id),
            }
        }
        self.answer_handle();
        self.collect_done();
        self.tls_turn();
        self.answer_asks();
        self.revisit();
        self.tick_guards();
        self.retry_fd_store();
        crate::access_log::report_drops(Instant::now());
        self.check_upgrade();
        self.check_stop();
        Ok(())
    }

    /// socketserver's `serve_forever`: accept and serve until a `ShutdownHandle` asks to stop
    /// (or, in the daemon, a stop signal arrives). `service_actions` runs on every turn of the
    /// loop. On return nothing is accepted any more; connections in flight go on until
    /// `server_close`.
    pub fn serve_forever(&mut self, service_actions: &mut dyn FnMut()) -> Result<(), ServeError> {
        self.start()?;
        if self.state == State::Running {
            self.resume_all();
        }
        self.control.enter();
        let mut events = Events::with_capacity(256);
        let result = loop {
            if self.state != State::Running || self.control.requested() {
                break Ok(());
            }
            if let Err(e) = self.turn(&mut events, None) {
                break Err(e);
            }
            service_actions();
        };
        if self.control.requested() {
            // A stop wins over a binary upgrade in progress.
            self.abort_upgrade("a stop came first");
        }
        if self.state == State::Running {
            self.pause_all();
        }
        self.control.leave();
        result
    }

    /// socketserver's `handle_request`: wait up to `timeout` (`None`: as long as it takes) for
    /// one connection or datagram and dispatch it; with `wait_done`, also wait until its
    /// handler has returned. Returns whether a request came.
    pub fn handle_request(
        &mut self,
        timeout: Option<Duration>,
        wait_done: bool,
    ) -> Result<bool, ServeError> {
        self.start()?;
        if self.state != State::Running {
            return Ok(false);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        self.shared.budget = Some(1);
        self.resume_all();
        let mut events = Events::with_capacity(64);
        let result = loop {
            if self.shared.budget == Some(0) {
                break Ok(true);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) || self.state != State::Running {
                break Ok(false);
            }
            if let Err(e) = self.turn(&mut events, left) {
                break Err(e);
            }
        };
        self.pause_all();
        // The budget stays spent while the handler runs, so nothing else is accepted.
        if let (Ok(true), true) = (&result, wait_done) {
            while self.in_flight() > 0 && self.state == State::Running {
                if let Err(e) = self.turn(&mut events, None) {
                    self.shared.budget = None;
                    return Err(e);
                }
            }
        }
        self.shared.budget = None;
        result
    }

    /// socketserver's `server_close`: stop accepting, let in-flight work finish (up to the
    /// shutdown timeout, then cut it off), stop the fork servers and close every socket (a
    /// unix socket file the server created is removed). Idempotent.
    pub fn server_close(&mut self) {
        if self.state == State::Running {
            self.begin_stop();
        }
        let mut events = Events::with_capacity(64);
        loop {
            // Work may have finished before the stop began: look before waiting.
            self.collect_done();
            self.check_stop();
            if self.state == State::Stopped {
                break;
            }
            if let Err(e) = self.turn(&mut events, None) {
                log::error!("{e}; closing without waiting for in-flight work");
                self.stop_now("event loop failed");
            }
        }
        // Slots hold links to the fork server; then it is told to exit and waited for.
        self.slots.clear();
        if let Some(forks) = self.shared.forks.take() {
            forks.shutdown();
        }
    }

    /// Stop watching every listener (their sockets stay open: the backlog holds new clients).
    fn pause_all(&mut self) {
        self.again.clear();
        self.retry.clear();
        for slot in self.slots.values_mut() {
            slot.unwatch(self.poll.registry());
        }
    }

    /// Watch every open listener again, and look at each once (readiness may have come while
    /// unwatched).
    fn resume_all(&mut self) {
        for slot in self.slots.values_mut() {
            if slot.has_capacity() && !slot.fd_starved {
                slot.watch(self.poll.registry());
                self.again.push(slot.id);
            }
        }
    }

    /// Run due protection timers: cut connections past `max_duration`, write refusal summaries.
    fn tick_guards(&mut self) {
        let now = Instant::now();
        for slot in self.slots.values_mut() {
            if slot.guard.next_wakeup().is_some_and(|t| t <= now) {
                slot.guard.tick(&slot.cfg, &self.shared.tracker, now);
            }
            slot.fork_accept_retry(now);
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut next: Option<Instant> = self.retry.iter().map(|(t, _)| *t).min();
        // Protection timers: max_duration deadlines and refusal summaries.
        for t in self.slots.values().filter_map(|s| s.guard.next_wakeup()) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        // Fork servers told to stop accepting while the daemon was out of descriptors.
        for t in self.slots.values().filter_map(|s| s.fork_accept_retry_at()) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        for t in [
            self.notify.watchdog_due(),
            self.upgrade_deadline(),
            self.fd_store_retry,
            crate::access_log::next_report(),
        ]
        .into_iter()
        .flatten()
        {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if let State::Draining { deadline, forced } = self.state {
            let d = forced.map_or(deadline, |f| self.children_deadline(f));
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn drain(&mut self, id: usize) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        match slot.drain(self.poll.registry(), &mut self.shared, &mut self.buf) {
            Drained::Empty | Drained::Full => {}
            Drained::More => self.again.push(id),
            Drained::RetryAt(t) => self.retry.push((t, id)),
        }
    }

    /// Give listeners with more waiting, or whose retry time came, another turn.
    fn revisit(&mut self) {
        let now = Instant::now();
        let mut due: Vec<usize> = std::mem::take(&mut self.again);
        self.retry.retain(|(t, id)| {
            if *t <= now {
                due.push(*id);
                false
            } else {
                true
            }
        });
        for id in due {
            if let Some(slot) = self.slots.get_mut(&id) {
                slot.watch(self.poll.registry());
            }
            self.drain(id);
        }
    }

    fn collect_done(&mut self) {
        while let Ok(done) = self.done_rx.try_recv() {
            let Some(slot) = self.slots.get_mut(&done.listener) else {
                continue;
            };
            slot.absorb(); // before the decrement: this `Done`'s start may be in there
            slot.busy = slot.busy.saturating_sub(1);
            slot.served += 1;
            if done.outcome != crate::worker::Outcome::Ok {
                slot.stats
                    .handler_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if slot.listener.is_none() {
                if slot.busy == 0 {
                    log::info!("listener `{}`: drained", slot.cfg.name);
                    self.slots.remove(&done.listener);
                }
            } else if !slot.watching
                && !slot.fd_starved
                && self.shared.budget != Some(0)
                && self.state == State::Running
                && slot.has_capacity()
            {
                slot.watch(self.poll.registry());
                self.again.push(done.listener);
            }
        }
    }

    /// TLS listeners: dispatch finished handshakes to free workers, and accept again when a
    /// handshake place freed (see `crate::tls`).
    fn tls_turn(&mut self) {
        for (id, slot) in self.slots.iter_mut() {
            let room = slot.tls_turn(&mut self.shared);
            if room
                && slot.listener.is_some()
                && !slot.watching
                && !slot.fd_starved
                && self.state == State::Running
            {
                slot.watch(self.poll.registry());
                self.again.push(*id);
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.values().map(|s| s.in_flight()).sum()
    }

    /// The daemon's signals, turned into the calls a `ShutdownHandle` offers: TERM and INT are
    /// `shutdown` (a second one, or QUIT, is `shutdown_now`), HUP `reload`, USR1 a status
    /// report, USR2 a binary upgrade. `answer_handle` then acts on them on the same path as a
    /// handle's calls from another thread.
    fn on_signals(&mut self) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let pending: Vec<i32> = signals.pending().collect();
        let handle = self.shutdown_handle();
        for sig in pending {
            match sig {
                SIGTERM | SIGINT => {
                    if self.state == State::Running && !handle.shutdown_requested() {
                        // On the serving thread this only asks; `serve_forever` returns at the
                        // end of the turn and `server_close` (in `serve`) drains.
                        handle.shutdown();
                    } else {
                        handle.ask_stop_now("second stop signal");
                    }
                }
                SIGQUIT => handle.ask_stop_now("SIGQUIT"),
                SIGHUP => handle.reload(),
                SIGUSR1 => handle.log_status(),
                SIGUSR2 => handle.upgrade(),
                _ => {}
            }
        }
    }

    /// Act on what handles (and so the daemon's signals) asked since the last turn; a graceful
    /// `shutdown` is seen by `serve_forever` itself.
    fn answer_handle(&mut self) {
        let asks = self.control.take_asks();
        // A stop wins over a binary upgrade in progress.
        if let Some(why) = asks.stop_now {
            self.abort_upgrade(&format!("{why} came first"));
            if self.state != State::Stopped {
                self.stop_now(why);
            }
        }
        if asks.reload {
            if self.upgrading.is_some() {
                log::warn!("reload ignored: a binary upgrade is in progress; reload after it");
            } else if self.state != State::Running || self.control.requested() {
                log::warn!("reload ignored: stopping");
            } else if self.config.origin.as_os_str().is_empty() {
                log::warn!("reload ignored: this server was not made from a config file");
            } else {
                drop(self.reload());
            }
        }
        if asks.upgrade {
            if self.control.requested() {
                log::warn!("upgrade refused: this process is stopping");
            } else {
                self.upgrade(None, None);
            }
        }
        if asks.status {
            self.collect_done(); // loops report closes lazily (see `event::accept`)
            self.log_status();
        }
    }

    /// Run `hook` once the daemon is serving, right after `READY=1` (e.g. release the parent
    /// of `--daemon`).
    pub fn on_ready(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.on_ready.push(Box::new(hook));
    }
}

/// What a library server (`crate::socketserver`) changes between `bind` and serving.
impl Server {
    /// Give the listener named like `cfg` new settings (worker model, `max_workers`): new
    /// requests get them, as a reload would do.
    pub(crate) fn set_listener(
        &mut self,
        cfg: crate::config::ListenerConfig,
    ) -> Result<(), ServeError> {
        let factory = self
            .registry
            .build_for(&cfg)
            .map_err(|e| ServeError::Handler {
                listener: cfg.name.clone(),
                message: e.to_string(),
            })?;
        let stopping = Arc::clone(&self.shared.stopping);
        for slot in self.slots.values_mut() {
            if slot.cfg.name == cfg.name {
                let cfg = Arc::new(cfg.clone());
                let ctx = crate::handler::Context::new(Arc::clone(&cfg), Arc::clone(&stopping));
                slot.reconfigure(cfg, Arc::clone(&factory), ctx);
            }
        }
        if let Some(l) = self
            .config
            .listeners
            .iter_mut()
            .find(|l| l.name == cfg.name)
        {
            *l = cfg;
        }
        Ok(())
    }

    /// `verify_request` for every listener.
    pub(crate) fn set_verify(&mut self, verify: Option<crate::slot::Verify>) {
        for slot in self.slots.values_mut() {
            slot.verify = verify.clone();
        }
    }

    /// How long `server_close` lets in-flight work run before cutting it off.
    pub(crate) fn set_shutdown_timeout(&mut self, timeout: Duration) {
        self.config.daemon.shutdown_timeout = timeout;
    }

    /// The first listener's bound address.
    pub(crate) fn local_addr(&self) -> Option<crate::config::ListenAddr> {
        self.slots
            .values()
            .find_map(|s| s.listener.as_ref().map(|l| l.local_addr().clone()))
    }
}
