//! Echo (RFC 862): everything the client sends comes straight back.
//!
//! Stream: whatever bytes arrive are written back at once, binary-safe and without waiting for
//! a newline; when the client half-closes, the rest is sent and our side is shut down too.
//! Datagram: the datagram goes back to its sender unchanged.

use std::io::{self, BufRead, Write};

use super::util::{is_peer_gone, shutdown_write};
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
            Err(e) if is_peer_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let len = chunk.len();
        // Straight to the socket: no second copy through `wfile`, nothing left waiting in it.
        match s.wfile.get_mut().write_all(chunk) {
            Ok(()) => {}
            Err(e) if is_peer_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
        s.rfile.consume(len);
    }
    shutdown_write(s)
}

fn echo_datagram(d: &DatagramRequest) -> io::Result<()> {
    d.reply(d.data()).map(drop)
}

#[cfg(test)]
mod tests {
    use super::super::util::test_support::*;
    use super::*;
    use crate::config::Protocol;
    use std::io::Read;
    use std::net::Shutdown;
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
