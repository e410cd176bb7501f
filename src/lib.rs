//! socketd: Python's `socketserver` in Rust, grown into a production inetd.
//!
//! Two faces over one core:
//!
//! - **The library**: [`TcpServer`], [`UdpServer`], [`UnixStreamServer`] and
//!   [`UnixDatagramServer`], each made from an address and a [`Handler`] factory, with
//!   socketserver's verbs (`serve_forever`, `shutdown` through a [`ShutdownHandle`],
//!   `handle_request`, `server_close`) and worker models as the mix-ins (`.threading()`,
//!   `.forking()`, `.event()`). No config file, no signal handling: it runs inside any program.
//! - **The daemon**: one TOML file declares TCP, UDP, Unix-stream and Unix-datagram listeners;
//!   [`cli::main_with`] turns it into the same servers and owns the signals (stop, reload),
//!   the fork servers, daemonizing and the service manager. A program with its own handlers
//!   registers them in a [`Registry`] and calls `main_with`.
//!
//! ```
//! use std::io::{self, BufRead, Write};
//! use socketd::{Context, Handler, Request, TcpServer};
//!
//! #[derive(Default)]
//! struct MyHandler;
//!
//! impl Handler for MyHandler {
//!     fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
//!         let Request::Stream(s) = req else { return Ok(()) };
//!         let mut line = String::new();
//!         s.rfile.read_line(&mut line)?;
//!         write!(s.wfile, "Your msg={line}")
//!     }
//! }
//!
//! let mut server = TcpServer::bind("127.0.0.1:0", MyHandler::default)?.threading();
//! let stop = server.shutdown_handle();
//! let addr = server.server_address();
//! let client = std::thread::spawn(move || -> io::Result<String> {
//!     let mut c = std::net::TcpStream::connect(addr)?;
//!     c.write_all(b"hi\n")?;
//!     let mut answer = String::new();
//!     io::BufReader::new(c).read_line(&mut answer)?;
//!     stop.shutdown(); // from another thread; returns once serve_forever has
//!     Ok(answer)
//! });
//! server.serve_forever()?;
//! server.server_close();
//! assert_eq!(client.join().unwrap()?, "Your msg=hi\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

// Layers, bottom to top; an import only ever points down (`.ci/layers` checks it).
// Ground.
pub(crate) mod clock;
pub mod conn;
#[doc(hidden)]
pub mod jobs;
pub(crate) mod process;
mod sha256;
pub(crate) mod stats;
// Config: text -> Config, knowing no handler.
pub mod config;
// Mechanics.
pub(crate) mod access;
pub(crate) mod access_log;
pub(crate) mod control;
pub(crate) mod daemon;
pub(crate) mod exec;
#[doc(hidden)]
pub mod listener;
pub(crate) mod logging;
pub(crate) mod metrics;
#[doc(hidden)]
pub mod protect;
// Handlers, then worker models, then the slot, then the loop.
mod event;
pub mod handler;
#[doc(hidden)]
pub mod server;
mod slot;
pub mod tls;
#[doc(hidden)]
pub mod worker;
// The two faces.
pub mod cli;
mod socketserver;

pub use cli::main_with;
pub use config::{
    BuildContext, Catalog, Config, ConfigError, Diagnostic, ListenAddr, ListenerConfig, Problem,
    SettingsError,
};
pub use config::{Protocol, WorkerModel};
pub use conn::{Conn, PeerAddr};
pub use handler::{
    Context, DatagramRequest, DatagramSocket, Factory, Handler, Registry, Request, StreamRequest,
};
pub use listener::BindError;
pub use server::{ServeError, Server, ShutdownHandle};
pub use socketserver::{
    Error, Failure, TcpServer, UdpServer, UnixDatagramServer, UnixStreamServer,
};
pub use tls::TlsInfo;
