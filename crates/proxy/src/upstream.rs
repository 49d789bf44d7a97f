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
    ///
    /// A newcomer's latency estimate starts at the average of the endpoints already there,
    /// not at the 30 ms default: next to endpoints that answer in a millisecond, the default
    /// would keep it out of P2C's choices until their estimates had decayed (tens of
    /// seconds), and a new instance must take traffic within a second of registering. A
    /// slow newcomer gives itself away on its first answer (a peak replaces the estimate).
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.endpoints.snapshot();
        let seed = (!current.is_empty()).then(|| {
            current.iter().map(|e| e.rtt_estimate_ns()).sum::<f64>() / current.len() as f64
        });
        let mut existing: HashMap<SocketAddr, &Arc<Endpoint>> =
            current.iter().map(|e| (e.addr, e)).collect();
        let mut next = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if next.iter().any(|e: &Arc<Endpoint>| e.addr == *addr) {
                continue; // a duplicate in the input
            }
            let endpoint = match existing.remove(addr) {
                Some(e) => e.clone(),
                None => {
                    let endpoint = Arc::new(Endpoint::new(
                        *addr,
                        self.metrics.endpoint(&self.config.name, &addr.to_string()),
                        self.config.max_idle_per_endpoint,
                    ));
                    if let Some(seed) = seed {
                        endpoint.seed_rtt_estimate(seed);
                    }
                    endpoint
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn newcomers_start_at_the_average_estimate_of_the_others() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let upstream = Upstream::new(
            UpstreamConfig::new("u", vec![a.to_string(), b.to_string()]),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        // The first endpoints have nothing to go by: the default.
        let default = upstream.endpoints()[0].rtt_estimate_ns();
        assert!(default > 20e6, "{default}");
        upstream.endpoints()[0].seed_rtt_estimate(1e6);
        upstream.endpoints()[1].seed_rtt_estimate(3e6);
        upstream.set_endpoints(&[a, b, c]);
        let endpoints = upstream.endpoints();
        let newcomer = endpoints.iter().find(|e| e.addr == c).unwrap();
        let estimate = newcomer.rtt_estimate_ns();
        assert!(estimate > 1.9e6 && estimate <= 2e6, "{estimate}");
        // Endpoints that stay keep their own estimate.
        assert!(endpoints[0].rtt_estimate_ns() <= 1e6);
    }
}
