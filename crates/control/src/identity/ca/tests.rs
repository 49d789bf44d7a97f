use std::time::{Duration, SystemTime};

use malla_core::{ServiceName, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::*;
use crate::api::grpc::tests::TempDir;

fn domain() -> TrustDomain {
    TrustDomain::new("malla.local").unwrap()
}

fn svc(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

fn generated(dir: &TempDir) -> CaSettings {
    CaSettings {
        trust_domain: domain(),
        cert_ttl: DEFAULT_CERT_TTL,
        source: CaSource::Generated {
            dir: dir.0.join("ca"),
        },
    }
}

fn key() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
}

/// A CSR signed by `key`, asking for whatever it likes (the CA ignores it).
fn csr(key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.is_ca = IsCa::NoCa;
    params.serialize_request(key).unwrap().der().to_vec()
}

fn uris(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_root_is_created_once_private_and_kept() {
    let dir = TempDir::new("ca-root");
    let ca = Ca::open(&generated(&dir)).unwrap();
    let key_path = dir.0.join("ca").join(files::ROOT_KEY);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key_path), 0o600);
        assert_eq!(mode(&dir.0.join("ca")), 0o700);
    }
    let bundle = ca.bundle();
    let (_, root) = X509Certificate::from_der(&bundle[0]).unwrap();
    assert!(root.is_ca());
    assert!(root
        .subject()
        .to_string()
        .contains("malla root CA malla.local"));
    // Opened again: the same root.
    let again = Ca::open(&generated(&dir)).unwrap();
    assert_eq!(again.bundle(), ca.bundle());
    assert!(ca.bundle_pem().starts_with("-----BEGIN CERTIFICATE-----"));

    // Half a CA on disk is reported, never replaced.
    std::fs::remove_file(&key_path).unwrap();
    let e = Ca::open(&generated(&dir)).unwrap_err().to_string();
    assert!(e.contains("without the other"), "{e}");
}

#[test]
fn a_leaf_is_the_services_svid_whatever_the_csr_asks() {
    let dir = TempDir::new("ca-leaf");
    let ca = Ca::open(&generated(&dir)).unwrap();
    let key = key();
    let issued = ca.issue_for_service(&csr(&key), &svc("checkout")).unwrap();
    assert_eq!(
        issued.spiffe_id.to_string(),
        "spiffe://malla.local/svc/checkout"
    );
    assert_eq!(issued.chain.len(), 1, "a root issues leaves directly");
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
    assert_eq!(uris(&leaf), ["spiffe://malla.local/svc/checkout"]);
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "no subject: the SAN is critical");
    assert!(leaf.subject().iter().next().is_none(), "no subject");
    // Nothing the CSR asked for (a DNS name) made it in.
    assert!(!san
        .value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::DNSName(_))));
    assert!(!leaf.is_ca());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(leaf.key_usage().unwrap().unwrap().value.digital_signature());
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
    let bundle = ca.bundle();
    let (_, root) = X509Certificate::from_der(&bundle[0]).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    let life = issued.not_after.duration_since(issued.not_before).unwrap();
    assert_eq!(life, DEFAULT_CERT_TTL + BACKDATE);
    assert!(leaf.validity().is_valid());
}

