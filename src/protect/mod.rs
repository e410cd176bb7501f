//! Protection at the door: every connection and datagram passes a listener's `Guard` in the
//! main loop, right after `accept`/`recv` and before any handler, thread, child or program.
//!
//! A refused connection is dropped at once (closed with no byte sent), a refused datagram is
//! discarded; refusals are logged through `RefusalLog`, rate-limited. Admitted connections get
//! their socket timeouts (`idle_timeout`) and a watchdog deadline (`max_duration`) here too, so
//! every worker model inherits them. The guard reads the listener's settings on every call, so
//! a reload applies new limits to new connections while the counts carry on.

pub mod acl;
pub mod deadlines;
pub mod limits;
pub mod rate;
pub mod refusals;
pub mod socket_file;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::{ListenerConfig, Protocol};
use crate::conn::{canonical_ip, Conn, PeerAddr};
use crate::jobs::Tracker;

pub use limits::Ticket;
pub use refusals::Reason;

use deadlines::Deadlines;
use limits::{Counts, Over};
use rate::Bucket;
use refusals::RefusalLog;

/// One listener's admission state: open counts, rate bucket, deadlines and refusal log.
///
/// Clones share the state, so event loops that accept for themselves judge connections with
/// the very counts, bucket and log the main loop uses; each lock is held for a few field
/// updates only.
#[derive(Debug, Default, Clone)]
pub struct Guard {
    counts: Counts,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    bucket: Bucket,
    deadlines: Deadlines,
    log: RefusalLog,
}

impl Guard {
    fn state(&self) -> MutexGuard<'_, State> {
        // Only counters and timestamps change under this lock; a poisoned one is still valid.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Judge a new stream connection; `Some` admits it and holds its place until dropped.
    pub fn admit_stream(
        &self,
        cfg: &ListenerConfig,
        peer: &PeerAddr,
        now: Instant,
    ) -> Option<Ticket> {
        let p = &cfg.protect;
        let ip = peer.ip();
        let verdict = match ip {
            Some(ip) if !acl::permits(&p.allow, &p.deny, ip) => Err(Reason::Acl),
            _ => match self.counts.take(ip, p.max_connections, p.max_per_source) {
                Err(Over::Listener) => Err(Reason::MaxConnections),
                Err(Over::Source) => Err(Reason::MaxPerSource),
                // Checked last, so connections refused for other reasons use no token; the
                // ticket is dropped (its place freed) if the rate refuses.
                Ok(ticket) => match p.rate {
                    Some(rate) if !self.state().bucket.take(rate, now) => Err(Reason::Rate),
                    _ => Ok(ticket),
                },
            },
        };
        match verdict {
            Ok(ticket) => Some(ticket),
            Err(reason) => {
                self.state().log.refused(
                    &cfg.name,
                    &format_args!("refused connection from {peer}"),
                    reason,
                    now,
                );
                None
            }
        }
    }

    /// Judge a datagram: anti-reflection checks, the ACL, then the rate.
    pub fn admit_datagram(&self, cfg: &ListenerConfig, peer: &PeerAddr, now: Instant) -> bool {
        let p = &cfg.protect;
        let verdict = match peer {
            PeerAddr::Inet(addr) if cfg.protocol == Protocol::Udp => {
                udp_source(addr, p.min_source_port).and_then(|ip| {
                    if acl::permits(&p.allow, &p.deny, ip) {
                        Ok(())
                    } else {
                        Err(Reason::Acl)
                    }
                })
            }
            _ => Ok(()),
        }
        .and_then(|()| match p.rate {
            Some(rate) if !self.state().bucket.take(rate, now) => Err(Reason::Rate),
            _ => Ok(()),
        });
        match verdict {
            Ok(()) => true,
            Err(reason) => {
                self.state().log.refused(
                    &cfg.name,
                    &format_args!("dropped datagram from {peer}"),
                    reason,
                    now,
                );
                false
            }
        }
    }

