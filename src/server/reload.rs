//! SIGHUP: re-read the config file by its path, and change only what changed.
//!
//! Listeners are matched by `name`. One whose protocol and address stayed keeps its very socket
//! (no connection is refused or reset) and applies new settings to new connections; a new or
//! moved one binds first; one that left stops accepting and drains. Binds happen before anything
//! is touched, so a bind failure (or an invalid file) leaves the running daemon exactly as it
//! was. A listener renamed without moving hands its socket over to its new name.

use std::collections::HashSet;
use std::sync::Arc;

use super::Server;
use crate::config::{Config, ListenerConfig};
use crate::handler::{Context, Registry};
use crate::listener::Listener;

/// Where a listener of the new config gets its socket from.
pub(super) enum Source {
    /// The running listener of the same name and address.
    Keep(usize),
    /// A running listener of another name on the same address, which is going away.
    Take(usize),
    /// A socket bound for this reload.
    Bound(Listener),
}

/// What a reload will do, computed before anything changes: each new listener with the source
/// of its socket, in the new config's order. Every socket it needs is already bound, so
/// applying it cannot fail half-way; dropping it instead leaves the server as it was.
pub(super) struct Plan {
    pub(super) config: Config,
    pub(super) steps: Vec<Source>,
}

/// Why a reload changes nothing.
pub(super) enum Refused {
    /// The file is invalid: every diagnostic.
    Invalid(Vec<String>),
    /// Valid, but a handler or a bind failed; what was bound for it is closed again.
    RolledBack(String),
}

fn same_socket(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a.protocol == b.protocol && a.address == b.address
}

/// Read the file at `path` and plan the change from the running listeners (`open`: slot id
/// and config of each listener still accepting). `Err` says why nothing will change.
pub(super) fn plan(
    path: &std::path::Path,
    registry: &Registry,
    open: &[(usize, Arc<ListenerConfig>)],
) -> Result<Plan, Refused> {
    let new = Config::load(path, registry)
        .map_err(|e| Refused::Invalid(e.diagnostics.iter().map(|d| d.to_string()).collect()))?;
    // Handlers first, so nothing below can fail after a socket was bound or taken over.
    for l in &new.listeners {
        registry
            .build_for(l)
            .map_err(|e| Refused::RolledBack(format!("listener `{}`: {e}", l.name)))?;
    }
    let kept_by_name = |old: &ListenerConfig| {
        new.listeners
            .iter()
            .any(|n| n.name == old.name && same_socket(n, old))
    };
    let mut claimed = HashSet::new();
    let mut steps = Vec::with_capacity(new.listeners.len());
    for l in &new.listeners {
        let keep = open
            .iter()
            .find(|(_, c)| c.name == l.name && same_socket(c, l));
        let take = || {
            open.iter()
                .find(|(id, c)| !claimed.contains(id) && same_socket(c, l) && !kept_by_name(c))
        };
        let source = if let Some((id, _)) = keep {
            Source::Keep(*id)
        } else if let Some((id, _)) = take() {
            Source::Take(*id)
        } else {
            // On error the sockets bound so far are dropped with `steps`: nothing changed.
            Source::Bound(Listener::bind(l).map_err(|e| Refused::RolledBack(e.to_string()))?)
        };
        if let Source::Keep(id) | Source::Take(id) = source {
            claimed.insert(id);
        }
        steps.push(source);
    }
    Ok(Plan { config: new, steps })
}

impl Server {
    /// SIGHUP: apply the config file's current content, or keep everything as it is and say
    /// why not: `Ok` with a summary of what changed, or `Err` with every reason it was refused.
    pub(super) fn reload_config(&mut self) -> Result<String, Vec<String>> {
        let path = self.config.origin.clone();
        log::info!("reload: reading {}", path.display());
        let open: Vec<(usize, Arc<ListenerConfig>)> = self
            .slots
            .values()
            .filter(|s| s.listener.is_some())
            .map(|s| (s.id, Arc::clone(&s.cfg)))
            .collect();
        match plan(&path, &self.registry, &open) {
            Ok(plan) => {
                warn_restart_only(&self.config.daemon, &plan.config.daemon);
                Ok(self.apply(plan))
            }
            Err(Refused::RolledBack(why)) => {
                log::error!("reload rolled back: {why}; the running configuration stays in force");
                Err(vec![why])
            }
            Err(Refused::Invalid(why)) => {
                for d in &why {
                    log::error!("reload refused: {d}");
                }
                log::error!("reload refused: the running configuration stays in force");
                Err(why)
            }
        }
    }

