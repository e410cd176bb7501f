//! The handler API: socketserver's `BaseRequestHandler` (`setup`, `handle`, `finish`) for Rust.
//!
//! A handler is created fresh for every connection or datagram, so it may keep per-request state
//! in `self`. A `Registry` maps the config's `handler = "name"` to a builder that receives the
//! listener's handler table (`[listener.myproto]` / `myproto = {...}`) and returns a factory;
//! built-ins are registered the same way a programmer registers their own, so the daemon binary
//! is nothing but `Registry::with_builtins()` plus the CLI.

pub mod chargen;
pub mod daytime;
pub mod discard;
pub mod echo;
pub mod exec;
pub mod file;
pub mod proxy;
mod relay;
pub mod time;
pub mod util;

use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use crate::config::BuildContext;
use crate::config::{Catalog, ListenerConfig, SettingsError};
pub use crate::conn::DatagramSocket;
use crate::conn::{Conn, PeerAddr, SharedConn};

/// One request's life, in socketserver's order: `setup`, then `handle`, then `finish` (which
/// runs whenever `setup` succeeded, even if `handle` failed).
pub trait Handler: Send {
    /// Prepare per-request state; an error here skips `handle` and `finish`.
    fn setup(&mut self, _req: &mut Request, _ctx: &Context) -> io::Result<()> {
        Ok(())
    }

    /// Serve the request. Return when the conversation is over; the connection is closed after.
    fn handle(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()>;

    /// Clean up; runs after `handle` whether it succeeded or not.
    fn finish(&mut self, _req: &mut Request, _ctx: &Context) -> io::Result<()> {
        Ok(())
    }
}

/// The built-in handler names that also have an event-loop implementation (`crate::event`).
pub const EVENT_HANDLERS: &[&str] = &[
    "echo", "discard", "chargen", "daytime", "time", "proxy", "file",
];

/// Makes one fresh handler per request; cheap to clone and share across workers.
pub type Factory = Arc<dyn Fn() -> Box<dyn Handler> + Send + Sync>;

/// Turns a listener's settings into a factory, or says what is wrong with them. Builders are
/// called at `check` time and again at (re)start, so they must not have side effects.
pub type Builder = Arc<dyn Fn(&BuildContext) -> Result<Factory, SettingsError> + Send + Sync>;

/// Config handler names to builders; what makes a custom daemon binary a one-liner.
#[derive(Clone, Default)]
pub struct Registry {
    builders: BTreeMap<String, Builder>,
    /// Names whose handler is still the built-in with an event-loop twin (`crate::event`).
    event_capable: std::collections::BTreeSet<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.builders.keys()).finish()
    }
}

impl Registry {
    /// An empty registry; most programs want `with_builtins`.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The RFC services every inetd has.
    pub fn with_builtins() -> Registry {
        let mut r = Registry::new();
        r.register_default::<echo::Echo>("echo");
        r.register_default::<discard::Discard>("discard");
        r.register_default::<chargen::Chargen>("chargen");
        r.register_default::<daytime::Daytime>("daytime");
        r.register_default::<time::Time>("time");
        r.register("proxy", proxy::build);
        r.register("exec", exec::build);
        r.register("file", file::build);
        r.event_capable = EVENT_HANDLERS.iter().map(|s| s.to_string()).collect();
        r
    }

    /// Register a builder under `name`, replacing any earlier one of that name.
    pub fn register<B>(&mut self, name: &str, builder: B)
    where
        B: Fn(&BuildContext) -> Result<Factory, SettingsError> + Send + Sync + 'static,
    {
        self.builders.insert(name.to_string(), Arc::new(builder));
        // A programmer's handler under a built-in's name replaces it in every model.
        self.event_capable.remove(name);
    }

    /// Whether `name` can run with `workers = "event"`: only the built-ins have state
    /// machines; registered handlers block and are refused there by `check`.
    pub fn has_event(&self, name: &str) -> bool {
        self.event_capable.contains(name)
    }

