//! The library face: Python's `socketserver` server classes in Rust, with no config file.
//!
//! `TcpServer`, `UdpServer`, `UnixStreamServer` and `UnixDatagramServer` are each made from an
//! address and a handler factory, and have socketserver's verbs: `serve_forever`, `shutdown`
//! (through a `ShutdownHandle`, from any thread), `handle_request` with `set_timeout` and
//! `handle_timeout`, `server_close`, and the hooks a subclass would override
//! (`verify_request`, `handle_error`, `service_actions`). The mix-ins are worker models: the
//! default serves one request at a time like `TCPServer`; `.threading()` and `.forking()` serve
//! many at once, bounded by `max_workers`; `.event()` runs a built-in handler on event loops.
//!
//! Underneath is the daemon's own loop (`crate::server::Server`), bound without anything
//! process-wide: no signal disposition is touched, no resource limit raised, no inherited socket
//! adopted. So a library server runs in a program with other threads, several can run in one
//! process, and each stops only when its handle says so.
//!
//! # Fork safety of `.forking()`
//! A server in forking mode forks one *fork server* when it starts serving, and every request's
//! child is forked by that single-threaded process, never by your (threaded) program. The one
//! fork from your program happens with stdout and stderr locked by the forking thread, so
//! socketd's logger and `println!` work in the children. A lock of your own that another thread
//! holds at that instant stays held in the children: a forked handler must not wait for such a
//! lock. (Python's `ForkingMixIn` forks the threaded program for every request and promises
//! nothing; the daemon `socketd` starts its fork servers before it has a second thread, so its
//! children inherit no lock at all.) The fork server ends with `server_close` (or drop), or with
//! the process; it does not matter which thread serves or closes.

mod hooks;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::WorkerModel;
use crate::config::{defaults, Config, DaemonConfig, ListenAddr, ListenerConfig, Protocol};
use crate::conn::PeerAddr;
use crate::handler::{Factory, Handler, Registry};
use crate::server::{ServeError, Server, ShutdownHandle};

pub use hooks::Failure;
use hooks::{Hooked, Hooks};

/// The handler name a library server registers its factory under.
const HANDLER: &str = "handler";

/// What a library server can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding, starting or running the loop failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// `.event()` on a server whose handler has no event-loop implementation.
    #[error("handler `{handler}` has no event-loop implementation; event() serves the built-ins {valid}")]
    NoEventLoop {
        /// The handler asked for.
        handler: String,
        /// The built-ins that do have one.
        valid: String,
    },
    /// `bind_builtin` with a name that is not a built-in handler.
    #[error("unknown built-in handler `{handler}`; valid values: {valid}")]
    UnknownBuiltin {
        /// The name asked for.
        handler: String,
        /// The built-in names.
        valid: String,
    },
}

/// socketserver's mix-ins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    /// `TCPServer`: one request at a time.
    Single,
    /// `ThreadingMixIn`, bounded.
    Threading,
    /// `ForkingMixIn`, bounded.
    Forking,
    /// Built-in handlers on event loops.
    Event,
}

/// What the four server types share.
struct Base {
    server: Server,
    cfg: ListenerConfig,
    model: Model,
    max_workers: Option<usize>,
    timeout: Option<Duration>,
    hooks: Arc<Hooks>,
    service_actions: Option<Box<dyn FnMut() + Send>>,
    handle_timeout: Option<Box<dyn FnMut() + Send>>,
    closed: bool,
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("protocol", &self.cfg.protocol)
            .field("address", &self.server.local_addr())
            .field("model", &self.model)
            .field("max_workers", &self.cfg.max_workers)
            .finish()
    }
}

/// A `BindError` as the `io::Error` `bind` promises, keeping its kind (`AddrInUse`, …).
fn into_io(e: ServeError) -> io::Error {
    match e {
        ServeError::Bind(b) => io::Error::new(b.source.kind(), b.to_string()),
        ServeError::Io { source, context } => {
            io::Error::new(source.kind(), format!("{context}: {source}"))
        }
        other => io::Error::other(other.to_string()),
    }
}

