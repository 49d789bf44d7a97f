//! Choosing an endpoint for each request.
//!
//! The default is the power of two random choices over peak-EWMA load (Mitzenmacher;
//! Finagle's `p2cPeakEwma`, Linkerd's balancer): pick two endpoints at random and send to
//! the one whose latency estimate × (in-flight + 1) is lower. It needs no global view,
//! reacts within a few requests to an endpoint turning slow, and avoids the herd behaviour
//! of "always the least loaded". Round robin and least request (P2C over in-flight counts,
//! as Envoy's `LEAST_REQUEST`) are there for workloads that want them.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use crate::{config::BalancerKind, endpoint::Endpoint};

#[derive(Debug)]
pub struct Balancer {
    kind: BalancerKind,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(kind: BalancerKind) -> Self {
        Balancer {
            kind,
            next: AtomicUsize::new(0),
        }
    }

    pub fn kind(&self) -> BalancerKind {
        self.kind
    }

    /// Picks one endpoint, or `None` when the set is empty.
    pub fn pick<'a>(&self, endpoints: &'a [Arc<Endpoint>]) -> Option<&'a Arc<Endpoint>> {
        match endpoints.len() {
            0 => None,
            1 => endpoints.first(),
            n => Some(match self.kind {
                BalancerKind::RoundRobin => {
                    &endpoints[self.next.fetch_add(1, Ordering::Relaxed) % n]
                }
                BalancerKind::P2cEwma => p2c(endpoints, |e| e.load()),
                BalancerKind::LeastRequest => p2c(endpoints, |e| f64::from(e.in_flight())),
            }),
        }
    }
}

/// Two distinct random candidates; the one with the lower `load` wins (ties: the first).
fn p2c(endpoints: &[Arc<Endpoint>], load: impl Fn(&Endpoint) -> f64) -> &Arc<Endpoint> {
    let n = endpoints.len();
    let a = fastrand::usize(..n);
    // A second index drawn from the other n-1 slots, so the two always differ.
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    let (ea, eb) = (&endpoints[a], &endpoints[b]);
    if load(eb) < load(ea) {
        eb
    } else {
        ea
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        let metrics = Metrics::new();
        (0..n)
            .map(|i| {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + i));
                Arc::new(Endpoint::new(
                    addr,
                    false,
                    metrics.endpoint("t", &addr.to_string()),
                ))
            })
            .collect()
    }

    #[test]
    fn empty_set_picks_nothing() {
        assert!(Balancer::new(BalancerKind::P2cEwma).pick(&[]).is_none());
    }

    #[test]
    fn round_robin_is_even() {
        let eps = endpoints(3);
        let b = Balancer::new(BalancerKind::RoundRobin);
        let mut counts = [0; 3];
        for _ in 0..300 {
            let e = b.pick(&eps).unwrap();
            counts[usize::from(e.addr.port() - 1000)] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn p2c_never_picks_the_same_endpoint_twice_as_candidates() {
        // With two endpoints and one busy, P2C must always see both and pick the idle one.
        let eps = endpoints(2);
        let _busy: Vec<_> = (0..5).map(|_| eps[0].start(false)).collect();
        let b = Balancer::new(BalancerKind::LeastRequest);
        for _ in 0..100 {
            assert_eq!(b.pick(&eps).unwrap().addr, eps[1].addr);
        }
    }

    #[test]
    fn p2c_ewma_avoids_a_slow_endpoint() {
        let eps = endpoints(3);
        // Teach the estimator that endpoint 0 is slow.
        for _ in 0..3 {
            let f = eps[0].start(false);
            f.endpoint().observe(std::time::Duration::from_millis(500));
        }
        let b = Balancer::new(BalancerKind::P2cEwma);
        let slow = (0..300)
            .filter(|_| b.pick(&eps).unwrap().addr == eps[0].addr)
            .count();
        // P2C picks the slow one only when both candidates are it: impossible with
        // distinct candidates, so it should never win against a fast one.
        assert_eq!(slow, 0);
    }
}
