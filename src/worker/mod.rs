//! Worker models: how a listener runs handlers once the loop has a connection or datagram.
//!
//! The loop owns the counting: it dispatches only while a listener has fewer than `max_workers`
//! jobs in flight, and every job reports `Done` through a channel plus the loop's `Waker`, so a
//! full listener pauses (the kernel backlog holds the queue) and resumes as soon as one frees.

mod child;
pub mod doorway;
pub mod forked;
mod forkserver;
mod programs;
mod start;
pub mod threaded;
pub mod wire;

pub use crate::jobs::{Done, Notifier, Outcome, Tracker};

/// Things every slot needs from the server to dispatch work.
#[derive(Debug)]
pub struct Shared {
    pub notifier: Notifier,
    pub tracker: Arc<Tracker>,
    pub stopping: Arc<AtomicBool>,
    pub next_conn: u64,
    /// `workers = "forked"`: the fork server, once `Server::serve` has started it.
    pub forks: Option<Arc<forked::ForkServer>>,
    /// `handle_request`: how many more requests may be taken (`None`: no limit).
    pub budget: Option<usize>,
}

use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::conn::{Conn, PeerAddr};
use crate::handler::{
    serve, Context, DatagramRequest, DatagramSocket, Factory, Request, StreamRequest,
};

/// Run one connection through a fresh handler, containing errors and panics to it alone.
/// Shared by every worker model, so a handler behaves the same in a thread or a child.
/// `before_close` is dropped before the connection's descriptors are closed (the tracker
/// entry must go first, see `Tracker`).
pub fn serve_stream<G>(
    factory: &Factory,
    ctx: &Context,
    conn: Conn,
    peer: PeerAddr,
    local: Option<SocketAddr>,
    before_close: G,
    tls: Option<std::sync::Arc<crate::tls::TlsInfo>>,
) -> Outcome {
    let started = std::time::Instant::now();
    let mut stream = StreamRequest::new(conn, peer.clone(), local);
    stream.set_tls(tls.clone());
    let mut req = Request::Stream(stream);
    let outcome = run(factory, ctx, &mut req);
    // The counters cost a getsockopt; skip it when the access line is not logged.
    let bytes = match &req {
        Request::Stream(s) => crate::access::bytes(s.conn()),
        _ => crate::access::Bytes::default(),
    };
    drop(before_close);
    drop(req);
    let outcome = report(ctx, &peer, outcome);
    crate::access::log_stream(
        ctx.listener_name(),
        &peer,
        started.elapsed(),
        bytes,
        &outcome,
        tls.as_deref(),
    );
    outcome
}

/// Run one datagram through a fresh handler, containing errors and panics to it alone.
pub fn serve_datagram(
    factory: &Factory,
    ctx: &Context,
    data: Vec<u8>,
    peer: PeerAddr,
    socket: DatagramSocket,
) -> Outcome {
    let (started, len) = (std::time::Instant::now(), data.len());
    let mut req = Request::Datagram(DatagramRequest::new(data, peer.clone(), socket));
    let outcome = run(factory, ctx, &mut req);
    let outcome = report(ctx, &peer, outcome);
    crate::access::log_datagram(ctx.listener_name(), &peer, started.elapsed(), len, &outcome);
    outcome
}

fn run(factory: &Factory, ctx: &Context, req: &mut Request) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| {
        let mut handler = factory();
        serve(handler.as_mut(), req, ctx)
    })) {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(e)) if is_peer_gone(&e) => Outcome::Ok,
        Ok(Err(e)) if crate::handler::is_no_reply_address(&e) => {
            // Any local user can send these from an unbound socket: debug, not warn.
            log::debug!(
                "listener `{}` peer {}: {e}",
                ctx.listener_name(),
                req.peer()
            );
            Outcome::Ok
        }
        Ok(Err(e)) if is_idle_timeout(&e, ctx) => {
            // Expected under slow or silent clients; per-connection, so debug, not warn.
            log::debug!(
                "listener `{}` peer {}: closed at idle_timeout",
                ctx.listener_name(),
                req.peer()
            );
            Outcome::Ok
        }
        Ok(Err(e)) => Outcome::Error(e.to_string()),
        Err(payload) => Outcome::Panic(panic_message(payload.as_ref())),
    }
}

/// A read or write that waited `idle_timeout` (SO_RCVTIMEO/SO_SNDTIMEO set at admission).
fn is_idle_timeout(e: &std::io::Error, ctx: &Context) -> bool {
    use std::io::ErrorKind::*;
    ctx.config().protect.idle_timeout.is_some() && matches!(e.kind(), WouldBlock | TimedOut)
}

/// A peer that hangs up mid-conversation is the normal end of many connections, not a fault
/// (one predicate for handlers and worker models alike).
pub use crate::handler::util::is_peer_gone;

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

fn report(ctx: &Context, peer: &PeerAddr, outcome: Outcome) -> Outcome {
    match &outcome {
        Outcome::Ok => {}
        Outcome::Error(e) => {
            log::warn!(
                "listener `{}` peer {peer}: handler failed: {e}",
                ctx.listener_name()
            )
        }
        Outcome::Panic(m) => {
            log::error!(
                "listener `{}` peer {peer}: handler panicked: {m}",
                ctx.listener_name()
            )
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;
    use crate::handler::util::test_support::context;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;

    /// A datagram from an unbound Unix socket cannot be answered; that is the sender's choice,
    /// not a handler failure (which `report` would log at warn for every such datagram).
    #[test]
    fn unanswerable_unix_sender_is_not_a_handler_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = UnixDatagram::bind(dir.path().join("s.sock")).expect("bind");
        let factory: Factory = Arc::new(|| Box::new(crate::handler::echo::Echo) as _);
        let (ctx, _) = context(Protocol::UnixDgram);
        let peer = PeerAddr::Unix {
            path: None,
            cred: None,
        };
        let socket = DatagramSocket::Unix(Arc::new(server));
        let outcome = serve_datagram(&factory, &ctx, b"hi".to_vec(), peer, socket);
        assert_eq!(outcome, Outcome::Ok);
    }
}
