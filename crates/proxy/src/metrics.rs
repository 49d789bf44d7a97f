//! Prometheus metrics for the data plane.
//!
//! One registry per proxy (no globals). The hot path never looks a label set up: each
//! endpoint and listener resolves its metric handles once, when it is created, and a
//! request then costs a few atomic adds and one histogram observation.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
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
    errors: Family<ErrorLabels, Counter>,
    listener_connections: Family<ListenerLabels, Gauge>,
    listener_accepted: Family<ListenerLabels, Counter>,
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
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "errors",
            "Requests the proxy answered itself, by cause (see docs/proxy.md)",
            errors.clone(),
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
        Metrics {
            registry: Mutex::new(registry),
            responses,
            latency,
            upstream_connections,
            endpoints,
            errors,
            listener_connections,
            listener_accepted,
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

    pub(crate) fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        let labels = UpstreamLabels {
            upstream: upstream.to_string(),
        };
        UpstreamMetrics {
            name: upstream.to_string(),
            endpoints: self.endpoints.get_or_create(&labels).clone(),
            errors: self.errors.clone(),
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
    errors: Family<ErrorLabels, Counter>,
}

impl UpstreamMetrics {
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

/// Lets a shared `Metrics` be cloned cheaply into every component.
pub type SharedMetrics = Arc<Metrics>;
