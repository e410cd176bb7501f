//! socketd's integration tests: one test binary that starts the real daemon (and example
//! daemons with extra handlers) in temp dirs and talks to it over real sockets.
//!
//! `harness` is the shared toolbox (start/stop/signal a daemon, clients with timeouts, config
//! checks, assertions); each other module is one topic. To add a topic, add a file here and a
//! `mod` line below, and use `crate::harness::*`.

mod harness;

mod accept;
mod concurrency;
mod config_errors;
mod control;
mod control_systemd;
mod daemon_mode;
mod deploy;
mod event;
mod exec;
mod file;
mod forked;
mod forked_accept;
mod forked_exec;
mod handlers;
mod hostile;
mod lib_examples;
mod log_lines;
mod manager;
mod metrics;
mod protection;
mod proxy;
mod reload;
mod services;
mod start;
mod stop;
mod sysd;
mod systemd;
mod tls;
mod traffic;
mod under_systemd;
mod upgrade;
mod upgrade_under_systemd;
