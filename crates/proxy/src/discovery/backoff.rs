//! Exponential backoff with full jitter, for reconnecting to the control plane.
//!
//! Each wait is drawn uniformly from `[0, min(max, base × 2^attempt)]` ("full jitter", as
//! in the AWS architecture blog's comparison): when a control plane restarts, the sidecars
//! that lost it spread their reconnections over the whole window instead of arriving in
//! synchronised waves, and a single sidecar still retries quickly after a blip.

use std::time::Duration;

#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    /// The ceiling of the next wait.
    pub(crate) fn ceiling(&self) -> Duration {
        self.base
            .saturating_mul(1u32 << self.attempt.min(30))
            .min(self.max)
    }

    /// The next wait; each call doubles the ceiling, up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(0..=nanos))
    }

    /// After a success: the next failure waits at most `base` again.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_waits_within_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_millis());
            let wait = b.next_delay();
            assert!(wait <= ceiling, "{wait:?} > {ceiling:?}");
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(10));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn waits_are_spread_over_the_whole_window() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..1000).map(|_| b.next_delay()).collect();
        let short = waits
            .iter()
            .filter(|w| **w < Duration::from_millis(250))
            .count();
        let long = waits
            .iter()
            .filter(|w| **w > Duration::from_millis(750))
            .count();
        // Uniform: about 250 each; a clustered (equal-jitter or none) policy has none short.
        assert!(short > 150 && long > 150, "short {short}, long {long}");
    }
}
