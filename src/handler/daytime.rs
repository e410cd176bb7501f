//! Daytime (RFC 867): one human-readable line with the current date and time.
//!
//! Stream: the line is sent and the connection closed; anything the client sends is ignored.
//! Datagram: the line is the reply. The format is the RFC's own example, in UTC
//! (`Thursday, November 26, 2026 14:40:51-UTC`), built by `clock` without a date crate.

use std::io;
use std::time::SystemTime;

use super::util::reply_once;
use super::{Context, Handler, Request};
use crate::clock::daytime_line;

/// The RFC 867 daytime service; answers once, with the UTC wall clock.
#[derive(Debug, Default)]
pub struct Daytime;

impl Handler for Daytime {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        let line = daytime_line(SystemTime::now());
        match req {
            Request::Stream(s) => reply_once(s, line.as_bytes()),
            Request::Datagram(d) => d.reply(line.as_bytes()).map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::test_support::*;
    use super::*;
    use crate::config::Protocol;
    use std::io::Read;
    use std::time::Duration;

    /// `Weekday, Month D, YYYY HH:MM:SS-UTC\r\n`, checked field by field.
    fn assert_daytime_format(bytes: &[u8]) {
        let text = std::str::from_utf8(bytes).expect("ASCII");
        let line = text.strip_suffix("-UTC\r\n").expect("ends with -UTC CR LF");
        let (weekday, rest) = line.split_once(", ").expect("weekday, ");
        assert!(
            [
                "Sunday",
                "Monday",
                "Tuesday",
                "Wednesday",
                "Thursday",
                "Friday",
                "Saturday"
            ]
            .contains(&weekday),
            "weekday in {text:?}"
        );
        let (month_day, rest) = rest.split_once(", ").expect("month day, ");
        let (month, day) = month_day.split_once(' ').expect("month day");
        assert!(month.len() >= 3 && month.chars().all(|c| c.is_ascii_alphabetic()));
        let day: u32 = day.parse().expect("day number");
        assert!((1..=31).contains(&day));
        let (year, hms) = rest.split_once(' ').expect("year time");
        let year: i64 = year.parse().expect("year");
        assert!(year >= 2024, "clock year {year}");
        let fields: Vec<&str> = hms.split(':').collect();
        assert_eq!(fields.len(), 3, "HH:MM:SS in {text:?}");
        assert!(fields
            .iter()
            .all(|f| f.len() == 2 && f.bytes().all(|b| b.is_ascii_digit())));
        // The same clock, read now, gives the same date (barring a midnight in between).
        let now = daytime_line(SystemTime::now());
        assert_eq!(
            now.split(' ').nth(1),
            Some(month),
            "month agrees with the clock"
        );
    }

    #[test]
    fn stream_sends_one_line_and_closes_even_with_input_pending() {
        let (ctx, _) = context(Protocol::Unix);
        let (mut client, worker) = spawn_stream(Daytime, ctx);
        std::io::Write::write_all(&mut client, b"ignored\r\n").expect("write");
        let mut back = Vec::new();
        client
            .read_to_end(&mut back)
            .expect("read to EOF, not a reset");
        drop(client); // the handler lingers until the client closes too
        worker.join().expect("worker").expect("handler result");
        assert_daytime_format(&back);
    }

    #[test]
    fn datagram_reply_is_the_line() {
        let replies = udp_exchange(&mut Daytime, b"", Duration::from_secs(5));
        assert_eq!(replies.len(), 1);
        assert_daytime_format(&replies[0]);

        let replies = unix_dgram_exchange(&mut Daytime, b"what time is it", Duration::from_secs(5));
        assert_eq!(replies.len(), 1);
        assert_daytime_format(&replies[0]);
    }
}
