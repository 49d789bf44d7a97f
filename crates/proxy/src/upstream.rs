//! An upstream: a named service, its live endpoints, its balancer and its resilience
//! policy in force (see [`crate::resilience`]).
//!
//! Two endpoint lists are kept, both swapped whole and read lock-free: every known
//! endpoint, and the *available* ones the balancer picks from, grouped into locality
//! levels with their traffic shares. The second is rebuilt only when something changes:
//! the endpoint set, a breaker opening or closing, or the policy.

use std::{
    collections::{BTreeMap, HashMap},
    net::{SocketAddr, ToSocketAddrs},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use arc_swap::{ArcSwap, Guard};
use malla_core::{
    policy::{Outcome, Policy},
    Labels, ServiceName,
};
use tokio::{sync::Notify, time::Instant};

use crate::{
    balance::Balancer,
    config::UpstreamConfig,
    endpoint::{Endpoint, EndpointSet, InFlight},
    error::ProxyError,
    metrics::{SharedMetrics, UpstreamMetrics},
    resilience::{
        budget::RetryBudget,
        events::{Event, EventKind, EventLog, Throttle},
        limits::{self, Limit},
        locality,
        outlier::{self, Admission, State, Verdict},
        PolicySource, Resilience,
    },
    tls::MeshTls,
};

/// What the balancer picks from.
#[derive(Debug, Default)]
struct Available {
    /// Endpoints that may take traffic, by locality level (best first, empty levels out).
    levels: Vec<Vec<Arc<Endpoint>>>,
    /// Cumulative traffic share of each level (the last is 1).
    cumulative: Vec<f64>,
    /// Too few endpoints available: every endpoint is in, ejected or not.
    panic: bool,
    /// Half-open endpoints: the next request goes to one of them as its probe, so that
    /// an ejection ends promptly whatever the balancer thinks of the endpoint's latency.
    probes: Vec<Arc<Endpoint>>,
}

pub struct Upstream {
    pub config: UpstreamConfig,
    endpoints: EndpointSet,
    available: ArcSwap<Available>,
    /// Labels of discovered endpoints (for locality levels).
    labels: Mutex<HashMap<SocketAddr, Labels>>,
    /// This sidecar's own labels (its locality).
    local: Labels,
    balancer: Balancer,
    resilience: ArcSwap<Resilience>,
    budget: RetryBudget,
    pub(crate) limits: Arc<limits::Counters>,
    events: Arc<EventLog>,
    limit_throttle: Throttle,
    budget_throttle: Throttle,
    rate_throttle: Throttle,
    /// Wakes the maintenance task (an ejection to time, a policy to follow).
    maintenance: Notify,
    metrics: SharedMetrics,
    pub(crate) upstream_metrics: UpstreamMetrics,
    /// Serialises updates and breaker transitions; readers never take it.
    update_lock: Mutex<()>,
    panic: AtomicBool,
    /// When a call through it last failed (ms on [`outlier::now_ms`]'s clock; 0: never),
    /// for the inbound edge's check of an application's relayed-failure claim.
    last_failure_ms: AtomicU64,
    /// The service its endpoints belong to, when its name (or `service`) is a valid one:
    /// the identity their sidecars must prove over mTLS.
    service: Option<ServiceName>,
    /// This sidecar's mesh TLS, for endpoints whose sidecar accepts mTLS
    /// ([`crate::connect::open`]); `None` without an identity.
    mesh_tls: Option<Arc<MeshTls>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.config.name)
            .finish()
    }
}

