//! Endpoint circuit breakers (outlier detection).
//!
//! Each endpoint has a [`Breaker`]: closed (takes traffic), ejected (out of the balancer
//! until its ejection time ends) or half-open (one probe request at a time decides:
//! success closes it, failure ejects it again for twice as long, up to the maximum).
//! Three detectors open it:
//!
//! - **consecutive failures**, counted on every response as it happens;
//! - **success rate**, every `interval`: an endpoint below `mean - stdev_factor × stdev`
//!   of the success rates of peers with enough requests (Envoy's detector);
//! - **latency**, every `interval` (opt-in): an endpoint whose mean latency is more than
//!   `factor` × the median of its peers'.
//!
//! The hot path only touches the breaker's atomics; the decisions that look at the whole
//! upstream (the max-ejection share, panic mode, rebuilding the balancer's set) are the
//! upstream's, under its lock, and only when a breaker changes state.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering},
        OnceLock,
    },
    time::Duration,
};

use malla_core::policy::{Outcome, Outlier};
use tokio::time::Instant;

const CLOSED: u8 = 0;
const EJECTED: u8 = 1;
const HALF_OPEN: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Ejected,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Ejected => "ejected",
            State::HalfOpen => "half-open",
        }
    }
}

/// What a recorded outcome asks of the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Nothing,
    /// The consecutive-failure threshold was reached.
    Eject {
        failures: u32,
    },
    /// A half-open probe failed.
    Reopen,
    /// A half-open probe succeeded.
    Close,
}

/// Milliseconds on a process-wide monotonic clock.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// `t` in milliseconds on [`now_ms`]'s clock (for a caller that has just read the time).
pub fn ms_at(t: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    t.saturating_duration_since(base).as_millis() as u64 + 1
}

#[derive(Debug, Default)]
pub struct Breaker {
    state: AtomicU8,
    consecutive: AtomicU32,
    probing: AtomicBool,
    /// Ejections since the endpoint last closed: the backoff exponent.
    streak: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// This interval's requests (low 32 bits) and successes (high 32 bits), packed so
    /// that counting a response is one atomic add, for the success-rate detector.
    outcomes: AtomicU64,
    /// This interval's summed latency, for the latency detector (only while it is on).
    latency_us: AtomicU64,
}

/// One endpoint's statistics over the last interval.
#[derive(Clone, Copy, Debug, Default)]
pub struct IntervalStats {
    pub requests: u64,
    pub successes: u64,
    pub mean_latency_us: f64,
}

