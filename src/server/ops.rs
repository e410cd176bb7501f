//! The loop's side of operating the daemon: the control socket's commands (status, reload,
//! stop, pause, resume, drain, reopen-logs), the metrics endpoint's snapshot, and the access
//! log sink's start. Threads decode requests and write answers; here the loop only looks at
//! its own state and answers through a channel, so no client can hold it up.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::stop::State;
use super::{io_err, ServeError, Server};
use crate::config::Config;
use crate::control::{Ask, Command, ControlSocket, LoopLink, Reply, Then};
use crate::stats::REFUSAL_LABELS;

/// What the loop keeps for operating the daemon.
pub(super) struct Ops {
    asks: Receiver<Ask>,
    link: LoopLink,
    control: Option<ControlSocket>,
    metrics: Option<crate::metrics::Endpoint>,
    started: Instant,
    started_unix: u64,
    config_sha256: Option<String>,
    last_reload: Option<Value>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn file_sha256(path: &std::path::Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|b| crate::sha256::hex_digest(&b))
}

impl Ops {
    /// Bind the control socket and the metrics endpoint (before privileges are dropped).
    pub(super) fn bind(config: &Config, waker: Arc<mio::Waker>) -> Result<Ops, ServeError> {
        let (tx, asks) = channel();
        let control = ControlSocket::bind(&config.daemon.control)
            .map_err(io_err("cannot set up the control socket"))?;
        let metrics = config
            .daemon
            .metrics
            .map(crate::metrics::Endpoint::bind)
            .transpose()
            .map_err(io_err("cannot bind [daemon.metrics] address"))?;
        Ok(Ops {
            asks,
            link: LoopLink::new(tx, waker),
            control,
            metrics,
            started: Instant::now(),
            started_unix: unix_now(),
            config_sha256: file_sha256(&config.origin),
            last_reload: None,
        })
    }
}

impl Server {
    /// Start the access log writer and the control and metrics threads (after the fork
    /// servers: these are threads).
    pub(super) fn start_ops(&mut self) -> Result<(), ServeError> {
        crate::access_log::start(&self.config.daemon.access_log, &self.config.daemon.syslog)
            .map_err(io_err("cannot start the access log writer"))?;
        if let Some(c) = &mut self.ops.control {
            c.publish()
                .map_err(io_err("cannot put the control socket in place"))?;
            c.serve(self.ops.link.clone())
                .map_err(io_err("cannot start the control socket thread"))?;
            log::info!("control socket: listening on {}", c.path().display());
        }
        if let Some(m) = &self.ops.metrics {
            m.serve(self.ops.link.clone())
                .map_err(io_err("cannot start the metrics thread"))?;
            log::info!("metrics: serving http://{}/metrics", m.local_addr());
        }
        Ok(())
    }

    /// Answer every command the control and metrics threads handed over.
    pub(super) fn answer_asks(&mut self) {
        while let Ok(ask) = self.ops.asks.try_recv() {
            if let Command::Upgrade { binary } = ask.command {
                // Answered when the upgrade ends, not now.
                let reply = ask.reply;
                self.upgrade(
                    binary,
                    Some(Box::new(move |outcome| {
                        let _ = reply.try_send(upgrade_reply(outcome));
                    })),
                );
                continue;
            }
            if let Some(reply) = self.answer(ask.command, &ask.reply) {
                let _ = ask.reply.try_send(reply);
            }
        }
    }