impl Upstream {
    /// Builds an upstream, resolving its configured endpoints once.
    pub(crate) fn new(
        config: UpstreamConfig,
        metrics: SharedMetrics,
        local: Labels,
        events: Arc<EventLog>,
    ) -> anyhow::Result<Self> {
        let addrs = resolve_all(&config.endpoints)?;
        let upstream = Upstream {
            balancer: Balancer::new(config.balancer),
            endpoints: EndpointSet::new(Vec::new()),
            available: ArcSwap::from_pointee(Available::default()),
            labels: Mutex::new(HashMap::new()),
            local,
            resilience: ArcSwap::new(Resilience::initial(&config)),
            budget: RetryBudget::default(),
            limits: Arc::new(limits::Counters::default()),
            events,
            limit_throttle: Throttle::default(),
            budget_throttle: Throttle::default(),
            rate_throttle: Throttle::default(),
            maintenance: Notify::new(),
            upstream_metrics: metrics.upstream(&config.name),
            metrics,
            update_lock: Mutex::new(()),
            panic: AtomicBool::new(false),
            last_failure_ms: AtomicU64::new(0),
            service: ServiceName::new(config.discovery_service()).ok(),
            mesh_tls: None,
            config,
        };
        upstream.set_endpoints(&addrs);
        Ok(upstream)
    }

    /// Calls its endpoints that accept mTLS with this sidecar's identity.
    pub(crate) fn with_mesh_tls(mut self, tls: Option<Arc<MeshTls>>) -> Self {
        self.mesh_tls = tls;
        self
    }

    pub(crate) fn mesh_tls(&self) -> Option<&MeshTls> {
        self.mesh_tls.as_deref()
    }

    /// The service whose identity its endpoints' sidecars prove.
    pub(crate) fn service(&self) -> Option<&ServiceName> {
        self.service.as_ref()
    }

    pub(crate) fn metrics(&self) -> &SharedMetrics {
        &self.metrics
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The policy in force, for one request.
    pub(crate) fn resilience(&self) -> Guard<Arc<Resilience>> {
        self.resilience.load()
    }

    /// The policy in force, held for a whole exchange.
    pub(crate) fn resilience_full(&self) -> Arc<Resilience> {
        self.resilience.load_full()
    }

    /// Puts a control-plane policy in force (`version`: its store revision), or with
    /// `None` returns to the local `[upstream.policy]` / defaults. Connections, ejections,
    /// budgets and limits carry over.
    pub fn set_policy(&self, policy: Option<(Policy, u64)>) {
        let version = policy.as_ref().map_or(0, |(_, v)| *v);
        self.upstream_metrics
            .policy_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        let next = match policy {
            Some((policy, version)) => {
                Resilience::compile(policy, PolicySource::ControlPlane { version }, &self.config)
            }
            None => Resilience::initial(&self.config),
        };
        tracing::info!(upstream = self.name(), source = ?next.source, "resilience policy in force");
        self.resilience.store(next);
        let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.resilience().policy.outlier.enabled {
            for e in self.endpoints.snapshot().iter() {
                e.breaker.close();
            }
        }
        self.rebuild();
        self.maintenance.notify_one();
    }

    /// Replaces the endpoint set (static endpoints: no labels).
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let labeled: Vec<_> = addrs.iter().map(|a| (*a, Labels::new())).collect();
        self.set_labeled_endpoints(&labeled);
    }

    /// Replaces the endpoint set, every endpoint healthy as far as the control plane goes.
    pub fn set_labeled_endpoints(&self, endpoints: &[(SocketAddr, Labels)]) {
        let discovered: Vec<_> = endpoints
            .iter()
            .map(|(addr, labels)| DiscoveredEndpoint {
                addr: *addr,
                labels: labels.clone(),
                unhealthy: false,
                mtls: false,
            })
            .collect();
        self.set_discovered_endpoints(&discovered);
    }

