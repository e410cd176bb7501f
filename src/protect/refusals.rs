//! Refusal logging that a scan or a flood cannot turn into a log flood.
//!
//! The first refusal after a quiet spell is logged at once with the peer and the reason, so an
//! operator testing a rule sees it immediately. Later ones are only counted, and one summary
//! line per listener per `SUMMARY_EVERY` gives the counts by reason. The loop calls `flush`
//! from its timer (see `next_flush`), so a summary is written even if no further refusal comes.

use std::fmt;
use std::time::{Duration, Instant};

/// How often a listener that keeps refusing writes one summary line.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(5);

/// Why a connection or datagram was turned away, or a connection cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Outside `allow`, or inside `deny`.
    Acl,
    MaxConnections,
    MaxPerSource,
    Rate,
    /// A datagram from a port below `min_source_port`.
    SourcePort,
    /// A datagram claiming a broadcast, multicast or unspecified source address.
    BadSource,
    /// An open connection closed at `max_duration`.
    MaxDuration,
}

impl Reason {
    const ALL: [Reason; 7] = [
        Reason::Acl,
        Reason::MaxConnections,
        Reason::MaxPerSource,
        Reason::Rate,
        Reason::SourcePort,
        Reason::BadSource,
        Reason::MaxDuration,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The label in status and metrics (one of `stats::REFUSAL_LABELS`).
    pub fn label(self) -> &'static str {
        match self {
            Reason::Acl => "acl",
            Reason::MaxConnections => "max_connections",
            Reason::MaxPerSource => "max_per_source",
            Reason::Rate => "rate",
            Reason::SourcePort => "source_port",
            Reason::BadSource => "bad_source",
            Reason::MaxDuration => "max_duration",
        }
    }

    /// The words used in log lines.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Acl => "not allowed by allow/deny",
            Reason::MaxConnections => "max_connections reached",
            Reason::MaxPerSource => "max_per_source reached",
            Reason::Rate => "over rate",
            Reason::SourcePort => "source port below min_source_port",
            Reason::BadSource => "broadcast, multicast or unspecified source",
            Reason::MaxDuration => "closed at max_duration",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// One listener's refusal counts since the last line written.
#[derive(Debug, Default)]
pub struct RefusalLog {
    counts: [u64; Reason::ALL.len()],
    /// While set, refusals are only counted; a summary is due at this time.
    quiet_until: Option<Instant>,
    /// Refusals since start, by reason, for status lines and tests.
    totals: [u64; Reason::ALL.len()],
}

impl RefusalLog {
    /// Record one refusal; logs it at once only if the listener was quiet.
    pub fn refused(
        &mut self,
        listener: &str,
        what: &dyn fmt::Display,
        reason: Reason,
        now: Instant,
    ) {
        self.totals[reason.index()] += 1;
        crate::stats::listener(listener).refused(reason.label());
        if self.quiet_until.is_some() {
            self.counts[reason.index()] += 1;
            return;
        }
        log::warn!(
            "listener `{listener}`: {what}: {reason}; further refusals are summarised every {}s",
            SUMMARY_EVERY.as_secs()
        );
        self.quiet_until = Some(now + SUMMARY_EVERY);
    }

    /// When the loop should call `flush`.
    pub fn next_flush(&self) -> Option<Instant> {
        self.quiet_until
    }

    /// Write the summary if it is due; a window with nothing in it ends the quiet spell.
    pub fn flush(&mut self, listener: &str, now: Instant) {
        let Some(due) = self.quiet_until else { return };
        if now < due {
            return;
        }
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            self.quiet_until = None;
            return;
        }
        let parts: Vec<String> = Reason::ALL
            .iter()
            .filter(|r| self.counts[r.index()] > 0)
            .map(|r| format!("{} {}", self.counts[r.index()], r.describe()))
            .collect();
        log::warn!(
            "listener `{listener}`: {total} refused or cut in the last {}s: {}",
            SUMMARY_EVERY.as_secs(),
            parts.join(", ")
        );
        self.counts = Default::default();
        self.quiet_until = Some(now + SUMMARY_EVERY);
    }

    /// Refusals since start for one reason.
    pub fn total(&self, reason: Reason) -> u64 {
        self.totals[reason.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_during_a_quiet_spell_and_ends_it_when_idle() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        log.refused("x", &"peer", Reason::Acl, t0);
        assert_eq!(log.next_flush(), Some(t0 + SUMMARY_EVERY));
        for _ in 0..1000 {
            log.refused("x", &"peer", Reason::Rate, t0);
        }
        assert_eq!(log.counts[Reason::Rate.index()], 1000);
        log.flush("x", t0 + Duration::from_secs(1));
        assert_eq!(log.counts[Reason::Rate.index()], 1000, "not due yet");
        log.flush("x", t0 + SUMMARY_EVERY);
        assert_eq!(log.counts, [0; 7]);
        assert!(
            log.next_flush().is_some(),
            "a summary starts another window"
        );
        log.flush("x", t0 + SUMMARY_EVERY * 2);
        assert_eq!(
            log.next_flush(),
            None,
            "an empty window ends the quiet spell"
        );
        assert_eq!((log.total(Reason::Rate), log.total(Reason::Acl)), (1000, 1));
        for r in Reason::ALL {
            assert!(crate::stats::REFUSAL_LABELS.contains(&r.label()), "{r:?}");
        }
    }
}
