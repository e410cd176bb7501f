//! `rate = "N/s"`: a token bucket per listener. It holds up to N tokens and refills at N per
//! unit, so a burst of N passes at once, then one more per 1/N of the unit; over it, new
//! connections or datagrams are refused until tokens come back, with nothing to reset by hand.

use std::time::Instant;

use crate::config::Rate;

/// A listener's bucket; the rate is passed on every call so a reload applies at once.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            tokens: 0.0,
            last: None,
        }
    }
}

impl Bucket {
    /// Take one token if there is one.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        let cap = f64::from(rate.count);
        self.tokens = match self.last {
            None => cap,
            Some(last) => {
                let refill = now.saturating_duration_since(last).as_secs_f64()
                    / rate.per.as_secs_f64()
                    * cap;
                (self.tokens + refill).min(cap)
            }
        };
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let rate = Rate {
            count: 5,
            per: Duration::from_secs(1),
        };
        let mut b = Bucket::default();
        let t0 = Instant::now();
        let passed = (0..20).filter(|_| b.take(rate, t0)).count();
        assert_eq!(passed, 5);
        assert!(
            !b.take(rate, t0 + Duration::from_millis(100)),
            "a fifth of a token is not one"
        );
        assert!(b.take(rate, t0 + Duration::from_millis(250)));
        let later = t0 + Duration::from_secs(10);
        let passed = (0..20).filter(|_| b.take(rate, later)).count();
        assert_eq!(passed, 5, "the bucket never holds more than N");
    }

    #[test]
    fn per_minute() {
        let rate = Rate {
            count: 2,
            per: Duration::from_secs(60),
        };
        let mut b = Bucket::default();
        let t0 = Instant::now();
        assert!(b.take(rate, t0) && b.take(rate, t0) && !b.take(rate, t0));
        assert!(!b.take(rate, t0 + Duration::from_secs(20)));
        assert!(b.take(rate, t0 + Duration::from_secs(31)));
    }
}
