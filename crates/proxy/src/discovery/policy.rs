//! Following the resilience policy of one upstream's service: `WatchPolicy` (a
//! [`super::state_stream`]), each state read and validated (`malla_api::PolicyState`, the
//! same checks the control plane made when the policy was written) and put in force with
//! [`Upstream::set_policy`].
//!
//! Every upstream follows its service's policy, discovered or static: a policy is about
//! the callers of a service, whichever way they find its endpoints.
//!
//! Version skew: a control plane newer than the sidecar may send fields this sidecar does
//! not know. They are ignored and the rest of the policy applied (refusing it whole would
//! keep the sidecar on an old policy until it is upgraded); each such field is logged once
//! per policy version, counted (`malla_proxy_policy_unknown_fields_total`) and listed in
//! `/config` (`policy_watch.unknown_fields`). A policy this sidecar cannot use for any
//! other reason (a bound it checks differently, a value of a type it does not expect) is
//! refused whole: the policy in force stays, the refusal is logged, counted and shown in
//! `/config`.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};

use malla_api::{policy_pb as pb, PoliciesClient, PolicyState};
use malla_core::ServiceName;
use serde_json::json;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::state_stream::{self, StreamStatus, Subject};
use crate::upstream::Upstream;

/// One upstream's policy watch, for `/config`.
pub(crate) struct PolicyStatus {
    pub(super) service: ServiceName,
    /// The control-plane version in force; 0: none (local policy or defaults).
    version: AtomicU64,
    stream: StreamStatus,
    /// Policies received and refused (invalid for this sidecar).
    rejected: AtomicU64,
    /// Fields of the control-plane policy in force that this sidecar ignored.
    unknown_fields: Mutex<Vec<String>>,
}

impl PolicyStatus {
    pub(super) fn new(service: ServiceName) -> Self {
        PolicyStatus {
            service,
            version: AtomicU64::new(0),
            stream: StreamStatus::default(),
            rejected: AtomicU64::new(0),
            unknown_fields: Mutex::new(Vec::new()),
        }
    }

    /// The control-plane version in force, if any.
    pub(crate) fn version(&self) -> Option<u64> {
        Some(self.version.load(Ordering::Relaxed)).filter(|v| *v != 0)
    }

