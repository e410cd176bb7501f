//! Character generator (RFC 864): an endless stream of printable ASCII, for testing links.
//!
//! The RFC's pattern: number the 95 printable characters (32..=126) as a ring; line n holds
//! characters n..n+71 of the ring, then CR LF. Stream: lines are sent until the client closes
//! (EPIPE or ECONNRESET is the normal end) or socketd starts stopping. Datagram: each datagram
//! is answered with 0..=512 bytes of the same pattern, the length chosen at random.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::util::is_peer_gone;
use super::{Context, DatagramRequest, Handler, Request, StreamRequest};

/// Printable ASCII: space (32) through tilde (126).
const RING: usize = 95;
const FIRST: u8 = b' ';
/// Characters per line, before CR LF.
const LINE_CHARS: usize = 72;
const LINE_LEN: usize = LINE_CHARS + 2;
/// After RING lines the pattern repeats, so one period of it is all we ever need.
const PERIOD: usize = RING * LINE_LEN;
/// RFC 864: a datagram reply holds "a random number of characters (between 0 and 512)".
const MAX_DATAGRAM: usize = 512;
/// How often a stream blocked on a slow reader looks at `shutting_down()`.
const STOP_POLL: Duration = Duration::from_millis(250);

/// The RFC 864 chargen service; keeps only its place in the pattern.
#[derive(Debug, Default)]
pub struct Chargen;

impl Handler for Chargen {
    fn handle(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()> {
        match req {
            Request::Stream(s) => chargen_stream(s, ctx),
            Request::Datagram(d) => chargen_datagram(d),
        }
    }
}

/// Two periods of the pattern back to back, so a full period can be sent from any offset as
/// one contiguous slice.
pub(crate) fn pattern() -> Vec<u8> {
    let mut buf = Vec::with_capacity(2 * PERIOD);
    for line in 0..2 * RING {
        buf.extend((0..LINE_CHARS).map(|i| FIRST + ((line + i) % RING) as u8));
        buf.extend_from_slice(b"\r\n");
    }
    buf
}

fn chargen_stream(s: &mut StreamRequest, ctx: &Context) -> io::Result<()> {
    // Anything `setup` queued goes first; the pattern then goes straight to the socket.
    match s.wfile.flush() {
        Err(e) if is_peer_gone(&e) => return Ok(()),
        other => other?,
    }
    // A client that stops reading would block a plain write forever; a write timeout lets
    // the loop notice a stop. Restore what the worker had set on the way out.
    let previous = socket2::SockRef::from(s.conn()).write_timeout()?;
    s.conn().set_write_timeout(Some(STOP_POLL))?;
    let sent = send_pattern(s, ctx, previous);
    let restored = s.conn().set_write_timeout(previous);
    sent.and(restored.or_else(|e| if is_peer_gone(&e) { Ok(()) } else { Err(e) }))
}

/// Write the pattern until the client goes away or a stop begins. `stalled` is the write
/// timeout the worker set (the listener's `idle_timeout`): no progress for that long fails
/// with `TimedOut`, as a plain write would have.
fn send_pattern(
    s: &mut StreamRequest,
    ctx: &Context,
    stalled: Option<std::time::Duration>,
) -> io::Result<()> {
    let pattern = pattern();
    let conn = s.wfile.get_mut();
    let mut at = 0;
    let mut progress = std::time::Instant::now();
    while !ctx.shutting_down() {
        if stalled.is_some_and(|t| progress.elapsed() >= t) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no byte accepted for the write timeout",
            ));
        }
        match conn.write(&pattern[at..at + PERIOD]) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                at = (at + n) % PERIOD;
                progress = std::time::Instant::now();
            }
            Err(e) if is_peer_gone(&e) => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One reply of random length, starting at a random line of the pattern.
fn chargen_datagram(d: &DatagramRequest) -> io::Result<()> {
    d.reply(&datagram_reply()).map(drop)
}