    /// Replaces the endpoint set. Endpoints present before and after keep their state
    /// (load estimate, pooled connections, breaker); removed ones finish the requests they
    /// carry. Endpoints the control plane marks unhealthy stay in the set, flagged: they
    /// take no traffic unless too few endpoints are available (see [`Self::rebuild`]).
    ///
    /// A newcomer's latency estimate starts at the average of the endpoints already there,
    /// not at the 30 ms default: next to endpoints that answer in a millisecond, the default
    /// would keep it out of P2C's choices until their estimates had decayed (tens of
    /// seconds), and a new instance must take traffic within a second of registering. A
    /// slow newcomer gives itself away on its first answer (a peak replaces the estimate).
    pub fn set_discovered_endpoints(&self, endpoints: &[DiscoveredEndpoint]) {
        let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.endpoints.snapshot();
        let seed = (!current.is_empty()).then(|| {
            current.iter().map(|e| e.rtt_estimate_ns()).sum::<f64>() / current.len() as f64
        });
        let mut existing: HashMap<SocketAddr, &Arc<Endpoint>> =
            current.iter().map(|e| (e.addr, e)).collect();
        let mut next = Vec::with_capacity(endpoints.len());
        let mut labels = HashMap::with_capacity(endpoints.len());
        for d in endpoints {
            if labels.insert(d.addr, d.labels.clone()).is_some() {
                continue; // a duplicate in the input
            }
            // An address whose sidecar starts or stops accepting mTLS is a new endpoint:
            // its pooled connections were made the other way.
            let endpoint = match existing.remove(&d.addr).filter(|e| e.mtls == d.mtls) {
                Some(e) => e.clone(),
                None => {
                    let endpoint = Arc::new(Endpoint::new(
                        d.addr,
                        d.mtls,
                        self.metrics
                            .endpoint(&self.config.name, &d.addr.to_string()),
                    ));
                    if let Some(seed) = seed {
                        endpoint.seed_rtt_estimate(seed);
                    }
                    endpoint
                }
            };
            endpoint.set_control_unhealthy(d.unhealthy);
            next.push(endpoint);
        }
        for gone in existing.keys() {
            self.metrics
                .forget_endpoint(&self.config.name, &gone.to_string());
        }
        self.upstream_metrics.endpoints.set(next.len() as i64);
        self.upstream_metrics
            .endpoints_unhealthy
            .set(next.iter().filter(|e| e.control_unhealthy()).count() as i64);
        *self.labels.lock().unwrap_or_else(|e| e.into_inner()) = labels;
        self.endpoints.store(next);
        self.rebuild();
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.snapshot()
    }

    /// Rebuilds the available set from the endpoints, their breakers, the control plane's
    /// health and labels, and the policy. Called with `update_lock` held.
    ///
    /// An endpoint is unavailable when its breaker ejected it or the control plane marks
    /// it unhealthy. When fewer than the policy's `panic_threshold` share of all endpoints
    /// is available, counting both reasons, the upstream is in panic and balances over
    /// every endpoint, as Envoy does: a service most of whose instances look bad is more
    /// likely judged wrongly (a wrong health-check path, a shared dependency down) than
    /// sick instance by instance. The threshold holds whether outlier detection is on or
    /// not (Envoy's is a load-balancer setting, not an outlier one), and registry health
    /// alone never empties an upstream: when no endpoint is available and the control
    /// plane marks any unhealthy, the upstream is in panic whatever the threshold.
    fn rebuild(&self) {
        let all = self.endpoints.snapshot();
        let resilience = self.resilience();
        let policy = &resilience.policy;
        let counts = Counts::of(&all);
        let panic = counts.panic(policy.outlier.panic_threshold.fraction());
        self.upstream_metrics.panic.set(i64::from(panic));
        if panic != self.panic.swap(panic, Ordering::Relaxed) {
            let (kind, detail) = if panic {
                (
                    EventKind::PanicEntered,
                    format!(
                        "{}, below the panic threshold of {}%: balancing over all",
                        counts.describe(),
                        policy.outlier.panic_threshold.value()
                    ),
                )
            } else {
                (EventKind::PanicLeft, counts.describe())
            };
            self.event(Event::new(self.name(), kind, detail));
        }
        let labels = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        let empty = Labels::new();
        let mut next_probes = Vec::new();
        // Level -> (all endpoints of the level, those available).
        let mut levels: BTreeMap<usize, (usize, Vec<Arc<Endpoint>>)> = BTreeMap::new();
        for e in all.iter() {
            let l = labels.get(&e.addr).unwrap_or(&empty);
            let level = locality::level(&self.local, l, &policy.failover);
            if e.breaker.state() == State::HalfOpen && (panic || !e.control_unhealthy()) {
                next_probes.push(e.clone());
            }
            let entry = levels.entry(level).or_default();
            entry.0 += 1;
            if panic || available(e) {
                entry.1.push(e.clone());
            }
        }
        let totals: Vec<usize> = levels.values().map(|(n, _)| *n).collect();
        let counts: Vec<usize> = levels.values().map(|(_, a)| a.len()).collect();
        let shares = locality::shares(&counts, &totals, policy.failover.overprovisioning_factor);
        let mut next = Available {
            panic,
            probes: next_probes,
            ..Available::default()
        };
        let mut cumulative = 0.0;
        // Levels without a share stay listed (never drawn: their cumulative share equals
        // the level's before them) so that a retry that tried every endpoint of the local
        // level can still fall over to them.
        for ((_, (_, endpoints)), share) in levels.into_iter().zip(shares) {
            if !endpoints.is_empty() {
                cumulative += share;
                next.levels.push(endpoints);
                next.cumulative.push(cumulative);
            }
        }
        // No rounding gap at the top: the first level that completes the sum ends at 1.
        for c in &mut next.cumulative {
            if *c >= cumulative - 1e-9 {
                *c = 1.0;
            }
        }
        self.available.store(Arc::new(next));
    }

