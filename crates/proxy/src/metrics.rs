//! Prometheus metrics for the data plane.
//!
//! One registry per proxy (no globals). The hot path never looks a label set up: each
//! endpoint and listener resolves its metric handles once, when it is created, and a
//! request then costs a few atomic adds and one histogram observation.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{
        counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, MetricType,
        TypedMetric,
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub upstream: String,
    pub endpoint: String,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub upstream: String,
    pub endpoint: String,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub upstream: String,
    pub cause: String,
}

/// A resilience action: a breaker transition, a limit or rate limit hit, a fault.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub upstream: String,
    pub action: String,
    /// `enforce`, or `audit` when the policy only reports.
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
    pub protocol: String,
}

/// Latency buckets in seconds: 0.5 ms to ~16 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16)
}

/// All metric families of one proxy.
pub struct Metrics {
    registry: Mutex<Registry>,
    responses: Family<ResponseLabels, Counter>,
    latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    upstream_connections: Family<EndpointLabels, Gauge>,
    endpoints: Family<UpstreamLabels, Gauge>,
    endpoints_unhealthy: Family<UpstreamLabels, Gauge>,
    endpoints_stalled: Family<UpstreamLabels, Gauge>,
    panic: Family<UpstreamLabels, Gauge>,
    errors: Family<ErrorLabels, Counter>,
    retries: Family<UpstreamLabels, Counter>,
    retry_budget_exhausted: Family<UpstreamLabels, Counter>,
    breaker: Family<ActionLabels, Counter>,
    limits: Family<ActionLabels, Counter>,
    faults: Family<ActionLabels, Counter>,
    policy_version: Family<UpstreamLabels, Gauge>,
    policy_rejected: Family<UpstreamLabels, Counter>,
    policy_unknown_fields: Family<UpstreamLabels, Counter>,
    listener_connections: Family<ListenerLabels, Gauge>,
    listener_accepted: Family<ListenerLabels, Counter>,
    untrusted_relayed: Counter,
    /// Registered on first use: a proxy without a control plane does not show them.
    control: ControlFamilies,
    control_registered: std::sync::Once,
}

/// The control-plane client's families (see [`crate::discovery`]).
#[derive(Clone, Default)]
struct ControlFamilies {
    connected: Family<UpstreamLabels, Gauge>,
    revision: Family<UpstreamLabels, Gauge>,
    last_update_age: Family<UpstreamLabels, UpdateAge>,
    reconnects: Family<UpstreamLabels, Counter>,
    registered: Gauge,
    registrations: Counter,
    certificate_expiry: Gauge,
    certificate_requests: Family<CertificateRequestLabels, Counter>,
    inbound_connections: Family<SecurityLabels, Counter>,
    outbound_connections: Family<SecurityLabels, Counter>,
    authz_decisions: Family<AuthzDecisionLabels, Counter>,
}

/// One inbound authorization decision (see [`crate::authz`], which bounds `source`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzDecisionLabels {
    /// `allow`, `deny`, or `audit_deny` (would deny; let through by a policy in audit mode).
    pub decision: &'static str,
    /// The caller's SPIFFE ID, `unauthenticated` (plaintext), or `other`.
    pub source: String,
    /// `http1`, `http2`, `grpc` or `tcp`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecurityLabels {
    /// `mtls` (a handshake that proved a peer), `handshake-failed`; inbound: `plaintext`
    /// (accepted, permissive), `plaintext-refused` (strict); outbound (to endpoints whose
    /// sidecar accepts mTLS): `plaintext-no-identity` (this sidecar has no certificate
    /// yet).
    pub security: &'static str,
    /// The negotiated key exchange group of an mTLS connection (`X25519MLKEM768`...), or
    /// empty.
    pub group: String,
    /// The protocol agreed by ALPN on an mTLS connection (`malla/1`, `h2`, `http/1.1`), or
    /// empty.
    pub alpn: String,
    /// Why a handshake failed (`handshake-failed`): one of [`crate::tls::FAILURE_REASONS`];
    /// empty otherwise.
    pub reason: &'static str,
}

impl SecurityLabels {
    /// A connection with no handshake to describe (plaintext, refused or not).
    pub fn plain(security: &'static str) -> Self {
        SecurityLabels {
            security,
            group: String::new(),
            alpn: String::new(),
            reason: "",
        }
    }