    fn unknown_fields(&self) -> Vec<String> {
        self.unknown_fields
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_unknown_fields(&self, fields: Vec<String>) {
        *self
            .unknown_fields
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = fields;
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        json!({
            "service": self.service,
            "connected": self.stream.connected(),
            "version": self.version(),
            "rejected": self.rejected.load(Ordering::Relaxed),
            "last_error": self.stream.last_error(),
            "unknown_fields": self.unknown_fields(),
        })
    }
}

pub(super) async fn run(
    client: PoliciesClient<Channel>,
    upstream: Arc<Upstream>,
    status: Arc<PolicyStatus>,
) {
    let of = format!("upstream {}", upstream.name());
    let in_force = || status.version();
    let open = || {
        let mut client = client.clone();
        let request = pb::WatchPolicyRequest {
            service: status.service.to_string(),
        };
        async move { client.watch_policy(request).await }
    };
    let subject = Subject {
        what: "policy",
        of: &of,
        in_force: &in_force,
    };
    state_stream::follow(subject, &status.stream, open, |message| {
        apply(&message, &upstream, &status)
    })
    .await;
}

/// Puts one received state in force, unless it is already, or cannot be used.
fn apply(message: &pb::PolicyUpdate, upstream: &Upstream, status: &PolicyStatus) {
    let state = match PolicyState::from_update(message, status.service.as_str()) {
        Ok(state) => state,
        Err(e) => {
            status.rejected.fetch_add(1, Ordering::Relaxed);
            upstream.upstream_metrics.policy_rejected.inc();
            let error = format!("policy version {} refused: {e}", message.version);
            warn!(upstream = %upstream.name(), service = %status.service, version = message.version, in_force = status.version(), error = %e, "refusing a policy this sidecar cannot use; keeping the one in force");
            status.stream.set_error(Some(error));
            return;
        }
    };
    if state.version == status.version.load(Ordering::Relaxed) {
        return;
    }
    // Logged and counted here, once per version: a reconnection re-reads the version in
    // force and stops above.
    if !state.unknown_fields.is_empty() {
        upstream
            .upstream_metrics
            .policy_unknown_fields
            .inc_by(state.unknown_fields.len() as u64);
        for field in &state.unknown_fields {
            warn!(upstream = %upstream.name(), service = %status.service, version = state.version, %field, "ignoring a policy field this sidecar does not know (a newer control plane?); applying the rest");
        }
    }
    status.set_unknown_fields(state.unknown_fields);
    match state.policy {
        Some(policy) => {
            info!(upstream = %upstream.name(), service = %status.service, version = state.version, "applying the control plane's policy");
            upstream.set_policy(Some((policy, state.version)));
        }
        None => {
            info!(upstream = %upstream.name(), service = %status.service, "the control plane has no policy for this service any more; back to the local policy or defaults");
            upstream.set_policy(None);
        }
    }
    status.version.store(state.version, Ordering::Relaxed);
    status.stream.set_error(None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::UpstreamConfig, metrics::Metrics};

    fn update(version: u64, json: &str) -> pb::PolicyUpdate {
        pb::PolicyUpdate {
            version,
            policy_json: json.into(),
        }
    }

    fn source(upstream: &Upstream) -> serde_json::Value {
        upstream.state()["policy"]["source"].clone()
    }

    #[test]
    fn valid_states_apply_invalid_ones_keep_the_policy_in_force() {
        let metrics = Arc::new(Metrics::new());
        let upstream = Upstream::new(
            UpstreamConfig::new("quote", vec!["127.0.0.1:9".into()]),
            metrics,
            Default::default(),
            Default::default(),
        )
        .unwrap();
        let status = PolicyStatus::new(ServiceName::new("quote").unwrap());

        apply(&update(0, ""), &upstream, &status);
        assert_eq!(source(&upstream), json!({"source": "defaults"}));
        assert_eq!(status.version(), None);

        apply(
            &update(
                12,
                r#"{"service": "quote", "retries": {"max_attempts": 2}}"#,
            ),
            &upstream,
            &status,
        );
        assert_eq!(
            source(&upstream),
            json!({"source": "control-plane", "version": 12})
        );
        assert_eq!(status.version(), Some(12));

        // Invalid here: refused, counted, the version in force stays.
        for bad in [
            r#"{"retries": {"max_attempts": 0}}"#,
            r#"{"retries": {"a_field_from_the_future": 1, "max_attempts": "2"}}"#,
            r#"{"service": "billing"}"#,
        ] {
            apply(&update(13, bad), &upstream, &status);
        }
        assert_eq!(status.rejected.load(Ordering::Relaxed), 3);
        assert_eq!(status.version(), Some(12));
        assert_eq!(
            source(&upstream),
            json!({"source": "control-plane", "version": 12})
        );
        let error = status.stream.last_error().unwrap();
        assert!(
            error.starts_with("policy version 13 refused: service"),
            "{error}"
        );

        // From a newer control plane: the fields it does not know are ignored, the rest
        // applies; counted once per version, whatever the reconnections.
        let newer = r#"{"service": "quote", "retries": {"max_attempts": 4, "hedging": {"delay": "5ms"}}, "mirror": [{"to": "x"}]}"#;
        for _ in 0..3 {
            apply(&update(14, newer), &upstream, &status);
        }
        assert_eq!(status.version(), Some(14));
        assert_eq!(status.rejected.load(Ordering::Relaxed), 3);
        assert_eq!(status.stream.last_error(), None);
        assert_eq!(
            status.to_json()["unknown_fields"],
            json!(["retries.hedging", "mirror"])
        );
        assert_eq!(upstream.upstream_metrics.policy_unknown_fields.get(), 2);
        assert_eq!(
            upstream.state()["policy"]["spec"]["retries"]["max_attempts"],
            json!(4)
        );
        // A later version without them clears the list.
        apply(
            &update(
                15,
                r#"{"service": "quote", "retries": {"max_attempts": 2}}"#,
            ),
            &upstream,
            &status,
        );
        assert_eq!(status.to_json()["unknown_fields"], json!([]));
        assert_eq!(upstream.upstream_metrics.policy_unknown_fields.get(), 2);

        // Deleted: back to the defaults.
        apply(&update(0, ""), &upstream, &status);
        assert_eq!(source(&upstream), json!({"source": "defaults"}));
        assert_eq!(status.version(), None);
        assert_eq!(status.stream.last_error(), None);
    }
}