    /// Chooses the endpoint for one attempt, avoiding `exclude` (the endpoint that just
    /// failed) when there is another. See [`Self::pick_avoiding`].
    #[cfg(test)]
    pub(crate) fn pick(&self, exclude: Option<&Endpoint>) -> Result<InFlight, ProxyError> {
        self.pick_avoiding(|e| exclude.is_some_and(|x| std::ptr::eq(x, e)))
    }

    /// Chooses the endpoint for one attempt, avoiding the `excluded` ones (those a retried
    /// request already tried) when there is another. Half-open endpoints take one probe
    /// at a time, and the next request goes to one; ejected endpoints take none, unless
    /// the upstream is in panic.
    pub(crate) fn pick_avoiding(
        &self,
        excluded: impl Fn(&Endpoint) -> bool,
    ) -> Result<InFlight, ProxyError> {
        let available = self.available.load();
        let level = match available.levels.len() {
            0 => {
                let endpoints = self.endpoints.snapshot().len();
                return Err(if endpoints == 0 {
                    ProxyError::NoEndpoints {
                        upstream: self.config.name.clone(),
                    }
                } else {
                    ProxyError::AllEjected {
                        upstream: self.config.name.clone(),
                        endpoints,
                    }
                });
            }
            1 => 0,
            _ => {
                let draw = fastrand::f64();
                available
                    .cumulative
                    .iter()
                    .position(|c| draw < *c)
                    .unwrap_or(0)
            }
        };
        for e in &available.probes {
            if !excluded(e) && e.breaker.admit() == Admission::Probe {
                return Ok(e.start(true));
            }
        }
        let candidates = &available.levels[level];
        for _ in 0..4 {
            let Some(e) = self.balancer.pick(candidates) else {
                break;
            };
            if excluded(e) && candidates.len() > 1 {
                continue;
            }
            if let Some(claim) = self.claim(e, available.panic) {
                return Ok(claim);
            }
        }
        // Unlucky draws (a busy probe, the excluded endpoint): scan every level in order.
        let all = available.levels.iter().flatten();
        for pass_excluded in [false, true] {
            for e in all.clone() {
                if excluded(e) != pass_excluded {
                    continue;
                }
                if let Some(claim) = self.claim(e, available.panic) {
                    return Ok(claim);
                }
            }
        }
        Err(ProxyError::NoEndpoints {
            upstream: self.config.name.clone(),
        })
    }

