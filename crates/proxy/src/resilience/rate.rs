//! Local rate limits: a token bucket per rule, refilled continuously at
//! `requests_per_second` up to `burst`. Over the rate a request gets `429` with
//! `retry-after` (the seconds until a token is due) and `malla-limit: rate-limit`.

use std::{sync::Mutex, time::Duration};

use malla_core::policy::{Mode, RateLimit};
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    pub path_prefix: Option<String>,
    pub mode: Mode,
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    stamp: Instant,
}

impl RateLimiter {
    pub fn new(rule: &RateLimit) -> Self {
        let burst = f64::from(
            rule.burst
                .unwrap_or(rule.requests_per_second.ceil() as u32)
                .max(1),
        );
        RateLimiter {
            path_prefix: rule.path_prefix.clone(),
            mode: rule.mode,
            rate: rule.requests_per_second,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                stamp: Instant::now(),
            }),
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn applies_to(&self, path: &[u8]) -> bool {
        self.path_prefix
            .as_ref()
            .is_none_or(|p| path.starts_with(p.as_bytes()))
    }

    /// Takes a token: `Ok` when there was one, else the time until the next.
    pub fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(b.stamp).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.stamp = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

/// `retry-after` in whole seconds, never 0 (RFC 9110 §10.2.3).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let r = RateLimiter::new(&RateLimit {
            path_prefix: None,
            requests_per_second: 10.0,
            burst: Some(3),
            mode: Mode::Enforce,
        });
        let t0 = Instant::now();
        assert!((0..3).all(|_| r.try_acquire(t0).is_ok()));
        let wait = r.try_acquire(t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        assert!(r.try_acquire(t0 + Duration::from_millis(100)).is_ok());
        assert_eq!(retry_after_secs(wait), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2500)), 3);
    }

    #[test]
    fn prefixes_select_requests() {
        let r = RateLimiter::new(&RateLimit {
            path_prefix: Some("/api".into()),
            requests_per_second: 1.0,
            burst: None,
            mode: Mode::Enforce,
        });
        assert!(r.applies_to(b"/api/x") && !r.applies_to(b"/health"));
    }
}
