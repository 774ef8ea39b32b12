//! Per-client token bucket for failed verifications.
//!
//! Only refusals are charged: a request whose token verifies never touches a bucket, so honest
//! CI traffic cannot be limited by it, however busy. The clock is an input (`now`), so tests
//! drive time without sleeping. Memory is bounded: at most `max_clients` buckets; buckets that
//! have refilled are forgotten first, and past that every new client shares one overflow
//! bucket (fails closed: a spray of addresses is limited together, not let through).

use std::collections::HashMap;
use time::{Duration, OffsetDateTime};

/// The key of the shared bucket (and aggregate) once the tables are full.
pub const OVERFLOW_CLIENT: &str = "*";

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: OffsetDateTime,
}

/// Failed verifications allowed per client: a burst that refills evenly.
#[derive(Debug)]
pub struct FailureLimiter {
    per_second: f64,
    burst: f64,
    max_clients: usize,
    buckets: HashMap<String, Bucket>,
}

impl FailureLimiter {
    /// `per_minute == 0` turns the limiter off.
    pub fn new(per_minute: u32, burst: u32, max_clients: usize) -> Self {
        Self {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            max_clients: max_clients.max(1),
            buckets: HashMap::new(),
        }
    }

    fn refilled(&self, b: Bucket, now: OffsetDateTime) -> f64 {
        // A clock set back refills nothing (never a negative refill either).
        let elapsed = (now - b.at).max(Duration::ZERO).as_seconds_f64();
        (b.tokens + elapsed * self.per_second).min(self.burst)
    }

    /// Charge one failure to `client` at `now`. `Err(seconds)`: over the limit, retry after.
    pub fn charge(&mut self, client: &str, now: OffsetDateTime) -> Result<(), u64> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let key = if self.buckets.contains_key(client) {
            client
        } else {
            if self.buckets.len() >= self.max_clients {
                self.prune(now);
            }
            if self.buckets.len() >= self.max_clients {
                OVERFLOW_CLIENT
            } else {
                client
            }
        };
        let full = Bucket {
            tokens: self.burst,
            at: now,
        };
        let b = self.buckets.get(key).copied().unwrap_or(full);
        let tokens = self.refilled(b, now);
        let (tokens, result) = if tokens >= 1.0 {
            (tokens - 1.0, Ok(()))
        } else {
            let wait = ((1.0 - tokens) / self.per_second).ceil().max(1.0);
            (tokens, Err(wait as u64))
        };
        self.buckets
            .insert(key.to_owned(), Bucket { tokens, at: now });
        result
    }

    /// Forget the buckets that are full again (they hold nothing a new one would not).
    pub fn prune(&mut self, now: OffsetDateTime) {
        let burst = self.burst;
        let per_second = self.per_second;
        self.buckets.retain(|_, b| {
            let elapsed = (now - b.at).max(Duration::ZERO).as_seconds_f64();
            b.tokens + elapsed * per_second < burst
        });
    }

    /// Buckets held (for tests and the bound on memory).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::milliseconds(ms)
    }

    #[test]
    fn a_burst_then_the_refill_rate_per_client() {
        // 60/min = 1/s, burst 3.
        let mut l = FailureLimiter::new(60, 3, 100);
        for _ in 0..3 {
            assert_eq!(l.charge("a", t(0)), Ok(()));
        }
        assert_eq!(l.charge("a", t(0)), Err(1));
        assert_eq!(l.charge("a", t(500)), Err(1), "half a token is not one");
        // Another client is untouched by a's exhaustion.
        assert_eq!(l.charge("b", t(500)), Ok(()));
        assert_eq!(l.charge("a", t(1000)), Ok(()));
        assert_eq!(l.charge("a", t(1000)), Err(1));
        // A long pause refills to the burst, not beyond it.
        for _ in 0..3 {
            assert_eq!(l.charge("a", t(600_000)), Ok(()));
        }
        assert!(l.charge("a", t(600_000)).is_err());
    }

    #[test]
    fn retry_after_reflects_the_refill_rate() {
        // 6/min: one token every 10 s.
        let mut l = FailureLimiter::new(6, 1, 100);
        assert_eq!(l.charge("a", t(0)), Ok(()));
        assert_eq!(l.charge("a", t(0)), Err(10));
        assert_eq!(l.charge("a", t(4_000)), Err(6));
    }

    #[test]
    fn a_clock_set_back_refills_nothing() {
        let mut l = FailureLimiter::new(60, 1, 100);
        assert_eq!(l.charge("a", t(10_000)), Ok(()));
        assert!(l.charge("a", t(0)).is_err());
    }

    #[test]
    fn zero_per_minute_is_off() {
        let mut l = FailureLimiter::new(0, 1, 1);
        for _ in 0..1000 {
            assert_eq!(l.charge("a", t(0)), Ok(()));
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn the_table_is_bounded_and_overflow_shares_one_bucket() {
        let mut l = FailureLimiter::new(60, 2, 2);
        assert_eq!(l.charge("a", t(0)), Ok(()));
        assert_eq!(l.charge("b", t(0)), Ok(()));
        // Full: c and d share the overflow bucket (burst 2 between them).
        assert_eq!(l.charge("c", t(0)), Ok(()));
        assert_eq!(l.charge("d", t(0)), Ok(()));
        assert!(l.charge("e", t(0)).is_err());
        assert_eq!(l.tracked(), 3);
        // Once a and b have refilled they are forgotten and room is made.
        assert_eq!(l.charge("f", t(10_000)), Ok(()));
        assert!(l.tracked() <= 3);
    }
}
