//! The inbound direction: calls from other instances (their sidecars, or any client) to
//! the application behind this sidecar.
//!
//! The stages a connection meets, in order:
//!
//! ```text
//! accept -> mTLS ([`accept`]: the caller's identity from its certificate)
//!   -> detect (HTTP/1 | HTTP/2 | TCP)
//!   -> authorization ([`authorize`]: may that identity make this call to this service?
//!      per request for HTTP, once per connection for TCP)
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
//! - `malla-client-id` (requests): the caller's SPIFFE ID, set by this sidecar when the
//!   caller proved it with mTLS. Whatever a request carries under that name is removed
//!   first, on every listener, so an application can trust the field: only its own
//!   sidecar can have written it.
//!
//! ## mTLS
//!
//! A connection that opens with a TLS handshake record is a sidecar (or another mesh
//! workload) calling: the handshake requires its certificate from the mesh's CA
//! ([`crate::tls`]) and yields its identity. Any other first byte is plaintext, accepted in
//! `permissive` mode and closed in `strict` mode (`[inbound] mtls`). Each outcome is
//! counted (`inbound_connections_by_security`).

use std::{net::SocketAddr, time::Duration};

use malla_core::{policy::Policy, SpiffeId};
use tokio::net::TcpStream;
use tracing::debug;

use crate::{
    authz::{self, Authorizer},
    config::{MtlsMode, UpstreamConfig},
    error::ProxyError,
    listener::Shared,
    metrics::SecurityLabels,
    stream::Stream,
    tls::{self, MeshTls},
};

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// The mTLS stage: the connection as the protocols will read it, and the identity its
/// caller proved; `None` when it is closed here (a failed handshake, plaintext in strict
/// mode, a caller that sent nothing in time).
pub(crate) async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    tls: &MeshTls,
) -> Option<(Stream, Option<SpiffeId>)> {
    let mode = shared
        .config
        .inbound
        .as_ref()
        .map_or(MtlsMode::Permissive, |i| i.mtls);
    let timeout = shared.config.limits.detect_timeout;
    let mut first = [0u8; 1];
    let opens_tls = match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
        Ok(Ok(_)) | Ok(Err(_)) => return None, // closed
        Err(_) => false,                       // silent: a server-first protocol
    };
    if !opens_tls {
        return match mode {
            MtlsMode::Strict => {
                shared
                    .metrics
                    .inbound_security(SecurityLabels::plain("plaintext-refused"));
                debug!(%peer, "plaintext refused: [inbound] mtls = \"strict\"");
                None
            }
            _ => {
                shared
                    .metrics
                    .inbound_security(SecurityLabels::plain("plaintext"));
                Some((Stream::Plain(stream), None))
            }
        };
    }
    let config = match tls.server_config() {
        Ok(config) => config,
        Err(e) => {
            shared
                .metrics
                .inbound_security(SecurityLabels::failed("no-certificate"));
            debug!(%peer, error = %e, "mTLS refused: no certificate to answer with");
            return None;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(session)) => {
            let state = session.get_ref().1;
            let identity = tls::peer_identity(state);
            shared.metrics.inbound_security(tls::mtls_labels(state));
            Some((
                Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(session))),
                identity,
            ))
        }
        Ok(Err(e)) => {
            shared
                .metrics
                .inbound_security(SecurityLabels::failed(tls::failure_reason(&e)));
            debug!(%peer, error = %e, "mTLS handshake failed");
            None
        }
        Err(_) => {
            shared
                .metrics
                .inbound_security(SecurityLabels::failed("timeout"));
            debug!(%peer, "mTLS handshake timed out");
            None
        }
    }
}

/// The authorization stage: the call goes on when the service's policy allows it (or only
/// audits its denial); a denied one is answered `403 forbidden` (gRPC `PERMISSION_DENIED`)
/// or, for TCP, closed. The error names the caller and the verdict, not the rules.
pub(crate) fn authorize(
    authorizer: &Authorizer,
    call: &authz::Inbound<'_>,
) -> Result<(), ProxyError> {
    let verdict = authorizer.check(call);
    if verdict.allowed() {
        return Ok(());
    }
    let caller = call.source.map_or_else(
        || "an unauthenticated caller (no mTLS)".to_string(),
        ToString::to_string,
    );
    Err(ProxyError::Forbidden {
        reason: format!("{caller} may not call {}: {verdict}", authorizer.service()),
    })
}

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
