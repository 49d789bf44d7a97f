//! The retry budget: retries may add at most `budget_ratio` of the requests of the last
//! `budget_window`, plus `budget_min_per_second`, so that a failing service sees at most a
//! bounded multiple of its normal load however many callers retry (Finagle's and
//! Linkerd's design; Envoy's fixed `max_retries` concurrency cap is in [`super::limits`]).
//!
//! Counting is lock-free: the window is ten slots of requests and retries, each stamped
//! with the tenth of the window it counts; a slot from an older tenth is reset by the
//! first request that finds it stale.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use malla_core::policy::Retries;

const SLOTS: usize = 10;

#[derive(Default)]
struct Slot {
    /// Which tenth-of-a-window this slot counts (`now / slot length`).
    epoch: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

#[derive(Default)]
pub struct RetryBudget {
    slots: [Slot; SLOTS],
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget").finish_non_exhaustive()
    }
}

impl RetryBudget {
    fn slot_ms(window: Duration) -> u64 {
        (window.as_millis() as u64 / SLOTS as u64).max(1)
    }

    /// The slot for `now_ms`, reset first if it still holds an older epoch.
    fn current(&self, now_ms: u64, window: Duration) -> &Slot {
        let epoch = now_ms / Self::slot_ms(window);
        let slot = &self.slots[(epoch % SLOTS as u64) as usize];
        let seen = slot.epoch.load(Ordering::Acquire);
        if seen != epoch
            && slot
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Counts one original request (every request deposits; retries do not).
    pub fn deposit(&self, now_ms: u64, window: Duration) {
        self.current(now_ms, window)
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, or says it is spent.
    pub fn try_withdraw(&self, now_ms: u64, policy: &Retries) -> bool {
        let window = policy.budget_window;
        let slot = self.current(now_ms, window);
        let (requests, retries) = self.totals(now_ms, window);
        let allowed = policy.budget_ratio * requests as f64
            + f64::from(policy.budget_min_per_second) * window.as_secs_f64();
        if (retries as f64) < allowed {
            slot.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Requests and retries counted in the window ending at `now_ms`.
    fn totals(&self, now_ms: u64, window: Duration) -> (u64, u64) {
        let current = now_ms / Self::slot_ms(window);
        let oldest = current.saturating_sub(SLOTS as u64 - 1);
        self.slots
            .iter()
            .filter(|s| (oldest..=current).contains(&s.epoch.load(Ordering::Acquire)))
            .fold((0, 0), |(q, r), s| {
                (
                    q + s.requests.load(Ordering::Relaxed),
                    r + s.retries.load(Ordering::Relaxed),
                )
            })
    }
}

/// The wait before retry number `retry` (1 for the first): full jitter over an
/// exponentially growing cap (AWS's "exponential backoff and jitter").
pub fn backoff(policy: &Retries, retry: u32) -> Duration {
    let cap = policy
        .backoff_base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(policy.backoff_max);
    cap.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ratio: f64, min: u32) -> Retries {
        Retries {
            budget_ratio: ratio,
            budget_min_per_second: min,
            budget_window: Duration::from_secs(10),
            ..Retries::default()
        }
    }

    #[test]
    fn retries_are_bounded_by_ratio_plus_floor() {
        let b = RetryBudget::default();
        let p = policy(0.2, 1);
        let t = 1_000_000;
        for _ in 0..1000 {
            b.deposit(t, p.budget_window);
        }
        // 20% of 1000 requests + 1/s over 10 s = 210 retries.
        let granted = (0..1000).filter(|_| b.try_withdraw(t, &p)).count();
        assert_eq!(granted, 210);
    }

    #[test]
    fn the_window_forgets_old_traffic() {
        let b = RetryBudget::default();
        let p = policy(0.5, 0);
        let t = 1_000_000;
        for _ in 0..100 {
            b.deposit(t, p.budget_window);
        }
        assert!(b.try_withdraw(t, &p));
        // A window later, the old requests no longer pay for retries.
        assert!(!b.try_withdraw(t + 10_000, &p));
    }

    #[test]
    fn backoff_stays_under_its_growing_cap() {
        let p = Retries {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..Retries::default()
        };
        for retry in 1..20 {
            let cap = Duration::from_millis((10u64 << (retry - 1).min(16)).min(50));
            for _ in 0..50 {
                assert!(backoff(&p, retry) <= cap);
            }
        }
    }
}
