//! SIGHUP: re-read the config file by its path, and change only what changed.
//!
//! Listeners are matched by `name`. One whose protocol and address stayed keeps its very socket
//! (no connection is refused or reset) and applies new settings to new connections; a new or
//! moved one binds first; one that left stops accepting and drains. Binds happen before anything
//! is touched, so a bind failure (or an invalid file) leaves the running daemon exactly as it
//! was. A listener renamed without moving hands its socket over to its new name.

use std::collections::HashSet;
use std::sync::Arc;

use crate::config::{Config, ListenerConfig};
use crate::handler::Context;
use crate::listener::Listener;
use crate::server::Server;

/// Where a listener of the new config gets its socket from.
enum Source {
    /// The running listener of the same name and address.
    Keep(usize),
    /// A running listener of another name on the same address, which is going away.
    Take(usize),
    /// A socket bound for this reload.
    Bound(Listener),
}

fn same_socket(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a.protocol == b.protocol && a.address == b.address
}

/// Apply the config file's current content, or keep everything as it is and say why not:
/// `Ok` with a summary of what changed, or `Err` with every reason it was refused.
pub(crate) fn reload(server: &mut Server) -> Result<String, Vec<String>> {
    let path = server.config().origin.clone();
    log::info!("reload: reading {}", path.display());
    let new = match Config::load(&path, server.registry()) {
        Ok(c) => c,
        Err(e) => {
            for d in &e.diagnostics {
                log::error!("reload refused: {d}");
            }
            log::error!("reload refused: the running configuration stays in force");
            return Err(e.diagnostics.iter().map(|d| d.to_string()).collect());
        }
    };
    let plan = match plan(server, &new) {
        Ok(p) => p,
        Err(e) => {
            log::error!("reload rolled back: {e}; the running configuration stays in force");
            return Err(vec![e]);
        }
    };
    warn_restart_only(&server.config().daemon, &new.daemon);
    Ok(apply(server, new, plan))
}

fn plan(server: &mut Server, new: &Config) -> Result<Vec<Source>, String> {
    // Handlers first, so nothing below can fail after a socket was bound or taken over.
    for l in &new.listeners {
        server
            .registry()
            .build_for(l)
            .map_err(|e| format!("listener `{}`: {e}", l.name))?;
    }
    let (slots, _) = server.parts_mut();
    let open: Vec<(usize, Arc<ListenerConfig>)> = slots
        .values()
        .filter(|s| s.listener.is_some())
        .map(|s| (s.id, Arc::clone(&s.cfg)))
        .collect();
    let kept_by_name = |old: &ListenerConfig| {
        new.listeners
            .iter()
            .any(|n| n.name == old.name && same_socket(n, old))
    };
    let mut claimed = HashSet::new();
    let mut sources = Vec::with_capacity(new.listeners.len());
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
            // On error the sockets bound so far are dropped with `sources`: nothing changed.
            Source::Bound(Listener::bind(l).map_err(|e| e.to_string())?)
        };
        if let Source::Keep(id) | Source::Take(id) = source {
            claimed.insert(id);
        }
        sources.push(source);
    }
    Ok(sources)
}

fn apply(server: &mut Server, new: Config, plan: Vec<Source>) -> String {
    let stopping = server.stopping();
    let mut live = HashSet::new();
    let (mut kept, mut added) = (0, 0);
    for (cfg, source) in new.listeners.iter().cloned().zip(plan) {
        match source {
            Source::Keep(id) => {
                let factory = match server.registry().build_for(&cfg) {
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
                let (slots, poll) = server.parts_mut();
                if let Some(slot) = slots.get_mut(&id) {
                    reapply_socket_file(slot, &cfg);
                    let cfg = Arc::new(cfg);
                    let ctx = Context::new(Arc::clone(&cfg), Arc::clone(&stopping));
                    slot.reconfigure(cfg, factory, ctx);
                    if slot.has_capacity() && !slot.fd_starved {
                        slot.watch(poll);
                    }
                }
                live.insert(id);
                kept += 1;
            }
            Source::Take(old) => {
                let (slots, poll) = server.parts_mut();
                let listener = slots.get_mut(&old).and_then(|slot| slot.close(poll));
                if let Some(listener) = listener {
                    install(server, cfg, listener, &mut live);
                    added += 1;
                }
            }
            Source::Bound(listener) => {
                install(server, cfg, listener, &mut live);
                added += 1;
            }
        }
    }
    let mut removed = 0;
    let (slots, poll) = server.parts_mut();
    for slot in slots.values_mut() {
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
    slots.retain(|_, s| s.listener.is_some() || s.busy > 0);
    server.set_config(new);
    let summary = format!("{kept} kept, {added} added, {removed} removed");
    log::info!("reload: done ({summary})");
    summary
}

fn install(
    server: &mut Server,
    cfg: ListenerConfig,
    listener: Listener,
    live: &mut HashSet<usize>,
) {
    let name = cfg.name.clone();
    let addr = listener.local_addr().to_string();
    let proto = cfg.protocol;
    match server.install(cfg, listener) {
        Ok(id) => {
            live.insert(id);
            log::info!("listener `{name}` listening on {proto} {addr}");
        }
        Err(e) => log::error!("reload: {e}"),
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
