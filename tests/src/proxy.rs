//! The proxy under test, started in-process with every listener on `127.0.0.1:0`.
//!
//! ```ignore
//! let proxy = TestProxy::builder()
//!     .upstream("echo", &[a.addr(), b.addr()])
//!     .balancer(BalancerKind::RoundRobin)
//!     .outbound("echo")
//!     .http_proxy()
//!     .admin()
//!     .start();
//! let addr = proxy.outbound();
//! ```
//!
//! Defaults differ from production where tests need it: one worker thread (the machine is
//! small and shared), a 5 s drain timeout. A `TestProxy` drains when dropped and its
//! threads finish in the background, so a failing test never blocks on it; call
//! [`TestProxy::stop`] to drain and wait.

pub mod admin;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use malla_proxy::{
    config::{
        AdminConfig, BalancerKind, HttpProxyConfig, InboundConfig, Limits, ListenerProtocol,
        OutboundConfig, RouteConfig, UpstreamConfig,
    },
    upstream::Upstream,
    Bound, ProxyConfig, ProxyHandle,
};

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Builds a [`TestProxy`]; settings such as [`balancer`](Self::balancer) apply to the
/// upstream added last.
#[derive(Debug, Clone)]
pub struct TestProxyBuilder {
    config: ProxyConfig,
}

impl TestProxyBuilder {
    pub fn upstream(mut self, name: &str, endpoints: &[SocketAddr]) -> Self {
        let endpoints = endpoints.iter().map(ToString::to_string).collect();
        self.config
            .upstreams
            .push(UpstreamConfig::new(name, endpoints));
        self
    }

    /// Changes the upstream added last.
    pub fn upstream_config(mut self, change: impl FnOnce(&mut UpstreamConfig)) -> Self {
        let last = self
            .config
            .upstreams
            .last_mut()
            .expect("add an upstream before configuring it");
        change(last);
        self
    }

    /// Changes the resilience policy of the upstream added last (`[upstream.policy]`).
    pub fn policy(self, change: impl FnOnce(&mut malla_core::Policy)) -> Self {
        self.upstream_config(|u| change(u.policy.get_or_insert_with(Default::default)))
    }

    pub fn balancer(self, kind: BalancerKind) -> Self {
        self.upstream_config(|u| u.balancer = kind)
    }

    pub fn response_timeout(self, timeout: Duration) -> Self {
        self.upstream_config(|u| u.response_timeout = timeout)
    }

    pub fn connect_timeout(self, timeout: Duration) -> Self {
        self.upstream_config(|u| u.connect_timeout = timeout)
    }

    /// An outbound listener for `upstream` that detects the protocol (`auto`).
    pub fn outbound(self, upstream: &str) -> Self {
        self.outbound_with(upstream, ListenerProtocol::Auto)
    }

    pub fn outbound_with(mut self, upstream: &str, protocol: ListenerProtocol) -> Self {
        self.config.outbound.push(OutboundConfig {
            listen: any_port(),
            upstream: upstream.to_string(),
            protocol,
        });
        self
    }

    /// The HTTP proxy listener, routing by `Host` / `:authority`.
    pub fn http_proxy(mut self) -> Self {
        self.config.http_proxy.get_or_insert(HttpProxyConfig {
            listen: any_port(),
            routes: Vec::new(),
        });
        self
    }

    /// A `host → upstream` route on the HTTP proxy listener (added if absent).
    pub fn route(mut self, host: &str, upstream: &str) -> Self {
        self = self.http_proxy();
        if let Some(p) = self.config.http_proxy.as_mut() {
            p.routes.push(RouteConfig {
                host: host.to_string(),
                upstream: upstream.to_string(),
            });
        }
        self
    }

    pub fn inbound(mut self, forward_to: SocketAddr, protocol: ListenerProtocol) -> Self {
        self.config.inbound = Some(InboundConfig {
            listen: any_port(),
            forward_to: forward_to.to_string(),
            protocol,
            mtls: Default::default(),
        });
        self
    }

    pub fn admin(mut self) -> Self {
        self.config.admin = Some(AdminConfig { listen: any_port() });
        self
    }

    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    pub fn limits(mut self, change: impl FnOnce(&mut Limits)) -> Self {
        change(&mut self.config.limits);
        self
    }

    /// Any other change to the configuration.
    pub fn config(mut self, change: impl FnOnce(&mut ProxyConfig)) -> Self {
        change(&mut self.config);
        self
    }

    /// The configuration as built so far.
    pub fn to_config(&self) -> ProxyConfig {
        self.config.clone()
    }

    /// Starts the proxy (panics with the proxy's error if it cannot).
    pub fn start(self) -> TestProxy {
        let handle = malla_proxy::start(self.config)
            .unwrap_or_else(|e| panic!("the proxy did not start: {e:#}"));
        TestProxy {
            bound: handle.bound().clone(),
            handle: Some(handle),
        }
    }
}

/// A running proxy; drains when dropped.
pub struct TestProxy {
    bound: Bound,
    handle: Option<ProxyHandle>,
}

impl std::fmt::Debug for TestProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestProxy")
            .field("bound", &self.bound)
            .finish()
    }
}

impl TestProxy {
    pub fn builder() -> TestProxyBuilder {
        TestProxyBuilder {
            // The worker count a user gets (one per core): tests run what users run.
            config: ProxyConfig {
                drain_timeout: Duration::from_secs(5),
                ..ProxyConfig::default()
            },
        }
    }

    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    /// The first outbound listener.
    pub fn outbound(&self) -> SocketAddr {
        self.outbound_at(0)
    }

    pub fn outbound_at(&self, i: usize) -> SocketAddr {
        *self
            .bound
            .outbound
            .get(i)
            .unwrap_or_else(|| panic!("no outbound listener #{i}; add one with .outbound()"))
    }

    pub fn http_proxy(&self) -> SocketAddr {
        self.bound
            .http_proxy
            .expect("no HTTP proxy listener; add one with .http_proxy()")
    }

    pub fn inbound(&self) -> SocketAddr {
        self.bound
            .inbound
            .expect("no inbound listener; add one with .inbound()")
    }

    pub fn admin(&self) -> SocketAddr {
        self.bound
            .admin
            .expect("no admin listener; add one with .admin()")
    }

    pub fn handle(&self) -> &ProxyHandle {
        self.handle.as_ref().expect("the proxy is running")
    }

    pub fn upstream(&self, name: &str) -> Arc<Upstream> {
        self.handle()
            .upstream(name)
            .unwrap_or_else(|| panic!("no upstream named {name:?}"))
    }

    /// Replaces an upstream's endpoints, live.
    pub fn set_endpoints(&self, upstream: &str, endpoints: &[SocketAddr]) {
        self.upstream(upstream).set_endpoints(endpoints);
    }

    /// Resilience events recorded and not yet sent to a control plane.
    pub fn events(&self) -> Vec<malla_proxy::resilience::events::Event> {
        let log = self.handle().events();
        let events = log.drain(usize::MAX);
        log.requeue(events.clone());
        events
    }

    /// The proxy's metrics in Prometheus text form, without the admin listener.
    pub fn metrics_text(&self) -> String {
        self.handle().metrics().encode()
    }

    /// Starts draining and returns at once.
    pub fn drain(&self) {
        self.handle().drain();
    }

    /// Drains and waits until every worker has finished (at most the drain timeout).
    pub async fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.drain();
            // Never block the test's runtime: the workers finish (at most after the drain
            // timeout) on a thread of their own.
            let _ = std::thread::Builder::new()
                .name("test-proxy-stop".into())
                .spawn(move || handle.join());
        }
    }
}