    /// A failed handshake, and why.
    pub fn failed(reason: &'static str) -> Self {
        SecurityLabels {
            reason,
            ..SecurityLabels::plain("handshake-failed")
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateRequestLabels {
    /// `first` (with the join token) or `renewal`.
    pub kind: &'static str,
    /// `ok`, `refused` (the CA said no), `unavailable`, `invalid-answer`.
    pub result: &'static str,
}

impl ControlFamilies {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "control_connected",
            "1 while the watch of a discovered upstream's instances is connected to the control plane",
            self.connected.clone(),
        );
        registry.register(
            "control_revision",
            "Registry revision of the last update applied to a discovered upstream",
            self.revision.clone(),
        );
        registry.register(
            "control_last_update_age_seconds",
            "Seconds since a discovered upstream last heard from the control plane (snapshot or update)",
            self.last_update_age.clone(),
        );
        registry.register(
            "control_reconnects",
            "Times a discovered upstream's watch was re-established after it broke",
            self.reconnects.clone(),
        );
        registry.register(
            "control_registered",
            "1 while this proxy's instance holds a live lease in the registry",
            self.registered.clone(),
        );
        registry.register(
            "control_registrations",
            "Registrations of this proxy's instance (the first, and each after a lost lease)",
            self.registrations.clone(),
        );
        registry.register(
            "identity_certificate_expiry_timestamp_seconds",
            "Unix time at which this sidecar's current certificate expires (0: none yet)",
            self.certificate_expiry.clone(),
        );
        registry.register(
            "identity_certificate_requests",
            "Certificate requests to the control plane's CA, by kind (first, renewal) and result",
            self.certificate_requests.clone(),
        );
        registry.register(
            "inbound_connections_by_security",
            "Inbound connections by how they were secured: mtls (with its key exchange group and ALPN protocol), handshake-failed (with the reason), plaintext (permissive) or plaintext-refused (strict)",
            self.inbound_connections.clone(),
        );
        registry.register(
            "inbound_authz_decisions",
            "Decisions of this sidecar's authorization policy on inbound calls (while one is in force), by decision (allow, deny, audit_deny), caller (SPIFFE ID or unauthenticated) and protocol",
            self.authz_decisions.clone(),
        );
        registry.register(
            "outbound_connections_by_security",
            "Connections to endpoints whose sidecar accepts mTLS by how they were secured: mtls (with its key exchange group and ALPN protocol), handshake-failed (with the reason), or plaintext-no-identity (this sidecar has no certificate)",
            self.outbound_connections.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("malla_proxy");
        let responses = Family::<ResponseLabels, Counter>::default();
        registry.register(
            "responses",
            "Responses by upstream, endpoint and status class (proxy-generated errors included)",
            responses.clone(),
        );
        let latency: Family<EndpointLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "response_latency_seconds",
            "Time from the request's arrival to the upstream's response head",
            latency.clone(),
        );
        let upstream_connections = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "upstream_open_connections",
            "Open connections to each endpoint",
            upstream_connections.clone(),
        );
        let endpoints = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_endpoints",
            "Endpoints currently known for each upstream",
            endpoints.clone(),
        );
        let endpoints_unhealthy = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_endpoints_unhealthy",
            "Endpoints of each upstream the control plane marks unhealthy (its health checks); they take no traffic unless the upstream is in panic",
            endpoints_unhealthy.clone(),
        );
        let endpoints_stalled = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_endpoints_stalled",
            "Endpoints of each upstream with calls waiting and no progress (no response head, no bytes) for longer than the stall threshold (see docs/resilience.md)",
            endpoints_stalled.clone(),
        );
        let panic = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_panic",
            "1 while too few of an upstream's endpoints are available (ejected or unhealthy per the control plane) and it balances over all of them",
            panic.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "errors",
            "Requests the proxy answered itself, by cause (see docs/proxy.md)",
            errors.clone(),
        );
        let retries = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "retries",
            "Retries sent (each attempt after the first)",
            retries.clone(),
        );
        let retry_budget_exhausted = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries that were due but not sent because the retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        let breaker = Family::<ActionLabels, Counter>::default();
        registry.register(
            "breaker_transitions",
            "Endpoint circuit breaker transitions (ejected, half-open, closed, ejection-skipped); mode=audit counts ejections a policy in audit mode would have made",
            breaker.clone(),
        );
        let limits = Family::<ActionLabels, Counter>::default();
        registry.register(
            "limit_hits",
            "Requests over a service limit or rate limit (action = max_connections, max_pending_requests, max_requests, max_retries, rate-limit); mode=audit: counted, not rejected",
            limits.clone(),
        );
        let faults = Family::<ActionLabels, Counter>::default();
        registry.register(
            "faults_injected",
            "Faults injected by policy (action = delay or abort)",
            faults.clone(),
        );
        let policy_version = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "policy_version",
            "Version (control-plane store revision) of the resilience policy in force; 0: the local policy or the defaults",
            policy_version.clone(),
        );
        let policy_rejected = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "policy_rejected",
            "Control-plane policies this sidecar refused as invalid (the one in force stayed)",
            policy_rejected.clone(),
        );
        let policy_unknown_fields = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "policy_unknown_fields",
            "Fields of control-plane policies this sidecar does not know (a newer control plane) and ignored, applying the rest; counted once per policy version",
            policy_unknown_fields.clone(),
        );
        let listener_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "Open client connections per listener and detected protocol",
            listener_connections.clone(),
        );
        let listener_accepted = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "accepted_connections",
            "Client connections accepted per listener and detected protocol",
            listener_accepted.clone(),
        );
        let untrusted_relayed = Counter::default();
        registry.register(
            "inbound_untrusted_relayed_failure",
            "malla-relayed-failure marks the local application set that no recent failure of this sidecar's upstreams bore out; removed before the response left",
            untrusted_relayed.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            untrusted_relayed,
            responses,
            latency,
            upstream_connections,
            endpoints,
            endpoints_unhealthy,
            endpoints_stalled,
            panic,
            errors,
            retries,
            retry_budget_exhausted,
            breaker,
            limits,
            faults,
            policy_version,
            policy_rejected,
            policy_unknown_fields,
            listener_connections,
            listener_accepted,
            control: ControlFamilies::default(),
            control_registered: std::sync::Once::new(),
        }
    }

    fn control(&self) -> &ControlFamilies {
        self.control_registered.call_once(|| {
            let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            self.control.register(&mut registry);
        });
        &self.control
    }

    /// The handles of one discovered upstream's watch.
    pub(crate) fn discovery(&self, upstream: &str) -> DiscoveryMetrics {
        let labels = UpstreamLabels {
            upstream: upstream.to_string(),
        };
        let control = self.control();
        DiscoveryMetrics {
            connected: control.connected.get_or_create(&labels).clone(),
            revision: control.revision.get_or_create(&labels).clone(),
            last_update: control.last_update_age.get_or_create(&labels).clone(),
            reconnects: control.reconnects.get_or_create(&labels).clone(),
        }
    }

    /// Counts an inbound connection by how it was secured.
    pub(crate) fn inbound_security(&self, labels: SecurityLabels) {
        self.control()
            .inbound_connections
            .get_or_create(&labels)
            .inc();
    }

    /// Counts a connection to an endpoint whose sidecar accepts mTLS by how it was secured.
    pub(crate) fn outbound_security(&self, labels: SecurityLabels) {
        self.control()
            .outbound_connections
            .get_or_create(&labels)
            .inc();
    }

    /// The family of inbound authorization decisions ([`crate::authz`] keeps the handles).
    pub(crate) fn authz_decisions(&self) -> Family<AuthzDecisionLabels, Counter> {
        self.control().authz_decisions.clone()
    }

    /// The handles of this sidecar's certificate requests.
    pub(crate) fn identity(&self) -> IdentityMetrics {
        let control = self.control();
        IdentityMetrics {
            expiry: control.certificate_expiry.clone(),
            requests: control.certificate_requests.clone(),
        }
    }

    /// The handles of this proxy's registration.
    pub(crate) fn registration(&self) -> RegistrationMetrics {
        let control = self.control();
        RegistrationMetrics {
            registered: control.registered.clone(),
            registrations: control.registrations.clone(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    pub(crate) fn endpoint(&self, upstream: &str, endpoint: &str) -> EndpointMetrics {
        let labels = EndpointLabels {
            upstream: upstream.to_string(),
            endpoint: endpoint.to_string(),
        };
        let responses = CLASSES.map(|status_class| {
            self.responses
                .get_or_create(&ResponseLabels {
                    upstream: labels.upstream.clone(),
                    endpoint: labels.endpoint.clone(),
                    status_class,
                })
                .clone()
        });
        EndpointMetrics {
            responses,
            latency: self.latency.get_or_create(&labels).clone(),
            open_connections: self.upstream_connections.get_or_create(&labels).clone(),
        }
    }

    /// Drops an endpoint's series once it has left its upstream.
    pub(crate) fn forget_endpoint(&self, upstream: &str, endpoint: &str) {
        let labels = EndpointLabels {
            upstream: upstream.to_string(),
            endpoint: endpoint.to_string(),
        };
        for status_class in CLASSES {
            self.responses.remove(&ResponseLabels {
                upstream: labels.upstream.clone(),
                endpoint: labels.endpoint.clone(),
                status_class,
            });
        }
        self.latency.remove(&labels);
        self.upstream_connections.remove(&labels);
    }

    /// The application's relayed-failure mark was removed at the inbound edge.
    pub(crate) fn untrusted_relayed_failure(&self) {
        self.untrusted_relayed.inc();
    }

    pub(crate) fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        let labels = UpstreamLabels {
            upstream: upstream.to_string(),
        };
        UpstreamMetrics {
            name: upstream.to_string(),
            endpoints: self.endpoints.get_or_create(&labels).clone(),
            endpoints_unhealthy: self.endpoints_unhealthy.get_or_create(&labels).clone(),
            endpoints_stalled: self.endpoints_stalled.get_or_create(&labels).clone(),
            panic: self.panic.get_or_create(&labels).clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            retry_budget_exhausted: self.retry_budget_exhausted.get_or_create(&labels).clone(),
            policy_version: self.policy_version.get_or_create(&labels).clone(),
            policy_rejected: self.policy_rejected.get_or_create(&labels).clone(),
            policy_unknown_fields: self.policy_unknown_fields.get_or_create(&labels).clone(),
            errors: self.errors.clone(),
            breaker: self.breaker.clone(),
            limits: self.limits.clone(),
            faults: self.faults.clone(),
        }
    }

    pub(crate) fn listener(&self, listener: &str, protocol: &str) -> ListenerMetrics {
        let labels = ListenerLabels {
            listener: listener.to_string(),
            protocol: protocol.to_string(),
        };
        ListenerMetrics {
            open: self.listener_connections.get_or_create(&labels).clone(),
            accepted: self.listener_accepted.get_or_create(&labels).clone(),
        }
    }
}

/// Pre-resolved handles for one endpoint.
#[derive(Clone, Debug)]
pub(crate) struct EndpointMetrics {
    responses: [Counter; 5],
    latency: Histogram,
    pub open_connections: Gauge,
}

impl EndpointMetrics {
    pub fn response(&self, status: u16, latency: std::time::Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.responses[class].inc();
        self.latency.observe(latency.as_secs_f64());
    }

    /// A response the proxy made itself (the endpoint failed before answering).
    pub fn local_response(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.responses[class].inc();
    }
}

#[derive(Clone, Debug)]
pub(crate) struct UpstreamMetrics {
    name: String,
    pub endpoints: Gauge,
    /// Endpoints the control plane marks unhealthy.
    pub endpoints_unhealthy: Gauge,
    /// Endpoints stalled (see [`crate::resilience::stall`]).
    pub endpoints_stalled: Gauge,
    /// 1 while in panic.
    pub panic: Gauge,
    retries: Counter,
    retry_budget_exhausted: Counter,
    pub policy_version: Gauge,
    pub policy_rejected: Counter,
    pub policy_unknown_fields: Counter,
    errors: Family<ErrorLabels, Counter>,
    breaker: Family<ActionLabels, Counter>,
    limits: Family<ActionLabels, Counter>,
    faults: Family<ActionLabels, Counter>,
}

impl UpstreamMetrics {
    fn action(&self, family: &Family<ActionLabels, Counter>, action: &str, audit: bool) {
        family
            .get_or_create(&ActionLabels {
                upstream: self.name.clone(),
                action: action.to_string(),
                mode: if audit { "audit" } else { "enforce" },
            })
            .inc();
    }

    pub fn retry(&self) {
        self.retries.inc();
    }

    pub fn retry_budget_exhausted(&self) {
        self.retry_budget_exhausted.inc();
    }

    pub fn breaker(&self, kind: crate::resilience::events::EventKind) {
        self.action(&self.breaker, kind.as_str(), false);
    }

    /// An ejection that a policy in audit mode would have made.
    pub fn breaker_audit(&self) {
        self.action(&self.breaker, "ejected", true);
    }

    pub fn limit_hit(&self, limit: &str, audit: bool) {
        self.action(&self.limits, limit, audit);
    }

    pub fn rate_limited(&self, audit: bool) {
        self.action(&self.limits, "rate-limit", audit);
    }

    pub fn fault(&self, fault: &str) {
        self.action(&self.faults, fault, false);
    }

    /// Errors are rare, so the label lookup here is acceptable.
    pub fn error(&self, cause: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                upstream: self.name.clone(),
                cause: cause.to_string(),
            })
            .inc();
    }
}