    /// Arm an admitted connection: socket timeouts for `idle_timeout` (a read or write that
    /// waits that long fails, so a silent or non-reading peer is dropped whichever way the
    /// handler talks) and a watchdog deadline for `max_duration`.
    pub fn arm(
        &self,
        cfg: &ListenerConfig,
        conn: &Conn,
        conn_id: u64,
        tracker: &Tracker,
        now: Instant,
    ) {
        if let Some(idle) = cfg.protect.idle_timeout {
            let set = conn
                .set_read_timeout(Some(idle))
                .and_then(|()| conn.set_write_timeout(Some(idle)));
            if let Err(e) = set {
                log::warn!(
                    "listener `{}`: cannot set idle_timeout on a connection: {e}",
                    cfg.name
                );
            }
        }
        if let Some(max) = cfg.protect.max_duration {
            self.state().deadlines.add(now + max, conn_id, tracker);
        }
    }

    /// When the loop must next call `tick` (a deadline or a due refusal summary).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let st = self.state();
        match (st.deadlines.next(), st.log.next_flush()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Cut connections past `max_duration` and write a due refusal summary.
    pub fn tick(&self, cfg: &ListenerConfig, tracker: &Tracker, now: Instant) {
        let mut st = self.state();
        let cut = st.deadlines.expire(now, tracker);
        for _ in 0..cut {
            st.log
                .refused(&cfg.name, &"a connection", Reason::MaxDuration, now);
        }
        st.log.flush(&cfg.name, now);
    }

    /// Whether `max_connections` is reached, so every new stream connection will be refused:
    /// then the listener keeps accepting (and refusing) even with every worker busy, rather
    /// than leaving clients unanswered in the kernel's backlog.
    pub fn at_max_connections(&self, cfg: &ListenerConfig) -> bool {
        cfg.protect
            .max_connections
            .is_some_and(|max| self.counts.total() >= max)
    }

    /// Connections open now (for status lines).
    pub fn open(&self) -> usize {
        self.counts.total()
    }

    /// Refusals since start for one reason (for status lines).
    pub fn refused(&self, reason: Reason) -> u64 {
        self.state().log.total(reason)
    }
}

/// A UDP source that may be answered: not a privileged port (reflection at another
/// service, CERT CA-1996-01), not a broadcast, multicast or unspecified address (no real
/// sender has one, and answering would hit a whole network).
fn udp_source(addr: &SocketAddr, min_port: u16) -> Result<IpAddr, Reason> {
    if addr.port() < min_port {
        return Err(Reason::SourcePort);
    }
    let ip = canonical_ip(addr.ip());
    let bad = match ip {
        IpAddr::V4(v4) => v4.is_broadcast() || v4.is_multicast() || v4.is_unspecified(),
        IpAddr::V6(v6) => v6.is_multicast() || v6.is_unspecified(),
    };
    if bad {
        return Err(Reason::BadSource);
    }
    Ok(ip)
}

/// Descriptors that must be free before a listener starved by EMFILE accepts again: the
/// connection, its second handle, and a few for what a handler opens (files, pipes, stdio).
pub const FD_HEADROOM: usize = 8;

/// Whether twice `FD_HEADROOM` descriptors can be opened now (twice, so a listener that
/// resumes does not pause again at once); probed by opening /dev/null (close-on-exec, closed
/// at once), only while a listener is starved.
pub fn fd_headroom() -> bool {
    let probe: Result<Vec<std::fs::File>, _> = (0..2 * FD_HEADROOM)
        .map(|_| std::fs::File::open("/dev/null"))
        .collect();
    probe.is_ok()
}

/// Whether a just-accepted descriptor number says fewer than `FD_HEADROOM` are left: the
/// kernel hands out the lowest free number, so every lower one is in use.
pub fn near_fd_limit(fd: std::os::fd::RawFd) -> bool {
    match (soft_fd_limit(), u64::try_from(fd)) {
        (Some(soft), Ok(fd)) => fd.saturating_add(FD_HEADROOM as u64) >= soft,
        _ => false,
    }
}

/// The soft `RLIMIT_NOFILE`, read once: it is checked on every accept, and only socketd
/// itself changes it (at start, in `raise_fd_limit`), so a syscall per connection buys nothing.
static SOFT_FD_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn soft_fd_limit() -> Option<u64> {
    use std::sync::atomic::Ordering;
    match SOFT_FD_LIMIT.load(Ordering::Relaxed) {
        0 => {
            let (soft, _) =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
            SOFT_FD_LIMIT.store(soft, Ordering::Relaxed);
            Some(soft)
        }
        soft => Some(soft),
    }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, so the daemon can hold as many
/// connections as the administrator allows before accept ever sees EMFILE.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                SOFT_FD_LIMIT.store(0, std::sync::atomic::Ordering::Relaxed);
                log::debug!("open files limit raised from {soft} to {hard}")
            }
            Err(e) => log::warn!("cannot raise the open files limit from {soft} to {hard}: {e}"),
        },
        Ok(_) => {}
        Err(e) => log::warn!("cannot read the open files limit: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_network, ListenAddr, Protection, Rate, WorkerModel};
    use std::time::Duration;

    fn cfg(protocol: Protocol, protect: Protection) -> ListenerConfig {
        ListenerConfig {
            name: "t".into(),
            protocol,
            address: ListenAddr::Inet(SocketAddr::from(([127, 0, 0, 1], 0))),
            handler: "echo".into(),
            workers: WorkerModel::Threaded,
            max_workers: 4,
            threads: 1,
            protect,
            handler_settings: None,
            tls: None,
        }
    }

    fn peer(s: &str) -> PeerAddr {
        PeerAddr::Inet(s.parse().unwrap())
    }

    #[test]
    fn udp_reflection_sources_are_dropped() {
        let c = cfg(Protocol::Udp, Protection::default());
        let g = Guard::default();
        let now = Instant::now();
        assert!(g.admit_datagram(&c, &peer("127.0.0.1:40000"), now));
        assert!(
            !g.admit_datagram(&c, &peer("127.0.0.1:19"), now),
            "chargen port"
        );
        assert!(
            !g.admit_datagram(&c, &peer("127.0.0.1:7"), now),
            "echo port"
        );
        assert!(!g.admit_datagram(&c, &peer("255.255.255.255:5000"), now));
        assert!(!g.admit_datagram(&c, &peer("224.0.0.1:5000"), now));
        assert!(!g.admit_datagram(&c, &peer("[ff02::1]:5000"), now));
        assert!(!g.admit_datagram(&c, &peer("[::ffff:224.0.0.1]:5000"), now));
        assert!(!g.admit_datagram(&c, &peer("0.0.0.0:5000"), now));
        assert_eq!(g.refused(Reason::SourcePort), 2);
        assert_eq!(g.refused(Reason::BadSource), 5);
        let off = cfg(
            Protocol::Udp,
            Protection {
                min_source_port: 0,
                ..Protection::default()
            },
        );
        assert!(
            g.admit_datagram(&off, &peer("127.0.0.1:19"), now),
            "0 turns the port check off"
        );
    }

    #[test]
    fn stream_admission_order_and_release() {
        let p = Protection {
            deny: vec![parse_network("127.0.0.2").unwrap()],
            max_per_source: Some(1),
            rate: Some(Rate {
                count: 2,
                per: Duration::from_secs(60),
            }),
            ..Protection::default()
        };
        let c = cfg(Protocol::Tcp, p);
        let g = Guard::default();
        let now = Instant::now();
        assert!(g
            .admit_stream(&c, &peer("[::ffff:127.0.0.2]:5000"), now)
            .is_none());
        let t = g
            .admit_stream(&c, &peer("127.0.0.1:5000"), now)
            .expect("first admitted");
        assert!(
            g.admit_stream(&c, &peer("127.0.0.1:5001"), now).is_none(),
            "per source"
        );
        assert_eq!(g.open(), 1);
        drop(t);
        assert!(
            g.admit_stream(&c, &peer("127.0.0.1:5002"), now).is_some(),
            "place came back"
        );
        assert!(
            g.admit_stream(&c, &peer("127.0.0.3:5002"), now).is_none(),
            "rate: 2 per minute"
        );
        assert_eq!(g.open(), 0, "a rate refusal gives its place back");
        assert_eq!(
            (
                g.refused(Reason::Acl),
                g.refused(Reason::MaxPerSource),
                g.refused(Reason::Rate)
            ),
            (1, 1, 1)
        );
    }
}
