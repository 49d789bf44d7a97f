//! Endpoints and the live set of them behind an upstream.
//!
//! An [`Endpoint`] carries what the balancer needs (in-flight requests, a peak-EWMA latency
//! estimate) and its circuit breaker. Connections are not its business: HTTP/1 idle
//! connections live in per-worker pools ([`crate::http1::pool`]), which only report their
//! count here for `/config`. (The one HTTP/2 connection per endpoint still hangs off it:
//! `h2`, shared by the workers through hyper's request channel.) The [`EndpointSet`] is
//! read by every request from an `ArcSwap` snapshot, so the hot path never takes a lock,
//! and it is replaced whole by one updater (static config today, the control plane's watch
//! tomorrow). A request holds an `Arc<Endpoint>`, so removing an endpoint never cuts a
//! request that is already using it.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::{
    http2,
    metrics::EndpointMetrics,
    resilience::outlier::{self, Breaker},
};

/// Latency assumed for an endpoint that has not answered yet (as Linkerd does).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast the peak-EWMA forgets: the weight of an old sample halves in about 7 s.
const DECAY: Duration = Duration::from_secs(10);

pub struct Endpoint {
    pub addr: SocketAddr,
    /// Its sidecar accepts mTLS: connections to it are made over the mesh's TLS when this
    /// sidecar has a certificate ([`crate::connect::open`]). Fixed for the endpoint's life.
    pub mtls: bool,
    in_flight: AtomicU32,
    ewma: Mutex<PeakEwma>,
    requests: AtomicU64,
    /// Idle HTTP/1 connections to this endpoint in the workers' pools.
    pub(crate) idle_http1: IdleCount,
    pub(crate) h2: http2::EndpointClient,
    pub(crate) metrics: EndpointMetrics,
    /// The endpoint's circuit breaker (outlier detection).
    pub(crate) breaker: Breaker,
    /// The control plane marks the instance behind it unhealthy (its health checks): it
    /// takes no traffic unless the upstream is in panic (see [`crate::upstream`]).
    control_unhealthy: AtomicBool,
    /// When the endpoint last made progress: a response head, an opened connection, a
    /// failure that was not a timeout, bytes of a TCP stream from it (ms on
    /// [`outlier::now_ms`]'s clock; 0: never). Read by the stall check
    /// ([`crate::resilience::stall`]) off the request path.
    progress_ms: AtomicU64,
    /// Since when bytes TCP streams sent it have had no bytes back (same clock; 0: none
    /// waiting). One for every stream to the endpoint: any bytes from it show it alive.
    unanswered_ms: AtomicU64,
    /// Set by the stall check while the endpoint is stalled, for `/config`.
    pub(crate) stalled: AtomicBool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Endpoint {
    pub(crate) fn new(addr: SocketAddr, mtls: bool, metrics: EndpointMetrics) -> Self {
        Endpoint {
            addr,
            mtls,
            in_flight: AtomicU32::new(0),
            ewma: Mutex::new(PeakEwma {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
            }),
            requests: AtomicU64::new(0),
            idle_http1: IdleCount::default(),
            h2: http2::EndpointClient::default(),
            metrics,
            breaker: Breaker::default(),
            control_unhealthy: AtomicBool::new(false),
            progress_ms: AtomicU64::new(0),
            unanswered_ms: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
        }
    }

    /// Whether the control plane marks the instance behind this endpoint unhealthy.
    pub fn control_unhealthy(&self) -> bool {
        self.control_unhealthy.load(Ordering::Relaxed)
    }

    /// Records the control plane's verdict; `true` when it changed.
    pub(crate) fn set_control_unhealthy(&self, unhealthy: bool) -> bool {
        self.control_unhealthy.swap(unhealthy, Ordering::Relaxed) != unhealthy
    }

    /// When the endpoint last made progress (ms on [`outlier::now_ms`]'s clock; 0: never).
    pub(crate) fn progress_ms(&self) -> u64 {
        self.progress_ms.load(Ordering::Relaxed)
    }

    /// Since when bytes TCP streams sent it have had no answer (same clock; 0: none).
    pub(crate) fn unanswered_ms(&self) -> u64 {
        self.unanswered_ms.load(Ordering::Relaxed)
    }

    /// The endpoint made progress at `ms`. At most one store, and none when the value is
    /// already there (several answers in the same millisecond, from several workers,
    /// leave the cache line shared).
    pub(crate) fn note_progress(&self, ms: u64) {
        if self.progress_ms.load(Ordering::Relaxed) != ms {
            self.progress_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// A TCP stream sent the endpoint bytes at `ms`: they wait for an answer, unless
    /// earlier ones already do.
    pub(crate) fn note_sent(&self, ms: u64) {
        if self.unanswered_ms.load(Ordering::Relaxed) == 0 {
            self.unanswered_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// A TCP stream received bytes from the endpoint at `ms`: progress, and nothing sent
    /// waits any more.
    pub(crate) fn note_received(&self, ms: u64) {
        if self.unanswered_ms.load(Ordering::Relaxed) != 0 {
            self.unanswered_ms.store(0, Ordering::Relaxed);
        }
        self.note_progress(ms);
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

    #[cfg(test)]
    pub(crate) fn observe(&self, rtt: Duration) {
        self.observe_at(Instant::now(), rtt);
    }

    fn observe_at(&self, now: Instant, rtt: Duration) {
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
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.started);
        self.endpoint.observe_at(now, rtt);
        self.endpoint.note_progress(outlier::ms_at(now));
        self.endpoint.metrics.response(status, rtt);
    }

    /// A connection to the endpoint opened (opaque TCP): feeds its latency estimate.
    pub fn connected(&self) {
        let now = Instant::now();
        self.endpoint
            .observe_at(now, now.saturating_duration_since(self.started));
        self.endpoint.note_progress(outlier::ms_at(now));
    }

    /// The endpoint failed before answering; failures count as slow so that P2C steers
    /// away from it (a fast failure must not look attractive). A failure other than a
    /// timeout (`504`) is the endpoint answering, badly: not a stall.
    pub fn failed(&self, status: u16) {
        let now = Instant::now();
        self.endpoint.observe_at(
            now,
            DEFAULT_RTT.max(now.saturating_duration_since(self.started)) * 4,
        );
        if status != 504 {
            self.endpoint.note_progress(outlier::ms_at(now));
        }
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

/// A count of idle connections kept elsewhere (the workers' pools), for `/config`.
#[derive(Debug, Default)]
pub(crate) struct IdleCount(AtomicUsize);

impl IdleCount {
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn forget(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
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
