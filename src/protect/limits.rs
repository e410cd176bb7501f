//! `max_connections` and `max_per_source`: open connections per listener and per client IP.
//!
//! The loop takes a `Ticket` when it admits a connection; the ticket travels with the job and
//! gives its place back when dropped. Worker models drop it just before the connection's fd
//! closes (threaded: with the tracker entry), so a client that sees its connection end and
//! reconnects at once finds the place already free. Dropping is the one release path, so a
//! panicking handler or a lost job cannot leak a place.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Listener,
    Source,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// Open-connection counts of one listener.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    open: Arc<Mutex<Open>>,
}

impl Counts {
    fn lock(&self) -> MutexGuard<'_, Open> {
        // Only counter arithmetic runs under this lock; a poisoned one still holds valid counts.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a place for a connection from `ip`, or say which cap is reached.
    pub fn take(
        &self,
        ip: Option<IpAddr>,
        max_total: Option<usize>,
        max_per_ip: Option<usize>,
    ) -> Result<Ticket, Over> {
        let mut open = self.lock();
        if max_total.is_some_and(|m| open.total >= m) {
            return Err(Over::Listener);
        }
        let ip = ip.filter(|_| max_per_ip.is_some());
        if let (Some(ip), Some(max)) = (ip, max_per_ip) {
            if open.by_ip.get(&ip).copied().unwrap_or(0) >= max {
                return Err(Over::Source);
            }
            *open.by_ip.entry(ip).or_insert(0) += 1;
        }
        open.total += 1;
        Ok(Ticket {
            counts: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Distinct client addresses counted now (bounded by `total`).
    pub fn sources(&self) -> usize {
        self.lock().by_ip.len()
    }
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Ticket {
    counts: Counts,
    ip: Option<IpAddr>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.counts.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(ip) = self.ip {
            if let Some(n) = open.by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.by_ip.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_places_come_back() {
        let c = Counts::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = c.take(Some(a), Some(3), Some(2)).unwrap();
        let t2 = c.take(Some(a), Some(3), Some(2)).unwrap();
        assert_eq!(c.take(Some(a), Some(3), Some(2)).unwrap_err(), Over::Source);
        let t3 = c.take(Some(b), Some(3), Some(2)).unwrap();
        assert_eq!(
            c.take(Some(b), Some(3), Some(2)).unwrap_err(),
            Over::Listener
        );
        drop(t1);
        let t4 = c.take(Some(a), Some(3), Some(2)).unwrap();
        assert_eq!((c.total(), c.sources()), (3, 2));
        drop((t2, t3, t4));
        assert_eq!((c.total(), c.sources()), (0, 0), "no entry left behind");
    }

    #[test]
    fn no_caps_counts_without_refusing() {
        let c = Counts::default();
        let tickets: Vec<_> = (0..100)
            .map(|_| c.take(None, None, None).unwrap())
            .collect();
        assert_eq!((c.total(), c.sources()), (100, 0));
        drop(tickets);
        assert_eq!(c.total(), 0);
    }
}
