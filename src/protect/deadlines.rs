//! `max_duration`: the loop's watchdog over open connections.
//!
//! Each admitted connection with a `max_duration` gets a deadline here; when it passes, the
//! connection is shut down both ways through the `Tracker` (which holds its fd only while the
//! job runs, under a lock, so a reused descriptor number is never touched). A handler blocked
//! in read sees EOF, one blocked in write sees EPIPE, and both return. Entries of connections
//! that ended first are skipped when due and pruned in bulk, so the heap stays bounded by the
//! open connections rather than by the connection rate.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use crate::jobs::Tracker;

/// Pending connection deadlines of one listener, earliest first.
#[derive(Debug, Default)]
pub struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Deadlines {
    /// Cut connection `conn` at `at` unless it ended before.
    pub fn add(&mut self, at: Instant, conn: u64, tracker: &Tracker) {
        self.heap.push(Reverse((at, conn)));
        if self.heap.len() > 64 + 2 * tracker.len() {
            self.heap.retain(|Reverse((_, id))| tracker.contains(*id));
        }
    }

    /// The earliest deadline, for the loop's poll timeout.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Shut down every connection whose deadline passed; returns how many were still open.
    pub fn expire(&mut self, now: Instant, tracker: &Tracker) -> usize {
        let mut cut = 0;
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            if tracker.shutdown(id) {
                cut += 1;
            }
        }
        cut
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn due_connections_are_shut_down_and_ended_ones_skipped() {
        let tracker = Tracker::default();
        let (mut a, _b) = UnixStream::pair().unwrap();
        tracker.insert(1, a.as_raw_fd());
        let mut d = Deadlines::default();
        let t0 = Instant::now();
        d.add(t0 + Duration::from_secs(1), 1, &tracker);
        d.add(t0, 2, &tracker); // already ended: not in the tracker
        assert_eq!(d.expire(t0, &tracker), 0);
        assert_eq!(d.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(d.expire(t0 + Duration::from_secs(1), &tracker), 1);
        assert!(d.is_empty());
        let mut buf = [0u8; 1];
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            a.read(&mut buf).unwrap(),
            0,
            "shut down: reads see EOF at once"
        );
    }

    #[test]
    fn ended_entries_are_pruned() {
        let tracker = Tracker::default();
        let mut d = Deadlines::default();
        let far = Instant::now() + Duration::from_secs(3600);
        for id in 0..10_000 {
            d.add(far, id, &tracker);
        }
        assert!(
            d.len() <= 65,
            "{} entries kept for 0 open connections",
            d.len()
        );
    }
}
