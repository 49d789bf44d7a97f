//! What must hold whatever bytes arrive where a CSR or a certificate is expected: the
//! checks behind the `identity_csr` fuzz target (`fuzz/`) and an always-on bounded test
//! of mutated inputs.
//!
//! - Nothing panics.
//! - An issued certificate is exactly the asked service's identity (one URI SAN, no other
//!   name whatever the CSR asked), for the CSR's own key, not a CA, and verifies against
//!   the root.
//! - A renewal succeeds only for the key of the certificate presented, and only with a
//!   certificate this CA issued: bytes that are not one never renew.

use std::sync::OnceLock;

use malla_core::{ServiceName, TrustDomain};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{ca::DEFAULT_CERT_TTL, Ca, Issued};

struct Fixture {
    ca: Ca,
    service: ServiceName,
    /// The subject public key (BIT STRING bytes) of `key`.
    key_bits: Vec<u8>,
    /// A valid CSR for `key`.
    csr: Vec<u8>,
    /// A certificate of `ca` for `key`.
    current: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let domain = TrustDomain::new("malla.local").expect("a valid domain");
        let ca = Ca::ephemeral(domain, DEFAULT_CERT_TTL).expect("an in-memory CA");
        let service = ServiceName::new("checkout").expect("a valid name");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("a key");
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .expect("a CSR")
            .der()
            .to_vec();
        let current = ca
            .issue_for_service(&csr, &service)
            .expect("the fixture's certificate")
            .chain
            .remove(0);
        let (_, cert) = X509Certificate::from_der(&current).expect("it parses");
        Fixture {
            key_bits: cert.public_key().subject_public_key.data.to_vec(),
            ca,
            service,
            csr,
            current,
        }
    })
}

/// A good CSR and a good certificate, to mutate.
pub fn seeds() -> (Vec<u8>, Vec<u8>) {
    let f = fixture();
    (f.csr.clone(), f.current.clone())
}

/// `data` as a CSR (first certificate and renewal) and as the current certificate.
pub fn check(data: &[u8]) {
    let f = fixture();
    if let Ok(issued) = f.ca.issue_for_service(data, &f.service) {
        check_leaf(f, &issued, csr_key_bits(data).as_deref());
    }
    if let Ok(issued) = f.ca.renew(data, &f.current, &f.service) {
        assert_eq!(
            csr_key_bits(data).as_deref(),
            Some(f.key_bits.as_slice()),
            "renewed for a key that is not the certificate's"
        );
        check_leaf(f, &issued, Some(&f.key_bits));
    }
    if let Ok(issued) = f.ca.renew(&f.csr, data, &f.service) {
        let (_, presented) = X509Certificate::from_der(data).expect("a renewed certificate parses");
        assert_eq!(
            presented.public_key().subject_public_key.data.as_ref(),
            f.key_bits.as_slice(),
            "renewed from a certificate for another key"
        );
        check_leaf(f, &issued, Some(&f.key_bits));
    }
}

fn csr_key_bits(der: &[u8]) -> Option<Vec<u8>> {
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der).ok()?;
    Some(
        csr.certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .to_vec(),
    )
}

fn check_leaf(f: &Fixture, issued: &Issued, key_bits: Option<&[u8]>) {
    assert_eq!(
        issued.spiffe_id.to_string(),
        "spiffe://malla.local/svc/checkout"
    );
    let (rest, leaf) = X509Certificate::from_der(&issued.chain[0]).expect("the leaf parses");
    assert!(rest.is_empty());
    assert!(!leaf.is_ca(), "a leaf is never a CA");
    let names = &leaf
        .subject_alternative_name()
        .expect("its SAN parses")
        .expect("it has a SAN")
        .value
        .general_names;
    assert_eq!(names.len(), 1, "one name only: {names:?}");
    assert!(
        matches!(names[0], x509_parser::extensions::GeneralName::URI(u) if u == "spiffe://malla.local/svc/checkout")
    );
    assert_eq!(
        Some(leaf.public_key().subject_public_key.data.as_ref()),
        key_bits,
        "the certificate is for the CSR's key"
    );
    let bundle = f.ca.bundle();
    let (_, root) = X509Certificate::from_der(&bundle[0]).expect("the root parses");
    leaf.verify_signature(Some(root.public_key()))
        .expect("the leaf verifies against the root");
}

#[cfg(test)]
mod tests {
    use malla_core::rng::Rng;

    use super::*;

    fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
        let mut data = seed.to_vec();
        for _ in 0..=rng.below(4) {
            let at = rng.below(data.len());
            match rng.below(6) {
                0 => data[at] ^= 1 << rng.below(8),
                1 => data[at] = rng.next_u64() as u8,
                2 => data.truncate(at),
                3 => data.insert(at, rng.next_u64() as u8),
                4 if !data.is_empty() => {
                    data.remove(at.min(data.len() - 1));
                }
                // A length byte set to a boundary value.
                _ => data[at] = [0x00, 0x7f, 0x80, 0x81, 0x82, 0xff][rng.below(6)],
            }
            if data.is_empty() {
                break;
            }
        }
        data
    }

    #[test]
    fn mutated_csrs_and_certificates_hold_the_invariants() {
        let (csr, cert) = seeds();
        check(&csr);
        check(&cert);
        check(&[]);
        let mut rng = Rng::new(0x6d61_6c6c_6121);
        for _ in 0..2_000 {
            check(&mutate(&csr, &mut rng));
            check(&mutate(&cert, &mut rng));
        }
    }
}