/// The bytes of one datagram reply (shared with the event model, which answers inline).
pub(crate) fn datagram_reply() -> Vec<u8> {
    let r = random_u64();
    let len = (r % (MAX_DATAGRAM as u64 + 1)) as usize;
    let start = ((r >> 32) % RING as u64) as usize * LINE_LEN;
    pattern()[start..start + len].to_vec()
}

/// A small thread-safe PRNG (SplitMix64 over a shared counter, stirred with the clock): only
/// reply lengths depend on it, so it needs variety, not secrecy, and no extra crate.
fn random_u64() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = STATE.fetch_add(GAMMA, Ordering::Relaxed) ^ clock;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::super::util::test_support::*;
    use super::*;
    use crate::config::Protocol;
    use std::io::{BufRead, BufReader, Read};
    use std::sync::atomic::Ordering;

    #[test]
    fn stream_lines_follow_the_rfc_rotation() {
        let (ctx, _) = context(Protocol::Unix);
        let (client, worker) = spawn_stream(Chargen, ctx);
        let mut lines = BufReader::new(&client);
        let mut line = String::new();

        lines.read_line(&mut line).expect("line 0");
        assert_eq!(
            line,
            " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefg\r\n"
        );
        line.clear();
        lines.read_line(&mut line).expect("line 1");
        assert_eq!(
            line,
            "!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefgh\r\n"
        );

        // Two full periods and a bit: every line n is ring[n..n+72], wrapping past `~`.
        for n in 2..(2 * RING + 10) {
            line.clear();
            lines.read_line(&mut line).expect("line");
            let want: String = (0..LINE_CHARS)
                .map(|i| char::from(b' ' + ((n + i) % RING) as u8))
                .chain("\r\n".chars())
                .collect();
            assert_eq!(line, want, "line {n}");
        }
        drop(lines);
        drop(client); // the client closing is how chargen ends
        worker.join().expect("worker").expect("handler result");
    }

    #[test]
    fn stream_stops_when_socketd_stops_even_if_the_client_never_reads() {
        let (ctx, stopping) = context(Protocol::Unix);
        let (mut client, worker) = spawn_stream(Chargen, ctx);
        let mut first = [0u8; LINE_LEN];
        client.read_exact(&mut first).expect("first line");
        // Stop reading: the socket buffers fill and the handler's writes block.
        std::thread::sleep(Duration::from_millis(300));
        stopping.store(true, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !worker.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "chargen ignored the stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        worker.join().expect("worker").expect("handler result");
    }

    #[test]
    fn datagram_replies_are_pattern_text_of_at_most_512_bytes() {
        let pattern = pattern();
        let mut lengths = Vec::new();
        for i in 0..20 {
            let replies = if i % 2 == 0 {
                udp_exchange(&mut Chargen, b"", Duration::from_secs(5))
            } else {
                unix_dgram_exchange(&mut Chargen, b"x", Duration::from_secs(5))
            };
            assert!(replies.len() <= 1, "one reply per datagram");
            // A zero-length reply is a valid answer; over Unix or UDP it still arrives.
            let reply = replies.into_iter().next().expect("a reply");
            assert!(
                reply.len() <= MAX_DATAGRAM,
                "reply of {} bytes",
                reply.len()
            );
            assert!(
                (0..RING).any(|line| pattern[line * LINE_LEN..].starts_with(&reply)),
                "reply is not a run of the pattern from a line start: {:?}",
                String::from_utf8_lossy(&reply)
            );
            lengths.push(reply.len());
        }
        lengths.sort_unstable();
        lengths.dedup();
        assert!(lengths.len() > 5, "lengths barely vary: {lengths:?}");
    }

    #[test]
    fn random_lengths_cover_the_whole_range() {
        let mut seen = [false; MAX_DATAGRAM + 1];
        for _ in 0..200_000 {
            seen[(random_u64() % (MAX_DATAGRAM as u64 + 1)) as usize] = true;
        }
        assert!(
            seen.iter().all(|&s| s),
            "some lengths in 0..=512 never came up"
        );
    }
}
