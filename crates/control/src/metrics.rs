//! The control plane's own metrics, served as Prometheus text at `GET /metrics`.
//!
//! Every name starts with `malla_control_`; counters end in `_total`, durations are in
//! seconds. Labels have bounded values: an API request is labelled by its route *template*
//! (`/v1/services/{service}`), never its raw path, and by a gRPC method only when the
//! method exists, so a client cannot grow the label set by inventing paths.
//!
//! Most metrics belong to one control plane ([`Metrics`], created with it). Three are
//! counted where they happen, deep in the store's writer and in the health checker, which
//! hold no handle on a control plane: they are process-wide ([`process`]), which is exact
//! for `malla control` (one control plane per process) and a sum for a test process that
//! runs several.

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use http::{Method, StatusCode};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::time::Instant;

/// Which API served a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Http,
    Grpc,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Http => "http",
            Api::Grpc => "grpc",
        }
    }
}

/// What a watch stream follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchKind {
    /// `Registry/Watch`: a service's instances.
    Registry,
    /// `Policies/WatchPolicy`: a service's resilience policy.
    Policy,
    /// `Authorizations/WatchAuthorization`: a service's authorization policy.
    Authorization,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    api: &'static str,
    route: String,
    method: &'static str,
    /// The HTTP status for `api="http"`, the gRPC status name (`OK`, `NOT_FOUND`...) for
    /// `api="grpc"`.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    api: &'static str,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    /// `first` (join token) or `renewal`.
    kind: &'static str,
    /// `issued`, or why not (`token-used`, `other-service`, `csr`, ...).
    result: &'static str,
}

/// 0.25 ms to ~8 s, doubling.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

