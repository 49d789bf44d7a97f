//! Service limits, the other kind of circuit breaker: caps on what one upstream may hold
//! at once (connections, requests waiting for a connection or stream, requests in flight,
//! retries in flight). Over a cap, a call fails fast with `503` and `malla-limit: NAME`
//! instead of queueing behind a service that is already saturated. In audit mode the hit
//! is counted and reported, and the call goes on.

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use malla_core::policy::Limits;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

impl Limit {
    /// The policy field's name, also the `malla-limit` header's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::PendingRequests => "max_pending_requests",
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
        }
    }

    fn max(self, limits: &Limits) -> u32 {
        match self {
            Limit::Connections => limits.max_connections,
            Limit::PendingRequests => limits.max_pending_requests,
            Limit::Requests => limits.max_requests,
            Limit::Retries => limits.max_retries,
        }
    }

    const ALL: [Limit; 4] = [
        Limit::Connections,
        Limit::PendingRequests,
        Limit::Requests,
        Limit::Retries,
    ];
}

/// What an upstream holds now, one counter per [`Limit`].
#[derive(Debug, Default)]
pub struct Counters {
    held: [AtomicU32; 4],
}

/// One unit of a limit, held until dropped.
#[derive(Debug)]
pub struct Slot {
    counters: Arc<Counters>,
    limit: Limit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters.held[self.limit as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A cap was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub limit: Limit,
    pub max: u32,
}

impl Counters {
    /// Takes one unit of `limit`. Over the cap: `Err` in enforce mode; in audit mode the
    /// slot is taken anyway and the hit comes back beside it for reporting.
    pub fn acquire(self: &Arc<Self>, limit: Limit, limits: &Limits) -> (Option<Slot>, Option<Hit>) {
        let max = limit.max(limits);
        let held = self.held[limit as usize].fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            counters: self.clone(),
            limit,
        };
        if held < max {
            return (Some(slot), None);
        }
        let hit = Some(Hit { limit, max });
        if limits.mode.enforces() {
            drop(slot);
            (None, hit)
        } else {
            (Some(slot), hit)
        }
    }

    pub fn held(&self, limit: Limit) -> u32 {
        self.held[limit as usize].load(Ordering::Relaxed)
    }

    /// Every counter, for `/config`.
    pub fn snapshot(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for limit in Limit::ALL {
            map.insert(limit.as_str().into(), self.held(limit).into());
        }
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use malla_core::policy::Mode;

    #[test]
    fn enforce_rejects_over_the_cap_and_audit_only_reports() {
        let c = Arc::new(Counters::default());
        let mut limits = Limits {
            max_requests: 2,
            ..Limits::default()
        };
        let a = c.acquire(Limit::Requests, &limits);
        let b = c.acquire(Limit::Requests, &limits);
        assert!(a.0.is_some() && b.0.is_some() && a.1.is_none());
        let over = c.acquire(Limit::Requests, &limits);
        assert!(over.0.is_none());
        assert_eq!(over.1.unwrap().max, 2);
        assert_eq!(c.held(Limit::Requests), 2, "a rejected call holds nothing");
        limits.mode = Mode::Audit;
        let audited = c.acquire(Limit::Requests, &limits);
        assert!(audited.0.is_some() && audited.1.is_some());
        drop((a, b, audited));
        assert_eq!(c.held(Limit::Requests), 0);
    }
}