impl Base {
    /// Bind `address` for `registry`'s `handler`, one request at a time.
    fn bind(
        protocol: Protocol,
        address: ListenAddr,
        registry: Registry,
        handler: &str,
        hooks: Arc<Hooks>,
    ) -> io::Result<Base> {
        let mut cfg = ListenerConfig::new(protocol.name(), protocol, address, handler);
        cfg.max_workers = 1;
        let config = Config {
            origin: PathBuf::new(),
            daemon: DaemonConfig::default(),
            listeners: vec![cfg.clone()],
        };
        let server = Server::bind(config, registry).map_err(into_io)?;
        // The real address (port 0 resolved), so a reconfigure never asks for another port.
        if let Some(real) = server.local_addr() {
            cfg.address = real;
        }
        Ok(Base {
            server,
            cfg,
            model: Model::Single,
            max_workers: None,
            timeout: None,
            hooks,
            service_actions: None,
            handle_timeout: None,
            closed: false,
        })
    }

    /// Bind a stream or datagram socket to the first of `addrs` that binds.
    fn bind_inet<A: ToSocketAddrs>(
        protocol: Protocol,
        addrs: A,
        registry: Registry,
        handler: &str,
        hooks: Arc<Hooks>,
    ) -> io::Result<Base> {
        let mut last = None;
        for addr in addrs.to_socket_addrs()? {
            match Base::bind(
                protocol,
                ListenAddr::Inet(addr),
                registry.clone(),
                handler,
                Arc::clone(&hooks),
            ) {
                Ok(b) => return Ok(b),
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind")))
    }

    /// A registry holding only `factory`, wrapped so the hooks see every request.
    fn registry_for<F, H>(factory: F, hooks: &Arc<Hooks>) -> Registry
    where
        F: Fn() -> H + Send + Sync + 'static,
        H: Handler + 'static,
    {
        let hooks = Arc::clone(hooks);
        let factory: Factory = Arc::new(move || {
            Box::new(Hooked::new(factory(), Arc::clone(&hooks))) as Box<dyn Handler>
        });
        let mut registry = Registry::new();
        registry.register(HANDLER, move |_| Ok(Arc::clone(&factory)));
        registry
    }

    /// The built-ins' registry, after checking `name` is one.
    fn builtin(name: &str) -> Result<Registry, Error> {
        let registry = Registry::with_builtins();
        if !registry.contains(name) {
            return Err(Error::UnknownBuiltin {
                handler: name.to_string(),
                valid: registry.names().join(", "),
            });
        }
        Ok(registry)
    }

    fn set_model(&mut self, model: Model) -> Result<(), Error> {
        let mut cfg = self.cfg.clone();
        cfg.workers = match model {
            Model::Single | Model::Threading => WorkerModel::Threaded,
            Model::Forking => WorkerModel::Forked,
            Model::Event => WorkerModel::Event,
        };
        cfg.max_workers = match (model, self.max_workers) {
            (Model::Single, _) => 1,
            (_, Some(n)) => n,
            (Model::Event, None) => defaults::EVENT_MAX_CONNECTIONS,
            (_, None) => defaults::MAX_WORKERS,
        };
        self.server.set_listener(cfg.clone())?;
        self.cfg = cfg;
        self.model = model;
        Ok(())
    }

    fn event(&mut self) -> Result<(), Error> {
        if !Registry::with_builtins().has_event(&self.cfg.handler) || self.cfg.handler == HANDLER {
            return Err(Error::NoEventLoop {
                handler: if self.cfg.handler == HANDLER {
                    "(your handler)".to_string()
                } else {
                    self.cfg.handler.clone()
                },
                valid: crate::handler::EVENT_HANDLERS.join(", "),
            });
        }
        self.set_model(Model::Event)
    }

    fn max_workers(&mut self, n: usize) {
        self.max_workers = Some(n.max(1));
        if self.model != Model::Single {
            let model = self.model;
            // Rebuilding the same handler cannot fail once it was built at bind.
            if let Err(e) = self.set_model(model) {
                log::error!("max_workers: {e}");
            }
        }
    }

    fn serve_forever(&mut self) -> Result<(), Error> {
        let mut nothing = || {};
        let actions: &mut dyn FnMut() = match self.service_actions.as_mut() {
            Some(f) => f,
            None => &mut nothing,
        };
        self.server.serve_forever(actions)?;
        Ok(())
    }

    fn handle_request(&mut self) -> Result<bool, Error> {
        let came = self
            .server
            .handle_request(self.timeout, self.model == Model::Single)?;
        if !came {
            if let Some(f) = self.handle_timeout.as_mut() {
                f();
            }
        }
        Ok(came)
    }

    fn server_close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.server.server_close();
        }
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        self.server_close();
    }
}