/// The metrics of one control plane.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
    watches: Family<WatchLabels, Gauge>,
    registrations: Family<ApiLabels, Counter>,
    deregistrations: Family<ApiLabels, Counter>,
    heartbeats: Family<ApiLabels, Counter>,
    connections: Gauge,
    refused: Counter,
    unauthenticated: Family<ReasonLabels, Counter>,
    tls_handshakes: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    /// `missing` (no credential), `wrong` (not the operator token in force),
    /// `other-service` (a workload's certificate for another service's instance),
    /// `plaintext` (a request on a connection without TLS, refused).
    reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("malla_control");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests by api (http, grpc), route template, method and code (HTTP status or gRPC status name); a gRPC stream counts when it ends",
            requests.clone(),
        );
        let durations: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "api_request_duration_seconds",
            "Time from a request's arrival to its answer's head (for a gRPC stream: to the stream's start)",
            durations.clone(),
        );
        let watches = Family::<WatchLabels, Gauge>::default();
        registry.register(
            "watch_streams_open",
            "gRPC watch streams open, by kind (registry, policy)",
            watches.clone(),
        );
        let registrations = Family::<ApiLabels, Counter>::default();
        registry.register(
            "registrations",
            "Successful registrations, by api",
            registrations.clone(),
        );
        let deregistrations = Family::<ApiLabels, Counter>::default();
        registry.register(
            "deregistrations",
            "Successful deregistrations, by api",
            deregistrations.clone(),
        );
        let heartbeats = Family::<ApiLabels, Counter>::default();
        registry.register(
            "heartbeats",
            "Successful lease renewals (heartbeats), by api",
            heartbeats.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open (HTTP/1 and HTTP/2, every address)",
            connections.clone(),
        );
        let refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because --max-connections were open",
            refused.clone(),
        );
        let unauthenticated = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "api_unauthenticated",
            "API requests refused for want of a credential, by reason: missing (none), wrong (not the operator token in force), other-service (a workload certificate for another service's instance), plaintext (no TLS)",
            unauthenticated.clone(),
        );
        let tls_handshakes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "api_tls_handshakes",
            "TLS handshakes on the API port, by result (ok, failed, timeout)",
            tls_handshakes.clone(),
        );
        let process = process();
        registry.register(
            "lease_expiries",
            "Leases that expired (their instances removed), in this process",
            process.lease_expiries.clone(),
        );
        registry.register(
            "health_checks",
            "Health-check probes by result (pass, fail), in this process",
            process.health_checks.clone(),
        );
        registry.register(
            "store_write_duration_seconds",
            "Time from a store write's submission to its durable acknowledgement, in this process",
            process.store_writes.clone(),
        );
        registry.register(
            "certificate_requests",
            "Certificate requests to the CA by kind (first, renewal) and result (issued, or the refusal's reason), in this process",
            process.certificates.clone(),
        );
        registry.register(
            "join_tokens_created",
            "Join tokens created, in this process",
            process.join_tokens.clone(),
        );
        registry.register(
            "ca_certificate_expiry_timestamp_seconds",
            "Unix time at which the CA's issuing certificate expires (during a root rotation: the one signing now)",
            process.ca_expiry.clone(),
        );
        registry.register(
            "ca_trust_bundle_roots",
            "Roots in the trust bundle the CA hands out (2 during a root rotation)",
            process.ca_roots.clone(),
        );
        registry.register(
            "ca_root_rotation_phase",
            "The root rotation's phase: 0 none, 1 announcing (the new root is trusted, the old one signs), 2 retiring (the new root signs, the old one is still trusted)",
            process.ca_rotation_phase.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
            watches,
            registrations,
            deregistrations,
            heartbeats,
            connections,
            refused,
            unauthenticated,
            tls_handshakes,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records an HTTP/JSON request; `route` is its template (`None`: no route matched).
    pub fn http_request(
        &self,
        route: Option<&str>,
        method: &Method,
        status: StatusCode,
        took: Duration,
    ) {
        let route = route.unwrap_or("unmatched");
        let method = method_label(method);
        self.observe(Api::Http, route, took);
        self.requests
            .get_or_create(&RequestLabels {
                api: Api::Http.label(),
                route: route.to_string(),
                method,
                code: status.as_u16().to_string(),
            })
            .inc();
        if status.is_success() {
            match (method, route) {
                ("PUT", "/v1/services/{service}/instances/{id}") => self.registered(Api::Http),
                ("DELETE", "/v1/services/{service}/instances/{id}") => self.deregistered(Api::Http),
                ("PUT", "/v1/leases/{lease}/keepalive") => self.heartbeat(Api::Http),
                _ => {}
            }
        }
    }

    /// Records the answer head of a gRPC call to `route` (its path; `None` for a method
    /// that does not exist).
    pub fn grpc_started(&self, route: Option<&str>, took: Duration) {
        self.observe(Api::Grpc, route.unwrap_or("unknown"), took);
    }

    /// Records the end of a gRPC call with its status code (`tonic::Code` as an integer).
    pub fn grpc_ended(&self, route: Option<&str>, code: tonic::Code) {
        let route = route.unwrap_or("unknown");
        self.requests
            .get_or_create(&RequestLabels {
                api: Api::Grpc.label(),
                route: route.to_string(),
                method: "POST",
                code: grpc_code_name(code).to_string(),
            })
            .inc();
        if code == tonic::Code::Ok {
            match route.rsplit('/').next() {
                Some("Register") => self.registered(Api::Grpc),
                Some("Deregister") => self.deregistered(Api::Grpc),
                Some("Heartbeat") => self.heartbeat(Api::Grpc),
                _ => {}
            }
        }
    }

    fn observe(&self, api: Api, route: &str, took: Duration) {
        self.durations
            .get_or_create(&RouteLabels {
                api: api.label(),
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    fn registered(&self, api: Api) {
        self.registrations
            .get_or_create(&ApiLabels { api: api.label() })
            .inc();
    }

    fn deregistered(&self, api: Api) {
        self.deregistrations
            .get_or_create(&ApiLabels { api: api.label() })
            .inc();
    }

    fn heartbeat(&self, api: Api) {
        self.heartbeats
            .get_or_create(&ApiLabels { api: api.label() })
            .inc();
    }

    /// Counts a watch stream open until the guard drops.
    pub fn watch_opened(self: &Arc<Self>, kind: WatchKind) -> OpenGuard {
        let gauge = self
            .watches
            .get_or_create(&WatchLabels {
                kind: match kind {
                    WatchKind::Registry => "registry",
                    WatchKind::Policy => "policy",
                    WatchKind::Authorization => "authorization",
                },
            })
            .clone();
        OpenGuard::new(gauge)
    }

    /// Counts a connection open until the guard drops.
    pub fn connection_opened(&self) -> OpenGuard {
        OpenGuard::new(self.connections.clone())
    }

    pub fn connection_refused(&self) {
        self.refused.inc();
    }

    /// An HTTP API request refused for want of the operator token: `wrong` when it carried
    /// a token that is not the one in force, `missing` otherwise.
    pub fn unauthenticated(&self, wrong: bool) {
        self.refused_for(if wrong { "wrong" } else { "missing" });
    }

    /// An API request refused for want of a credential, by reason (see [`ReasonLabels`]).
    pub fn refused_for(&self, reason: &'static str) {
        self.unauthenticated
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A request on a plaintext connection, refused (TLS is required).
    pub fn plaintext_refused(&self) {
        self.refused_for("plaintext");
    }

    /// A TLS handshake on the API port ended: `ok`, `failed` or `timeout`.
    pub fn tls_handshake(&self, result: &'static str) {
        self.tls_handshakes
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

/// Decrements its gauge when dropped.
pub struct OpenGuard(Gauge);

impl OpenGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        OpenGuard(gauge)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A fixed set of method labels: anything else is `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The gRPC status names of the specification (`OK`, `INVALID_ARGUMENT`...).
fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The process-wide metrics (see the module's documentation).
pub struct ProcessMetrics {
    lease_expiries: Counter,
    health_checks: Family<ResultLabels, Counter>,
    store_writes: Histogram,
    certificates: Family<CertificateLabels, Counter>,
    join_tokens: Counter,
    ca_expiry: Gauge,
    ca_roots: Gauge,
    ca_rotation_phase: Gauge,
}

static PROCESS: LazyLock<ProcessMetrics> = LazyLock::new(|| ProcessMetrics {
    lease_expiries: Counter::default(),
    health_checks: Family::default(),
    store_writes: duration_histogram(),
    certificates: Family::default(),
    join_tokens: Counter::default(),
    ca_expiry: Gauge::default(),
    ca_roots: Gauge::default(),
    ca_rotation_phase: Gauge::default(),
});

/// The process-wide metrics, for one-line instrumentation where things happen.
pub fn process() -> &'static ProcessMetrics {
    &PROCESS
}

impl ProcessMetrics {
    /// `n` leases expired.
    pub fn leases_expired(&self, n: usize) {
        self.lease_expiries.inc_by(n as u64);
    }

    /// One health-check probe ended.
    pub fn health_check(&self, passed: bool) {
        let result = if passed { "pass" } else { "fail" };
        self.health_checks
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// One certificate request ended: `result` is `issued` or the refusal's reason.
    pub fn certificate(&self, renewal: bool, result: &'static str) {
        let kind = if renewal { "renewal" } else { "first" };
        self.certificates
            .get_or_create(&CertificateLabels { kind, result })
            .inc();
    }

    pub fn join_token_created(&self) {
        self.join_tokens.inc();
    }

    /// The CA's issuing certificate expires at `unix_seconds`.
    pub fn ca_expires(&self, unix_seconds: i64) {
        self.ca_expiry.set(unix_seconds);
    }

    /// The CA's trust bundle holds `roots`; its rotation is in `phase` (0 none, 1
    /// announcing, 2 retiring).
    pub fn ca_roots(&self, roots: usize, phase: u8) {
        self.ca_roots.set(i64::try_from(roots).unwrap_or(i64::MAX));
        self.ca_rotation_phase.set(i64::from(phase));
    }

    /// Times a store write from now until the returned guard drops.
    pub fn store_write(&self) -> WriteTimer {
        WriteTimer(Instant::now())
    }
}

/// Observes the time since its creation into the store write histogram when dropped.
pub struct WriteTimer(Instant);

impl Drop for WriteTimer {
    fn drop(&mut self) {
        PROCESS.store_writes.observe(self.0.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions_and_requests_are_labelled_by_template() {
        let metrics = Arc::new(Metrics::new());
        metrics.http_request(
            Some("/v1/services/{service}/instances/{id}"),
            &Method::PUT,
            StatusCode::OK,
            Duration::from_millis(2),
        );
        metrics.http_request(
            None,
            &Method::from_bytes(b"BREW").unwrap(),
            StatusCode::NOT_FOUND,
            Duration::ZERO,
        );
        metrics.grpc_started(
            Some("/malla.registry.v1.Registry/Heartbeat"),
            Duration::ZERO,
        );
        metrics.grpc_ended(
            Some("/malla.registry.v1.Registry/Heartbeat"),
            tonic::Code::Ok,
        );
        metrics.grpc_ended(None, tonic::Code::Unimplemented);
        let watch = metrics.watch_opened(WatchKind::Policy);
        let text = metrics.encode();
        for line in [
            r#"malla_control_api_requests_total{api="http",route="/v1/services/{service}/instances/{id}",method="PUT",code="200"} 1"#,
            r#"malla_control_api_requests_total{api="http",route="unmatched",method="other",code="404"} 1"#,
            r#"malla_control_api_requests_total{api="grpc",route="/malla.registry.v1.Registry/Heartbeat",method="POST",code="OK"} 1"#,
            r#"malla_control_api_requests_total{api="grpc",route="unknown",method="POST",code="UNIMPLEMENTED"} 1"#,
            r#"malla_control_registrations_total{api="http"} 1"#,
            r#"malla_control_heartbeats_total{api="grpc"} 1"#,
            r#"malla_control_watch_streams_open{kind="policy"} 1"#,
            r#"malla_control_api_request_duration_seconds_count{api="http",route="/v1/services/{service}/instances/{id}"} 1"#,
            "# TYPE malla_control_lease_expiries counter",
            "# TYPE malla_control_store_write_duration_seconds histogram",
            "# TYPE malla_control_connections_open gauge",
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
        drop(watch);
        assert!(metrics
            .encode()
            .contains(r#"malla_control_watch_streams_open{kind="policy"} 0"#));
    }
}
