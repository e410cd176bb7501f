//! What the daemon tells an operator about itself: the SIGUSR1 snapshot (one line for the
//! daemon, one per listener) and the one-line summary the service manager shows (`STATUS=`).

use super::Server;

impl Server {
    /// SIGUSR1: one line for the daemon, one per listener (address, connections open and
    /// served, workers busy).
    pub(super) fn log_status(&self) {
        log::info!("status: {}", self.status_line());
        for s in self.slots.values() {
            let addr = s
                .listener
                .as_ref()
                .map_or("closed, draining".to_string(), |l| {
                    format!("{} {}", s.cfg.protocol, l.local_addr())
                });
            let open = if s.cfg.protocol.is_datagram() {
                "datagrams in progress"
            } else {
                "connections open"
            };
            let loops = s
                .accepted_per_loop()
                .map(|(accepted, open)| {
                    let a: Vec<String> = accepted.iter().map(u64::to_string).collect();
                    let o: Vec<String> = open.iter().map(usize::to_string).collect();
                    format!(
                        ", accepted by event loops {} (open on each {})",
                        a.join("/"),
                        o.join("/")
                    )
                })
                .unwrap_or_default();
            let forks = s
                .accepted_by_fork_servers()
                .map(|n| format!(", accepted by fork servers {n}"))
                .unwrap_or_default();
            log::info!(
                "status: listener `{}` {addr}: {} {open}, {} served, {} workers busy of {} ({} threads), {}{loops}{forks}",
                s.cfg.name,
                s.in_flight(),
                s.served,
                s.in_flight(),
                s.cfg.max_workers,
                s.pool.threads(),
                if s.watching { "accepting" } else { "paused" }
            );
        }
        if self.slots.values().any(|s| s.cfg.tls.is_some()) {
            let held: usize = self.slots.values().map(|s| s.tls_held()).sum();
            log::info!(
                "status: tls: {held} handshakes in progress or waiting for a worker, {} failed since start",
                crate::tls::front::handshake_failures()
            );
        }
    }

    /// The daemon in one line, for SIGUSR1 and the service manager's `STATUS=`.
    pub(super) fn status_line(&self) -> String {
        let open = self.slots.values().filter(|s| s.listener.is_some()).count();
        let draining = self.slots.len() - open;
        let mut line = format!("{open} listeners, {} connections open", self.in_flight());
        if draining > 0 {
            line.push_str(&format!(", {draining} removed listeners draining"));
        }
        line
    }
}