    /// Register a handler whose settings are a serde struct `S`, read the way the core keys
    /// are: every unknown or mistyped key is its own error at its own line and column (give
    /// `S` `#[serde(deny_unknown_fields)]` so unknown keys are refused), a missing required key
    /// one error on the table. `build` gets the parsed settings and may refuse them too.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use socketd::{Factory, Handler, Registry};
    /// #[derive(serde::Deserialize)]
    /// #[serde(deny_unknown_fields)]
    /// struct GreetSettings {
    ///     text: String,
    ///     #[serde(default)]
    ///     times: u32,
    /// }
    /// # struct Greet(Arc<GreetSettings>);
    /// # impl Handler for Greet {
    /// #     fn handle(&mut self, _: &mut socketd::Request, _: &socketd::Context) -> std::io::Result<()> { Ok(()) }
    /// # }
    /// let mut registry = Registry::with_builtins();
    /// registry.register_settings("greet", |_ctx, s: GreetSettings| {
    ///     let s = Arc::new(s);
    ///     Ok(Arc::new(move || Box::new(Greet(Arc::clone(&s))) as Box<dyn Handler>) as Factory)
    /// });
    /// ```
    pub fn register_settings<S, B>(&mut self, name: &str, build: B)
    where
        S: serde::de::DeserializeOwned,
        B: Fn(&BuildContext, S) -> Result<Factory, SettingsError> + Send + Sync + 'static,
    {
        let owned = name.to_string();
        self.register(name, move |ctx: &BuildContext| {
            let settings = read_settings::<S>(&owned, ctx.settings)?;
            build(ctx, settings)
        });
    }

    /// Register a handler that needs no settings: a listener table for it is refused.
    pub fn register_default<H: Handler + Default + 'static>(&mut self, name: &str) {
        let owned = name.to_string();
        self.register(name, move |ctx: &BuildContext| {
            if let Some(t) = ctx.settings {
                if !t.is_empty() {
                    return Err(SettingsError::from(format!(
                        "handler `{owned}` takes no settings; remove the `{owned}` table"
                    )));
                }
            }
            Ok(Arc::new(|| Box::new(H::default()) as Box<dyn Handler>) as Factory)
        });
    }

    /// Whether `name` is known, for config validation.
    pub fn contains(&self, name: &str) -> bool {
        self.builders.contains_key(name)
    }

    /// Every registered name, for "valid values" in error messages.
    pub fn names(&self) -> Vec<&str> {
        self.builders.keys().map(String::as_str).collect()
    }

    /// Build the factory for a handler name.
    pub fn build(&self, name: &str, ctx: &BuildContext) -> Result<Factory, SettingsError> {
        match self.builders.get(name) {
            Some(b) => b(ctx),
            None => Err(SettingsError::from(format!(
                "unknown handler `{name}`; valid values: {}",
                self.names().join(", ")
            ))),
        }
    }

    /// Build the factory for a validated listener.
    pub fn build_for(&self, l: &ListenerConfig) -> Result<Factory, SettingsError> {
        self.build(
            &l.handler,
            &BuildContext {
                listener: &l.name,
                protocol: l.protocol,
                settings: l.handler_settings.as_ref(),
            },
        )
    }
}

impl Catalog for Registry {
    fn contains(&self, name: &str) -> bool {
        Registry::contains(self, name)
    }

    fn names(&self) -> Vec<&str> {
        Registry::names(self)
    }

    fn has_event(&self, name: &str) -> bool {
        Registry::has_event(self, name)
    }

    fn event_names(&self) -> Vec<&str> {
        EVENT_HANDLERS.to_vec()
    }

    fn check(&self, name: &str, ctx: &BuildContext<'_>) -> Result<(), SettingsError> {
        self.build(name, ctx).map(drop)
    }
}

