//! Sidecars that joined a test control plane's mesh: a *server* sidecar in front of an
//! application (its inbound listener, registered as an instance of its service) and a
//! *caller* sidecar whose application calls discovered services on outbound listeners.
//! Each joins with a fresh join token of its service, as `malla token create` makes them,
//! and is returned once it holds its certificate.

use std::net::SocketAddr;

use malla_proxy::config::{ControlPlaneConfig, ListenerProtocol, MtlsMode, UpstreamConfig};

use crate::{
    assert_eventually,
    control::TestControl,
    identity::{joined, joining, wait_for_certificate},
    proxy::TestProxy,
};

/// A sidecar of `service` in front of `app`, its inbound listener in `mode` (`None`: the
/// control plane's mode).
pub async fn server(
    control: &TestControl,
    service: &str,
    app: SocketAddr,
    protocol: ListenerProtocol,
    mode: impl Into<Option<MtlsMode>>,
) -> TestProxy {
    let mode = mode.into();
    let control_config = joining(control, service).await;
    let proxy = TestProxy::builder()
        .inbound(app, protocol)
        .admin()
        .config(move |c| {
            if let Some(inbound) = c.inbound.as_mut() {
                inbound.mtls = mode;
            }
            c.control = Some(control_config);
        })
        .start();
    wait_for_certificate(&proxy).await;
    proxy
}

/// A caller's sidecar: what it is and what it calls.
pub struct Caller<'a> {
    /// Its service; with `joins`, it holds that service's certificate.
    pub service: &'a str,
    pub joins: bool,
    /// Discovered upstreams, each with an outbound listener (`outbound_at(i)`, in order).
    pub upstreams: Vec<(&'a str, ListenerProtocol)>,
}

impl Caller<'_> {
    /// Starts it and waits until it holds its certificate (when it joins) and knows an
    /// endpoint of every upstream.
    pub async fn start(&self, control: &TestControl) -> TestProxy {
        self.start_with(control, |_| {}).await
    }

    /// [`Self::start`], each upstream's configuration changed by `change`.
    pub async fn start_with(
        &self,
        control: &TestControl,
        change: impl Fn(&mut UpstreamConfig),
    ) -> TestProxy {
        let joined = match self.joins {
            true => joining(control, self.service).await,
            false => joined(control, self.service, None),
        };
        // No inbound listener of its own: it registers an address nobody calls.
        let control_config = ControlPlaneConfig {
            register_address: Some(SocketAddr::from(([127, 0, 0, 1], 4143))),
            ..joined
        };
        let mut builder = TestProxy::builder().admin();
        for (upstream, protocol) in &self.upstreams {
            builder = builder
                .upstream(upstream, &[])
                .upstream_config(&change)
                .outbound_with(upstream, *protocol);
        }
        let proxy = builder
            .config(move |c| c.control = Some(control_config))
            .start();
        if self.joins {
            wait_for_certificate(&proxy).await;
        }
        for (name, _) in &self.upstreams {
            let upstream = proxy.upstream(name);
            assert_eventually!(
                !upstream.endpoints().is_empty(),
                "{} never discovered an endpoint of {name}",
                self.service
            );
        }
        proxy
    }
}

/// Connections counted by how they were secured (`direction`: `inbound` or `outbound`),
/// over every key exchange group.
pub fn security(proxy: &TestProxy, direction: &str, security: &str) -> f64 {
    let name = format!("malla_proxy_{direction}_connections_by_security_total");
    let label = format!("security=\"{security}\"");
    proxy
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with(&name) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
