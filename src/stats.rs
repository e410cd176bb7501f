//! Counters that outlive a connection: per listener (by name, so they survive a reload that
//! keeps or moves the listener), reloads, and the process's own descriptors and memory. The
//! loop, the workers and the event loops write them with relaxed atomics; the control socket
//! (`socketd status`) and the Prometheus endpoint read them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// Upper bounds (seconds) of the connection-duration histogram's buckets (`+Inf` is implied).
pub const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0,
];

/// The refusal reasons' labels in status and metrics (`protect::Reason::label` gives them).
pub const REFUSAL_LABELS: [&str; 7] = [
    "acl",
    "max_connections",
    "max_per_source",
    "rate",
    "source_port",
    "bad_source",
    "max_duration",
];

fn reason_index(label: &str) -> Option<usize> {
    REFUSAL_LABELS.iter().position(|l| *l == label)
}

/// One listener's counters since the daemon started.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections accepted and admitted, and datagrams received and admitted.
    pub accepted: AtomicU64,
    /// Jobs that ended with a handler error or panic (or a worker process that failed).
    pub handler_errors: AtomicU64,
    /// Bytes received and sent on its connections (TCP: the kernel's counters), and datagram
    /// payload bytes received.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    refused: [AtomicU64; REFUSAL_LABELS.len()],
    /// Connection durations: per-bucket counts (not cumulative), the sum in microseconds and
    /// the count.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_micros: AtomicU64,
    ended: AtomicU64,
}

/// A histogram as Prometheus wants it: cumulative counts per upper bound, then sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl ListenerStats {
    /// Count one refusal (or cut) for the reason labelled `label` (one of `REFUSAL_LABELS`).
    pub fn refused(&self, label: &str) {
        if let Some(i) = reason_index(label) {
            self.refused[i].fetch_add(1, Relaxed);
        }
    }

    /// Refusals since start for the reason labelled `label`.
    pub fn refused_total(&self, label: &str) -> u64 {
        reason_index(label).map_or(0, |i| self.refused[i].load(Relaxed))
    }

    /// Record a connection that ended after `took`, with its byte counts when known.
    pub fn connection_ended(&self, took: Duration, received: Option<u64>, sent: Option<u64>) {
        let secs = took.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.duration_micros.fetch_add(micros, Relaxed);
        self.ended.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(received.unwrap_or(0), Relaxed);
        self.bytes_out.fetch_add(sent.unwrap_or(0), Relaxed);
    }

    /// The duration histogram so far.
    pub fn durations(&self) -> Histogram {
        let mut running = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                running += b.load(Relaxed);
                running
            })
            .collect();
        Histogram {
            cumulative,
            sum_seconds: self.duration_micros.load(Relaxed) as f64 / 1e6,
            count: self.ended.load(Relaxed),
        }
    }
}

fn registry() -> &'static RwLock<BTreeMap<String, Arc<ListenerStats>>> {
    static REGISTRY: OnceLock<RwLock<BTreeMap<String, Arc<ListenerStats>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The counters of listener `name`, created on first use. Every ended connection looks its
/// listener up here: a read lock, so workers do not queue behind each other.
pub fn listener(name: &str) -> Arc<ListenerStats> {
    if let Some(s) = registry()
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
    {
        return Arc::clone(s);
    }
    let mut map = registry().write().unwrap_or_else(|p| p.into_inner());
    Arc::clone(map.entry(name.to_string()).or_default())
}

/// Reloads applied and refused since start (SIGHUP and `socketd reload` alike).
pub static RELOADS_OK: AtomicU64 = AtomicU64::new(0);
pub static RELOADS_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Open file descriptors of this process (`/proc/self/fd`).
pub fn open_fds() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    // Minus one: the directory handle itself.
    Some((dir.count() as u64).saturating_sub(1))
}

/// Resident set size in bytes (`/proc/self/statm`).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_into_cumulative_buckets() {
        let s = ListenerStats::default();
        s.connection_ended(Duration::from_micros(500), Some(5), Some(7));
        s.connection_ended(Duration::from_millis(20), None, Some(1));
        s.connection_ended(Duration::from_secs(7200), Some(1), None);
        let h = s.durations();
        assert_eq!(h.count, 3);
        assert_eq!(h.cumulative.len(), DURATION_BUCKETS.len() + 1);
        assert_eq!(h.cumulative[0], 1, "<= 1ms");
        assert_eq!(h.cumulative[2], 1, "<= 10ms");
        assert_eq!(h.cumulative[3], 2, "<= 50ms");
        assert_eq!(h.cumulative[DURATION_BUCKETS.len() - 1], 2, "<= 1h");
        assert_eq!(h.cumulative[DURATION_BUCKETS.len()], 3, "+Inf");
        assert!(
            (h.sum_seconds - 7200.0205).abs() < 1e-6,
            "{}",
            h.sum_seconds
        );
        assert_eq!(
            (s.bytes_in.load(Relaxed), s.bytes_out.load(Relaxed)),
            (6, 8)
        );
    }

    #[test]
    fn refusals_count_by_reason_and_names_are_shared() {
        let a = listener("stats-test-a");
        a.refused("rate");
        a.refused("rate");
        a.refused("acl");
        a.refused("no such reason");
        let again = listener("stats-test-a");
        assert_eq!(again.refused_total("rate"), 2);
        assert_eq!(again.refused_total("acl"), 1);
        assert_eq!(again.refused_total("max_duration"), 0);
    }

    #[test]
    fn process_numbers_are_read() {
        assert!(open_fds().is_some_and(|n| n >= 3));
        assert!(rss_bytes().is_some_and(|n| n > 0));
    }
}
