//! `stderr = "log"`: a program's stderr read line by line on a small thread and logged with the
//! listener's name and the program's pid, so a failing inetd program explains itself in the
//! daemon's log. Lines are cut at `MAX_LINE` bytes so a program cannot make the daemon buffer
//! without limit, and capped by `LineCap` (a burst of `BURST` lines, then `RATE` a second) so
//! a chatty program cannot flood the log; what the cap drops is counted and logged in one line.
//! The fork server's stderr pipes (`worker::programs`) use the same cap.

use std::io::{BufRead, BufReader, Read};
use std::process::ChildStderr;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// The longest stderr line logged in one piece.
pub const MAX_LINE: usize = 4096;

/// How long a finished program's last stderr lines may take to arrive in the log. A program
/// that left a descendant holding its stderr open does not hold the worker up longer.
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// Lines one program may log at once before `RATE` applies.
pub const BURST: f64 = 100.0;
/// Lines a second one program may log after its burst.
pub const RATE: f64 = 10.0;

/// A token bucket over one program's stderr lines, and the count of what it dropped.
#[derive(Debug, Clone)]
pub struct LineCap {
    tokens: f64,
    at: Instant,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl LineCap {
    /// A full bucket (`BURST` lines) at `now`.
    pub fn new(now: Instant) -> LineCap {
        LineCap {
            tokens: BURST,
            at: now,
            dropped_lines: 0,
            dropped_bytes: 0,
        }
    }

    /// Whether a line of `bytes` may be logged at `now`; if not it is counted as dropped.
    pub fn take(&mut self, now: Instant, bytes: usize) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * RATE).min(BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.dropped_lines += 1;
        self.dropped_bytes += bytes as u64;
        false
    }

    /// Log (once) how many lines were dropped since the last report, if any.
    pub fn report(&mut self, listener: &str, pid: impl std::fmt::Display) {
        if self.dropped_lines == 0 {
            return;
        }
        log::info!(
            "listener `{listener}` pid {pid}: {} stderr lines ({} bytes) dropped: over the cap \
             of {BURST} lines, then {RATE} a second",
            self.dropped_lines,
            self.dropped_bytes
        );
        self.dropped_lines = 0;
        self.dropped_bytes = 0;
    }

    /// Log `text` as one stderr line of `pid` if the cap allows; a report of earlier drops
    /// goes first.
    pub fn log_line(&mut self, listener: &str, pid: impl std::fmt::Display, text: &str) {
        if self.take(Instant::now(), text.len()) {
            self.report(listener, &pid);
            log::info!("listener `{listener}` pid {pid}: {text}");
        }
    }
}

/// The thread logging one program's stderr.
#[derive(Debug)]
pub struct LineLogger {
    done: Receiver<()>,
}

impl LineLogger {
    /// Wait briefly for the last lines after the program has exited.
    pub fn finish(self) {
        let _ = self.done.recv_timeout(DRAIN_WAIT);
    }
}

/// Log each line of `err` as `listener `name` pid N: line`.
pub fn log_lines(err: ChildStderr, listener: &str, pid: u32) -> LineLogger {
    let (tx, done) = channel();
    let name = listener.to_string();
    let listener = name.clone();
    let spawned = std::thread::Builder::new()
        .name("socketd:stderr".into())
        .spawn(move || {
            let mut r = BufReader::new(err);
            let mut line = Vec::new();
            let mut cap = LineCap::new(Instant::now());
            loop {
                line.clear();
                match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        cap.log_line(&listener, pid, text.trim_end());
                    }
                }
            }
            cap.report(&listener, pid);
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        log::warn!("listener `{name}`: cannot start a stderr reader: {e}");
    }
    LineLogger { done }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_allows_a_burst_then_the_rate_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut cap = LineCap::new(t0);
        let burst = (0..1000).filter(|_| cap.take(t0, 10)).count();
        assert_eq!(burst, BURST as usize);
        assert_eq!((cap.dropped_lines, cap.dropped_bytes), (900, 9000));
        // One second later: RATE more lines, no more.
        let t1 = t0 + Duration::from_secs(1);
        let later = (0..1000).filter(|_| cap.take(t1, 1)).count();
        assert_eq!(later, RATE as usize);
        cap.report("l", 1);
        assert_eq!(cap.dropped_lines, 0, "a report resets the count");
        // A long quiet spell refills the burst, never beyond it.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!(
            (0..1000).filter(|_| cap.take(t2, 1)).count(),
            BURST as usize
        );
    }
}
