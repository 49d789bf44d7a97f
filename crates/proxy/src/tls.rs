//! mTLS between sidecars: rustls configurations made from this sidecar's identity
//! ([`crate::identity`]).
//!
//! - TLS 1.3 only, on aws-lc-rs, with the hybrid post-quantum key exchange X25519MLKEM768
//!   preferred and X25519 as the fallback (rustls' `prefer-post-quantum` order).
//! - The server side requires a client certificate that chains to the mesh's trust bundle
//!   (client-auth usage); the caller's identity is the SPIFFE ID in it ([`peer_identity`]).
//!   Whether that identity may call is authorization's question, not the handshake's.
//! - The client side presents this sidecar's certificate and accepts a server only if its
//!   certificate chains to the bundle (server-auth usage) *and* names the expected SPIFFE
//!   ID: the identity of the service being called. rustls' own server verifier matches DNS
//!   names and IP addresses; SPIFFE identities are URIs, so the name check is ours
//!   ([`SpiffeServerVerifier`]) while the chain check stays rustls'.
//!
//! Configurations are built once per certificate ([`MeshTls`] caches them against the
//! [`Svid`] in force): a renewal is picked up by the next connection, and connections
//! already open keep the certificate they were made with.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use malla_core::SpiffeId;
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::{ParsedCertificate, WebPkiClientVerifier},
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use crate::{
    identity::{IdentityState, Svid},
    metrics::SecurityLabels,
};

/// The ALPN protocol of malla's sidecar-to-sidecar connections.
pub const ALPN_MESH: &[u8] = b"malla/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("this sidecar has no certificate yet (see /config control.identity.last_error)")]
    NoIdentity,
    #[error("the mesh TLS configuration cannot be built: {0}")]
    Config(String),
}

/// The crypto provider: aws-lc-rs, key exchange groups in rustls' post-quantum-first order.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// This sidecar's TLS configurations, rebuilt when its certificate changes.
pub struct MeshTls {
    identity: Arc<IdentityState>,
    provider: Arc<CryptoProvider>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// The certificate the configurations below were built with.
    svid: Option<Arc<Svid>>,
    server: Option<Arc<ServerConfig>>,
    clients: HashMap<SpiffeId, Arc<ClientConfig>>,
}

impl MeshTls {
    pub fn new(identity: Arc<IdentityState>) -> Self {
        MeshTls {
            identity,
            provider: provider(),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The identity the configurations are made from.
    pub fn identity(&self) -> &IdentityState {
        &self.identity
    }

    /// The configuration that accepts other sidecars.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let svid = self.identity.current().ok_or(TlsError::NoIdentity)?;
        let mut cache = self.cache_for(&svid);
        if let Some(config) = &cache.server {
            return Ok(config.clone());
        }
        let config = Arc::new(server_config(&svid, &self.provider)?);
        cache.server = Some(config.clone());
        Ok(config)
    }

    /// The configuration that calls a sidecar of the service whose identity is `peer`.
    pub fn client_config(&self, peer: &SpiffeId) -> Result<Arc<ClientConfig>, TlsError> {
        let svid = self.identity.current().ok_or(TlsError::NoIdentity)?;
        let mut cache = self.cache_for(&svid);
        if let Some(config) = cache.clients.get(peer) {
            return Ok(config.clone());
        }
        let config = Arc::new(client_config(&svid, peer.clone(), &self.provider)?);
        cache.clients.insert(peer.clone(), config.clone());
        Ok(config)
    }

    /// The cache, emptied first if it was built for another certificate.
    fn cache_for(&self, svid: &Arc<Svid>) -> std::sync::MutexGuard<'_, Cache> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if !cache.svid.as_ref().is_some_and(|s| Arc::ptr_eq(s, svid)) {
            *cache = Cache {
                svid: Some(svid.clone()),
                ..Cache::default()
            };
        }
        cache
    }
}

fn roots(svid: &Svid) -> Result<Arc<RootCertStore>, TlsError> {
    roots_from_der(&svid.trust_bundle)
}

fn chain_and_key(svid: &Svid) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = svid
        .chain
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.as_ref().clone()));
    (chain, key)
}

/// Accepts sidecars whose certificate chains to the bundle; presents `svid`.
pub fn server_config(
    svid: &Svid,
    provider: &Arc<CryptoProvider>,
) -> Result<ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(svid)?, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let (chain, key) = chain_and_key(svid);
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("this sidecar's certificate and key: {e}")))?;
    // The mesh's own first; then what other TLS clients of the mesh offer (curl, gRPC
    // libraries), since a client whose every offer is refused gets no connection. The
    // protocol inside is detected from its first bytes whatever was agreed.
    config.alpn_protocols = vec![ALPN_MESH.to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Calls a sidecar that must prove `peer`; presents `svid`.
pub fn client_config(
    svid: &Svid,
    peer: SpiffeId,
    provider: &Arc<CryptoProvider>,
) -> Result<ClientConfig, TlsError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        roots(svid)?,
        Expected::Id(peer),
        provider,
    ));
    let (chain, key) = chain_and_key(svid);
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("this sidecar's certificate and key: {e}")))?;
    config.alpn_protocols = vec![ALPN_MESH.to_vec()];
    Ok(config)
}