/// The verbs every server type has; one definition, four types.
macro_rules! verbs {
    ($ty:ident, $example:literal) => {
        impl $ty {
            /// `ThreadingMixIn`: each request on a thread of a bounded pool (`max_workers`,
            /// default 64); when all are busy, new clients wait in the kernel's backlog.
            pub fn threading(mut self) -> Self {
                if let Err(e) = self.base.set_model(Model::Threading) {
                    log::error!("threading: {e}");
                }
                self
            }

            /// `ForkingMixIn`: each request in a child process (at most `max_workers` at
            /// once), forked by a fork server; see the module docs for what is fork-safe.
            pub fn forking(mut self) -> Self {
                if let Err(e) = self.base.set_model(Model::Forking) {
                    log::error!("forking: {e}");
                }
                self
            }

            /// A built-in handler (`bind_builtin`) on event loops: thousands of connections
            /// on a few threads. Refused for your own handlers, which block a thread.
            pub fn event(mut self) -> Result<Self, Error> {
                self.base.event()?;
                Ok(self)
            }

            /// How many requests may be served at once under `threading`, `forking` or
            /// `event` (ignored by the default model, which serves one).
            pub fn max_workers(mut self, n: usize) -> Self {
                self.base.max_workers(n);
                self
            }

            /// How long `server_close` lets requests in flight run on before it shuts their
            /// connections down (default 10 s).
            pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
                self.base.server.set_shutdown_timeout(timeout);
                self
            }

            /// socketserver's `verify_request`: return `false` to refuse a peer; its
            /// connection is closed (its datagram dropped) before any handler runs.
            pub fn verify_request<V>(mut self, verify: V) -> Self
            where
                V: Fn(&PeerAddr) -> bool + Send + Sync + 'static,
            {
                self.base.server.set_verify(Some(Arc::new(verify)));
                self
            }

            /// socketserver's `handle_error`: called with the peer and what went wrong when
            /// a handler's `setup`, `handle` or `finish` returns an error or panics. The
            /// server goes on serving. Runs where the handler ran (a worker thread, or the
            /// request's child under `forking`). Not called for built-in handlers.
            pub fn handle_error<E>(self, hook: E) -> Self
            where
                E: Fn(&PeerAddr, &Failure<'_>) + Send + Sync + 'static,
            {
                self.base.hooks.set_error(Arc::new(hook));
                self
            }

            /// socketserver's `service_actions`: called on every turn of `serve_forever`'s
            /// loop, on the serving thread (keep it short).
            pub fn service_actions<S>(mut self, actions: S) -> Self
            where
                S: FnMut() + Send + 'static,
            {
                self.base.service_actions = Some(Box::new(actions));
                self
            }

            /// socketserver's `handle_timeout`: called when `handle_request` waited its
            /// `timeout` and no request came.
            pub fn handle_timeout<T>(mut self, on_timeout: T) -> Self
            where
                T: FnMut() + Send + 'static,
            {
                self.base.handle_timeout = Some(Box::new(on_timeout));
                self
            }

            /// socketserver's `timeout` attribute: how long `handle_request` waits for a
            /// request (`None`, the default: as long as it takes).
            pub fn set_timeout(&mut self, timeout: Option<Duration>) {
                self.base.timeout = timeout;
            }

            /// The current `handle_request` timeout.
            pub fn timeout(&self) -> Option<Duration> {
                self.base.timeout
            }

            /// Serve until a `ShutdownHandle` (see `shutdown_handle`) asks to stop. On
            /// return nothing new is accepted; requests in flight go on until `server_close`.
            /// May be called again after it returned.
            ///
            /// ```
            #[doc = $example]
            /// ```
            pub fn serve_forever(&mut self) -> Result<(), Error> {
                self.base.serve_forever()
            }

            /// A `Clone + Send` handle whose `shutdown()` stops `serve_forever` from any
            /// thread and returns once it has returned.
            pub fn shutdown_handle(&self) -> ShutdownHandle {
                self.base.server.shutdown_handle()
            }

            /// Wait (up to `timeout`, see `set_timeout`) for one request and serve it: under
            /// the default model the handler has returned when this does; under the others it
            /// has been started. Returns `false`, after calling `handle_timeout`, if none came.
            pub fn handle_request(&mut self) -> Result<bool, Error> {
                self.base.handle_request()
            }

            /// Stop accepting, let requests in flight finish (up to `shutdown_timeout`, then
            /// shut their connections down), stop the fork server and close the socket: the
            /// address can be bound again at once (a unix socket file the server created is
            /// removed). Also done on drop.
            pub fn server_close(&mut self) {
                self.base.server_close()
            }
        }

        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.base.fmt(f)
            }
        }
    };
}

