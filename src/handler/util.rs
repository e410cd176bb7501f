//! Pieces the stream and datagram handlers share: telling a peer that went away from a real
//! failure, ending a stream politely (half-close, and the linger a one-shot reply needs before
//! close), and, for tests, socket pairs and a runner that serve one request the way a worker
//! does. The built-ins use these, and so can a programmer's own handlers.

use std::io::{self, BufRead, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::StreamRequest;

/// The ways a client ends a conversation by going away (EPIPE, ECONNRESET, EOF mid-write, a
/// write that the peer can take no more of): the normal end of a stream service, not a failure
/// worth an error in the log. Every worker model and every built-in asks this one predicate.
pub fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::WriteZero
    )
}

/// Send a one-shot reply (daytime, time) and end the connection with `linger_close`; a client
/// that left before the reply went out is a normal end.
pub fn reply_once(s: &mut StreamRequest, reply: &[u8]) -> io::Result<()> {
    match s.wfile.write_all(reply).and_then(|()| s.wfile.flush()) {
        Ok(()) => linger_close(s),
        Err(e) if is_peer_gone(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Tell the client we are done sending (FIN after the data); a peer that already went away
/// is not an error.
pub fn shutdown_write(s: &StreamRequest) -> io::Result<()> {
    match s.conn().shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected || is_peer_gone(&e) => Ok(()),
        other => other,
    }
}

/// How long a one-shot reply waits for the client to close after our FIN.
const LINGER: Duration = Duration::from_secs(1);
/// How much late input a one-shot reply reads and drops while it waits.
const LINGER_BYTES: usize = 64 * 1024;

/// End a one-shot reply (daytime, time): half-close, then read and drop what the client sent
/// until it closes too, within `LINGER`. Closing a socket with unread input makes the kernel
/// reset the connection, and a reset can destroy the reply before the client reads it.
pub fn linger_close(s: &mut StreamRequest) -> io::Result<()> {
    shutdown_write(s)?;
    let previous = socket2::SockRef::from(s.conn()).read_timeout()?;
    let deadline = Instant::now() + LINGER;
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.conn().set_read_timeout(Some(left)).is_err() {
            break;
        }
        match s.rfile.fill_buf() {
            Ok([]) => break,
            Ok(chunk) => {
                let len = chunk.len();
                s.rfile.consume(len);
                dropped += len;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Timed out or gone: the reply is out, which is all that matters now.
            Err(_) => break,
        }
    }
    s.conn().set_read_timeout(previous)
}

/// Socket pairs, a context and a runner shared by the built-in handlers' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::io;
    use std::net::UdpSocket;
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use crate::config::{Config, Protocol};
    use crate::conn::{Conn, PeerAddr};
    use crate::handler::StreamRequest;
    use crate::handler::{
        serve, Context, DatagramRequest, DatagramSocket, Handler, Registry, Request,
    };

    /// Long enough for a loaded CI machine, short enough that a hung test fails visibly.
    pub const TIMEOUT: Duration = Duration::from_secs(10);

    /// A context for a made-up listener, and the flag that says "stopping". The listener comes
    /// from config text, so new `ListenerConfig` fields get their defaults here for free.
    pub fn context(protocol: Protocol) -> (Context, Arc<AtomicBool>) {
        let address = if protocol.is_unix() {
            "test.sock"
        } else {
            "127.0.0.1:0"
        };
        let text = format!(
            "[[listener]]\nname = \"test\"\nprotocol = \"{protocol}\"\n\
             address = \"{address}\"\nhandler = \"echo\"\n"
        );
        let config = Config::from_str(&text, Path::new("test.toml"), &Registry::with_builtins())
            .expect("test config");
        let listener = config.listeners.into_iter().next().expect("one listener");
        let stopping = Arc::new(AtomicBool::new(false));
        (Context::new(Arc::new(listener), stopping.clone()), stopping)
    }

    /// Run `handler` on the server end of a fresh Unix stream pair in a thread, as a worker
    /// would (setup, handle, finish, flush, close); the test talks to the returned client end.
    pub fn spawn_stream<H: Handler + 'static>(
        mut handler: H,
        ctx: Context,
    ) -> (UnixStream, JoinHandle<io::Result<()>>) {
        let (server, client) = UnixStream::pair().expect("socketpair");
        client.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        client.set_write_timeout(Some(TIMEOUT)).expect("timeout");
        let req = StreamRequest::new(
            Conn::Unix(server),
            PeerAddr::Unix {
                path: None,
                cred: None,
            },
            None,
        );
        let worker = std::thread::spawn(move || {
            let mut req = Request::Stream(req);
            serve(&mut handler, &mut req, &ctx)
            // `req` drops here: the server end closes, as socketd closes it after `finish`.
        });
        (client, worker)
    }

    /// Send `payload` over UDP on loopback, serve the one datagram with `handler`, and return
    /// every reply that arrives within `wait` (none for discard).
    pub fn udp_exchange<H: Handler>(
        handler: &mut H,
        payload: &[u8],
        wait: Duration,
    ) -> Vec<Vec<u8>> {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind server");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind client");
        client
            .send_to(payload, server.local_addr().expect("addr"))
            .expect("send");
        let mut buf = vec![0u8; 65536];
        server.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let (n, from) = server.recv_from(&mut buf).expect("server recv");
        let mut req = Request::Datagram(DatagramRequest::new(
            buf[..n].to_vec(),
            PeerAddr::Inet(from),
            DatagramSocket::Udp(Arc::new(server)),
        ));
        let (ctx, _) = context(Protocol::Udp);
        serve(handler, &mut req, &ctx).expect("handler");
        collect_replies(wait, |t, b| {
            client
                .set_read_timeout(Some(t))
                .and_then(|_| client.recv(b))
        })
    }

    /// The same over Unix datagram sockets bound to paths in a temporary directory.
    pub fn unix_dgram_exchange<H: Handler>(
        handler: &mut H,
        payload: &[u8],
        wait: Duration,
    ) -> Vec<Vec<u8>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let server_path = dir.path().join("server.sock");
        let client_path = dir.path().join("client.sock");
        let server = UnixDatagram::bind(&server_path).expect("bind server");
        let client = UnixDatagram::bind(&client_path).expect("bind client");
        client.send_to(payload, &server_path).expect("send");
        let mut buf = vec![0u8; 65536];
        server.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let (n, from) = server.recv_from(&mut buf).expect("server recv");
        let mut req = Request::Datagram(DatagramRequest::new(
            buf[..n].to_vec(),
            PeerAddr::Unix {
                path: from.as_pathname().map(|p| p.to_path_buf()),
                cred: None,
            },
            DatagramSocket::Unix(Arc::new(server)),
        ));
        let (ctx, _) = context(Protocol::UnixDgram);
        serve(handler, &mut req, &ctx).expect("handler");
        collect_replies(wait, |t, b| {
            client
                .set_read_timeout(Some(t))
                .and_then(|_| client.recv(b))
        })
    }

    /// Every reply: the first may take up to `wait`, later ones must follow within a moment.
    fn collect_replies(
        wait: Duration,
        mut recv: impl FnMut(Duration, &mut [u8]) -> io::Result<usize>,
    ) -> Vec<Vec<u8>> {
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let t = if replies.is_empty() {
                wait
            } else {
                Duration::from_millis(100)
            };
            match recv(t, &mut buf) {
                Ok(n) => replies.push(buf[..n].to_vec()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return replies
                }
                Err(e) => panic!("client recv: {e}"),
            }
        }
    }

    /// Deterministic "random" bytes (xorshift), so a failure can be reproduced.
    pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 32) as u8
            })
            .collect()
    }
}
