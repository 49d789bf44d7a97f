//! Following this sidecar's own authorization policy: `WatchAuthorization` of the service
//! it registers (a [`super::state_stream`]), each state read strictly and compiled for the
//! mesh's trust domain (`malla_api::AuthorizationState`) and put in force in the
//! [`Authorizer`].
//!
//! A state this sidecar cannot use (a field it does not know, from a newer control plane;
//! another service's policy) is refused, logged, counted and shown in `/config`, and the
//! policy in force stays. Neither extreme would do: dropping to "no policy" would open the
//! service to every caller, denying everything would cut it off over a version skew.
//!
//! Every state carries the mesh's mTLS mode too, put in force with the policy (the
//! [`Authorizer`] holds both; the inbound side reads the mode per connection). A state
//! whose policy version is the one in force may still bring another mesh mode (the control
//! plane restarted with another `--mtls-mode`): that is applied alone.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use malla_api::{authz_pb as pb, AuthorizationState, AuthorizationsClient};
use serde_json::json;
use tonic::transport::Channel;
use tracing::{info, warn};

use malla_core::authz::PeerMtls;

use super::state_stream::{self, StreamStatus, Subject};
use crate::{authz::Authorizer, config::MtlsSource};

/// The authorization watch and what it feeds.
pub(crate) struct AuthzWatch {
    pub(super) authorizer: Arc<Authorizer>,
    stream: StreamStatus,
    /// States received and refused.
    rejected: AtomicU64,
}

impl AuthzWatch {
    pub(super) fn new(authorizer: Authorizer) -> Self {
        AuthzWatch {
            authorizer: Arc::new(authorizer),
            stream: StreamStatus::default(),
            rejected: AtomicU64::new(0),
        }
    }

    /// The `authorization` part of `/config`: the policy in force and its watch.
    pub(super) fn to_json(&self) -> serde_json::Value {
        let mut value = self.authorizer.to_json();
        value["watch"] = json!({
            "connected": self.stream.connected(),
            "rejected": self.rejected.load(Ordering::Relaxed),
            "last_error": self.stream.last_error(),
        });
        value
    }
}

pub(super) async fn run(client: AuthorizationsClient<Channel>, watch: Arc<AuthzWatch>) {
    let of = format!("service {}", watch.authorizer.service());
    let in_force = || watch.authorizer.version();
    let open = || {
        let mut client = client.clone();
        let request = pb::WatchAuthorizationRequest {
            service: watch.authorizer.service().to_string(),
        };
        async move { client.watch_authorization(request).await }
    };
    let subject = Subject {
        what: "authorization policy",
        of: &of,
        in_force: &in_force,
    };
    state_stream::follow(subject, &watch.stream, open, |message| {
        apply(&message, &watch)
    })
    .await;
}

/// Puts one received state in force, unless it is already, or cannot be used.
fn apply(message: &pb::AuthorizationUpdate, watch: &AuthzWatch) {
    let authorizer = &watch.authorizer;
    let service = authorizer.service();
    let refuse = |e: malla_api::InvalidPolicy| {
        watch.rejected.fetch_add(1, Ordering::Relaxed);
        warn!(%service, version = message.version, in_force = authorizer.version(), error = %e, "refusing an authorization policy this sidecar cannot use; keeping the one in force");
        watch.stream.set_error(Some(format!(
            "authorization policy version {} refused: {e}",
            message.version
        )));
    };
    let mtls_before = authorizer.mtls();
    // The policy in force again (a reconnection starts with it): only the mesh's mode
    // may have changed.
    if message.version == authorizer.version().unwrap_or(0) {
        match AuthorizationState::mesh_mtls(message) {
            Ok(mesh) => {
                authorizer.set_mesh_mtls(mesh);
                watch.stream.set_error(None);
                log_mtls(authorizer, mtls_before);
            }
            Err(e) => refuse(e),
        }
        return;
    }
    let state = match AuthorizationState::from_update(message, service.as_str()) {
        Ok(state) => state,
        Err(e) => return refuse(e),
    };
    match &state.policy {
        Some(p) => {
            let p = p.policy();
            info!(%service, version = state.version, mode = p.mode.as_str(), default = p.default.as_str(), rules = p.rules.len(), "applying the control plane's authorization policy");
        }
        None => {
            info!(%service, "the control plane has no authorization policy for this service any more; every caller is allowed")
        }
    }
    authorizer.set_mesh_mtls(state.mesh_mtls);
    authorizer.set(state.version, state.policy);
    watch.stream.set_error(None);
    log_mtls(authorizer, mtls_before);
}