    fn claim(&self, e: &Arc<Endpoint>, panic: bool) -> Option<InFlight> {
        match e.breaker.admit() {
            Admission::Yes => Some(e.start(false)),
            Admission::Probe => Some(e.start(true)),
            Admission::No if panic => Some(e.start(false)),
            Admission::No => None,
        }
    }

    /// Feeds the outlier detector with one attempt's outcome. A `relayed` failure (the
    /// endpoint relayed an error from further upstream, `malla-relayed-failure`) is not
    /// the endpoint's doing and counts neither way.
    pub(crate) fn record(&self, in_flight: &InFlight, outcome: Outcome, relayed: bool) {
        if !outcome.is_success() {
            self.note_failure();
        }
        if relayed {
            return;
        }
        let resilience = self.resilience();
        let policy = &resilience.policy.outlier;
        if !policy.enabled {
            return;
        }
        let endpoint = in_flight.endpoint();
        match endpoint
            .breaker
            .record(outcome, policy, || in_flight.elapsed())
        {
            Verdict::Nothing => {}
            Verdict::Eject { failures } => self.eject(
                endpoint,
                &format!(
                    "{failures} consecutive failures (last: {})",
                    describe(outcome)
                ),
            ),
            Verdict::Reopen => self.eject(
                endpoint,
                &format!("half-open probe failed ({})", describe(outcome)),
            ),
            Verdict::Close => {
                let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
                if endpoint.breaker.state() == State::HalfOpen {
                    endpoint.breaker.close();
                    self.upstream_metrics.breaker(EventKind::Closed);
                    self.event(
                        Event::new(self.name(), EventKind::Closed, "half-open probe succeeded")
                            .endpoint(endpoint.addr),
                    );
                    self.rebuild();
                }
            }
        }
    }

    /// Opens an endpoint's breaker, unless the max-ejection share forbids it; in audit
    /// mode only reports it.
    fn eject(&self, endpoint: &Arc<Endpoint>, reason: &str) {
        let resilience = self.resilience();
        let policy = &resilience.policy.outlier;
        let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
        if endpoint.breaker.state() == State::Ejected {
            return;
        }
        if !policy.mode.enforces() {
            endpoint.breaker.forget_failures();
            self.upstream_metrics.breaker_audit();
            self.event(
                Event::new(
                    self.name(),
                    EventKind::Ejected,
                    format!("would eject: {reason}"),
                )
                .endpoint(endpoint.addr)
                .audit(true),
            );
            return;
        }
        let all = self.endpoints.snapshot();
        let ejected = all
            .iter()
            .filter(|e| e.breaker.state() == State::Ejected)
            .count();
        let max = outlier::max_ejected(all.len(), policy);
        if ejected >= max {
            endpoint.breaker.forget_failures();
            self.upstream_metrics.breaker(EventKind::EjectionSkipped);
            self.event(
                Event::new(
                    self.name(),
                    EventKind::EjectionSkipped,
                    format!(
                        "{reason}; {ejected} of {} endpoints already ejected (max_ejection_percent {}%)",
                        all.len(),
                        policy.max_ejection_percent.value()
                    ),
                )
                .endpoint(endpoint.addr),
            );
            return;
        }
        let time = endpoint.breaker.eject(policy, outlier::now_ms());
        self.upstream_metrics.breaker(EventKind::Ejected);
        self.event(
            Event::new(
                self.name(),
                EventKind::Ejected,
                format!("{reason}; ejected for {}", humantime::format_duration(time)),
            )
            .endpoint(endpoint.addr),
        );
        self.rebuild();
        self.maintenance.notify_one();
    }