impl Breaker {
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            EJECTED => State::Ejected,
            HALF_OPEN => State::HalfOpen,
            _ => State::Closed,
        }
    }

    /// Whether a request may be sent here now: always when closed; when half-open, only
    /// the one probe (the caller must then [`Self::end_probe`] or record an outcome).
    pub fn admit(&self) -> Admission {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Admission::Yes,
            HALF_OPEN
                if self
                    .probing
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok() =>
            {
                Admission::Probe
            }
            _ => Admission::No,
        }
    }

    /// Starts the failure count over (an ejection that was not carried out).
    pub fn forget_failures(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
    }

    /// A probe ended without an outcome (the client went away): let another one through.
    pub fn end_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// Records one outcome (hot path); `latency` is asked for only when the latency
    /// detector is on.
    pub fn record(
        &self,
        outcome: Outcome,
        policy: &Outlier,
        latency: impl FnOnce() -> Duration,
    ) -> Verdict {
        let success = u64::from(outcome.is_success()) << 32;
        self.outcomes.fetch_add(success | 1, Ordering::Relaxed);
        if policy.latency.enabled {
            self.latency_us
                .fetch_add(latency().as_micros() as u64, Ordering::Relaxed);
        }
        let half_open = self.state.load(Ordering::Acquire) == HALF_OPEN;
        if policy.failure_on.matches(outcome) {
            let failures = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
            if half_open {
                return Verdict::Reopen;
            }
            if policy.consecutive_failures > 0 && failures >= policy.consecutive_failures {
                return Verdict::Eject { failures };
            }
        } else {
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            if half_open {
                return Verdict::Close;
            }
        }
        Verdict::Nothing
    }

    /// Opens the breaker for the next backoff step; returns how long.
    pub fn eject(&self, policy: &Outlier, now_ms: u64) -> Duration {
        let streak = self.streak.fetch_add(1, Ordering::Relaxed);
        let time = policy
            .base_ejection_time
            .saturating_mul(1u32 << streak.min(20))
            .min(policy.max_ejection_time);
        self.ejected_until_ms
            .store(now_ms + time.as_millis() as u64, Ordering::Release);
        self.consecutive.store(0, Ordering::Relaxed);
        self.probing.store(false, Ordering::Release);
        self.state.store(EJECTED, Ordering::Release);
        time
    }

    /// Ends an ejection whose time is up: the next request is a probe.
    pub fn half_open(&self) {
        self.probing.store(false, Ordering::Release);
        self.state.store(HALF_OPEN, Ordering::Release);
    }

    /// A probe succeeded (or ejection was lifted): back to normal, backoff reset.
    pub fn close(&self) {
        self.streak.store(0, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        self.probing.store(false, Ordering::Release);
        self.state.store(CLOSED, Ordering::Release);
    }

    /// When an ejection ends (ms on [`now_ms`]'s clock), if ejected.
    pub fn ejected_until(&self) -> Option<u64> {
        (self.state.load(Ordering::Acquire) == EJECTED)
            .then(|| self.ejected_until_ms.load(Ordering::Acquire))
    }

    /// Takes the interval's statistics and starts a new interval.
    pub fn take_interval(&self) -> IntervalStats {
        let outcomes = self.outcomes.swap(0, Ordering::Relaxed);
        let (requests, successes) = (outcomes & u64::from(u32::MAX), outcomes >> 32);
        let latency = self.latency_us.swap(0, Ordering::Relaxed);
        IntervalStats {
            requests,
            successes,
            mean_latency_us: if requests == 0 {
                0.0
            } else {
                latency as f64 / requests as f64
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Yes,
    /// Admitted as the half-open probe.
    Probe,
    No,
}

/// Endpoints whose success rate is an outlier among `stats` (indices, with a reason).
pub fn success_rate_outliers(stats: &[IntervalStats], policy: &Outlier) -> Vec<(usize, String)> {
    let p = &policy.success_rate;
    if !p.enabled {
        return Vec::new();
    }
    let rates: Vec<(usize, f64)> = stats
        .iter()
        .enumerate()
        .filter(|(_, s)| s.requests >= u64::from(p.min_requests))
        .map(|(i, s)| (i, s.successes as f64 / s.requests as f64))
        .collect();
    if rates.len() < p.min_hosts as usize || rates.len() < 2 {
        return Vec::new();
    }
    let n = rates.len() as f64;
    let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
    let stdev = (rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    let threshold = mean - p.stdev_factor * stdev;
    rates
        .into_iter()
        .filter(|(_, r)| *r < threshold)
        .map(|(i, r)| {
            (
                i,
                format!(
                    "success rate {:.1}% below {:.1}% (peers' mean {:.1}%)",
                    r * 100.0,
                    threshold * 100.0,
                    mean * 100.0
                ),
            )
        })
        .collect()
}

/// Endpoints whose mean latency is more than `factor` × the median of the others'.
pub fn latency_outliers(stats: &[IntervalStats], policy: &Outlier) -> Vec<(usize, String)> {
    let p = &policy.latency;
    if !p.enabled {
        return Vec::new();
    }
    let mut measured: Vec<(usize, f64)> = stats
        .iter()
        .enumerate()
        .filter(|(_, s)| s.requests >= u64::from(p.min_requests))
        .map(|(i, s)| (i, s.mean_latency_us))
        .collect();
    if measured.len() < p.min_hosts as usize || measured.len() < 2 {
        return Vec::new();
    }
    measured.sort_by(|a, b| a.1.total_cmp(&b.1));
    let median = measured[measured.len() / 2].1.max(1.0);
    measured
        .into_iter()
        .filter(|(_, l)| *l > median * p.factor)
        .map(|(i, l)| {
            (
                i,
                format!(
                    "mean latency {:.1} ms above {:.1} × the median {:.1} ms",
                    l / 1000.0,
                    p.factor,
                    median / 1000.0
                ),
            )
        })
        .collect()
}

/// How many endpoints of `total` may be ejected at once: the share, but at least one.
pub fn max_ejected(total: usize, policy: &Outlier) -> usize {
    ((total as f64 * policy.max_ejection_percent.fraction()).floor() as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Outlier {
        Outlier {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(1),
            max_ejection_time: Duration::from_secs(5),
            ..Outlier::default()
        }
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let b = Breaker::default();
        let p = policy();
        let d = || Duration::from_millis(1);
        assert_eq!(b.record(Outcome::Status(500), &p, d), Verdict::Nothing);
        assert_eq!(b.record(Outcome::Status(200), &p, d), Verdict::Nothing);
        assert_eq!(b.record(Outcome::Status(503), &p, d), Verdict::Nothing);
        assert_eq!(b.record(Outcome::Reset, &p, d), Verdict::Nothing);
        assert_eq!(
            b.record(Outcome::ConnectFailure, &p, d),
            Verdict::Eject { failures: 3 }
        );
        assert_eq!(b.record(Outcome::Status(404), &p, d), Verdict::Nothing);
    }

    #[test]
    fn ejections_back_off_exponentially_up_to_the_max_and_probes_decide() {
        let b = Breaker::default();
        let p = policy();
        assert_eq!(b.eject(&p, 0), Duration::from_secs(1));
        assert_eq!(b.admit(), Admission::No);
        b.half_open();
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.admit(), Admission::No, "one probe at a time");
        let d = || Duration::from_millis(1);
        assert_eq!(b.record(Outcome::Status(500), &p, d), Verdict::Reopen);
        assert_eq!(b.eject(&p, 0), Duration::from_secs(2));
        b.half_open();
        assert_eq!(b.eject(&p, 0), Duration::from_secs(4));
        assert_eq!(b.eject(&p, 0), Duration::from_secs(5), "capped");
        b.half_open();
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.record(Outcome::Status(200), &p, d), Verdict::Close);
        b.close();
        assert_eq!(b.admit(), Admission::Yes);
        assert_eq!(
            b.eject(&p, 0),
            Duration::from_secs(1),
            "a close resets the backoff"
        );
    }

    #[test]
    fn success_rate_outliers_are_far_below_their_peers() {
        let mut stats = vec![
            IntervalStats {
                requests: 100,
                successes: 100,
                mean_latency_us: 1000.0
            };
            5
        ];
        stats[2].successes = 40;
        let p = Outlier::default();
        let out = success_rate_outliers(&stats, &p);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 2);
        // Too few requests: no verdict.
        stats.iter_mut().for_each(|s| s.requests = 5);
        assert!(success_rate_outliers(&stats, &p).is_empty());
    }

    #[test]
    fn latency_outliers_are_far_slower_than_the_median() {
        let mut stats = vec![
            IntervalStats {
                requests: 100,
                successes: 100,
                mean_latency_us: 1000.0
            };
            4
        ];
        stats[1].mean_latency_us = 10_000.0;
        let mut p = Outlier::default();
        assert!(latency_outliers(&stats, &p).is_empty(), "off by default");
        p.latency.enabled = true;
        let out = latency_outliers(&stats, &p);
        assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn at_least_one_endpoint_may_be_ejected() {
        let p = Outlier::default();
        assert_eq!(max_ejected(1, &p), 1);
        assert_eq!(max_ejected(3, &p), 1);
        assert_eq!(max_ejected(10, &p), 5);
    }
}
