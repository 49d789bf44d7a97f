//! The certificate authority: a root it creates at first start (or a root or intermediate
//! the operator gives), and the X.509 SVIDs it issues.
//!
//! What crosses the trust boundary here is a CSR and, for a renewal, a certificate, both
//! from the network. Neither decides anything about the certificate issued: the CSR only
//! proves possession of the key it carries (its signature is checked) and gives that public
//! key; its subject and requested extensions are ignored. The identity comes from the
//! credential the caller proved (a join token, or a current certificate of this CA whose key
//! signed the CSR), and every field of the certificate is this module's choice.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use malla_core::{identity::spiffe_id_of, ServiceName, SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
};
use x509_parser::{
    certificate::X509Certificate, certification_request::X509CertificationRequest, prelude::FromDer,
};

/// Longest CSR or certificate accepted, in bytes of DER: a P-256 CSR is ~250 bytes, a
/// certificate ~600.
pub const MAX_DER_BYTES: usize = 16 * 1024;
/// How long an issued certificate is valid by default (`--cert-ttl`).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a root the CA creates is valid.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before they are issued, so that a peer whose clock is a
/// little behind accepts them at once.
const BACKDATE: Duration = Duration::from_secs(60);

/// Where the CA's root comes from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// Created at first start under the data directory (`ca/root.crt`, `ca/root.key`,
    /// 0600), read back on every later start.
    Generated { dir: PathBuf },
    /// Given by the operator (`--ca-cert`, `--ca-key`): a root, or an intermediate followed
    /// in the same file by the chain up to its root.
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Clone, Debug)]
pub struct CaSettings {
    pub trust_domain: TrustDomain,
    pub cert_ttl: Duration,
    pub source: CaSource,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("creating the CA: {0}")]
    Create(String),
}

/// Why a request for a certificate was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IssueError {
    #[error("the CSR is not a PKCS#10 request in DER ({0})")]
    MalformedCsr(String),
    #[error("the CSR's signature does not verify: it must be signed with the key it carries")]
    CsrSignature,
    #[error("the CSR's key is {0}: use an ECDSA P-256 (recommended), P-384 or Ed25519 key")]
    KeyAlgorithm(String),
    #[error("the {what} is {bytes} bytes; at most {MAX_DER_BYTES} are accepted")]
    TooLarge { what: &'static str, bytes: usize },
    #[error("the current certificate is refused: {0}")]
    Certificate(String),
    #[error("the CSR's key is not the current certificate's: a renewal proves it holds the certificate's key by signing the CSR with it")]
    KeyMismatch,
    #[error("signing the certificate failed: {0}")]
    Signing(String),
    #[error("the current certificate is {have}'s identity, not {asked}'s")]
    OtherService { have: String, asked: String },
}

/// A certificate issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub spiffe_id: SpiffeId,
    /// The leaf first, then the intermediates up to (not including) the root, DER.
    pub chain: Vec<Vec<u8>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The CA.
pub struct Ca {
    trust_domain: TrustDomain,
    cert_ttl: Duration,
    issuer: Issuer<'static, KeyPair>,
    /// The issuing certificate, then intermediates up to (not including) the root, DER.
    chain: Vec<Vec<u8>>,
    /// The roots every workload trusts, DER; the first is the one `chain` leads to.
    bundle: Vec<Vec<u8>>,
    /// When the issuing certificate expires: no certificate it signs outlives it.
    issuer_not_after: SystemTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("cert_ttl", &self.cert_ttl)
            .field("chain", &self.chain.len())
            .field("bundle", &self.bundle.len())
            .finish_non_exhaustive()
    }
}

impl Ca {
    pub fn open(settings: &CaSettings) -> Result<Ca, CaError> {
        let (key, certs) = match &settings.source {
            CaSource::Generated { dir } => load_or_create(dir, &settings.trust_domain)?,
            CaSource::Files { cert, key } => (read_key(key)?, read_certs(cert)?),
        };
        let cert_path = match &settings.source {
            CaSource::Generated { dir } => dir.join(ROOT_CERT),
            CaSource::Files { cert, .. } => cert.clone(),
        };
        Self::from_parts(settings, key, certs).map_err(|why| CaError::File {
            path: cert_path,
            why,
        })
    }

