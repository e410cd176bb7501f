//! A TLS listener's handshakes: each admitted connection goes to the TLS front
//! (`crate::tls::front`); a finished one comes back as the plaintext end of a socketpair and
//! waits here for a worker place. A listener keeps a bounded number of handshakes in progress
//! (`handshake_room`), each cut at `handshake_timeout`, so stalled clients hold no worker.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::ListenerConfig;
use crate::conn::{Conn, PeerAddr};
use crate::tls::{front, TlsInfo};

/// A connection whose handshake finished, waiting for a worker.
pub(crate) struct Ready {
    pub conn: Conn,
    pub peer: PeerAddr,
    pub local: Option<SocketAddr>,
    pub ticket: crate::protect::Ticket,
    pub info: Arc<TlsInfo>,
    /// When the connection was accepted: `max_duration` counts the handshake too.
    pub accepted: Instant,
}

/// A TLS connection's session, as the dispatch functions take it.
pub(crate) struct Session {
    pub info: Arc<TlsInfo>,
    pub local: Option<SocketAddr>,
    pub accepted: Instant,
}

/// A listener's handshakes in progress and finished ones not yet dispatched.
#[derive(Default)]
pub(crate) struct Handshakes {
    /// Filled by the front's thread: `Some` a finished handshake, `None` a failed one.
    done: Arc<Mutex<Vec<Option<Ready>>>>,
    /// Handed to the front and not yet come back.
    pending: usize,
    /// Finished, waiting for a worker place.
    ready: VecDeque<Ready>,
}

impl Handshakes {
    /// Handshakes in progress plus finished ones waiting: what counts against the room.
    pub fn held(&self) -> usize {
        self.pending + self.ready.len()
    }

    /// Hand an admitted connection to the front; `wake` tells the main loop it came back.
    pub fn start(
        &mut self,
        cfg: &ListenerConfig,
        conn: Conn,
        peer: PeerAddr,
        local: Option<SocketAddr>,
        ticket: crate::protect::Ticket,
        wake: Box<dyn Fn() + Send>,
    ) {
        let Some(settings) = &cfg.tls else { return };
        let Some(server) = settings.server.clone() else {
            log::error!("listener `{}`: TLS settings were not loaded", cfg.name);
            return;
        };
        // idle_timeout and max_duration count the handshake: it gets the shortest of the three.
        let mut limit = settings.handshake_timeout;
        for d in [cfg.protect.idle_timeout, cfg.protect.max_duration]
            .into_iter()
            .flatten()
        {
            limit = limit.min(d);
        }
        let wire = match conn {
            // Records go out whole and at once: no Nagle delay behind a delayed ACK.
            Conn::Tcp(s) => s
                .set_nonblocking(true)
                .and_then(|()| s.set_nodelay(true))
                .map(|()| front::Wire::Tcp(mio::net::TcpStream::from_std(s))),
            Conn::Unix(s) => s
                .set_nonblocking(true)
                .map(|()| front::Wire::Unix(mio::net::UnixStream::from_std(s))),
        };
        let label = format!("listener `{}` peer {peer}", cfg.name);
        let wire = match wire {
            Ok(w) => w,
            Err(e) => {
                log::warn!("{label}: {e}");
                return;
            }
        };
        let done = Arc::clone(&self.done);
        let accepted = Instant::now();
        let reply: front::Reply = Box::new(move |result| {
            let ready = result.ok().map(|(pair, info)| Ready {
                conn: Conn::Unix(pair),
                peer,
                local,
                ticket,
                info: Arc::new(info),
                accepted,
            });
            if let Ok(mut d) = done.lock() {
                d.push(ready);
            }
            wake();
        });
        let job = front::Job::Accept {
            wire,
            config: server,
            deadline: Instant::now() + limit,
            idle: cfg.protect.idle_timeout,
            label: label.clone(),
            reply,
        };
        match front::front().and_then(|f| f.submit(job)) {
            Ok(()) => self.pending += 1,
            Err(e) => log::error!("{label}: cannot start the TLS handshake: {e}"),
        }
    }

    /// Take what the front finished; returns the handshakes now ready, oldest first.
    pub fn collect(&mut self) {
        let finished: Vec<Option<Ready>> = match self.done.lock() {
            Ok(mut d) => std::mem::take(&mut *d),
            Err(_) => return,
        };
        for r in finished {
            self.pending = self.pending.saturating_sub(1);
            if let Some(r) = r {
                self.ready.push_back(r);
            }
        }
    }

    /// The next finished handshake waiting for a worker.
    pub fn next_ready(&mut self) -> Option<Ready> {
        self.ready.pop_front()
    }
}

/// Handshakes a listener keeps in progress (or finished and waiting for a worker) at once:
/// at least `MIN_HANDSHAKES`, so a few stalled clients cannot stop a small listener from
/// accepting, and at most one per worker place beyond that.
pub const MIN_HANDSHAKES: usize = 64;

/// The handshake room of a listener with `max_workers` places.
pub fn handshake_room(max_workers: usize) -> usize {
    max_workers.max(MIN_HANDSHAKES)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use crate::config::Protocol;
    use crate::conn::{Conn, PeerAddr};
    use crate::handler::util::test_support::context;
    use crate::handler::{Context, Factory, Handler, Request};
    use crate::tls::TlsInfo;

    /// Writes what it learns of the TLS session, as a registered handler would.
    struct ShowTls;

    impl Handler for ShowTls {
        fn handle(&mut self, req: &mut Request, _ctx: &Context) -> std::io::Result<()> {
            let Request::Stream(s) = req else {
                return Ok(());
            };
            let line = match s.tls() {
                Some(t) => format!(
                    "{} {} {}\n",
                    t.protocol,
                    t.server_name.as_deref().unwrap_or("-"),
                    t.client_subject.as_deref().unwrap_or("-")
                ),
                None => "plain\n".to_string(),
            };
            s.wfile.write_all(line.as_bytes())
        }
    }

    /// The session's parameters reach a registered handler through its `StreamRequest`.
    #[test]
    fn a_registered_handler_sees_the_session() {
        let factory: Factory = Arc::new(|| Box::new(ShowTls) as _);
        let (ctx, _) = context(Protocol::Tcp);
        let peer: PeerAddr = PeerAddr::Inet("127.0.0.1:9".parse().expect("addr"));
        let info = TlsInfo {
            protocol: "TLSv1.3".into(),
            server_name: Some("a.example".into()),
            client_subject: Some("CN=c".into()),
            ..TlsInfo::default()
        };
        for (tls, want) in [
            (Some(Arc::new(info)), "TLSv1.3 a.example CN=c\n"),
            (None, "plain\n"),
        ] {
            let (ours, theirs) = UnixStream::pair().expect("pair");
            let conn = Conn::Unix(theirs);
            let outcome =
                crate::worker::serve_stream(&factory, &ctx, conn, peer.clone(), None, (), tls);
            assert_eq!(outcome, crate::worker::Outcome::Ok);
            let mut got = String::new();
            (&ours).read_to_string(&mut got).expect("read");
            assert_eq!(got, want);
        }
    }
}
