//! An upstream: a named service, its live endpoints, its balancer and its policies.

use std::{
    collections::HashMap,
    net::{SocketAddr, ToSocketAddrs},
    sync::{Arc, Mutex},
};

use crate::{
    balance::Balancer,
    config::UpstreamConfig,
    endpoint::{Endpoint, EndpointSet},
    error::ProxyError,
    metrics::{SharedMetrics, UpstreamMetrics},
};

pub struct Upstream {
    pub config: UpstreamConfig,
    endpoints: EndpointSet,
    balancer: Balancer,
    metrics: SharedMetrics,
    pub(crate) upstream_metrics: UpstreamMetrics,
    /// Serialises updates; readers never take it.
    update_lock: Mutex<()>,
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
    pub(crate) fn new(config: UpstreamConfig, metrics: SharedMetrics) -> anyhow::Result<Self> {
        let addrs = resolve_all(&config.endpoints)?;
        let upstream = Upstream {
            balancer: Balancer::new(config.balancer),
            endpoints: EndpointSet::new(Vec::new()),
            upstream_metrics: metrics.upstream(&config.name),
            metrics,
            config,
            update_lock: Mutex::new(()),
        };
        upstream.set_endpoints(&addrs);
        Ok(upstream)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Replaces the endpoint set. Endpoints present before and after keep their state
    /// (load estimate, pooled connections); removed ones finish the requests they carry.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.endpoints.snapshot();
        let mut existing: HashMap<SocketAddr, &Arc<Endpoint>> =
            current.iter().map(|e| (e.addr, e)).collect();
        let mut next = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if next.iter().any(|e: &Arc<Endpoint>| e.addr == *addr) {
                continue; // a duplicate in the input
            }
            let endpoint = match existing.remove(addr) {
                Some(e) => e.clone(),
                None => Arc::new(Endpoint::new(
                    *addr,
                    self.metrics.endpoint(&self.config.name, &addr.to_string()),
                    self.config.max_idle_per_endpoint,
                )),
            };
            next.push(endpoint);
        }
        for gone in existing.keys() {
            self.metrics
                .forget_endpoint(&self.config.name, &gone.to_string());
        }
        self.upstream_metrics.endpoints.set(next.len() as i64);
        self.endpoints.store(next);
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.snapshot()
    }

    /// Chooses the endpoint for one request.
    pub(crate) fn pick(&self) -> Result<Arc<Endpoint>, ProxyError> {
        let snapshot = self.endpoints.load();
        self.balancer
            .pick(&snapshot)
            .cloned()
            .ok_or_else(|| ProxyError::NoEndpoints {
                upstream: self.config.name.clone(),
            })
    }

    /// Counts a response the proxy made itself.
    pub(crate) fn error(&self, err: &ProxyError) {
        self.upstream_metrics.error(err.cause());
    }

    /// The live state, for `/config`.
    pub fn state(&self) -> serde_json::Value {
        let endpoints: Vec<_> = self
            .endpoints()
            .iter()
            .map(|e| {
                serde_json::json!({
                    "address": e.addr.to_string(),
                    "in_flight": e.in_flight(),
                    "requests": e.requests(),
                    "latency_estimate_ms": e.rtt_estimate_ns() / 1e6,
                    "idle_http1_connections": e.pool.idle_count(),
                })
            })
            .collect();
        serde_json::json!({
            "name": self.config.name,
            "balancer": self.balancer.kind().to_string(),
            "config": self.config,
            "endpoints": endpoints,
        })
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
