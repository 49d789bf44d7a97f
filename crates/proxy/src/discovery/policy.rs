//! Following the resilience policy of one upstream's service: `WatchPolicy`, each state
//! read and validated (`malla_api::PolicyState`, the same checks the control plane made
//! when the policy was written) and put in force with [`Upstream::set_policy`];
//! reconnecting with backoff when the stream breaks.
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
//!
//! While the control plane is away the policy in force stays, as the endpoints do; a
//! reconnection starts with the current state, which is applied only if its version
//! differs from the one in force.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use malla_api::{policy_pb as pb, PoliciesClient, PolicyState};
use malla_core::ServiceName;
use serde_json::json;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::{backoff::Backoff, get_error, set_error, RETRY_BASE, RETRY_MAX};
use crate::upstream::Upstream;

/// Longest wait for a new stream's first message.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// One upstream's policy watch, for `/config`.
pub(crate) struct PolicyStatus {
    pub(super) service: ServiceName,
    /// The control-plane version in force; 0: none (local policy or defaults).
    version: AtomicU64,
    connected: AtomicBool,
    /// Policies received and refused (invalid for this sidecar).
    rejected: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Fields of the control-plane policy in force that this sidecar ignored.
    unknown_fields: Mutex<Vec<String>>,
}

impl PolicyStatus {
    pub(super) fn new(service: ServiceName) -> Self {
        PolicyStatus {
            service,
            version: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
            last_error: Mutex::new(None),
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
            "connected": self.connected.load(Ordering::Relaxed),
            "version": self.version(),
            "rejected": self.rejected.load(Ordering::Relaxed),
            "last_error": get_error(&self.last_error),
            "unknown_fields": self.unknown_fields(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the control plane ended the stream")]
    Ended,
    #[error("no policy state within {START_TIMEOUT:?}")]
    Timeout,
}

pub(super) async fn run(
    mut client: PoliciesClient<Channel>,
    upstream: Arc<Upstream>,
    status: Arc<PolicyStatus>,
) {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut streams = 0u64;
    loop {
        let before = streams;
        let error = follow(&mut client, &upstream, &status, &mut backoff, &mut streams).await;
        status.connected.store(false, Ordering::Relaxed);
        set_error(&status.last_error, Some(error.to_string()));
        let wait = backoff.next_delay();
        if streams > before {
            warn!(upstream = %upstream.name(), %error, retry_in = ?wait, version = status.version(), "lost the policy stream; keeping the policy in force");
        } else {
            debug!(upstream = %upstream.name(), %error, retry_in = ?wait, "cannot watch the policy; retrying");
        }
        tokio::time::sleep(wait).await;
    }
}

/// One stream, from the request to its end.
async fn follow(
    client: &mut PoliciesClient<Channel>,
    upstream: &Upstream,
    status: &PolicyStatus,
    backoff: &mut Backoff,
    streams: &mut u64,
) -> WatchError {
    let request = pb::WatchPolicyRequest {
        service: status.service.to_string(),
    };
    let start = async {
        let mut stream = client.watch_policy(request).await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let (mut stream, mut next) = match tokio::time::timeout(START_TIMEOUT, start).await {
        Ok(Ok(started)) => started,
        Ok(Err(status)) => return status.into(),
        Err(_) => return WatchError::Timeout,
    };
    if next.is_none() {
        return WatchError::Ended;
    }
    *streams += 1;
    status.connected.store(true, Ordering::Relaxed);
    set_error(&status.last_error, None);
    backoff.reset();
    loop {
        let message = match next.take() {
            Some(message) => message,
            None => match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return WatchError::Ended,
                Err(status) => return status.into(),
            },
        };
        apply(&message, upstream, status);
    }
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
            set_error(&status.last_error, Some(error));
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
    set_error(&status.last_error, None);
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
        let error = get_error(&status.last_error).unwrap();
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
        assert_eq!(get_error(&status.last_error), None);
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
        assert_eq!(get_error(&status.last_error), None);
    }
}