    /// Runs the timed side of outlier detection until the proxy stops: ends ejections
    /// (half-open), and every `interval` compares success rates and latencies.
    pub(crate) async fn maintain(self: Arc<Self>) {
        let mut next_interval = Instant::now() + self.resilience().policy.outlier.interval;
        loop {
            let now_ms = outlier::now_ms();
            let next_expiry = self
                .endpoints
                .snapshot()
                .iter()
                .filter_map(|e| e.breaker.ejected_until())
                .min()
                .map(|until| Instant::now() + Duration::from_millis(until.saturating_sub(now_ms)));
            let wake = next_expiry.map_or(next_interval, |e| e.min(next_interval));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.maintenance.notified() => continue,
            }
            self.end_ejections();
            if Instant::now() >= next_interval {
                self.compare_endpoints();
                next_interval = Instant::now() + self.resilience().policy.outlier.interval;
            }
        }
    }

    /// Ejections whose time is up become half-open.
    fn end_ejections(&self) {
        let now_ms = outlier::now_ms();
        let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for e in self.endpoints.snapshot().iter() {
            if e.breaker
                .ejected_until()
                .is_some_and(|until| until <= now_ms)
            {
                e.breaker.half_open();
                changed = true;
                self.upstream_metrics.breaker(EventKind::HalfOpen);
                self.event(
                    Event::new(
                        self.name(),
                        EventKind::HalfOpen,
                        "ejection time over: next request is a probe",
                    )
                    .endpoint(e.addr),
                );
            }
        }
        if changed {
            self.rebuild();
        }
    }

    /// The success-rate and latency detectors, over the interval that just ended.
    fn compare_endpoints(&self) {
        let resilience = self.resilience();
        let policy = &resilience.policy.outlier;
        let endpoints = self.endpoints.snapshot();
        let stats: Vec<_> = endpoints
            .iter()
            .map(|e| e.breaker.take_interval())
            .collect();
        if !policy.enabled {
            return;
        }
        let outliers = outlier::success_rate_outliers(&stats, policy)
            .into_iter()
            .chain(outlier::latency_outliers(&stats, policy));
        for (i, reason) in outliers {
            if endpoints[i].breaker.state() == State::Closed {
                self.eject(&endpoints[i], &reason);
            }
        }
    }

    /// Counts one original request against the retry budget.
    pub(crate) fn deposit(&self, resilience: &Resilience) {
        self.budget
            .deposit(outlier::now_ms(), resilience.policy.retries.budget_window);
    }

    /// Takes a retry from the budget; reports when it is spent.
    pub(crate) fn withdraw_retry(&self, resilience: &Resilience) -> bool {
        let policy = &resilience.policy.retries;
        if self.budget.try_withdraw(outlier::now_ms(), policy) {
            self.upstream_metrics.retry();
            return true;
        }
        self.upstream_metrics.retry_budget_exhausted();
        self.throttled_event(
            &self.budget_throttle,
            EventKind::RetryBudgetExhausted,
            false,
            || {
                format!(
                    "retries are at {}% of requests plus {}/s",
                    policy.budget_ratio * 100.0,
                    policy.budget_min_per_second
                )
            },
        );
        false
    }

    /// Takes a unit of a service limit; `Err` when the limit rejects the call.
    pub(crate) fn acquire(
        &self,
        limit: Limit,
        resilience: &Resilience,
    ) -> Result<Option<limits::Slot>, ProxyError> {
        let policy = &resilience.policy.limits;
        let (slot, hit) = self.limits.acquire(limit, policy);
        if let Some(hit) = hit {
            let audit = !policy.mode.enforces();
            self.upstream_metrics.limit_hit(limit.as_str(), audit);
            self.throttled_event(&self.limit_throttle, EventKind::LimitHit, audit, || {
                format!("{} {} reached", hit.limit.as_str(), hit.max)
            });
            if !audit {
                return Err(ProxyError::LimitReached {
                    upstream: self.config.name.clone(),
                    limit: hit.limit.as_str(),
                    max: hit.max,
                });
            }
        }
        Ok(slot)
    }

    /// The checks before any endpoint is involved, for a request to `path`: fault
    /// injection (an abort is an `Err`; a delay comes back for the caller to wait, against
    /// the request's deadline, see [`crate::call::Call::admit`]) and the rate limits. A
    /// TCP connection (no `path`) meets the rate limits that name no path and no faults,
    /// which are HTTP responses. Free when the policy has neither.
    pub(crate) fn admit(
        &self,
        resilience: &Resilience,
        path: Option<&[u8]>,
    ) -> Result<Option<Duration>, ProxyError> {
        if resilience.faults.is_empty() && resilience.rate_limits.is_empty() {
            return Ok(None);
        }
        let injected = path
            .map(|path| crate::resilience::fault::draw(&resilience.faults, path))
            .unwrap_or_default();
        if let Some(status) = injected.abort {
            self.upstream_metrics.fault("abort");
            return Err(ProxyError::FaultAbort { status });
        }
        self.rate_limit(resilience, path)?;
        if injected.delay.is_some() {
            self.upstream_metrics.fault("delay");
        }
        Ok(injected.delay)
    }

    /// The local rate limits; `Err` (429) when one rejects the request.
    fn rate_limit(&self, resilience: &Resilience, path: Option<&[u8]>) -> Result<(), ProxyError> {
        let now = Instant::now();
        let applies = |l: &&crate::resilience::rate::RateLimiter| match path {
            Some(path) => l.applies_to(path),
            None => l.path_prefix.is_none(),
        };
        for limiter in resilience.rate_limits.iter().filter(applies) {
            if let Err(wait) = limiter.try_acquire(now) {
                let audit = !limiter.mode.enforces();
                self.upstream_metrics.rate_limited(audit);
                self.throttled_event(&self.rate_throttle, EventKind::RateLimited, audit, || {
                    format!(
                        "over {} requests per second{}",
                        limiter.rate(),
                        limiter
                            .path_prefix
                            .as_deref()
                            .map(|p| format!(" on {p}"))
                            .unwrap_or_default()
                    )
                });
                if !audit {
                    return Err(ProxyError::RateLimited {
                        upstream: self.config.name.clone(),
                        retry_after: wait,
                    });
                }
            }
        }
        Ok(())
    }

    fn event(&self, event: Event) {
        self.events.record(event);
    }

    /// An event of a kind that can fire on every request: at most one per second, standing
    /// for the occurrences held back (`detail` is only written when one goes out).
    fn throttled_event(
        &self,
        throttle: &Throttle,
        kind: EventKind,
        audit: bool,
        detail: impl FnOnce() -> String,
    ) {
        if let Some(count) = throttle.admit() {
            let mut event = Event::new(self.name(), kind, detail()).audit(audit);
            event.count = count;
            self.event(event);
        }
    }

    /// Counts a response the proxy made itself.
    pub(crate) fn error(&self, err: &ProxyError) {
        if err.is_upstream_failure() {
            self.note_failure();
        }
        self.upstream_metrics.error(err.cause());
    }

    fn note_failure(&self) {
        self.last_failure_ms
            .store(outlier::now_ms().max(1), Ordering::Relaxed);
    }

    /// Whether a call through this upstream failed within `window`.
    pub(crate) fn failed_within(&self, window: Duration) -> bool {
        let last = self.last_failure_ms.load(Ordering::Relaxed);
        last != 0 && outlier::now_ms().saturating_sub(last) <= window.as_millis() as u64
    }

    /// The live state, for `/config`.
    pub fn state(&self) -> serde_json::Value {
        let available = self.available.load();
        let endpoints: Vec<_> = self
            .endpoints()
            .iter()
            .map(|e| {
                let level = available
                    .levels
                    .iter()
                    .position(|l| l.iter().any(|x| Arc::ptr_eq(x, e)));
                serde_json::json!({
                    "address": e.addr.to_string(),
                    "breaker": e.breaker.state().as_str(),
                    "control_plane_health": if e.control_unhealthy() { "unhealthy" } else { "serving" },
                    "stalled": e.stalled.load(Ordering::Relaxed),
                    "level": level,
                    "in_flight": e.in_flight(),
                    "requests": e.requests(),
                    "latency_estimate_ms": e.rtt_estimate_ns() / 1e6,
                    "idle_http1_connections": e.idle_http1.count(),
                })
            })
            .collect();
        let resilience = self.resilience();
        let counts = Counts::of(&self.endpoints());
        serde_json::json!({
            "name": self.config.name,
            "balancer": self.balancer.kind().to_string(),
            "config": self.config,
            "policy": {
                "source": resilience.source,
                "spec": resilience.policy,
            },
            "panic": available.panic,
            "endpoints_available": counts.available,
            "endpoints_unhealthy": counts.unhealthy,
            "endpoints_ejected": counts.ejected,
            "level_shares": available.cumulative,
            "limits_held": self.limits.snapshot(),
            "endpoints": endpoints,
        })
    }
}