/// Counts one client connection while it lives.
#[derive(Clone, Debug)]
pub(crate) struct ListenerMetrics {
    open: Gauge,
    accepted: Counter,
}

impl ListenerMetrics {
    pub fn track(&self) -> ConnectionTracker {
        self.accepted.inc();
        ConnectionTracker::open(&self.open)
    }
}

/// Counts one open connection in a gauge while it lives.
pub(crate) struct ConnectionTracker(Gauge);

impl ConnectionTracker {
    pub fn open(gauge: &Gauge) -> Self {
        gauge.inc();
        ConnectionTracker(gauge.clone())
    }
}

impl Drop for ConnectionTracker {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A discovered upstream's watch, as metrics.
#[derive(Clone, Debug)]
pub(crate) struct DiscoveryMetrics {
    pub connected: Gauge,
    pub revision: Gauge,
    pub last_update: UpdateAge,
    pub reconnects: Counter,
}

#[derive(Clone, Debug)]
pub(crate) struct IdentityMetrics {
    expiry: Gauge,
    requests: Family<CertificateRequestLabels, Counter>,
}

impl IdentityMetrics {
    pub(crate) fn request(&self, renewal: bool, result: &'static str) {
        let kind = if renewal { "renewal" } else { "first" };
        self.requests
            .get_or_create(&CertificateRequestLabels { kind, result })
            .inc();
    }

