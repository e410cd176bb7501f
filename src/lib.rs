//! socketd: a configurable socket daemon — Python's `socketserver` grown into a production inetd.
//!
//! One TOML file declares TCP, UDP, Unix-stream and Unix-datagram listeners, each with a handler
//! and a worker model; a mio loop accepts and dispatches; signals drive stop and reload. A
//! program that wants its own handlers builds a `Registry` and calls `cli::main_with`.

// Ground: below everything (see .ci/layers and README's Architecture).
pub(crate) mod clock;
pub mod conn;
pub mod jobs;
pub mod process;
mod sha256;
pub mod stats;
// Config: text -> Config, knowing no handler.
pub mod config;
// Mechanics.
pub(crate) mod access;
pub mod access_log;
pub mod control;
pub mod daemon;
pub mod exec;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod protect;
// Handlers, then worker models, then the slot, then the loop.
mod event;
pub mod handler;
pub mod server;
mod slot;
pub mod worker;
// The daemon.
pub mod cli;
// The library face.
mod socketserver;

pub use conn::PeerAddr;
pub use handler::{Context, DatagramRequest, Handler, Registry, Request, StreamRequest};
pub use server::ShutdownHandle;
pub use socketserver::{
    Error, Failure, TcpServer, UdpServer, UnixDatagramServer, UnixStreamServer,
};
