//! The outbound direction: the application's calls to its upstreams, through this
//! sidecar (a listener per upstream, or the HTTP proxy listener routing by `Host`).
//!
//! The stages a connection meets, in order:
//!
//! ```text
//! accept -> detect (HTTP/1 | HTTP/2 | TCP) -> route (the listener's upstream, or Host)
//!   -> the call (crate::call): deadline, faults and rate limits, service limits,
//!      pick (locality levels, breakers, P2C-EWMA), attempt, classify, record, retry
//!   -> [mTLS to the endpoint's sidecar, with this instance's identity]
//!   -> the response relayed
//! ```
//!
//! The application is trusted here (it is this sidecar's own): its `malla-timeout-ms` and
//! `grpc-timeout` set the call's budget (lowering, never raising, the policy's request
//! timeout).
//!
//! An error the sidecar answers on behalf of an upstream (no endpoints, refused, reset,
//! timeout, a limit) is marked `malla-relayed-failure: <upstream>`: the failure is a
//! service further along, and a caller's breaker must not eject the instance that only
//! relayed it.

use crate::upstream::Upstream;

/// The relayed-failure mark for an error answered on behalf of `upstream`.
pub(crate) fn relay_mark(upstream: &Upstream) -> Option<&str> {
    Some(upstream.name())
}