/// Read a handler's table into `S`, with each bad key its own problem: the whole table first;
/// if that fails, each key alone (where "missing field" only means another key is required).
pub(crate) fn read_settings<S: serde::de::DeserializeOwned>(
    handler: &str,
    table: Option<&toml::Table>,
) -> Result<S, SettingsError> {
    let table = table.cloned().unwrap_or_default();
    let whole = match toml::Value::Table(table.clone()).try_into::<S>() {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let mut problems = Vec::new();
    for (key, value) in &table {
        let alone = toml::Table::from_iter([(key.clone(), value.clone())]);
        if let Err(e) = toml::Value::Table(alone).try_into::<S>() {
            let message = unknown_key_message(handler, e.message().trim());
            if !message.contains("missing field") {
                problems.push(crate::config::Problem {
                    key: Some(key.clone()),
                    message,
                });
            }
        }
    }
    if problems.is_empty() {
        problems.push(crate::config::Problem {
            key: None,
            message: format!(
                "{}; add it to the `{handler}` table",
                whole.to_string().trim()
            ),
        });
    }
    Err(SettingsError { problems })
}

/// serde's "unknown field `x`, expected one of `a`, `b`" in the words the core keys use:
/// "unknown key `handler.x`; valid keys: a, b". Other messages pass unchanged.
fn unknown_key_message(handler: &str, message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((key, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let valid = expected
        .trim_start_matches(", expected ")
        .trim_start_matches("one of ")
        .replace(" or ", ", ")
        .replace('`', "");
    format!("unknown key `{handler}.{key}`; valid keys: {valid}")
}

/// A built-in's table: its shape (which keys, of which types) read into the serde struct `S`
/// with a problem per bad key, then the built-in's own checks (`semantic`), whose problems
/// are added for every key serde had no complaint about.
pub(crate) fn read_shape_then<S, T>(
    handler: &str,
    table: Option<&toml::Table>,
    semantic: impl FnOnce() -> Result<T, SettingsError>,
) -> Result<T, SettingsError>
where
    S: serde::de::DeserializeOwned,
{
    let shape = read_settings::<S>(handler, Some(table.unwrap_or(&toml::Table::new()))).err();
    match (shape, semantic()) {
        (None, result) => result,
        (Some(mut all), result) => {
            if let Err(more) = result {
                for p in more.problems {
                    let seen = all
                        .problems
                        .iter()
                        .any(|q| q.key.is_some() && q.key == p.key);
                    if !seen && p.key.is_some() {
                        all.problems.push(p);
                    }
                }
            }
            Err(all)
        }
    }
}

/// What a handler knows about the server it runs in (socketserver's `self.server`).
#[derive(Debug, Clone)]
pub struct Context {
    listener: Arc<ListenerConfig>,
    stopping: Arc<AtomicBool>,
}

impl Context {
    /// The context for requests on `listener`; `stopping` turns true when a stop begins.
    pub fn new(listener: Arc<ListenerConfig>, stopping: Arc<AtomicBool>) -> Context {
        Context { listener, stopping }
    }

    /// The listener's name from the config.
    pub fn listener_name(&self) -> &str {
        &self.listener.name
    }

    /// The listener's whole validated config, including the handler's own table.
    pub fn config(&self) -> &ListenerConfig {
        &self.listener
    }

    /// True once a stop has begun: long-running handlers should poll this and wind down,
    /// like the `threading.Event` a socketserver handler checks.
    pub fn shutting_down(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// A request: a connection on stream listeners, a datagram on datagram listeners.
#[derive(Debug)]
pub enum Request {
    /// A connection (TCP or Unix stream).
    Stream(StreamRequest),
    /// One datagram (UDP or Unix datagram).
    Datagram(DatagramRequest),
}

impl Request {
    /// The client's address (socketserver's `client_address`).
    pub fn peer(&self) -> &PeerAddr {
        match self {
            Request::Stream(s) => &s.peer,
            Request::Datagram(d) => &d.peer,
        }
    }
}

/// A connected stream with buffered reading and writing, like `StreamRequestHandler`'s
/// `rfile` and `wfile` (`makefile`).
#[derive(Debug)]
pub struct StreamRequest {
    /// Buffered reads: `read_line`, `fill_buf` and friends.
    pub rfile: BufReader<SharedConn>,
    /// Buffered writes; flushed by socketd after `finish`, flush earlier to send sooner.
    pub wfile: BufWriter<SharedConn>,
    peer: PeerAddr,
    local: Option<SocketAddr>,
    tls: Option<Arc<crate::tls::TlsInfo>>,
}

impl StreamRequest {
    /// Wrap an accepted connection; `local` is the listening address for IP sockets.
    /// `rfile` and `wfile` share the one descriptor (no `dup`), so a request costs no extra
    /// file descriptor even when the process is at its limit.
    pub fn new(conn: Conn, peer: PeerAddr, local: Option<SocketAddr>) -> StreamRequest {
        let conn = SharedConn::new(conn);
        StreamRequest {
            rfile: BufReader::new(conn.clone()),
            wfile: BufWriter::new(conn),
            peer,
            local,
            tls: None,
        }
    }

    /// The TLS session's parameters (version, cipher, SNI, ALPN, client certificate) when
    /// the listener terminates TLS; the handler reads and writes plaintext either way.
    pub fn tls(&self) -> Option<&crate::tls::TlsInfo> {
        self.tls.as_deref()
    }

    /// Attach a TLS session's parameters (socketd does this for TLS listeners).
    pub fn set_tls(&mut self, tls: Option<Arc<crate::tls::TlsInfo>>) {
        self.tls = tls;
    }

    /// The client's address.
    pub fn peer(&self) -> &PeerAddr {
        &self.peer
    }

    /// The local end of the connection, for IP sockets.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The raw socket, for timeouts, shutdown or direct unbuffered I/O.
    pub fn conn(&self) -> &Conn {
        self.wfile.get_ref()
    }
}

/// One received datagram and the means to answer it (socketserver's `(data, socket)` pair).
#[derive(Debug)]
pub struct DatagramRequest {
    data: Vec<u8>,
    peer: PeerAddr,
    socket: DatagramSocket,
}

impl DatagramRequest {
    /// A datagram `data` from `peer`, to be answered through `socket`.
    pub fn new(data: Vec<u8>, peer: PeerAddr, socket: DatagramSocket) -> DatagramRequest {
        DatagramRequest { data, peer, socket }
    }

    /// The datagram's payload.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The sender's address.
    pub fn peer(&self) -> &PeerAddr {
        &self.peer
    }

    /// The address the listener's socket is bound to (UDP only): an exec program's
    /// `UDPLOCALIP` and `UDPLOCALPORT`.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            DatagramSocket::Udp(s) => s.local_addr().ok(),
            DatagramSocket::Unix(_) => None,
        }
    }

    /// Send one datagram back to the sender. A Unix sender that did not bind an address
    /// cannot be answered; that is an error the handler may ignore.
    pub fn reply(&self, buf: &[u8]) -> io::Result<usize> {
        match (&self.socket, &self.peer) {
            (DatagramSocket::Udp(s), PeerAddr::Inet(a)) => s.send_to(buf, a),
            (DatagramSocket::Unix(s), PeerAddr::Unix { path: Some(p), .. }) => {
                s.send_to(buf, Path::new(p))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                NoReplyAddress,
            )),
        }
    }
}

/// The error `DatagramRequest::reply` gives for a sender with no address (a Unix datagram
/// socket that never bound a path). Any local user can send such datagrams as fast as they
/// like, so workers log it at debug level, never as a handler failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoReplyAddress;

impl std::fmt::Display for NoReplyAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the sender has no address to reply to")
    }
}

impl std::error::Error for NoReplyAddress {}

/// Whether `e` is `NoReplyAddress`: the reply was impossible, not the handler at fault.
pub fn is_no_reply_address(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<NoReplyAddress>())
}

/// Run one request through a handler, in socketserver's order. Returns the first error.
pub fn serve(handler: &mut dyn Handler, req: &mut Request, ctx: &Context) -> io::Result<()> {
    handler.setup(req, ctx)?;
    let handled = handler.handle(req, ctx);
    let finished = handler.finish(req, ctx);
    let flushed = match req {
        Request::Stream(s) => std::io::Write::flush(&mut s.wfile),
        Request::Datagram(_) => Ok(()),
    };
    handled.and(finished).and(flushed)
}
