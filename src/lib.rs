//! socketd: a configurable socket daemon — Python's `socketserver` grown into a production inetd.
//!
//! One TOML file declares TCP, UDP, Unix-stream and Unix-datagram listeners, each with a handler
//! and a worker model; a mio loop accepts and dispatches; signals drive stop and reload. A
//! program that wants its own handlers builds a `Registry` and calls `cli::main_with`.

pub mod access_log;
pub mod cli;
pub mod config;
pub mod conn;
pub mod control;
pub mod daemon;
mod event;
pub mod exec;
pub mod handler;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod protect;
mod reload;
pub mod server;
mod sha256;
mod slot;
pub mod stats;
pub mod worker;
