//! What the workers share, and a listener as its connections see it: its direction, where
//! its requests go, and the proxy's shared state. Built once by [`crate::server::start`];
//! read by every protocol module, which never reach back into the server.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::sync::watch;

use crate::{
    config::{ListenerProtocol, ProxyConfig},
    discovery::DiscoveryStatus,
    error::ProxyError,
    inbound,
    metrics::{ListenerMetrics, SharedMetrics},
    outbound,
    resilience::events::EventLog,
    upstream::Upstream,
};

/// Everything the workers share, built once at start.
pub(crate) struct Shared {
    pub config: ProxyConfig,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub routes: HashMap<String, Arc<Upstream>>,
    pub metrics: SharedMetrics,
    /// The control-plane client's state, when there is a `[control]` section.
    pub discovery: Option<Arc<DiscoveryStatus>>,
    /// Resilience events waiting to be sent to the control plane.
    pub events: Arc<EventLog>,
    /// The mesh TLS of the inbound listener, when this sidecar has an identity and its
    /// `[inbound] mtls` is not `off`.
    pub inbound_tls: Option<Arc<crate::tls::MeshTls>>,
    pub draining: AtomicBool,
    pub(crate) drain_tx: watch::Sender<bool>,
    /// Set once every worker has finished; the admin listener stops then.
    pub(crate) stopped_tx: watch::Sender<bool>,
}

impl Shared {
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    pub fn stopped_signal(&self) -> watch::Receiver<bool> {
        self.stopped_tx.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Which way a listener's calls go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From this instance's application to its upstreams.
    Outbound,
    /// From callers to this instance's application.
    Inbound,
}

/// Where a listener's requests go.
pub(crate) enum Target {
    /// Every connection goes to this upstream.
    Fixed(Arc<Upstream>),
    /// HTTP requests are routed by `Host` / `:authority`.
    ByHost,
}

/// A listener as its connections see it.
pub(crate) struct ListenerCtx {
    pub name: String,
    /// Which way its calls go: the stages and the trust that apply ([`crate::inbound`],
    /// [`crate::outbound`]).
    pub direction: Direction,
    pub protocol: ListenerProtocol,
    pub target: Target,
    pub shared: Arc<Shared>,
    pub metrics_http1: ListenerMetrics,
    pub metrics_http2: ListenerMetrics,
    pub metrics_tcp: ListenerMetrics,
    /// The port it listens on (every worker binds the same): the port a caller called,
    /// for authorization.
    pub port: u16,
    /// Inbound only, when this sidecar registers a service: its authorization policy
    /// ([`crate::inbound::authorize`]).
    pub authorizer: Option<Arc<crate::authz::Authorizer>>,
}

impl ListenerCtx {
    /// The authorizer to ask, when an authorization policy is in force (inbound only).
    /// Without one every call is allowed, and a call skips reading what a decision needs.
    pub fn enforcing(&self) -> Option<&crate::authz::Authorizer> {
        self.authorizer.as_deref().filter(|a| a.version().is_some())
    }

    /// The upstream for a request with this `Host` / `:authority` (if any).
    pub fn route(&self, host: Option<&[u8]>) -> Result<&Arc<Upstream>, ProxyError> {
        match &self.target {
            Target::Fixed(u) => Ok(u),
            Target::ByHost => {
                let host = host.unwrap_or_default();
                let key = normalize_host(host);
                self.shared
                    .routes
                    .get(key.as_str())
                    .or_else(|| self.shared.upstreams.get(key.as_str()))
                    .ok_or_else(|| ProxyError::NoRoute {
                        host: String::from_utf8_lossy(host).into_owned(),
                    })
            }
        }
    }

    /// The relayed-failure mark for an error answered on behalf of `upstream`: outbound
    /// listeners relay their upstreams' failures (see
    /// [`ProxyError::is_upstream_failure`]); the inbound listener's are this instance's own.
    pub fn relay_mark<'a>(&self, upstream: &'a Upstream) -> Option<&'a str> {
        match self.direction {
            Direction::Outbound => outbound::relay_mark(upstream),
            Direction::Inbound => None,
        }
    }

    /// Whether a response's `malla-relayed-failure: <value>` may go on to the caller: the
    /// upstreams' sidecars are trusted; the local application is checked.
    pub fn trusts_relayed_failure(&self, value: &[u8]) -> bool {
        match self.direction {
            Direction::Outbound => true,
            Direction::Inbound => inbound::relayed_failure_holds(&self.shared, value),
        }
    }

    /// The connections of a listener without an upstream of its own (HTTP proxy) have no
    /// TCP fallback.
    pub fn tcp_upstream(&self) -> Option<&Arc<Upstream>> {
        match &self.target {
            Target::Fixed(u) => Some(u),
            Target::ByHost => None,
        }
    }
}

/// `Host` without port, trailing dot or case.
pub(crate) fn normalize_host(host: &[u8]) -> String {
    let host = String::from_utf8_lossy(host).to_ascii_lowercase();
    let without_port = if host.starts_with('[') {
        // An IPv6 literal: keep the brackets' content.
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host.as_str(), |(h, _)| h)
    };
    without_port.trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::normalize_host;

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalize_host(b"Shipping-Quote:8080"), "shipping-quote");
        assert_eq!(normalize_host(b"shipping-quote."), "shipping-quote");
        assert_eq!(normalize_host(b"[::1]:80"), "::1");
        assert_eq!(normalize_host(b"a.b"), "a.b");
    }
}
