//! Discard (RFC 863): read everything, answer nothing.
//!
//! Stream: data is read and thrown away until the client closes. Datagram: the datagram is
//! dropped. Useful as a sink for load tests and as the simplest possible handler to copy.

use std::io::{self, BufRead};

use super::util::is_peer_gone;
use super::{Context, Handler, Request, StreamRequest};

/// The RFC 863 discard service; a sink that never replies.
#[derive(Debug, Default)]
pub struct Discard;

impl Handler for Discard {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        match req {
            Request::Stream(s) => discard_stream(s),
            // RFC 863: "any received datagram is thrown away".
            Request::Datagram(_) => Ok(()),
        }
    }
}

/// Drop whatever arrives, a buffer at a time, until EOF or the client goes away.
fn discard_stream(s: &mut StreamRequest) -> io::Result<()> {
    loop {
        let len = match s.rfile.fill_buf() {
            Ok([]) => return Ok(()),
            Ok(chunk) => chunk.len(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_peer_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        s.rfile.consume(len);
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::test_support::*;
    use super::*;
    use crate::config::Protocol;
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::time::Duration;

    #[test]
    fn stream_swallows_everything_and_sends_nothing() {
        let (ctx, _) = context(Protocol::Unix);
        let (mut client, worker) = spawn_stream(Discard, ctx);
        client.write_all(&noise(1 << 20, 1)).expect("write");
        client.shutdown(Shutdown::Write).expect("half-close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).expect("read to EOF");
        assert!(back.is_empty(), "discard sent {} bytes", back.len());
        worker.join().expect("worker").expect("handler result");
    }

    #[test]
    fn stream_returns_when_the_client_resets() {
        let (ctx, _) = context(Protocol::Unix);
        let (mut client, worker) = spawn_stream(Discard, ctx);
        client.write_all(b"bye").expect("write");
        drop(client);
        worker.join().expect("worker").expect("handler result");
    }

    #[test]
    fn datagrams_get_no_reply() {
        let wait = Duration::from_millis(300);
        assert!(udp_exchange(&mut Discard, b"hello", wait).is_empty());
        assert!(unix_dgram_exchange(&mut Discard, b"hello", wait).is_empty());
    }
}