    /// Carry out a plan: kept listeners get their new settings, taken and bound ones become
    /// slots, listeners the plan does not name stop accepting and drain.
    pub(super) fn apply(&mut self, plan: Plan) -> String {
        let Plan { config: new, steps } = plan;
        let stopping = Arc::clone(&self.shared.stopping);
        let mut live = HashSet::new();
        let (mut kept, mut added) = (0, 0);
        for (cfg, source) in new.listeners.iter().cloned().zip(steps) {
            match source {
                Source::Keep(id) => {
                    let factory = match self.registry.build_for(&cfg) {
                        Ok(f) => f,
                        Err(e) => {
                            log::error!(
                                "reload: listener `{}`: {e}; keeping its old settings",
                                cfg.name
                            );
                            live.insert(id);
                            continue;
                        }
                    };
                    if let Some(slot) = self.slots.get_mut(&id) {
                        reapply_socket_file(slot, &cfg);
                        let cfg = Arc::new(cfg);
                        let ctx = Context::new(Arc::clone(&cfg), Arc::clone(&stopping));
                        slot.reconfigure(cfg, factory, ctx);
                        slot.setup_accept(self.poll.registry(), &self.shared);
                        if slot.has_capacity() && !slot.fd_starved {
                            slot.watch(self.poll.registry());
                        }
                    }
                    live.insert(id);
                    kept += 1;
                }
                Source::Take(old) => {
                    let poll = self.poll.registry();
                    let listener = self.slots.get_mut(&old).and_then(|slot| slot.close(poll));
                    if let Some(listener) = listener {
                        self.install_listener(cfg, listener, &mut live);
                        added += 1;
                    }
                }
                Source::Bound(listener) => {
                    self.install_listener(cfg, listener, &mut live);
                    added += 1;
                }
            }
        }
        let mut removed = 0;
        let poll = self.poll.registry();
        for slot in self.slots.values_mut() {
            if !live.contains(&slot.id) && slot.listener.is_some() {
                log::info!(
                    "reload: listener `{}` removed; draining {} connections",
                    slot.cfg.name,
                    slot.busy
                );
                drop(slot.close(poll));
                removed += 1;
            }
        }
        self.slots
            .retain(|_, s| s.listener.is_some() || s.in_flight() > 0);
        self.config = new;
        let summary = format!("{kept} kept, {added} added, {removed} removed");
        log::info!("reload: done ({summary})");
        summary
    }

    fn install_listener(
        &mut self,
        cfg: ListenerConfig,
        listener: Listener,
        live: &mut HashSet<usize>,
    ) {
        let name = cfg.name.clone();
        let addr = listener.local_addr().to_string();
        let proto = cfg.protocol;
        match self.add_slot(cfg, listener) {
            Ok(id) => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.watch(self.poll.registry());
                }
                self.again.push(id);
                live.insert(id);
                log::info!("listener `{name}` listening on {proto} {addr}");
            }
            Err(e) => log::error!("reload: {e}"),
        }
    }
}

/// A kept unix listener whose `mode`, `owner` or `group` changed gets them on its file now:
/// the socket stays, so the next connection already meets the new permissions.
fn reapply_socket_file(slot: &crate::slot::Slot, new: &ListenerConfig) {
    let file = &new.protect.socket_file;
    if slot.cfg.protect.socket_file == *file {
        return;
    }
    let Some(path) = slot.listener.as_ref().and_then(Listener::own_socket_file) else {
        return;
    };
    match crate::protect::socket_file::apply(path, file) {
        Ok(()) => log::info!(
            "reload: listener `{}`: socket file {} now has the new mode/owner/group",
            new.name,
            path.display()
        ),
        Err(e) => log::error!(
            "reload: listener `{}`: cannot change {}: {e}; it keeps its old permissions",
            new.name,
            path.display()
        ),
    }
}

/// `[daemon]` settings that only a restart can change; the rest apply at once.
fn warn_restart_only(old: &crate::config::DaemonConfig, new: &crate::config::DaemonConfig) {
    let mut needs = Vec::new();
    if old.user != new.user || old.group != new.group {
        needs.push("user/group");
    }
    if old.pidfile != new.pidfile {
        needs.push("pidfile");
    }
    if old.log != new.log {
        needs.push("log");
    }
    if old.syslog != new.syslog {
        needs.push("syslog");
    }
    if old.control != new.control {
        needs.push("control/control_mode/control_group");
    }
    if old.metrics != new.metrics {
        needs.push("metrics");
    }
    if !needs.is_empty() {
        log::warn!(
            "reload: [daemon] {} changed; that takes a restart to apply",
            needs.join(", ")
        );
    }
    if old.log_level != new.log_level {
        log::set_max_level(new.log_level);
    }
}
