//! The control plane's APIs. Each is a projection of the [`crate::registry::Registry`],
//! the [`crate::policies::Policies`], the [`crate::authorizations::Authorizations`] and the [`crate::events::EventRing`].

pub mod auth;
pub mod grpc;
pub mod http;

use std::sync::Arc;

use malla_core::authz::PeerMtls;

use crate::{
    authorizations::Authorizations, events::EventRing, identity::Identity, metrics::Metrics,
    operator::OperatorToken, policies::Policies, proxies::Proxies, registry::Registry,
};

/// What every API serves.
pub struct Backend<S> {
    pub registry: Arc<Registry<S>>,
    pub policies: Arc<Policies<S>>,
    /// Authorization policies, one per service.
    pub authorizations: Arc<Authorizations<S>>,
    pub events: Arc<EventRing>,
    /// The control plane's own metrics (`GET /metrics`).
    pub metrics: Arc<Metrics>,
    /// The sidecars connected now (`GET /v1/proxies`).
    pub proxies: Arc<Proxies>,
    /// The CA and the join tokens.
    pub identity: Arc<Identity<S>>,
    /// The operator token the HTTP API's operator routes require.
    pub operator: Arc<OperatorToken>,
    /// The mesh's mTLS mode (`--mtls-mode`), sent with every authorization policy.
    pub mesh_mtls: PeerMtls,
}

// By hand: a derive would ask for `S: Clone`, and only the `Arc`s are cloned.
impl<S> Clone for Backend<S> {
    fn clone(&self) -> Self {
        Backend {
            registry: self.registry.clone(),
            policies: self.policies.clone(),
            authorizations: self.authorizations.clone(),
            events: self.events.clone(),
            metrics: self.metrics.clone(),
            proxies: self.proxies.clone(),
            identity: self.identity.clone(),
            operator: self.operator.clone(),
            mesh_mtls: self.mesh_mtls,
        }
    }
}
