//! Opening connections to endpoints: TCP, then the mesh's TLS when the endpoint is another
//! sidecar that accepts it.
//!
//! An endpoint is called over mTLS when its instance was registered by a sidecar with a
//! certificate (the registry's `mtls` flag) and this sidecar has one too. The server must
//! prove the SPIFFE ID of the service being called, in this sidecar's trust domain: the
//! identity is derived from the upstream's service, never taken from the registration, so
//! an instance registered under a service cannot answer with another service's identity
//! and the registry cannot point a caller at an identity of its choosing. Without a
//! certificate of its own (none configured, or a join token still being redeemed), a
//! sidecar calls in plaintext, which a server in `permissive` mode accepts and one in `strict` mode refuses.
//! Each outcome is counted (`outbound_connections_by_security`).

use std::{net::SocketAddr, time::Duration};

use malla_core::SpiffeId;
use tokio::{net::TcpStream, time::Instant};
use tracing::debug;

use crate::{
    endpoint::Endpoint,
    error::ProxyError,
    metrics::SecurityLabels,
    stream::Stream,
    tls::{self, TlsError},
    upstream::Upstream,
};

/// A TCP connection to `addr`, with `TCP_NODELAY`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(ProxyError::from_connect(addr, e)),
        Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
    }
}

/// A connection to `endpoint` of `upstream`, ready for the protocol: over mTLS when both
/// ends have a certificate, plaintext otherwise. `timeout` bounds the TCP connect and the
/// handshake together.
pub(crate) async fn open(
    upstream: &Upstream,
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<Stream, ProxyError> {
    let addr = endpoint.addr;
    let deadline = Instant::now() + timeout;
    let tcp = connect(addr, timeout).await?;
    let (true, Some(service)) = (endpoint.mtls, upstream.service()) else {
        return Ok(Stream::Plain(tcp));
    };
    let metrics = upstream.metrics();
    let Some((mesh, svid)) = upstream
        .mesh_tls()
        .and_then(|mesh| Some((mesh, mesh.identity().current()?)))
    else {
        metrics.outbound_security(SecurityLabels::plain("plaintext-no-identity"));
        return Ok(Stream::Plain(tcp));
    };
    let peer = SpiffeId::for_service(svid.spiffe_id.trust_domain(), service);
    let config = mesh.client_config(&peer).map_err(|e| match e {
        TlsError::NoIdentity | TlsError::Config(_) => ProxyError::Handshake {
            addr,
            reason: e.to_string(),
        },
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout_at(deadline, connector.connect(tls::server_name(), tcp)).await {
        Ok(Ok(session)) => {
            metrics.outbound_security(tls::mtls_labels(session.get_ref().1));
            Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(
                session,
            ))))
        }
        Ok(Err(e)) => {
            metrics.outbound_security(SecurityLabels::failed(tls::failure_reason(&e)));
            debug!(%addr, %peer, error = %e, "mTLS handshake failed");
            Err(ProxyError::Handshake {
                addr,
                reason: tls::explain(&e, &peer),
            })
        }
        Err(_) => {
            metrics.outbound_security(SecurityLabels::failed("timeout"));
            Err(ProxyError::ConnectTimeout { addr, timeout })
        }
    }
}