    /// A CA whose new root lives only in memory (fuzzing, benchmarks).
    pub fn ephemeral(trust_domain: TrustDomain, cert_ttl: Duration) -> Result<Ca, CaError> {
        let (key, cert) = new_root(&trust_domain)?;
        let settings = CaSettings {
            trust_domain,
            cert_ttl,
            source: CaSource::Generated {
                dir: PathBuf::new(),
            },
        };
        Self::from_parts(&settings, key, vec![cert.der().to_vec()]).map_err(CaError::Create)
    }

    fn from_parts(settings: &CaSettings, key: KeyPair, certs: Vec<Vec<u8>>) -> Result<Ca, String> {
        let (chain, root) = split_chain(certs)?;
        let issuer_not_after = check_issuing_cert(&chain[0], &key, settings.cert_ttl)?;
        let issuer = Issuer::from_ca_cert_der(&chain[0].clone().into(), key)
            .map_err(|e| format!("cannot use the certificate as an issuer: {e}"))?;
        Ok(Ca {
            trust_domain: settings.trust_domain.clone(),
            cert_ttl: settings.cert_ttl,
            issuer,
            chain,
            bundle: vec![root],
            issuer_not_after,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert_ttl(&self) -> Duration {
        self.cert_ttl
    }

    /// The roots every workload trusts, DER.
    pub fn bundle(&self) -> &[Vec<u8>] {
        &self.bundle
    }

    /// The trust bundle as PEM, for files and tools (`openssl verify -CAfile`).
    pub fn bundle_pem(&self) -> String {
        self.bundle
            .iter()
            .map(|der| pem("CERTIFICATE", der))
            .collect()
    }

    /// Issues the identity of `service` for the key of `csr` (DER), which must verify.
    pub fn issue_for_service(
        &self,
        csr: &[u8],
        service: &ServiceName,
    ) -> Result<Issued, IssueError> {
        let key = csr_key(csr)?;
        self.sign(&key, SpiffeId::for_service(&self.trust_domain, service))
    }

    /// Renews `current` (DER, a certificate this CA issued, still valid, `service`'s) for
    /// the key of `csr`, which must be the certificate's own key: the CSR's signature is the
    /// proof that the caller holds it (a certificate alone is public: every handshake shows
    /// it). Every check comes before anything is signed.
    pub fn renew(
        &self,
        csr: &[u8],
        current: &[u8],
        service: &ServiceName,
    ) -> Result<Issued, IssueError> {
        let key = csr_key(csr)?;
        let (id, spki) = self.check_current(current)?;
        if id.service().as_ref() != Some(service) {
            return Err(IssueError::OtherService {
                have: id.to_string(),
                asked: service.to_string(),
            });
        }
        if key.der != spki {
            return Err(IssueError::KeyMismatch);
        }
        self.sign(&key, id)
    }

    /// The identity in `current` if this CA issued it and it is valid now, and its key.
    fn check_current(&self, der: &[u8]) -> Result<(SpiffeId, Vec<u8>), IssueError> {
        let refuse = |why: String| IssueError::Certificate(why);
        if der.len() > MAX_DER_BYTES {
            return Err(IssueError::TooLarge {
                what: "certificate",
                bytes: der.len(),
            });
        }
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| refuse(format!("not an X.509 certificate in DER ({e})")))?;
        if !rest.is_empty() {
            return Err(refuse("trailing bytes after the certificate".into()));
        }
        let (_, issuing) = X509Certificate::from_der(&self.chain[0])
            .map_err(|e| refuse(format!("the CA's own certificate does not parse ({e})")))?;
        cert.verify_signature(Some(issuing.public_key()))
            .map_err(|_| refuse("not issued by this mesh's CA".into()))?;
        if !cert.validity().is_valid() {
            return Err(refuse(
                "expired (or not yet valid): prove the identity again with a new join token".into(),
            ));
        }
        let id = spiffe_id_of(&cert).map_err(refuse)?;
        if id.trust_domain() != &self.trust_domain {
            return Err(refuse(format!(
                "{id} is not in the trust domain {}",
                self.trust_domain
            )));
        }
        Ok((id, cert.public_key().subject_public_key.data.to_vec()))
    }

    fn sign(&self, key: &CsrKey, id: SpiffeId) -> Result<Issued, IssueError> {
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        // Never past the issuing certificate's own end: peers would refuse the chain then.
        let not_after = (now + self.cert_ttl).min(self.issuer_not_after);
        if not_after <= now {
            return Err(IssueError::Signing(
                "the CA's certificate has expired: give the control plane a new one (--ca-cert, --ca-key)".into(),
            ));
        }
        let mut params = CertificateParams::default();
        // No subject: the identity is the URI SAN alone (X.509-SVID), and the SAN is then
        // marked critical (RFC 5280 4.2.1.6).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e| IssueError::Signing(format!("{e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let leaf = params
            .signed_by(&key.spki, &self.issuer)
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        let mut chain = vec![leaf.der().to_vec()];
        chain.extend(self.chain.iter().filter(|c| !is_self_signed(c)).cloned());
        Ok(Issued {
            spiffe_id: id,
            chain,
            not_before,
            not_after,
        })
    }
}

/// The verified public key of a CSR.
struct CsrKey {
    spki: SubjectPublicKeyInfo,
    /// The raw subject public key (the BIT STRING's bytes), to compare with a
    /// certificate's.
    der: Vec<u8>,
}

/// Checks a CSR as issuing would (parse, key algorithm, signature), issuing nothing.
pub fn check_csr(der: &[u8]) -> Result<(), IssueError> {
    csr_key(der).map(|_| ())
}

/// Parses a CSR, checks its signature and its key's algorithm; nothing else of it is read.
fn csr_key(der: &[u8]) -> Result<CsrKey, IssueError> {
    if der.len() > MAX_DER_BYTES {
        return Err(IssueError::TooLarge {
            what: "CSR",
            bytes: der.len(),
        });
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| IssueError::MalformedCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IssueError::MalformedCsr(
            "trailing bytes after the request".into(),
        ));
    }
    let info = &csr.certification_request_info.subject_pki;
    let unsupported = || {
        let oid = info.algorithm.algorithm.to_id_string();
        IssueError::KeyAlgorithm(match oid.as_str() {
            "1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10" => "an RSA key".to_string(),
            "1.2.840.10045.2.1" => {
                "an elliptic-curve key on a curve other than P-256 and P-384".to_string()
            }
            _ => format!("of an unsupported algorithm ({oid})"),
        })
    };
    let spki = SubjectPublicKeyInfo::from_der(info.raw).map_err(|_| unsupported())?;
    let alg = rcgen::PublicKeyData::algorithm(&spki);
    if ![
        &PKCS_ECDSA_P256_SHA256,
        &PKCS_ECDSA_P384_SHA384,
        &PKCS_ED25519,
    ]
    .contains(&alg)
    {
        return Err(unsupported());
    }
    csr.verify_signature()
        .map_err(|_| IssueError::CsrSignature)?;
    Ok(CsrKey {
        der: info.subject_public_key.data.to_vec(),
        spki,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // aws-lc's DRBG; it fails only if the OS gives no randomness, and then nothing else
    // would work either: a fixed serial is still a valid certificate.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

const ROOT_CERT: &str = "root.crt";
const ROOT_KEY: &str = "root.key";

/// Reads the generated root, or creates it (key written 0600 before it holds anything).
fn load_or_create(dir: &Path, domain: &TrustDomain) -> Result<(KeyPair, Vec<Vec<u8>>), CaError> {
    let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => return Ok((read_key(&key_path)?, read_certs(&cert_path)?)),
        (false, false) => {}
        (true, false) | (false, true) => {
            return Err(CaError::File {
                path: dir.to_path_buf(),
                why: format!(
                    "holds one of {ROOT_CERT} and {ROOT_KEY} without the other: restore the \
                     missing file, or move both away to create a new root (every workload \
                     will need new certificates)"
                ),
            })
        }
    }
    create_dir_private(dir)?;
    let (key, cert) = new_root(domain)?;
    // The key first: a crash between the two leaves a key and no certificate, which the
    // next start reports rather than silently replacing.
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_file(&cert_path, cert.pem().as_bytes())?;
    tracing::info!(path = %cert_path.display(), "created the mesh's root CA");
    Ok((key, vec![cert.der().to_vec()]))
}

/// A new self-signed root for `domain`, valid for ten years.
fn new_root(domain: &TrustDomain) -> Result<(KeyPair, rcgen::Certificate), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Create(format!("generating the root key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "malla");
    dn.push(DnType::CommonName, format!("malla root CA {domain}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_VALIDITY).into();
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Create(format!("signing the root: {e}")))?;
    Ok((key, cert))
}

fn create_dir_private(dir: &Path) -> Result<(), CaError> {
    let err = |e: std::io::Error| CaError::File {
        path: dir.to_path_buf(),
        why: format!("cannot create the directory: {e}"),
    };
    fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Writes a file only its owner can read, created with that mode (never readable by
/// others, not even for an instant).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let err = |e: std::io::Error| CaError::File {
        path: path.to_path_buf(),
        why: format!("cannot write: {e}"),
    };
    let mut file = options.open(path).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    let err = |e: std::io::Error| CaError::File {
        path: path.to_path_buf(),
        why: format!("cannot write: {e}"),
    };
    let mut file = fs::File::create(path).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let err = |why: String| CaError::File {
        path: path.to_path_buf(),
        why,
    };
    let text = fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(path).map(|m| m.permissions().mode() & 0o777);
        if mode.is_ok_and(|m| m & 0o077 != 0) {
            tracing::warn!(path = %path.display(), "the CA key can be read by other users: chmod 600 it");
        }
    }
    KeyPair::from_pem(&text).map_err(|e| {
        err(format!(
            "not a private key in PEM (PKCS#8 'PRIVATE KEY', 'EC PRIVATE KEY'...): {e}"
        ))
    })
}

fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let err = |why: String| CaError::File {
        path: path.to_path_buf(),
        why,
    };
    let text = fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let certs: Vec<Vec<u8>> = pem_blocks(&text, "CERTIFICATE").map_err(err)?;
    if certs.is_empty() {
        return Err(err(
            "holds no PEM certificate ('-----BEGIN CERTIFICATE-----')".into(),
        ));
    }
    Ok(certs)
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

/// The issuing certificate must be a CA whose key is the one given, valid now; returns
/// when it expires (and warns when that is within one certificate TTL).
fn check_issuing_cert(der: &[u8], key: &KeyPair, cert_ttl: Duration) -> Result<SystemTime, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not a certificate ({e})"))?;
    let validity = cert.validity();
    let not_after = std::time::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(validity.not_after.timestamp()).unwrap_or(0));
    if !validity.is_valid() {
        return Err(format!(
            "{} is not valid now (valid from {} to {}): give a CA certificate that is",
            cert.subject(),
            validity.not_before,
            validity.not_after
        ));
    }
    crate::metrics::process().ca_expires(validity.not_after.timestamp());
    if not_after < SystemTime::now() + cert_ttl {
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

fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .is_ok_and(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok())
}

/// PEM of one DER object.
pub fn pem(label: &str, der: &[u8]) -> String {
    // LF line endings, as the files on disk have them (pem's default is CRLF).
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The DER of every PEM block labelled `label` in `text` (other blocks are skipped).
pub fn pem_blocks(text: &[u8], label: &str) -> Result<Vec<Vec<u8>>, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("not PEM: {e}"))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == label)
        .map(pem::Pem::into_contents)
        .collect())
}

#[cfg(test)]
mod tests;
