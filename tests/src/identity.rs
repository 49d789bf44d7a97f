//! Workload identity for tests: an SVID of a service from a real CA, as a sidecar would
//! hold it (its key made here, its CSR certified by the CA), and sidecars that join a test
//! control plane's mesh with a join token.

use std::{net::SocketAddr, path::Path, sync::Arc};

use malla_control::{
    identity::{Ca, Identity},
    store::embedded::EmbeddedStore,
};
use malla_core::ServiceName;
use malla_proxy::identity::Svid;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

/// `service`'s SVID from `ca`, with `ca`'s trust bundle.
pub fn svid(ca: &Ca, service: &str) -> Svid {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .expect("a CSR");
    let issued = ca
        .issue_for_service(
            csr.der(),
            &ServiceName::new(service).expect("a valid service name"),
        )
        .expect("a certificate");
    Svid {
        spiffe_id: issued.spiffe_id,
        chain: issued.chain,
        key_pkcs8: Arc::new(key.serialize_der()),
        trust_bundle: issued.trust_bundle,
        not_before: issued.not_before,
        not_after: issued.not_after,
    }
}

/// A single-use join token for `service` from `control`'s CA (as `malla token create`
/// makes one).
pub async fn join_token(control: &crate::control::TestControl, service: &str) -> String {
    join_token_from(control.identity(), service).await
}

/// The same from the identity of a control plane started without the harness
/// (`malla_control::server::Control::identity`).
pub async fn join_token_from(identity: &Identity<EmbeddedStore>, service: &str) -> String {
    identity
        .tokens
        .create(
            &ServiceName::new(service).expect("a valid service name"),
            None,
        )
        .await
        .expect("a join token")
        .token
}

/// `[control]` of a sidecar of `service` that joins `control`'s mesh with `token`: over
/// TLS, verified with the control plane's trust bundle until it holds a certificate.
pub fn joined(
    control: &crate::control::TestControl,
    service: &str,
    token: Option<String>,
) -> malla_proxy::config::ControlPlaneConfig {
    malla_proxy::config::ControlPlaneConfig {
        service: Some(service.into()),
        join_token: token,
        ..over_tls(control)
    }
}

/// [`joined`] with a fresh join token of `service`: a sidecar that may register its
/// instance and report resilience events, as a deployed one does.
pub async fn joining(
    control: &crate::control::TestControl,
    service: &str,
) -> malla_proxy::config::ControlPlaneConfig {
    joined(control, service, Some(join_token(control, service).await))
}

/// `[control]` of a sidecar that reaches `control` over TLS (`HOST:PORT`), verified with
/// its trust bundle (`ca_file`, `DATA_DIR/trust-bundle.pem`).
pub fn over_tls(control: &crate::control::TestControl) -> malla_proxy::config::ControlPlaneConfig {
    over_tls_at(control.http_addr(), control.data_dir())
}

/// The same for a control plane at `addr` (either of its ports) over `data_dir`, started
/// without the harness.
pub fn over_tls_at(addr: SocketAddr, data_dir: &Path) -> malla_proxy::config::ControlPlaneConfig {
    malla_proxy::config::ControlPlaneConfig {
        ca_file: Some(crate::control::tls::bundle_path(data_dir)),
        ..malla_proxy::config::ControlPlaneConfig::new(addr.to_string())
    }
}

/// The identity state of a sidecar that has one configured.
pub fn state(proxy: &crate::proxy::TestProxy) -> Arc<malla_proxy::identity::IdentityState> {
    proxy
        .handle()
        .discovery()
        .and_then(|d| d.identity().cloned())
        .expect("the sidecar has an identity configured")
}

/// Waits until `proxy` holds its certificate.
pub async fn wait_for_certificate(proxy: &crate::proxy::TestProxy) {
    let state = state(proxy);
    crate::assert_eventually!(
        state.current().is_some(),
        "the sidecar got no certificate: {}",
        state.to_json()
    );
}
