//! Time (RFC 868): the current time as a 32-bit count of seconds since 1900, for machines.
//!
//! Stream: four bytes, big-endian, then close. Datagram: any datagram is answered with those
//! four bytes. The count is taken modulo 2^32 so the service keeps answering past 2036, as the
//! clients that handle the wrap expect.

use std::io;
use std::time::SystemTime;

use super::util::reply_once;
use super::{Context, Handler, Request};
use crate::clock::rfc868_seconds;

/// The RFC 868 time service; answers once, in network byte order.
#[derive(Debug, Default)]
pub struct Time;

impl Handler for Time {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        let stamp = rfc868_seconds(SystemTime::now()).to_be_bytes();
        match req {
            Request::Stream(s) => reply_once(s, &stamp),
            Request::Datagram(d) => d.reply(&stamp).map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::test_support::*;
    use super::*;
    use crate::config::Protocol;
    use std::io::Read;
    use std::time::{Duration, UNIX_EPOCH};

    /// The four bytes decode to within a few seconds of the local clock.
    fn assert_close_to_now(bytes: &[u8]) {
        let stamp: [u8; 4] = bytes.try_into().expect("exactly four bytes");
        let got = u32::from_be_bytes(stamp);
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let want = ((unix + 2_208_988_800) % (1 << 32)) as u32;
        let diff = want.wrapping_sub(got);
        assert!(diff <= 5, "time {got} vs clock {want}");
    }

    #[test]
    fn stream_sends_four_bytes_and_closes() {
        let (ctx, _) = context(Protocol::Unix);
        let (mut client, worker) = spawn_stream(Time, ctx);
        let mut back = Vec::new();
        client.read_to_end(&mut back).expect("read to EOF");
        drop(client); // the handler lingers until the client closes too
        worker.join().expect("worker").expect("handler result");
        assert_close_to_now(&back);
    }

    #[test]
    fn any_datagram_gets_the_time() {
        let replies = udp_exchange(&mut Time, b"", Duration::from_secs(5));
        assert_eq!(replies.len(), 1);
        assert_close_to_now(&replies[0]);

        let replies = unix_dgram_exchange(&mut Time, b"anything", Duration::from_secs(5));
        assert_eq!(replies.len(), 1);
        assert_close_to_now(&replies[0]);
    }
}