/// Logs the control plane's mTLS mode when it changed (a sidecar's `[inbound] mtls`, if
/// set, overrides it: `/config` says which is in force).
fn log_mtls(authorizer: &Authorizer, before: Option<(PeerMtls, MtlsSource)>) {
    let now = authorizer.mtls();
    if now == before {
        return;
    }
    if let Some((mode, source)) = now {
        info!(service = %authorizer.service(), mode = mode.as_str(), source = source.as_str(), "the control plane's inbound mTLS mode for this service");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use malla_core::ServiceName;

    use super::*;
    use crate::{
        authz::{Inbound, Outcome},
        metrics::Metrics,
    };

    fn update(version: u64, json: &str) -> pb::AuthorizationUpdate {
        pb::AuthorizationUpdate {
            version,
            policy_json: json.into(),
            trust_domain: "malla.local".into(),
            mesh_mtls: "permissive".into(),
        }
    }

    fn with_mesh(version: u64, json: &str, mesh: &str) -> pb::AuthorizationUpdate {
        pb::AuthorizationUpdate {
            mesh_mtls: mesh.into(),
            ..update(version, json)
        }
    }

    #[test]
    fn the_mtls_mode_follows_the_policy_and_the_mesh() {
        let metrics = Metrics::new();
        let watch = AuthzWatch::new(Authorizer::new(
            ServiceName::new("ledger").unwrap(),
            &metrics,
        ));
        let mode = || watch.authorizer.mtls();
        assert_eq!(mode(), None, "no answer yet");

        // The first answer: no policy, the mesh strict.
        apply(&with_mesh(0, "", "strict"), &watch);
        assert_eq!(mode(), Some((PeerMtls::Strict, MtlsSource::Mesh)));
        // A policy that sets its own wins; one that does not leaves the mesh's.
        let permissive = r#"{"service": "ledger", "mtls": "permissive"}"#;
        apply(&with_mesh(5, permissive, "strict"), &watch);
        assert_eq!(mode(), Some((PeerMtls::Permissive, MtlsSource::Service)));
        assert_eq!(watch.to_json()["policy"]["mtls"], "permissive");
        apply(&with_mesh(6, r#"{"service": "ledger"}"#, "strict"), &watch);
        assert_eq!(mode(), Some((PeerMtls::Strict, MtlsSource::Mesh)));
        assert_eq!(watch.to_json()["policy"]["mtls"], json!(null));
        // The same version from a control plane restarted with another mode.
        apply(
            &with_mesh(6, r#"{"service": "ledger"}"#, "permissive"),
            &watch,
        );
        assert_eq!(mode(), Some((PeerMtls::Permissive, MtlsSource::Mesh)));
        // A mode this version does not know is refused whole: the one in force stays.
        apply(&with_mesh(6, r#"{"service": "ledger"}"#, "audit"), &watch);
        apply(
            &with_mesh(7, r#"{"service": "ledger", "mtls": "strict"}"#, "audit"),
            &watch,
        );
        assert_eq!(watch.rejected.load(Ordering::Relaxed), 2);
        assert_eq!(mode(), Some((PeerMtls::Permissive, MtlsSource::Mesh)));
        assert_eq!(watch.authorizer.version(), Some(6));
        // A control plane of an earlier version says nothing: permissive.
        apply(
            &with_mesh(8, r#"{"service": "ledger", "mtls": "strict"}"#, ""),
            &watch,
        );
        assert_eq!(mode(), Some((PeerMtls::Strict, MtlsSource::Service)));
        assert_eq!(watch.authorizer.mesh_mtls(), Some(PeerMtls::Permissive));
        // Deleted: the mesh's again.
        apply(&with_mesh(0, "", "strict"), &watch);
        assert_eq!(mode(), Some((PeerMtls::Strict, MtlsSource::Mesh)));
    }

    #[test]
    fn valid_states_apply_and_unusable_ones_keep_the_policy_in_force() {
        let metrics = Metrics::new();
        let watch = AuthzWatch::new(Authorizer::new(
            ServiceName::new("payments").unwrap(),
            &metrics,
        ));
        let tcp = Inbound::tcp(None, 8080);
        let outcome = || watch.authorizer.check(&tcp).outcome;

        apply(&update(0, ""), &watch);
        assert_eq!(watch.authorizer.version(), None);
        assert_eq!(outcome(), Outcome::Allow);

        let deny_all = r#"{"service": "payments", "default": "deny"}"#;
        apply(&update(12, deny_all), &watch);
        assert_eq!(watch.authorizer.version(), Some(12));
        assert_eq!(outcome(), Outcome::Deny);

        // Refused: a field this sidecar does not know, another service's, broken JSON.
        for bad in [
            r#"{"service": "payments", "rule": [{"action": "allow", "headers": ["x"]}]}"#,
            r#"{"service": "billing"}"#,
            r#"{"service": "#,
        ] {
            apply(&update(13, bad), &watch);
        }
        assert_eq!(watch.rejected.load(Ordering::Relaxed), 3);
        assert_eq!(watch.authorizer.version(), Some(12));
        assert_eq!(outcome(), Outcome::Deny, "the policy in force stays");
        let json = watch.to_json();
        assert!(
            json["watch"]["last_error"]
                .as_str()
                .unwrap()
                .starts_with("authorization policy version 13 refused: "),
            "{json}"
        );
        assert_eq!(json["policy"]["version"], 12);

        // The version in force again (after a reconnection): nothing changes.
        apply(&update(12, deny_all), &watch);
        assert_eq!(watch.to_json()["watch"]["last_error"], json!(null));

        // Deleted: every caller allowed.
        apply(&update(0, ""), &watch);
        assert_eq!(watch.authorizer.version(), None);
        assert_eq!(outcome(), Outcome::Allow);
    }
}
