//! The bytes of one syslog message, RFC 3164 or RFC 5424, from a clock reading given by the
//! caller (so tests drive the date instead of waiting for one).
//!
//! RFC 3164 §4.1.2: `Mmm dd hh:mm:ss`, the day padded with a space (`Dec  3`), never a zero;
//! strict receivers refuse `Dec 03`. RFC 5424 §6: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID
//! MSGID STRUCTURED-DATA MSG`, with the NILVALUE `-` for the MSGID and structured data socketd
//! does not have. Both carry UTC (socketd reads no time zone database).
//!
//! The `syslog` crate gives the vocabulary (`Severity`, the `LogFormat` trait); its own
//! `Formatter3164` pads the day with a zero and `Formatter5424` writes a numeric MSGID, so the
//! bytes are written here, as a `LogFormat` of our own.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use syslog::{LogFormat, Severity};

use crate::clock::CivilTime;

use crate::config::SyslogFormat;

/// What every message of one logger shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// RFC 3164 or RFC 5424.
    pub format: SyslogFormat,
    /// Facility code, 0 (kern) to 23 (local7).
    pub facility: u8,
    /// `None`: left out (RFC 3164 to the local daemon, which adds its own).
    pub hostname: Option<String>,
    /// The pid every line names: the daemon's, whichever process writes the line.
    pub pid: u32,
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The syslog formatter of one logger at one instant: the crate's `LogFormat` with socketd's
/// bytes (the clock is a field so tests drive the date).
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// What every message of the logger shares.
    pub header: &'a Header,
    /// The instant the message is stamped with.
    pub now: SystemTime,
}

impl LogFormat<&str> for Line<'_> {
    fn format<W: Write>(&self, w: &mut W, severity: Severity, text: &str) -> syslog::Result<()> {
        w.write_all(&format(self.header, severity, text, self.now))
            .map_err(syslog::Error::Write)
    }
}

/// One message: `text` is the line without a newline.
pub fn format(h: &Header, severity: Severity, text: &str, now: SystemTime) -> Vec<u8> {
    let pri = u32::from(h.facility) * 8 + severity as u32;
    let c = CivilTime::utc(now);
    // Before 1970 there are no microseconds to tell (the clock is set that far back).
    let micros = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_micros());
    let line = match h.format {
        SyslogFormat::Rfc3164 => {
            let month = MONTHS[(c.month as usize - 1) % 12];
            let host = h
                .hostname
                .as_deref()
                .map(|n| format!("{n} "))
                .unwrap_or_default();
            format!(
                "<{pri}>{month} {:>2} {:02}:{:02}:{:02} {host}socketd[{}]: {text}",
                c.day, c.hour, c.minute, c.second, h.pid
            )
        }
        SyslogFormat::Rfc5424 => format!(
            "<{pri}>1 {:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z {} socketd {} - - {text}",
            c.year,
            c.month,
            c.day,
            c.hour,
            c.minute,
            c.second,
            micros,
            h.hostname.as_deref().unwrap_or("-"),
            h.pid
        ),
    };
    line.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, micros: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    fn header(format: SyslogFormat, hostname: Option<&str>) -> Header {
        Header {
            format,
            facility: 3,
            hostname: hostname.map(str::to_string),
            pid: 4242,
        }
    }

    /// 2026-12-03 06:05:09 UTC: a single-digit day is padded with a space (RFC 3164 §4.1.2).
    #[test]
    fn rfc3164_pads_a_single_digit_day_with_a_space() {
        let line = format(
            &header(SyslogFormat::Rfc3164, None),
            Severity::LOG_INFO,
            "hello",
            at(1_796_277_909, 0),
        );
        assert_eq!(
            String::from_utf8(line).expect("utf-8"),
            "<30>Dec  3 06:05:09 socketd[4242]: hello"
        );
        let line = format(
            &header(SyslogFormat::Rfc3164, Some("box")),
            Severity::LOG_WARNING,
            "two digits",
            at(1_796_277_909 + 10 * 86_400, 0),
        );
        assert_eq!(
            String::from_utf8(line).expect("utf-8"),
            "<28>Dec 13 06:05:09 box socketd[4242]: two digits"
        );
    }

    /// The MSGID and structured data are the NILVALUE `-` (RFC 5424 §6.2.7, §6.3).
    #[test]
    fn rfc5424_uses_the_nilvalue_for_msgid() {
        let line = format(
            &header(SyslogFormat::Rfc5424, Some("box")),
            Severity::LOG_ERR,
            "x",
            at(951_782_400, 123_456), // 2000-02-29, a leap day
        );
        assert_eq!(
            String::from_utf8(line).expect("utf-8"),
            "<27>1 2000-02-29T00:00:00.123456Z box socketd 4242 - - x"
        );
    }
}