    /// The answer now, or `None` for a command whose outcome comes later: its arm keeps a
    /// clone of `_later` and sends the answer when it knows (the client thread waits up to
    /// `ANSWER_DEADLINE`). (`upgrade` is answered by `answer_asks` when the upgrade ends.)
    fn answer(
        &mut self,
        command: Command,
        _later: &std::sync::mpsc::SyncSender<Reply>,
    ) -> Option<Reply> {
        Some(match command {
            Command::Status => {
                self.collect_done(); // loops report closes lazily (see `event::accept`)
                Reply::ok(json!({ "status": self.status_json() }))
            }
            // `answer_asks` starts it and answers when it ends.
            Command::Upgrade { .. } => Reply::error("upgrade: not answered here", json!({})),
            Command::Reload if self.upgrading.is_some() => Reply::error(
                "a binary upgrade is in progress; reload after it",
                json!({}),
            ),
            Command::Reload if self.state != State::Running => {
                Reply::error("the daemon is stopping; no reload", json!({}))
            }
            Command::Reload => match self.reload() {
                Ok(summary) => Reply::ok(json!({"reload": {"ok": true, "summary": summary}})),
                Err(errors) => Reply::error(
                    "reload refused: the running configuration stays in force",
                    json!({"reload": {"ok": false, "errors": errors}}),
                ),
            },
            Command::Stop { now } => {
                // As for SIGTERM: a stop wins over an upgrade in progress.
                self.abort_upgrade("socketd stop came first");
                let in_flight = self.in_flight();
                // The same calls a `ShutdownHandle` makes (on this, the serving thread, they
                // only ask; the loop acts on them next).
                let handle = self.shutdown_handle();
                match (self.state, now) {
                    (State::Running, false) => handle.shutdown(),
                    (State::Stopped, _) | (State::Draining { .. }, false) => {}
                    (_, true) => handle.ask_stop_now("socketd stop --now"),
                }
                let mut r = Reply::ok(json!({"stop": {
                    "now": now,
                    "in_flight": in_flight,
                    "shutdown_timeout_seconds": self.config.daemon.shutdown_timeout.as_secs_f64(),
                    "pid": std::process::id(),
                }}));
                r.then = Then::HoldUntilExit;
                r
            }
            Command::Pause { listener } => self.with_listener(&listener, |s, poll| {
                s.paused = true;
                s.unwatch(poll);
                log::info!("listener `{}`: paused (socketd pause)", s.cfg.name);
                json!({"listener": s.cfg.name, "paused": true})
            }),
            Command::Resume { listener } => {
                let reply = self.with_listener(&listener, |s, poll| {
                    s.paused = false;
                    if s.has_capacity() && !s.fd_starved {
                        s.watch(poll);
                    }
                    log::info!(
                        "listener `{}`: accepting again (socketd resume)",
                        s.cfg.name
                    );
                    json!({"listener": s.cfg.name, "paused": false})
                });
                // Connections queued while paused raise no new readiness edge: look now.
                if let Some(id) = self.open_slot(&listener) {
                    self.again.push(id);
                }
                reply
            }
            Command::Drain { listener } => {
                let reply = self.with_listener(&listener, |s, poll| {
                    drop(s.close(poll));
                    log::info!(
                        "listener `{}`: closed by socketd drain; draining {} connections (a \
                         reload binds it again)",
                        s.cfg.name,
                        s.in_flight()
                    );
                    json!({"listener": s.cfg.name, "draining": s.in_flight()})
                });
                self.slots
                    .retain(|_, s| s.listener.is_some() || s.in_flight() > 0);
                reply
            }
            Command::ReopenLogs => {
                crate::access_log::reopen();
                Reply::ok(json!({"reopened": crate::access_log::counts().target}))
            }
        })
    }

    fn open_slot(&self, name: &str) -> Option<usize> {
        self.slots
            .values()
            .find(|s| s.cfg.name == name && s.listener.is_some())
            .map(|s| s.id)
    }