/// Whether an endpoint may take traffic outside panic: its breaker did not eject it and
/// the control plane does not mark it unhealthy.
fn available(e: &Endpoint) -> bool {
    e.breaker.state() != State::Ejected && !e.control_unhealthy()
}

/// An endpoint as discovery gives it to [`Upstream::set_discovered_endpoints`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredEndpoint {
    pub addr: SocketAddr,
    /// For locality levels.
    pub labels: Labels,
    /// The control plane marks the instance unhealthy (its health checks).
    pub unhealthy: bool,
    /// The instance's sidecar accepts mTLS (it registered with a certificate).
    pub mtls: bool,
}

/// Why the endpoints of an upstream are unavailable, for the panic decision and its
/// events. An endpoint both ejected and marked unhealthy counts in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    total: usize,
    available: usize,
    /// Marked unhealthy by the control plane.
    unhealthy: usize,
    /// Ejected by this sidecar's breakers.
    ejected: usize,
}

impl Counts {
    fn of(all: &[Arc<Endpoint>]) -> Self {
        let mut c = Counts {
            total: all.len(),
            ..Counts::default()
        };
        for e in all {
            c.available += usize::from(available(e));
            c.unhealthy += usize::from(e.control_unhealthy());
            c.ejected += usize::from(e.breaker.state() == State::Ejected);
        }
        c
    }