#[test]
fn renewal_needs_the_current_key_and_a_valid_certificate_of_this_ca() {
    let dir = TempDir::new("ca-renew");
    let ca = Ca::open(&generated(&dir)).unwrap();
    let key = key();
    let first = ca.issue_for_service(&csr(&key), &svc("checkout")).unwrap();
    let renewed = ca
        .renew(&csr(&key), &first.chain[0], &svc("checkout"))
        .unwrap();
    assert_eq!(renewed.spiffe_id, first.spiffe_id);
    assert_ne!(renewed.chain[0], first.chain[0], "a new serial");

    // Someone who saw the certificate in a handshake, with a key of their own.
    let e = ca
        .renew(&csr(&self::key()), &first.chain[0], &svc("checkout"))
        .unwrap_err();
    assert_eq!(e, IssueError::KeyMismatch);

    // A certificate of another CA.
    let other_dir = TempDir::new("ca-renew-other");
    let other = Ca::open(&generated(&other_dir)).unwrap();
    let foreign = other
        .issue_for_service(&csr(&key), &svc("checkout"))
        .unwrap();
    let e = ca
        .renew(&csr(&key), &foreign.chain[0], &svc("checkout"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not issued by this mesh's CA"), "{e}");

    // An expired one of this CA.
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://malla.local/svc/checkout".try_into().unwrap(),
    )];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(7200)).into();
    params.not_after = (now - Duration::from_secs(3600)).into();
    let expired = params
        .signed_by(&key, &ca.in_force().signer.issuer)
        .unwrap();
    let e = ca
        .renew(&csr(&key), expired.der(), &svc("checkout"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("expired"), "{e}");

    // Garbage where the certificate goes.
    let e = ca
        .renew(&csr(&key), b"not a certificate", &svc("checkout"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an X.509 certificate"), "{e}");
}

#[test]
fn bad_csrs_get_clear_errors() {
    let dir = TempDir::new("ca-bad-csr");
    let ca = Ca::open(&generated(&dir)).unwrap();
    let good = csr(&key());
    let checkout = svc("checkout");
    let err = |der: &[u8]| {
        ca.issue_for_service(der, &checkout)
            .unwrap_err()
            .to_string()
    };

    assert!(err(b"").contains("not a PKCS#10 request"));
    assert!(err(&good[..good.len() / 2]).contains("not a PKCS#10 request"));
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(err(&trailing).contains("trailing bytes"));
    // A flipped bit in the signature (its last byte).
    let mut forged = good.clone();
    *forged.last_mut().unwrap() ^= 1;
    let e = err(&forged);
    assert!(
        e.contains("signature does not verify") || e.contains("not a PKCS#10"),
        "{e}"
    );
    assert!(err(&vec![0x30; MAX_DER_BYTES + 1]).contains("at most 16384"));
    // An RSA key: refused with what to use instead.
    let rsa = KeyPair::generate_for(&PKCS_RSA_SHA256);
    if let Ok(rsa) = rsa {
        let e = err(&csr(&rsa));
        assert!(e.contains("use an ECDSA P-256"), "{e}");
    }
    // Every truncation of a good CSR is an error, never a panic.
    for n in 0..good.len() {
        assert!(ca.issue_for_service(&good[..n], &checkout).is_err());
    }
}

/// Writes `certs` (PEM, in order) and `key` to files for `CaSource::Files`.
fn files(dir: &TempDir, certs: &[&rcgen::Certificate], key: &KeyPair) -> CaSettings {
    std::fs::create_dir_all(&dir.0).unwrap();
    let cert = dir.0.join("ca.crt");
    let key_path = dir.0.join("ca.key");
    std::fs::write(&cert, certs.iter().map(|c| c.pem()).collect::<String>()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    CaSettings {
        trust_domain: domain(),
        cert_ttl: Duration::from_secs(3600),
        source: CaSource::Files {
            cert,
            key: key_path,
        },
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

#[test]
fn an_operators_intermediate_issues_with_its_chain() {
    let dir = TempDir::new("ca-intermediate");
    let root_key = key();
    let root_params = ca_params("Example Root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, &root_key);
    let mid_key = key();
    let mid = ca_params("Example Mesh Intermediate")
        .signed_by(&mid_key, &root_issuer)
        .unwrap();

    let ca = Ca::open(&files(&dir, &[&mid, &root], &mid_key)).unwrap();
    assert_eq!(ca.bundle(), [root.der().to_vec()]);
    let issued = ca
        .issue_for_service(&csr(&key()), &svc("payments"))
        .unwrap();
    assert_eq!(issued.chain.len(), 2, "leaf and intermediate");
    assert_eq!(issued.chain[1], mid.der().to_vec());
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
    let (_, mid_parsed) = X509Certificate::from_der(mid.der()).unwrap();
    leaf.verify_signature(Some(mid_parsed.public_key()))
        .unwrap();
    assert_eq!(
        issued.not_after.duration_since(issued.not_before).unwrap(),
        Duration::from_secs(3600) + BACKDATE
    );

    // What an operator gets wrong, each said plainly.
    let e = Ca::open(&files(&dir, &[&mid], &mid_key))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a self-signed root"), "{e}");
    let e = Ca::open(&files(&dir, &[&root, &mid], &mid_key))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not signed by the next certificate") || e.contains("not a self-signed root"),
        "{e}"
    );
    let e = Ca::open(&files(&dir, &[&mid, &root], &root_key))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not hold this certificate's key"), "{e}");
    let mut leaf_params = CertificateParams::new(vec!["x.example".to_string()]).unwrap();
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    let not_ca = leaf_params.signed_by(&mid_key, &root_issuer).unwrap();
    let e = Ca::open(&files(&dir, &[&not_ca, &root], &mid_key))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a CA certificate"), "{e}");
    std::fs::write(dir.0.join("ca.key"), "not a key").unwrap();
    let settings = CaSettings {
        source: CaSource::Files {
            cert: dir.0.join("ca.crt"),
            key: dir.0.join("ca.key"),
        },
        ..generated(&dir)
    };
    let e = Ca::open(&settings).unwrap_err().to_string();
    assert!(e.contains("not a private key in PEM"), "{e}");
}

#[test]
fn certificates_never_outlive_the_ca_and_an_expired_ca_is_refused() {
    let dir = TempDir::new("ca-short-intermediate");
    let root_key = key();
    let root_params = ca_params("Example Root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, &root_key);
    let now = SystemTime::now();

    // An intermediate with two hours left, and certificates of 24 h.
    let mid_key = key();
    let mut mid_params = ca_params("Short Intermediate");
    mid_params.not_before = (now - Duration::from_secs(3600)).into();
    mid_params.not_after = (now + Duration::from_secs(7200)).into();
    let mid = mid_params.signed_by(&mid_key, &root_issuer).unwrap();
    let mut settings = files(&dir, &[&mid, &root], &mid_key);
    settings.cert_ttl = DEFAULT_CERT_TTL;
    let ca = Ca::open(&settings).unwrap();
    let issued = ca
        .issue_for_service(&csr(&key()), &svc("payments"))
        .unwrap();
    let (_, mid_parsed) = X509Certificate::from_der(mid.der()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
    assert!(
        leaf.validity().not_after <= mid_parsed.validity().not_after,
        "cut to the CA's end"
    );
    let left = issued.not_after.duration_since(now).unwrap();
    assert!(left <= Duration::from_secs(7200), "{left:?}");

    // An intermediate that has expired: refused at start, with its dates.
    let old_key = key();
    let mut old_params = ca_params("Expired Intermediate");
    old_params.not_before = (now - Duration::from_secs(7200)).into();
    old_params.not_after = (now - Duration::from_secs(3600)).into();
    let old = old_params.signed_by(&old_key, &root_issuer).unwrap();
    let e = Ca::open(&files(&dir, &[&old, &root], &old_key))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not valid now (valid from"), "{e}");
}

#[test]
fn unsupported_keys_are_named_plainly() {
    let dir = TempDir::new("ca-key-names");
    let ca = Ca::open(&generated(&dir)).unwrap();
    if let Ok(rsa) = KeyPair::generate_for(&PKCS_RSA_SHA256) {
        let e = ca
            .issue_for_service(&csr(&rsa), &svc("a"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("the CSR's key is an RSA key: use"), "{e}");
    }
    // A renewal for another service is refused before anything is signed.
    let key = key();
    let first = ca.issue_for_service(&csr(&key), &svc("checkout")).unwrap();
    let e = ca
        .renew(&csr(&key), &first.chain[0], &svc("payments"))
        .unwrap_err();
    assert!(matches!(e, IssueError::OtherService { .. }), "{e}");
    // PEM as files have it: LF line endings.
    assert!(!ca.bundle_pem().contains('\r'));
}
