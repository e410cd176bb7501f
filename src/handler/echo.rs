//! Echo (RFC 862): everything the client sends comes straight back.
//!
//! Stream: whatever bytes arrive are written back at once, binary-safe and without waiting for
//! a newline; when the client half-closes, the rest is sent and our side is shut down too.
//! Datagram: the datagram goes back to its sender unchanged. This file also holds the
//! disconnect predicate the other built-ins share, since echo is where it matters most.

use std::io::{self, BufRead, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::{Context, DatagramRequest, Handler, Request, StreamRequest};

/// The RFC 862 echo service; stateless, so one per request costs nothing.
#[derive(Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        match req {
            Request::Stream(s) => echo_stream(s),
            Request::Datagram(d) => echo_datagram(d),
        }
    }
}

/// Copy the read side to the write side chunk by chunk until EOF, then half-close.
fn echo_stream(s: &mut StreamRequest) -> io::Result<()> {
    // Whatever `setup` may have queued goes out before the echoed bytes.
    s.wfile.flush()?;
    loop {
        let chunk = match s.rfile.fill_buf() {
            Ok([]) => break,
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if peer_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let len = chunk.len();
        // Straight to the socket: no second copy through `wfile`, nothing left waiting in it.
        match s.wfile.get_mut().write_all(chunk) {
            Ok(()) => {}
            Err(e) if peer_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
        s.rfile.consume(len);
    }
    shutdown_write(s)
}

fn echo_datagram(d: &DatagramRequest) -> io::Result<()> {
    d.reply(d.data()).map(drop)
}

/// Tell the client we are done sending (FIN after the data); a peer that already went away
/// is not an error.
pub(crate) fn shutdown_write(s: &StreamRequest) -> io::Result<()> {
    match s.conn().shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected || peer_gone(&e) => Ok(()),
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
pub(crate) fn linger_close(s: &mut StreamRequest) -> io::Result<()> {
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

/// The ways a client ends a conversation by going away (EPIPE, ECONNRESET, EOF mid-write):
/// the normal end of a stream service, not a failure worth an error in the log.
pub(crate) fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::WriteZero
    )
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
        )
        .expect("stream request");
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

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::config::Protocol;
    use std::io::Read;
    use std::time::Duration;

    #[test]
    fn stream_echoes_one_mebibyte_of_binary_with_half_close() {
        let (ctx, _) = context(Protocol::Unix);
        let (client, worker) = spawn_stream(Echo, ctx);
        let data = noise(1 << 20, 0x9E37_79B9_7F4A_7C15);

        let mut writer = client.try_clone().expect("clone");
        let sent = data.clone();
        let sender = std::thread::spawn(move || {
            writer.write_all(&sent).expect("client write");
            writer.shutdown(Shutdown::Write).expect("half-close");
        });

        let mut back = Vec::with_capacity(data.len());
        (&client).read_to_end(&mut back).expect("client read");
        sender.join().expect("sender");
        worker.join().expect("worker").expect("handler result");
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ from the ones sent");
    }

    #[test]
    fn stream_answers_without_waiting_for_a_newline() {
        let (ctx, _) = context(Protocol::Unix);
        let (mut client, worker) = spawn_stream(Echo, ctx);
        for piece in [&b"no newline"[..], b"\0\xff\r", b"x"] {
            client.write_all(piece).expect("write");
            let mut back = vec![0u8; piece.len()];
            client
                .read_exact(&mut back)
                .expect("echo arrives before EOF");
            assert_eq!(back, piece);
        }
        client.shutdown(Shutdown::Write).expect("half-close");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("EOF after half-close");
        assert!(rest.is_empty());
        worker.join().expect("worker").expect("handler result");
    }

    #[test]
    fn stream_client_vanishing_is_a_normal_end() {
        let (ctx, _) = context(Protocol::Unix);
        let (mut client, worker) = spawn_stream(Echo, ctx);
        client.write_all(&noise(256 * 1024, 7)).expect("write");
        drop(client); // never reads the echo: the handler sees EPIPE or ECONNRESET
        worker.join().expect("worker").expect("handler result");
    }

    #[test]
    fn udp_echoes_a_full_size_datagram() {
        let payload = noise(65_507, 42);
        let replies = udp_exchange(&mut Echo, &payload, Duration::from_secs(2));
        assert_eq!(replies.len(), 1);
        assert!(replies[0] == payload, "echoed datagram differs");
    }

    #[test]
    fn unix_datagram_echoes_and_empty_datagram_too() {
        let payload = noise(65_507, 43);
        let replies = unix_dgram_exchange(&mut Echo, &payload, Duration::from_secs(2));
        assert_eq!(replies.len(), 1);
        assert!(replies[0] == payload, "echoed datagram differs");

        let replies = unix_dgram_exchange(&mut Echo, b"", Duration::from_secs(2));
        assert_eq!(replies, vec![Vec::<u8>::new()]);
    }
}
