//! The loop's clocks: proxy connect deadlines, `idle_timeout` sweeps and the expiry of idle
//! UDP associations, all fired from `Loop::run` after each poll.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use super::{Entry, Loop, SWEEP};
use crate::event::stream::{Machine, Step};
use crate::worker::Outcome;

impl Loop {
    /// Close connections that had no event for their `idle_timeout`; check again in a
    /// quarter of the shortest one (at most `SWEEP`) while any connection has one.
    pub(super) fn sweep_idle(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut tick: Option<Duration> = None;
        for (i, e) in self.slab.iter().enumerate() {
            if let Some(Entry::Conn(c)) = e {
                if let Some(idle) = c.idle {
                    if now.duration_since(c.last) >= idle {
                        expired.push((i, idle));
                    }
                    tick = Some(tick.map_or(idle, |t| t.min(idle)));
                }
            }
        }
        for (i, idle) in expired {
            log::info!(
                "listener `{}`: connection idle for {}, closed (idle_timeout)",
                self.ctx.name,
                humantime::format_duration(idle)
            );
            self.close(i, Outcome::Ok);
        }
        self.idle_sweep = tick.map(|t| now + (t / 4).clamp(Duration::from_millis(10), SWEEP));
    }

    pub(super) fn fire_timers(&mut self) {
        let now = Instant::now();
        self.retry_accept(now);
        if self.idle_sweep.is_some_and(|t| t <= now) {
            self.sweep_idle(now);
        }
        while let Some(Reverse((t, idx, conn_id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let step = match self.slab.get(idx) {
                Some(Some(Entry::Conn(c))) if c.conn_id == conn_id => match &c.machine {
                    Machine::Proxy(r) if r.connecting => Some(r.timed_out()),
                    _ => None,
                },
                _ => None,
            };
            if let Some(Step::Close(o)) = step {
                self.close(idx, o);
            }
        }
        if !self.assocs.is_empty() {
            let expired: Vec<(std::net::SocketAddr, usize)> = self
                .assocs
                .iter()
                .filter(|(_, &i)| match self.slab.get(i) {
                    Some(Some(Entry::Assoc(a))) => a.last.elapsed() >= a.settings.udp_idle,
                    _ => true,
                })
                .map(|(k, &i)| (*k, i))
                .collect();
            for (k, i) in expired {
                self.assocs.remove(&k);
                self.remove_assoc(i);
            }
        }
    }
}
