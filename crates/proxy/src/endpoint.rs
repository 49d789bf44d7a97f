//! Endpoints and the live set of them behind an upstream.
//!
//! An [`Endpoint`] carries what the balancer needs (in-flight requests, a peak-EWMA latency
//! estimate) and what the connection layer needs (the idle HTTP/1 pool and the one shared
//! HTTP/2 connection). The [`EndpointSet`] is read by every request from an `ArcSwap`
//! snapshot, so the hot path never takes a lock, and it is replaced whole by one updater
//! (static config today, the control plane's watch tomorrow). A request holds an
//! `Arc<Endpoint>`, so removing an endpoint never cuts a request that is already using it.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{net::TcpStream, time::Instant};

use crate::{http2, metrics::EndpointMetrics, resilience::outlier::Breaker};

/// Latency assumed for an endpoint that has not answered yet (as Linkerd does).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast the peak-EWMA forgets: the weight of an old sample halves in about 7 s.
const DECAY: Duration = Duration::from_secs(10);

pub struct Endpoint {
    pub addr: SocketAddr,
    in_flight: AtomicU32,
    ewma: Mutex<PeakEwma>,
    requests: AtomicU64,
    pub(crate) pool: Pool,
    pub(crate) h2: http2::EndpointClient,
    pub(crate) metrics: EndpointMetrics,
    /// The endpoint's circuit breaker (outlier detection).
    pub(crate) breaker: Breaker,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Endpoint {
    pub(crate) fn new(addr: SocketAddr, metrics: EndpointMetrics, max_idle: usize) -> Self {
        Endpoint {
            addr,
            in_flight: AtomicU32::new(0),
            ewma: Mutex::new(PeakEwma {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
            }),
            requests: AtomicU64::new(0),
            pool: Pool::new(max_idle),
            h2: http2::EndpointClient::default(),
            metrics,
            breaker: Breaker::default(),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests ever started on this endpoint.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The decayed latency estimate, in nanoseconds.
    pub fn rtt_estimate_ns(&self) -> f64 {
        let now = Instant::now();
        self.ewma
            .lock()
            .map(|mut e| e.decay(now))
            .unwrap_or(DEFAULT_RTT.as_nanos() as f64)
    }

    /// Starts the latency estimate at `rtt_ns` rather than the default, for an endpoint that
    /// joins others already measured (see [`crate::upstream::Upstream::set_endpoints`]).
    pub(crate) fn seed_rtt_estimate(&self, rtt_ns: f64) {
        if let Ok(mut e) = self.ewma.lock() {
            e.rtt_ns = rtt_ns;
            e.stamp = Instant::now();
        }
    }

    /// The P2C-EWMA load: latency estimate weighted by outstanding work.
    pub fn load(&self) -> f64 {
        self.rtt_estimate_ns() * f64::from(self.in_flight() + 1)
    }

    /// Marks a request as started on this endpoint until the guard is dropped; `probe`:
    /// it is the half-open breaker's probe.
    pub(crate) fn start(self: &Arc<Self>, probe: bool) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started: Instant::now(),
            probe,
        }
    }

    pub(crate) fn observe(&self, rtt: Duration) {
        let now = Instant::now();
        if let Ok(mut e) = self.ewma.lock() {
            e.observe(now, rtt.as_nanos() as f64);
        }
    }
}

/// One request's claim on an endpoint: counted in-flight while it lives.
pub(crate) struct InFlight {
    endpoint: Arc<Endpoint>,
    started: Instant,
    probe: bool,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Time since the request started on this endpoint.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The endpoint answered (a response head arrived): feeds its latency estimate.
    pub fn answered(&self, status: u16) {
        let rtt = self.started.elapsed();
        self.endpoint.observe(rtt);
        self.endpoint.metrics.response(status, rtt);
    }

    /// The endpoint failed before answering; failures count as slow so that P2C steers
    /// away from it (a fast failure must not look attractive).
    pub fn failed(&self, status: u16) {
        self.endpoint
            .observe(DEFAULT_RTT.max(self.started.elapsed()) * 4);
        self.endpoint.metrics.local_response(status);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe {
            // Whatever the probe's fate, the next request may probe (a recorded outcome
            // has already closed or re-ejected the breaker).
            self.endpoint.breaker.end_probe();
        }
    }
}

/// Peak-sensitive exponentially weighted moving average of latency (Finagle's and
/// Linkerd's design): a sample above the estimate replaces it at once, a sample below is
/// blended in, and the estimate decays towards zero while nothing is observed so a once
/// slow endpoint is tried again.
#[derive(Debug)]
struct PeakEwma {
    rtt_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    fn weight(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    fn decay(&mut self, now: Instant) -> f64 {
        let w = self.weight(now);
        self.rtt_ns *= w;
        self.stamp = now;
        self.rtt_ns
    }

    fn observe(&mut self, now: Instant, sample_ns: f64) {
        if sample_ns > self.rtt_ns {
            self.rtt_ns = sample_ns;
        } else {
            let w = self.weight(now);
            self.rtt_ns = self.rtt_ns * w + sample_ns * (1.0 - w);
        }
        self.stamp = now;
    }
}

/// Idle HTTP/1 connections to one endpoint, shared by the workers.
pub(crate) struct Pool {
    idle: Mutex<Vec<IdleConn>>,
    max_idle: usize,
}

pub(crate) struct IdleConn {
    pub stream: TcpStream,
    pub since: Instant,
}

impl Pool {
    fn new(max_idle: usize) -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// The most recently used idle connection younger than `max_age`, if any.
    pub fn checkout(&self, max_age: Duration) -> Option<TcpStream> {
        let mut idle = self.idle.lock().ok()?;
        let now = Instant::now();
        // Oldest are at the front: drop the ones past their age first.
        let fresh_from = idle
            .iter()
            .position(|c| now.saturating_duration_since(c.since) < max_age)
            .unwrap_or(idle.len());
        idle.drain(..fresh_from);
        idle.pop().map(|c| c.stream)
    }

    pub fn checkin(&self, stream: TcpStream) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push(IdleConn {
                    stream,
                    since: Instant::now(),
                });
            }
        }
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

/// The endpoints of one upstream, replaced atomically as a whole.
pub struct EndpointSet {
    current: ArcSwap<Vec<Arc<Endpoint>>>,
}

impl EndpointSet {
    pub(crate) fn new(initial: Vec<Arc<Endpoint>>) -> Self {
        EndpointSet {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// The current endpoints; cheap, lock-free, safe to hold for one request.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.current.load_full()
    }

    pub(crate) fn store(&self, next: Vec<Arc<Endpoint>>) {
        self.current.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut e = PeakEwma {
            rtt_ns: 1_000.0,
            stamp: t0,
        };
        e.observe(t0, 5_000.0);
        assert_eq!(e.rtt_ns, 5_000.0, "a peak replaces the estimate at once");
        e.observe(t0 + Duration::from_secs(1), 1_000.0);
        assert!(e.rtt_ns < 5_000.0 && e.rtt_ns > 4_000.0, "{}", e.rtt_ns);
        let later = e.decay(t0 + Duration::from_secs(60));
        assert!(
            later < 50.0,
            "an idle estimate decays towards zero: {later}"
        );
    }
}
