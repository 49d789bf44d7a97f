//! Workload certificates for tests: an SVID of a service from a real CA, as a sidecar
//! would hold it (its key made here, its CSR certified by the CA).

use std::sync::Arc;

use malla_control::identity::Ca;
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
        trust_bundle: ca.bundle().to_vec(),
        not_before: issued.not_before,
        not_after: issued.not_after,
    }
}