/// socketserver's `TCPServer` (with `.threading()`: `ThreadingTCPServer`; with `.forking()`:
/// `ForkingTCPServer`).
///
/// ```
/// use std::io::{self, BufRead, Write};
/// use socketd::{Context, Handler, Request, TcpServer};
///
/// #[derive(Default)]
/// struct MyHandler;
///
/// impl Handler for MyHandler {
///     fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
///         let Request::Stream(s) = req else { return Ok(()) };
///         let mut line = String::new();
///         while s.rfile.read_line(&mut line)? > 0 {
///             write!(s.wfile, "Your msg={line}")?;
///             s.wfile.flush()?;
///             line.clear();
///         }
///         Ok(())
///     }
/// }
///
/// let mut server = TcpServer::bind("127.0.0.1:0", MyHandler::default)?.threading();
/// let addr = server.server_address();
/// let stop = server.shutdown_handle();
/// let client = std::thread::spawn(move || -> io::Result<String> {
///     let mut c = std::net::TcpStream::connect(addr)?;
///     c.write_all(b"hello\n")?;
///     c.shutdown(std::net::Shutdown::Write)?;
///     let mut answer = String::new();
///     io::Read::read_to_string(&mut c, &mut answer)?;
///     stop.shutdown();
///     Ok(answer)
/// });
/// server.serve_forever()?;
/// server.server_close();
/// assert_eq!(client.join().unwrap()?, "Your msg=hello\n");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct TcpServer {
    base: Base,
}

impl TcpServer {
    /// Bind a TCP socket (port 0 picks a free port) for handlers made by `factory`.
    pub fn bind<A, F, H>(addr: A, factory: F) -> io::Result<TcpServer>
    where
        A: ToSocketAddrs,
        F: Fn() -> H + Send + Sync + 'static,
        H: Handler + 'static,
    {
        let hooks = Arc::new(Hooks::default());
        let registry = Base::registry_for(factory, &hooks);
        let base = Base::bind_inet(Protocol::Tcp, addr, registry, HANDLER, hooks)?;
        Ok(TcpServer { base })
    }

    /// Bind a TCP socket for a built-in handler (`echo`, `discard`, `chargen`, `daytime`,
    /// `time`), the kind `.event()` can serve.
    pub fn bind_builtin<A: ToSocketAddrs>(addr: A, handler: &str) -> Result<TcpServer, Error> {
        let registry = Base::builtin(handler)?;
        let base = Base::bind_inet(Protocol::Tcp, addr, registry, handler, Arc::default())
            .map_err(|e| {
                Error::Serve(ServeError::Io {
                    context: "bind",
                    source: e,
                })
            })?;
        Ok(TcpServer { base })
    }

    /// The address actually bound (socketserver's `server_address`).
    pub fn server_address(&self) -> SocketAddr {
        inet(&self.base)
    }
}

verbs!(
    TcpServer,
    "let mut server = socketd::TcpServer::bind(\"127.0.0.1:0\", socketd::handler::echo::Echo::default)?;\nserver.shutdown_handle().shutdown(); // asked before serving: serve_forever returns at once\nserver.serve_forever()?;\nserver.server_close();\n# Ok::<(), Box<dyn std::error::Error>>(())"
);

/// socketserver's `UDPServer`: each datagram is one request (`Request::Datagram`), answered
/// with `reply`.
pub struct UdpServer {
    base: Base,
}

impl UdpServer {
    /// Bind a UDP socket (port 0 picks a free port) for handlers made by `factory`.
    pub fn bind<A, F, H>(addr: A, factory: F) -> io::Result<UdpServer>
    where
        A: ToSocketAddrs,
        F: Fn() -> H + Send + Sync + 'static,
        H: Handler + 'static,
    {
        let hooks = Arc::new(Hooks::default());
        let registry = Base::registry_for(factory, &hooks);
        let base = Base::bind_inet(Protocol::Udp, addr, registry, HANDLER, hooks)?;
        Ok(UdpServer { base })
    }

