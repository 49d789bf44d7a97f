//! `malla.authz.v1.Authorizations`: the sidecars of a service follow its authorization
//! policy (`WatchAuthorization`, a [`super::resource_watch`]) and decide on their inbound
//! side who may call it.
//!
//! Every message carries the mesh's trust domain (the CA's): a rule's `from` names
//! services of this mesh, and only the control plane knows for sure which domain that is.
//! A sidecar that has no certificate yet can then still read the policy as it is meant.
//!
//! Every message carries the mesh's mTLS mode too (`--mtls-mode`): a sidecar holds it
//! with the policy and takes the policy's `mtls` when it sets one, the mesh's otherwise.
//! The mode is the control plane's for its life; a control plane restarted with another
//! one sends it on the sidecars' new watches, whose first message then differs from the
//! state they hold although the policy's version does not.

#[cfg(test)]
mod tests;

use malla_api::authz_pb as pb;
use malla_core::{authz::PeerMtls, ServiceName, TrustDomain};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{api::Backend, authorizations::StoredAuthorization, metrics::WatchKind, store::Store};

pub struct AuthorizationsGrpc<S> {
    backend: Backend<S>,
    stop: watch::Receiver<bool>,
}

impl<S: Store + Clone> AuthorizationsGrpc<S> {
    pub fn new(backend: Backend<S>, stop: watch::Receiver<bool>) -> Self {
        AuthorizationsGrpc { backend, stop }
    }
}

type AuthorizationStream = super::Streaming<pb::AuthorizationUpdate>;

#[tonic::async_trait]
impl<S: Store + Clone> malla_api::AuthorizationsService for AuthorizationsGrpc<S> {
    type WatchAuthorizationStream = AuthorizationStream;

    async fn watch_authorization(
        &self,
        request: Request<pb::WatchAuthorizationRequest>,
    ) -> Result<Response<AuthorizationStream>, Status> {
        let held = super::connection(&request).map(|c| c.watch_opened());
        let service = ServiceName::new(&request.into_inner().service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let authorizations = self.backend.authorizations.clone();
        let domain = self.backend.identity.ca.trust_domain().clone();
        let mesh_mtls = self.backend.mesh_mtls;
        let open = self.backend.metrics.watch_opened(WatchKind::Authorization);
        super::streaming(&self.stop, |tx, stop| async move {
            let message = |stored: Option<&StoredAuthorization>| update(stored, &domain, mesh_mtls);
            super::resource_watch::run(authorizations, service, tx, stop, message).await;
            drop((open, held));
        })
    }
}

/// The message for a service's policy (`None`: it has none, every caller is allowed).
fn update(
    policy: Option<&StoredAuthorization>,
    domain: &TrustDomain,
    mesh_mtls: PeerMtls,
) -> pb::AuthorizationUpdate {
    pb::AuthorizationUpdate {
        version: policy.map_or(0, |p| p.version),
        policy_json: policy.map_or_else(String::new, |p| p.json.to_string()),
        trust_domain: domain.to_string(),
        mesh_mtls: mesh_mtls.as_str().to_string(),
    }
}