    /// Too few available endpoints (below `threshold`, a fraction of all of them), or none
    /// at all only because of the control plane's health (see [`Upstream::rebuild`]).
    fn panic(&self, threshold: f64) -> bool {
        self.total > 0
            && ((self.available as f64) < threshold * self.total as f64
                || (self.available == 0 && self.unhealthy > 0))
    }

    fn describe(&self) -> String {
        format!(
            "{} of {} endpoints available ({} unhealthy per the control plane, {} ejected)",
            self.available, self.total, self.unhealthy, self.ejected
        )
    }
}

fn describe(outcome: Outcome) -> String {
    match outcome {
        Outcome::ConnectFailure => "connect failure".into(),
        Outcome::Reset => "reset".into(),
        Outcome::Timeout => "timeout".into(),
        Outcome::Status(s) => format!("status {s}"),
        Outcome::Grpc(code) => format!(
            "grpc-status {code} {}",
            malla_core::policy::condition::grpc_code_name(code)
        ),
    }
}

/// Resolves `HOST:PORT` strings; every address of a name becomes an endpoint.
pub fn resolve_all(specs: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for spec in specs {
        let addrs = spec
            .to_socket_addrs()
            .map_err(|e| anyhow::anyhow!("cannot resolve endpoint {spec:?}: {e}"))?;
        out.extend(addrs);
    }
    Ok(out)
}

mod stalls;
#[cfg(test)]
mod tests;