    /// Bind a UDP socket for a built-in handler.
    pub fn bind_builtin<A: ToSocketAddrs>(addr: A, handler: &str) -> Result<UdpServer, Error> {
        let registry = Base::builtin(handler)?;
        let base = Base::bind_inet(Protocol::Udp, addr, registry, handler, Arc::default())
            .map_err(|e| {
                Error::Serve(ServeError::Io {
                    context: "bind",
                    source: e,
                })
            })?;
        Ok(UdpServer { base })
    }

    /// The address actually bound.
    pub fn server_address(&self) -> SocketAddr {
        inet(&self.base)
    }
}

verbs!(
    UdpServer,
    "let mut server = socketd::UdpServer::bind(\"127.0.0.1:0\", socketd::handler::echo::Echo::default)?;\nlet stop = server.shutdown_handle();\nlet t = std::thread::spawn(move || stop.shutdown());\nserver.serve_forever()?; // returns once the other thread's shutdown() is seen\nt.join().unwrap();\nserver.server_close();\n# Ok::<(), Box<dyn std::error::Error>>(())"
);

/// socketserver's `UnixStreamServer`.
pub struct UnixStreamServer {
    base: Base,
}

impl UnixStreamServer {
    /// Bind a Unix stream socket at `path` (created; removed again by `server_close`).
    pub fn bind<P, F, H>(path: P, factory: F) -> io::Result<UnixStreamServer>
    where
        P: AsRef<Path>,
        F: Fn() -> H + Send + Sync + 'static,
        H: Handler + 'static,
    {
        let hooks = Arc::new(Hooks::default());
        let registry = Base::registry_for(factory, &hooks);
        let address = ListenAddr::Path(path.as_ref().to_path_buf());
        let base = Base::bind(Protocol::Unix, address, registry, HANDLER, hooks)?;
        Ok(UnixStreamServer { base })
    }

    /// The socket file's path.
    pub fn server_address(&self) -> PathBuf {
        unix(&self.base)
    }
}

verbs!(
    UnixStreamServer,
    "let dir = std::env::temp_dir().join(format!(\"socketd-doc-{}\", std::process::id()));\nstd::fs::create_dir_all(&dir)?;\nlet mut server = socketd::UnixStreamServer::bind(dir.join(\"s.sock\"), socketd::handler::echo::Echo::default)?;\nserver.shutdown_handle().shutdown();\nserver.serve_forever()?;\nserver.server_close();\nassert!(!dir.join(\"s.sock\").exists());\nstd::fs::remove_dir(&dir)?;\n# Ok::<(), Box<dyn std::error::Error>>(())"
);

/// socketserver's `UnixDatagramServer`.
pub struct UnixDatagramServer {
    base: Base,
}

impl UnixDatagramServer {
    /// Bind a Unix datagram socket at `path` (created; removed again by `server_close`).
    pub fn bind<P, F, H>(path: P, factory: F) -> io::Result<UnixDatagramServer>
    where
        P: AsRef<Path>,
        F: Fn() -> H + Send + Sync + 'static,
        H: Handler + 'static,
    {
        let hooks = Arc::new(Hooks::default());
        let registry = Base::registry_for(factory, &hooks);
        let address = ListenAddr::Path(path.as_ref().to_path_buf());
        let base = Base::bind(Protocol::UnixDgram, address, registry, HANDLER, hooks)?;
        Ok(UnixDatagramServer { base })
    }

    /// The socket file's path.
    pub fn server_address(&self) -> PathBuf {
        unix(&self.base)
    }
}

verbs!(
    UnixDatagramServer,
    "let dir = std::env::temp_dir().join(format!(\"socketd-doc-dgram-{}\", std::process::id()));\nstd::fs::create_dir_all(&dir)?;\nlet mut server = socketd::UnixDatagramServer::bind(dir.join(\"d.sock\"), socketd::handler::echo::Echo::default)?;\nserver.shutdown_handle().shutdown();\nserver.serve_forever()?;\nserver.server_close();\nstd::fs::remove_dir(&dir)?;\n# Ok::<(), Box<dyn std::error::Error>>(())"
);

fn inet(base: &Base) -> SocketAddr {
    match &base.cfg.address {
        ListenAddr::Inet(a) => *a,
        ListenAddr::Path(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
    }
}

fn unix(base: &Base) -> PathBuf {
    match &base.cfg.address {
        ListenAddr::Path(p) => p.clone(),
        ListenAddr::Inet(a) => PathBuf::from(a.to_string()),
    }
}

#[cfg(test)]
mod tests;
