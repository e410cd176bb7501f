//! Logging through the `log` facade. In the foreground each event is one line on stderr,
//! written with a single `write` so lines from threads never interleave.
//!
//! Under systemd (`JOURNAL_STREAM` set) lines carry the `<N>` priority prefix that journald
//! reads, and no timestamp (journald adds its own); elsewhere they start with a UTC timestamp.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

pub mod syslog;
pub mod syslog_line;

struct StderrLogger {
    journald: bool,
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// Set once `log = "syslog"` is in force (after detaching); the installed logger then hands
/// every record to it. `log::set_logger` can be called only once, hence the indirection.
static SYSLOG: OnceLock<syslog::Syslog> = OnceLock::new();

/// Send every log line to syslog from now on (the stderr logger must be installed).
pub fn use_syslog(cfg: &crate::config::SyslogConfig) {
    let _ = SYSLOG.set(syslog::Syslog::new(cfg));
}

/// The daemon log's syslog connection, once `log = "syslog"` is in force (the access log
/// shares it rather than open a second connection to the same `[daemon.syslog]` address).
pub fn shared_syslog() -> Option<&'static crate::logging::syslog::Syslog> {
    SYSLOG.get()
}

/// One line on stderr in the foreground format; also syslog's fallback.
pub fn write_stderr(level: Level, text: &str) {
    let journald = LOGGER.get().is_some_and(|l| l.journald);
    let line = if journald {
        format!("<{}>{text}\n", priority(level))
    } else {
        format!("{} {:<5} {text}\n", timestamp(SystemTime::now()), level)
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Install the stderr logger; later calls only change the level.
pub fn init_stderr(level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| StderrLogger {
        journald: std::env::var_os("JOURNAL_STREAM").is_some(),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

/// syslog(3) priority numbers, which journald also understands as line prefixes.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        if let Some(syslog) = SYSLOG.get() {
            return syslog.log(r);
        }
        let line = if self.journald {
            format!("<{}>{}\n", priority(r.level()), r.args())
        } else {
            format!(
                "{} {:<5} {}\n",
                timestamp(SystemTime::now()),
                r.level(),
                r.args()
            )
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-26T14:40:51.123Z`.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, mo, day) = crate::clock::civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_704_051_123);
        assert_eq!(timestamp(t), "2026-11-26T14:40:51.123Z");
    }
}
