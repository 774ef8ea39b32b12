//! The retry schedule of the job-side client: exponential backoff with jitter, honouring a
//! capped `Retry-After`.

use std::time::Duration;

/// The most a `Retry-After` header may make us wait.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Retry schedule: `attempts` tries in all, waiting `base * 2^n` (capped at `max`, with jitter)
/// between them.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base: Duration::from_millis(500),
            max: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `n` (0-based), with up to 25% random jitter so many jobs
    /// failing together do not retry in lockstep.
    pub fn delay(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(n.min(16)))
            .min(self.max);
        let jitter = if exp.is_zero() {
            Duration::ZERO
        } else {
            let q = exp.as_millis().min(u128::from(u32::MAX)) as u64 / 4;
            Duration::from_millis(rand::random_range(0..=q))
        };
        let wait = exp + jitter;
        match retry_after {
            Some(ra) => wait.max(ra.min(MAX_RETRY_AFTER)),
            None => wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_caps_and_honours_retry_after() {
        let p = RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(100),
            max: Duration::from_millis(400),
        };
        let d0 = p.delay(0, None);
        assert!(d0 >= Duration::from_millis(100) && d0 <= Duration::from_millis(125));
        let d5 = p.delay(5, None);
        assert!(d5 >= Duration::from_millis(400) && d5 <= Duration::from_millis(500));
        assert!(p.delay(0, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        assert!(p.delay(0, Some(Duration::from_secs(3600))) <= MAX_RETRY_AFTER);
    }
}
