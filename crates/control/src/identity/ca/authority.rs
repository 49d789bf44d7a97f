//! One CA certificate with its key, as the CA signs with it: the issuing certificate (a
//! root, or an operator's intermediate), its chain up to the root, and the root that
//! workloads trust for it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use malla_core::TrustDomain;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use x509_parser::{certificate::X509Certificate, prelude::FromDer, time::ASN1Time};

use super::{random_serial, CaError, BACKDATE};

/// How long a root the CA creates is valid.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub(super) struct Authority {
    pub issuer: Issuer<'static, KeyPair>,
    /// The issuing certificate first, then its chain up to the root (a root the CA made:
    /// the root alone), DER.
    pub chain: Vec<Vec<u8>>,
    /// The root workloads trust for this authority, DER.
    pub root: Vec<u8>,
    /// When the issuing certificate expires: no certificate it signs outlives it.
    pub not_after: SystemTime,
    pub info: RootInfo,
}

/// What an operator sees of a root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootInfo {
    /// SHA-256 of the DER, as `openssl x509 -noout -fingerprint -sha256` prints it.
    pub sha256: String,
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Authority {
    /// The authority of `certs` (the issuing certificate first, its root last) and `key`,
    /// checked as of `now`.
    pub fn new(
        key: KeyPair,
        certs: Vec<Vec<u8>>,
        cert_ttl: Duration,
        now: SystemTime,
    ) -> Result<Authority, String> {
        let (chain, root) = split_chain(certs)?;
        let not_after = check_issuing_cert(&chain[0], &key, cert_ttl, now)?;
        let issuer = Issuer::from_ca_cert_der(&chain[0].clone().into(), key)
            .map_err(|e| format!("cannot use the certificate as an issuer: {e}"))?;
        let info = root_info(&root)?;
        Ok(Authority {
            issuer,
            chain,
            root,
            not_after,
            info,
        })
    }
}

fn root_info(der: &[u8]) -> Result<RootInfo, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("the root: {e}"))?;
    let validity = cert.validity();
    Ok(RootInfo {
        sha256: fingerprint(der),
        subject: cert.subject().to_string(),
        not_before: system_time(validity.not_before),
        not_after: system_time(validity.not_after),
    })
}

/// `AB:CD:...`: the SHA-256 of `der` in openssl's notation.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(super) fn system_time(t: ASN1Time) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
}

pub(super) fn asn1_time(t: SystemTime) -> ASN1Time {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    ASN1Time::from_timestamp(secs).unwrap_or_else(|_| ASN1Time::now())
}

/// A new self-signed root for `domain`, valid for ten years from `now`. `name` tells it
/// apart from the other roots of the domain: none for the first (`malla root CA DOMAIN`),
/// the time of its creation for the roots of rotations, so that two roots trusted at once
/// never share a subject (verifiers pick a root by its subject first).
pub(super) fn new_root(
    domain: &TrustDomain,
    name: Option<&str>,
    now: SystemTime,
) -> Result<(KeyPair, rcgen::Certificate), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Create(format!("generating the root key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "malla");
    dn.push(
        DnType::CommonName,
        match name {
            Some(name) => format!("malla root CA {domain} {name}"),
            None => format!("malla root CA {domain}"),
        },
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_VALIDITY).into();
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Create(format!("signing the root: {e}")))?;
    Ok((key, cert))
}

/// Splits a CA's certificates (the issuing one first, up to the root) into the chain sent
/// with leaves and the root every workload trusts.
fn split_chain(certs: Vec<Vec<u8>>) -> Result<(Vec<Vec<u8>>, Vec<u8>), String> {
    let root = certs.last().cloned().unwrap_or_default();
    if !is_self_signed(&root) {
        return Err(
            "the last certificate is not a self-signed root: put the chain from the issuing \
             certificate up to its root in the file, the root last"
                .into(),
        );
    }
    for pair in certs.windows(2) {
        let (Ok((_, child)), Ok((_, parent))) = (
            X509Certificate::from_der(&pair[0]),
            X509Certificate::from_der(&pair[1]),
        ) else {
            return Err("a certificate does not parse".into());
        };
        if child.verify_signature(Some(parent.public_key())).is_err() {
            return Err(format!(
                "{} is not signed by the next certificate in the file ({}): order the chain from the issuing certificate up to the root",
                child.subject(),
                parent.subject()
            ));
        }
    }
    Ok((certs, root))
}

/// The issuing certificate must be a CA whose key is the one given, valid at `now`;
/// returns when it expires (and warns when that is within one certificate TTL).
fn check_issuing_cert(
    der: &[u8],
    key: &KeyPair,
    cert_ttl: Duration,
    now: SystemTime,
) -> Result<SystemTime, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not a certificate ({e})"))?;
    let validity = cert.validity();
    let not_after = system_time(validity.not_after);
    if !validity.is_valid_at(asn1_time(now)) {
        return Err(format!(
            "{} is not valid now (valid from {} to {}): give a CA certificate that is",
            cert.subject(),
            validity.not_before,
            validity.not_after
        ));
    }
    if not_after < now + cert_ttl {
        tracing::warn!(subject = %cert.subject(), not_after = %validity.not_after, "the CA's certificate expires within one certificate TTL: certificates will be shortened to end with it; replace it soon");
    }
    if !cert.is_ca() {
        return Err(format!(
            "{} is not a CA certificate (basicConstraints CA:TRUE): give a root or an intermediate",
            cert.subject()
        ));
    }
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        return Err("the key file does not hold this certificate's key".into());
    }
    Ok(not_after)
}

pub(super) fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .is_ok_and(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok())
}