    fn with_listener(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut crate::slot::Slot, &mio::Registry) -> Value,
    ) -> Reply {
        if self.state != State::Running {
            return Reply::error("the daemon is stopping", json!({}));
        }
        let Some(id) = self.open_slot(name) else {
            let names: Vec<&str> = self
                .slots
                .values()
                .filter(|s| s.listener.is_some())
                .map(|s| s.cfg.name.as_str())
                .collect();
            return Reply::error(
                format!(
                    "no open listener named {name:?}; open listeners: {}",
                    names.join(", ")
                ),
                json!({}),
            );
        };
        let poll = self.poll.registry();
        match self.slots.get_mut(&id) {
            Some(slot) => Reply::ok(f(slot, poll)),
            None => Reply::error("listener vanished", json!({})),
        }
    }

    /// SIGHUP or `socketd reload`: reopen the access log, apply the file (or refuse it), and
    /// remember the outcome for status and metrics.
    pub(super) fn reload(&mut self) -> Result<String, Vec<String>> {
        crate::access_log::reopen();
        self.notify.reloading();
        let old_access = self.config.daemon.access_log.clone();
        let outcome = self.reload_config();
        self.sync_fd_store();
        match &outcome {
            Ok(_) => {
                crate::stats::RELOADS_OK.fetch_add(1, Relaxed);
                self.ops.config_sha256 = file_sha256(&self.config.origin);
                if self.config.daemon.access_log != old_access {
                    log::info!(
                        "access log: now {}",
                        self.config.daemon.access_log.describe()
                    );
                    crate::access_log::set_target(&self.config.daemon.access_log);
                }
            }
            Err(_) => {
                crate::stats::RELOADS_REFUSED.fetch_add(1, Relaxed);
            }
        }
        self.ops.last_reload = Some(match &outcome {
            Ok(summary) => json!({"at_unix": unix_now(), "ok": true, "summary": summary}),
            Err(errors) => json!({"at_unix": unix_now(), "ok": false, "errors": errors}),
        });
        let status = self.status_line();
        self.notify.ready(&status);
        outcome
    }

    /// The status document (README, "Control socket", schema version 1), without the
    /// process's fds and RSS, which the control thread adds.
    fn status_json(&self) -> Value {
        let listeners: Vec<Value> = self
            .slots
            .values()
            .map(|s| {
                let stats = &s.stats;
                let refused: serde_json::Map<String, Value> = REFUSAL_LABELS
                    .iter()
                    .map(|label| (label.to_string(), json!(stats.refused_total(label))))
                    .collect();
                let state = if s.listener.is_none() {
                    "draining"
                } else if s.paused {
                    "paused"
                } else if s.fd_starved {
                    "out-of-fds"
                } else if !s.has_capacity() {
                    "full"
                } else {
                    "accepting"
                };
                json!({
                    "name": s.cfg.name,
                    "protocol": s.cfg.protocol.name(),
                    "address": s.listener.as_ref().map(|l| l.local_addr().to_string()),
                    "handler": s.cfg.handler,
                    "workers": s.cfg.workers.name(),
                    "max_workers": s.cfg.max_workers,
                    "state": state,
                    "paused": s.paused,
                    "open": s.in_flight(),
                    "busy": s.in_flight(),
                    "served": s.served,
                    "accepted": stats.accepted.load(Relaxed),
                    "refused": refused,
                    "handler_errors": stats.handler_errors.load(Relaxed),
                    "bytes_in": stats.bytes_in.load(Relaxed),
                    "bytes_out": stats.bytes_out.load(Relaxed),
                })
            })
            .collect();
        let access = crate::access_log::counts();
        let state = match self.state {
            State::Running => "running",
            State::Draining { .. } => "stopping",
            State::Stopped => "stopped",
        };
        json!({
            "state": state,
            "process": {
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "started_unix": self.ops.started_unix,
                "uptime_seconds": self.ops.started.elapsed().as_secs_f64(),
            },
            "config": {
                "path": std::path::absolute(&self.config.origin)
                    .unwrap_or_else(|_| self.config.origin.clone())
                    .display()
                    .to_string(),
                "sha256": self.ops.config_sha256,
            },
            "reloads": {
                "ok": crate::stats::RELOADS_OK.load(Relaxed),
                "refused": crate::stats::RELOADS_REFUSED.load(Relaxed),
                "last": self.ops.last_reload,
            },
            "control": self.ops.control.as_ref().map(|c| c.path().display().to_string()),
            "metrics": self.ops.metrics.as_ref().map(|m| m.local_addr().to_string()),
            "access_log": {
                "target": access.target,
                "written": access.written,
                "dropped": access.dropped,
            },
            "listeners": listeners,
        })
    }
}

/// The control answer for an upgrade's outcome.
fn upgrade_reply(outcome: super::UpgradeOutcome) -> Reply {
    match outcome {
        Ok(pid) => Reply::ok(json!({"upgrade": {"pid": pid, "from": std::process::id()}})),
        Err(why) => Reply::error(
            format!("upgrade failed: {why}"),
            json!({"upgrade": {"pid": std::process::id()}}),
        ),
    }
}
