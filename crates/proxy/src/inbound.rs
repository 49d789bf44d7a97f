//! The inbound direction: calls from other instances (their sidecars, or any client) to
//! the application behind this sidecar.
//!
//! The stages a connection meets, in order:
//!
//! ```text
//! accept -> detect (HTTP/1 | HTTP/2 | TCP)
//!   -> [identity: the caller's mTLS certificate, once the mesh has a CA]
//!   -> [authorization: may that identity call this service?]
//!   -> mesh headers at the edge (below) -> the call to the one local endpoint
//!   -> the application's response, its mesh headers checked
//! ```
//!
//! The call runs through the same driver as outbound ([`crate::call`]) under a policy that
//! turns off retries, ejection and failover ([`upstream_config`]): the callers' sidecars
//! retry and eject; doing it twice would multiply load on the one endpoint there is.
//!
//! ## Mesh headers at the edge
//!
//! What arrives here may come from anyone, so each mesh header is trusted only as far as
//! it can be:
//!
//! - `malla-timeout-ms` / `grpc-timeout` (requests): a caller's remaining budget. It can
//!   only lower this side's deadline, never raise it past the policy's request timeout, and
//!   what is left of it is forwarded for the application to read.
//! - `malla-relayed-failure` (responses from the application): the application claims its
//!   failure is a dependency's, which exempts this instance from its callers' ejection. The
//!   claim stands only if it names one of this sidecar's upstreams that failed through this
//!   sidecar within [`RELAY_WINDOW`]; otherwise the field is removed (and counted), so an
//!   application cannot exempt itself by setting it.
//! - `malla-error` (responses): informational, never acted on by a caller's sidecar.

use std::time::Duration;

use malla_core::policy::Policy;

use crate::{config::UpstreamConfig, listener::Shared};

/// How recent an upstream's failure must be for the application's claim to relay it.
pub const RELAY_WINDOW: Duration = Duration::from_secs(10);

/// The local application as an upstream: no retries, no breaker, no failover.
pub(crate) fn upstream_config(forward_to: &str) -> UpstreamConfig {
    let mut config = UpstreamConfig::new("inbound", vec![forward_to.to_string()]);
    let mut policy = Policy::default();
    policy.retries.enabled = false;
    policy.outlier.enabled = false;
    policy.failover.enabled = false;
    config.policy = Some(policy);
    config
}

/// Whether the application's `malla-relayed-failure: <value>` is borne out: `value` names
/// one of this sidecar's upstreams that failed within [`RELAY_WINDOW`].
pub(crate) fn relayed_failure_holds(shared: &Shared, value: &[u8]) -> bool {
    let holds = std::str::from_utf8(value)
        .ok()
        .and_then(|name| shared.upstreams.get(name.trim()))
        .is_some_and(|u| u.failed_within(RELAY_WINDOW));
    if !holds {
        shared.metrics.untrusted_relayed_failure();
    }
    holds
}