/// Calls the control plane's API: accepts a server whose certificate chains to `roots` and
/// proves the control plane's identity ([`Expected::ControlPlane`]), whatever address it
/// was reached at; presents `svid` when given (a sidecar authenticates its writes with
/// it), nothing otherwise (the CLI, a sidecar before its first certificate). `alpn`: `h2`
/// for gRPC, `http/1.1` for the CLI.
pub fn control_plane_client_config(
    roots: Arc<RootCertStore>,
    svid: Option<&Svid>,
    alpn: &[u8],
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        roots,
        Expected::ControlPlane,
        &provider,
    ));
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match svid {
        Some(svid) => {
            let (chain, key) = chain_and_key(svid);
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(format!("this sidecar's certificate and key: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The roots of a PEM trust bundle (`DATA_DIR/trust-bundle.pem`); an error says what is
/// wrong with it.
pub fn roots_from_pem(pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let blocks = ::pem::parse_many(pem)
        .map_err(|e| TlsError::Config(format!("not a PEM trust bundle: {e}")))?;
    let mut roots = RootCertStore::empty();
    for block in blocks.iter().filter(|b| b.tag() == "CERTIFICATE") {
        roots
            .add(CertificateDer::from(block.contents().to_vec()))
            .map_err(|e| TlsError::Config(format!("a trust bundle root is refused: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Config(
            "the trust bundle holds no certificate (expected PEM CERTIFICATE blocks)".into(),
        ));
    }
    Ok(Arc::new(roots))
}

/// The roots of a DER trust bundle, as a certificate answer brings it.
pub fn roots_from_der(bundle: &[Vec<u8>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in bundle {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| TlsError::Config(format!("a trust bundle root is refused: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The name to put in the ClientHello: SNI is not used to pick a certificate (a sidecar
/// has one), and a SPIFFE ID is not a DNS name, so a fixed placeholder goes.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("malla.mesh").expect("a valid DNS name")
}

/// Verifies a server's chain with rustls' webpki check and its SPIFFE ID against the one
/// expected.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Expected,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The identity a server must prove.
#[derive(Clone, Debug)]
pub enum Expected {
    /// Exactly this one (a sidecar of the service called).
    Id(SpiffeId),
    /// A control plane's (`spiffe://DOMAIN/control`): the trust domain is the roots' own,
    /// and a client may not know it before its first certificate.
    ControlPlane,
}

impl Expected {
    fn accepts(&self, id: &SpiffeId) -> bool {
        match self {
            Expected::Id(expected) => id == expected,
            Expected::ControlPlane => id.is_control_plane(),
        }
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Id(id) => id.fmt(f),
            Expected::ControlPlane => {
                f.write_str("the control plane's identity (spiffe://DOMAIN/control)")
            }
        }
    }
}

impl SpiffeServerVerifier {
    /// Accepts servers whose certificate chains to `roots` and names `expected`.
    pub fn new(roots: Arc<RootCertStore>, expected: Expected, provider: &CryptoProvider) -> Self {
        SpiffeServerVerifier {
            roots,
            expected,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match spiffe_id(end_entity) {
            Some(id) if self.expected.accepts(&id) => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The SPIFFE ID of a certificate: its one URI SAN, when that is a valid SPIFFE ID.
pub fn spiffe_id(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    malla_core::identity::spiffe_id_of(&cert).ok()
}

/// The metric labels of a finished mTLS handshake: the key exchange group it agreed
/// (`X25519MLKEM768`...) and the ALPN protocol.
pub fn mtls_labels(connection: &rustls::CommonState) -> SecurityLabels {
    SecurityLabels {
        group: connection
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_default(),
        alpn: connection
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default(),
        ..SecurityLabels::plain("mtls")
    }
}

/// Every reason [`failure_reason`] gives, so the metric's label stays bounded.
pub const FAILURE_REASONS: [&str; 9] = [
    "unknown-ca",
    "expired",
    "wrong-identity",
    "no-certificate",
    "peer-refused",
    "protocol",
    "closed",
    "timeout",
    "other",
];

/// Why a handshake failed, in a word for metrics: the check of the peer's certificate
/// that refused it, the peer's refusal of ours, a protocol violation, or the connection
/// closing (`timeout` is the caller's to say).
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(E::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => "unknown-ca",
        Some(E::InvalidCertificate(CertificateError::Expired | CertificateError::NotValidYet)) => {
            "expired"
        }
        Some(E::InvalidCertificate(CertificateError::NotValidForName)) => "wrong-identity",
        Some(E::NoCertificatesPresented) => "no-certificate",
        Some(E::AlertReceived(_)) => "peer-refused",
        Some(
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_)
            | E::PeerIncompatible(_)
            | E::NoApplicationProtocol,
        ) => "protocol",
        Some(_) => "other",
        None if matches!(
            error.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ) =>
        {
            "closed"
        }
        None => "other",
    }
}

/// A failed client handshake in words a user can act on: which check refused the server
/// (rustls' error comes wrapped in an I/O error).
pub fn explain(error: &std::io::Error, expected: &impl std::fmt::Display) -> String {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => {
            format!("the server does not prove {expected} (its certificate names another identity)")
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
        | Some(rustls::Error::InvalidCertificate(CertificateError::BadSignature)) => {
            "the server's certificate is not from this mesh's CA".to_string()
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::Expired)) => {
            "the server's certificate has expired".to_string()
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the server refused this sidecar's certificate ({alert:?})")
        }
        Some(other) => other.to_string(),
        None => error.to_string(),
    }
}

/// The identity a peer proved in a finished handshake.
pub fn peer_identity(connection: &rustls::CommonState) -> Option<SpiffeId> {
    spiffe_id(connection.peer_certificates()?.first()?)
}
