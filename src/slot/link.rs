//! A listener slot's side of forked workers: its `Link` to the fork servers (which config they
//! were last sent, and a `Forget` when the slot goes away) and the `Slot` methods that hand a
//! connection or a datagram to them. The slot keeps the counting: a job is busy from dispatch
//! until its exit is reported (`forked`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use crate::config::ListenerConfig;
use crate::conn::PeerAddr;
use crate::worker::forked::{ForkJob, ForkServer};
use crate::worker::wire::{JobKind, ToServer};

/// A slot's registration with the fork server: which config it last sent, and a `Forget` when
/// the slot goes away.
#[derive(Debug)]
pub struct Link {
    server: Arc<ForkServer>,
    slot: usize,
    sent: Option<Arc<ListenerConfig>>,
}

impl Link {
    pub fn new(server: Arc<ForkServer>, slot: usize) -> Link {
        Link {
            server,
            slot,
            sent: None,
        }
    }

    pub fn server(&self) -> &ForkServer {
        &self.server
    }

    /// Send the config if the fork server does not have this very one yet (start, reload).
    pub fn sync(
        &mut self,
        cfg: &Arc<ListenerConfig>,
        socket: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        if self.sent.as_ref().is_some_and(|s| Arc::ptr_eq(s, cfg)) {
            return Ok(());
        }
        self.server.send_listener(self.slot, cfg, socket)?;
        self.sent = Some(Arc::clone(cfg));
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.sent.is_some() {
            let _ = self.server.broadcast(
                &ToServer::Forget {
                    slot: self.slot as u64,
                },
                None,
            );
        }
    }
}

impl crate::slot::Slot {
    /// Hand a job to the fork server, sending the listener's config first if it changed.
    /// Returns the job id when it is in flight (and counted busy).
    pub(crate) fn dispatch_forked(
        &mut self,
        shared: &crate::slot::Shared,
        job: ForkJob<'_>,
    ) -> Option<u64> {
        let Some(server) = &shared.forks else {
            log::error!(
                "listener `{}`: no fork server is running; dropping the request",
                self.cfg.name
            );
            return None;
        };
        let link = self
            .fork
            .get_or_insert_with(|| Link::new(Arc::clone(server), self.id));
        let socket = match &self.reply {
            Some(crate::handler::DatagramSocket::Udp(u)) => Some(u.as_fd()),
            Some(crate::handler::DatagramSocket::Unix(d)) => Some(d.as_fd()),
            None => None,
        };
        let sent = link
            .sync(&self.cfg, socket)
            .and_then(|()| link.server().dispatch(self.id, job));
        match sent {
            Ok(id) => {
                self.busy += 1;
                Some(id)
            }
            Err(e) => {
                log::error!(
                    "listener `{}`: cannot hand the request to the fork server: {e}",
                    self.cfg.name
                );
                None
            }
        }
    }

    /// A connection to a new child; `hold` (tracker entry, admission ticket) and the daemon's
    /// copy of the connection are kept until the child's exit is reported.
    pub(crate) fn dispatch_forked_stream(
        &mut self,
        shared: &crate::slot::Shared,
        conn: crate::conn::Conn,
        peer: PeerAddr,
        local: Option<SocketAddr>,
        hold: Box<dyn Send>,
        tls: Option<std::sync::Arc<crate::tls::TlsInfo>>,
    ) {
        let job = ForkJob {
            kind: JobKind::Stream,
            conn: Some(conn.as_fd()),
            peer,
            local,
            // A stream job carries no data of its own: a TLS session's parameters ride here.
            data: tls.map(|t| t.encode()).unwrap_or_default(),
        };
        if let Some(id) = self.dispatch_forked(shared, job) {
            if let Some(server) = &shared.forks {
                // `hold` first: the tracker entry goes before the descriptor closes.
                server.hold(id, Box::new((hold, conn)));
            }
        }
    }

    /// A datagram to a new child, which replies from the listener's socket.
    pub(crate) fn dispatch_forked_datagram(
        &mut self,
        shared: &crate::slot::Shared,
        data: Vec<u8>,
        peer: PeerAddr,
    ) {
        let job = ForkJob {
            kind: JobKind::Datagram,
            conn: None,
            peer,
            local: None,
            data,
        };
        self.dispatch_forked(shared, job);
    }
}
