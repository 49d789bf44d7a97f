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
//! `permissive` mode and closed in `strict` mode. Each outcome is counted
//! (`inbound_connections_by_security`).
//!
//! ## Which mode, from where
//!
//! The mode is read for each connection ([`mtls_in_force`]), so a change reaches the next
//! connection without a restart (open ones keep going), in this order:
//!
//! 1. `local`: `[inbound] mtls` in this sidecar's configuration, when set (`off` can only
//!    be set here): an operator's override of the control plane, for one sidecar.
//! 2. `service`: the `mtls` of the service's authorization policy, when it sets one.
//! 3. `mesh`: the mesh's mode (`malla control --mtls-mode`), sent with every policy state.
//! 4. `default`: without a control plane to follow (no `[control]`, or no `service` to
//!    follow a policy of), `permissive`, as before modes were central. A sidecar that
//!    follows one and has an identity is `strict` until the control plane's first answer:
//!    it fails closed rather than let plaintext in that the mesh may refuse (and it is
//!    not registered before its first certificate, so few callers find it meanwhile).
//!
//! A sidecar without an identity (no join token, no `control.identity_dir`) has no
//! certificate to prove and no handshake to answer: it takes every caller in plaintext,
//! whatever the mode (its registration says it does not accept mTLS).

use std::{net::SocketAddr, time::Duration};

use malla_core::{authz::PeerMtls, policy::Policy, SpiffeId};
use serde_json::json;
use tokio::net::TcpStream;
use tracing::debug;

use crate::{
    authz::{self, Authorizer},
    config::{MtlsMode, MtlsSource, UpstreamConfig},
    error::ProxyError,
    listener::Shared,
    metrics::SecurityLabels,
    stream::Stream,
    tls::{self, MeshTls},
};

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// The inbound mTLS mode in force, and where it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundMtls {
    pub mode: MtlsMode,
    pub source: MtlsSource,
}

/// The precedence (see the module's notes): `local`, the sidecar's `[inbound] mtls`;
/// `control`, `None` without a control plane's policy to follow, else what
/// [`Authorizer::mtls`] says (`None` before its first answer); `identity`, whether this
/// sidecar has an identity to prove (its inbound listener answers handshakes).
pub(crate) fn resolve_mtls(
    local: Option<MtlsMode>,
    control: Option<Option<(PeerMtls, MtlsSource)>>,
    identity: bool,
) -> InboundMtls {
    let (mode, source) = match (local, control) {
        (Some(mode), _) => (mode, MtlsSource::Local),
        (None, Some(Some((mode, source)))) => (mode.into(), source),
        // Following a control plane that has not answered yet: fail closed.
        (None, Some(None)) if identity => (MtlsMode::Strict, MtlsSource::Default),
        (None, _) => (MtlsMode::Permissive, MtlsSource::Default),
    };
    InboundMtls { mode, source }
}

/// The inbound mTLS mode in force now: one atomic and one `ArcSwap` read, per connection.
pub(crate) fn mtls_in_force(shared: &Shared) -> InboundMtls {
    let local = shared.config.inbound.as_ref().and_then(|i| i.mtls);
    let control = match local {
        Some(_) => None,
        None => shared
            .discovery
            .as_deref()
            .and_then(|d| d.authorizer())
            .map(|a| a.mtls()),
    };
    resolve_mtls(local, control, shared.inbound_tls.is_some())
}

/// The `inbound_mtls` part of `/config`: the mode in force, where it comes from, and what
/// each source says; `null` without an `[inbound]` listener.
pub(crate) fn mtls_json(shared: &Shared) -> serde_json::Value {
    let Some(inbound) = &shared.config.inbound else {
        return serde_json::Value::Null;
    };
    let authorizer = shared.discovery.as_deref().and_then(|d| d.authorizer());
    let in_force = mtls_in_force(shared);
    let service = authorizer.and_then(|a| match a.mtls() {
        Some((mode, MtlsSource::Service)) => Some(mode.as_str()),
        _ => None,
    });
    let note = match in_force.source {
        _ if shared.inbound_tls.is_none() && inbound.mtls != Some(MtlsMode::Off) => Some(
            "no identity (no join token, no control.identity_dir): no certificate to prove, so every caller is taken in plaintext whatever the mode",
        ),
        MtlsSource::Local if authorizer.is_some() => {
            Some("[inbound] mtls in this sidecar's configuration overrides the control plane's mode")
        }
        MtlsSource::Default if authorizer.is_some() && in_force.mode == MtlsMode::Strict => {
            Some("strict until the control plane's first answer (failing closed)")
        }
        _ => None,
    };
    json!({
        "mode": in_force.mode.as_str(),
        "source": in_force.source.as_str(),
        "local": inbound.mtls.map(MtlsMode::as_str),
        "service": service,
        "mesh": authorizer.and_then(|a| a.mesh_mtls()).map(PeerMtls::as_str),
        "note": note,
    })
}

/// The mTLS stage: the connection as the protocols will read it, and the identity its
/// caller proved; `None` when it is closed here (a failed handshake, plaintext in strict
/// mode, a caller that sent nothing in time).
pub(crate) async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    tls: &MeshTls,
) -> Option<(Stream, Option<SpiffeId>)> {
    let mtls = mtls_in_force(shared);
    let timeout = shared.config.limits.detect_timeout;
    let mut first = [0u8; 1];
    let opens_tls = match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
        Ok(Ok(_)) | Ok(Err(_)) => return None, // closed
        Err(_) => false,                       // silent: a server-first protocol
    };
    if !opens_tls {
        return match mtls.mode {
            MtlsMode::Strict => {
                shared
                    .metrics
                    .inbound_security(SecurityLabels::plain("plaintext-refused"));
                debug!(%peer, source = mtls.source.as_str(), "plaintext refused: the inbound mTLS mode is strict");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_mode_wins_then_the_service_then_the_mesh() {
        use MtlsMode::{Off, Permissive, Strict};
        let strict_mesh = Some(Some((PeerMtls::Strict, MtlsSource::Mesh)));
        let permissive_service = Some(Some((PeerMtls::Permissive, MtlsSource::Service)));
        let answer = |mode, source| InboundMtls { mode, source };
        let cases = [
            // [inbound] mtls set: it wins over whatever the control plane says, `off` too.
            (
                Some(Permissive),
                strict_mesh,
                true,
                answer(Permissive, MtlsSource::Local),
            ),
            (
                Some(Strict),
                permissive_service,
                true,
                answer(Strict, MtlsSource::Local),
            ),
            (Some(Off), strict_mesh, true, answer(Off, MtlsSource::Local)),
            (Some(Strict), None, true, answer(Strict, MtlsSource::Local)),
            // Not set: the control plane's (the authorizer has already put the service's
            // before the mesh's).
            (None, strict_mesh, true, answer(Strict, MtlsSource::Mesh)),
            (
                None,
                permissive_service,
                true,
                answer(Permissive, MtlsSource::Service),
            ),
            // Following a control plane that has not answered: strict with an identity.
            (None, Some(None), true, answer(Strict, MtlsSource::Default)),
            (
                None,
                Some(None),
                false,
                answer(Permissive, MtlsSource::Default),
            ),
            // No control plane to follow: permissive, as before.
            (None, None, true, answer(Permissive, MtlsSource::Default)),
            (None, None, false, answer(Permissive, MtlsSource::Default)),
        ];
        for (local, control, identity, expected) in cases {
            assert_eq!(
                resolve_mtls(local, control, identity),
                expected,
                "{local:?} {control:?} identity {identity}"
            );
        }
    }
}
