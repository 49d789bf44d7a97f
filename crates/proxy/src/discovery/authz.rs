//! Following this sidecar's own authorization policy: `WatchAuthorization` of the service
//! it registers (a [`super::state_stream`]), each state read strictly and compiled for the
//! mesh's trust domain (`malla_api::AuthorizationState`) and put in force in the
//! [`Authorizer`].
//!
//! A state this sidecar cannot use (a field it does not know, from a newer control plane;
//! another service's policy) is refused, logged, counted and shown in `/config`, and the
//! policy in force stays. Neither extreme would do: dropping to "no policy" would open the
//! service to every caller, denying everything would cut it off over a version skew.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use malla_api::{authz_pb as pb, AuthorizationState, AuthorizationsClient};
use serde_json::json;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::state_stream::{self, StreamStatus, Subject};
use crate::authz::Authorizer;

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
    // The state in force again (a reconnection starts with it): nothing to do.
    if message.version == authorizer.version().unwrap_or(0) {
        watch.stream.set_error(None);
        return;
    }
    let state = match AuthorizationState::from_update(message, service.as_str()) {
        Ok(state) => state,
        Err(e) => {
            watch.rejected.fetch_add(1, Ordering::Relaxed);
            warn!(%service, version = message.version, in_force = authorizer.version(), error = %e, "refusing an authorization policy this sidecar cannot use; keeping the one in force");
            watch.stream.set_error(Some(format!(
                "authorization policy version {} refused: {e}",
                message.version
            )));
            return;
        }
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
    authorizer.set(state.version, state.policy);
    watch.stream.set_error(None);
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
        }
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