    pub(crate) fn set_expiry(&self, not_after: SystemTime) {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.expiry.set(secs);
    }
}

#[derive(Clone, Debug)]
pub(crate) struct RegistrationMetrics {
    pub registered: Gauge,
    pub registrations: Counter,
}

/// A gauge of the seconds since an event, computed when scraped (so it keeps growing while
/// nothing happens, which is the point). Before the first event it reports nothing useful:
/// `NaN`.
#[derive(Clone, Debug, Default)]
pub struct UpdateAge {
    /// Unix time of the last event in milliseconds; 0 = never.
    last_unix_ms: Arc<AtomicU64>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl UpdateAge {
    /// Records an event now.
    pub fn touch(&self) {
        self.last_unix_ms.store(unix_ms().max(1), Ordering::Relaxed);
    }

    /// Time since the last event; `None` before the first.
    pub fn age(&self) -> Option<std::time::Duration> {
        match self.last_unix_ms.load(Ordering::Relaxed) {
            0 => None,
            last => Some(std::time::Duration::from_millis(
                unix_ms().saturating_sub(last),
            )),
        }
    }

    /// Unix time of the last event in milliseconds.
    pub fn last_unix_ms(&self) -> Option<u64> {
        Some(self.last_unix_ms.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }
}

impl TypedMetric for UpdateAge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for UpdateAge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let seconds = self.age().map_or(f64::NAN, |a| a.as_secs_f64());
        encoder.encode_gauge(&seconds)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Lets a shared `Metrics` be cloned cheaply into every component.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_families_appear_only_when_used_and_age_is_computed_when_scraped() {
        let metrics = Metrics::new();
        assert!(
            !metrics.encode().contains("control"),
            "{}",
            metrics.encode()
        );
        let d = metrics.discovery("quote");
        let text = metrics.encode();
        assert!(
            text.contains("malla_proxy_control_last_update_age_seconds{upstream=\"quote\"} NaN"),
            "{text}"
        );
        d.last_update.touch();
        d.connected.set(1);
        d.reconnects.inc();
        let text = metrics.encode();
        let age = text
            .lines()
            .find(|l| l.starts_with("malla_proxy_control_last_update_age_seconds{"))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap();
        assert!((0.0..1.0).contains(&age), "{age}");
        assert!(
            text.contains("malla_proxy_control_connected{upstream=\"quote\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("malla_proxy_control_reconnects_total{upstream=\"quote\"} 1"),
            "{text}"
        );
        assert!(text.contains("malla_proxy_control_registered 0"), "{text}");
    }
}
