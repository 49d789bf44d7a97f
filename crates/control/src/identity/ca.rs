//! The certificate authority: a root it creates at first start (or a root or intermediate
//! the operator gives), and the X.509 SVIDs it issues.
//!
//! What crosses the trust boundary here is a CSR and, for a renewal, a certificate, both
//! from the network. Neither decides anything about the certificate issued: the CSR only
//! proves possession of the key it carries (its signature is checked) and gives that public
//! key; its subject and requested extensions are ignored. The identity comes from the
//! credential the caller proved (a join token, or a current certificate of this CA whose key
//! signed the CSR), and every field of the certificate is this module's choice.
//!
//! A root the CA made can be rotated ([`rotation`]): for a while two roots are trusted, and
//! which one signs follows the rotation's phase. Every request reads the authorities in
//! force once ([`InForce`]), so a certificate and the trust bundle sent with it always
//! belong together.

mod authority;
mod files;
pub mod rotation;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, PoisonError, RwLock,
    },
    time::{Duration, SystemTime},
};

use malla_core::{identity::spiffe_id_of, ServiceName, SpiffeId, TrustDomain};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber, SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
    PKCS_ED25519,
};
use tracing::info;
use x509_parser::{
    certificate::X509Certificate, certification_request::X509CertificationRequest, prelude::FromDer,
};

pub use self::{
    authority::RootInfo,
    rotation::{Phase, Plan, RotateError},
};
use self::{
    authority::{asn1_time, Authority},
    rotation::default_overlap,
};

/// Longest CSR or certificate accepted, in bytes of DER: a P-256 CSR is ~250 bytes, a
/// certificate ~600.
pub const MAX_DER_BYTES: usize = 16 * 1024;
/// How long an issued certificate is valid by default (`--cert-ttl`).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Certificates start this long before they are issued, so that a peer whose clock is a
/// little behind accepts them at once.
const BACKDATE: Duration = Duration::from_secs(60);

/// Where the CA's root comes from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// Created at first start under the data directory (`ca/root.crt`, `ca/root.key`,
    /// 0600), read back on every later start; rotated on demand ([`Ca::rotate`]).
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

/// A name the control plane's certificate carries besides its SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServerName {
    Dns(String),
    Ip(std::net::IpAddr),
}

/// A certificate issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub spiffe_id: SpiffeId,
    /// The leaf first, then the intermediates up to (not including) the root, DER.
    pub chain: Vec<Vec<u8>>,
    /// The roots trusted when it was signed, DER, the one it chains to first: what its
    /// holder verifies peers with.
    pub trust_bundle: Vec<Vec<u8>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What a root is to the CA now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootRole {
    /// The certificates the CA issues chain to it.
    Signing,
    /// In the bundle, signing from the rotation's switch on.
    Next,
    /// In the bundle until the rotation ends; signs no more.
    Retiring,
}

impl RootRole {
    pub fn as_str(self) -> &'static str {
        match self {
            RootRole::Signing => "signing",
            RootRole::Next => "next",
            RootRole::Retiring => "retiring",
        }
    }
}

/// The CA as an operator sees it (`malla identity`).
#[derive(Clone, Debug)]
pub struct CaStatus {
    /// Given by the operator (`--ca-cert`), not made (and rotated) by malla.
    pub operator: bool,
    /// The trust bundle, the signing root first.
    pub roots: Vec<(RootInfo, RootRole)>,
    /// The same roots, DER.
    pub trust_bundle: Vec<Vec<u8>>,
    /// The rotation under way, and its phase.
    pub rotation: Option<(Plan, Phase)>,
}

/// The wall clock the CA reads (a test's, in tests).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The CA.
pub struct Ca {
    trust_domain: TrustDomain,
    cert_ttl: Duration,
    /// `DATA_DIR/ca` when the CA made its root (none: in memory only); `None` when the
    /// operator gave it.
    made: Option<Option<PathBuf>>,
    roots: RwLock<Roots>,
    clock: Clock,
    /// The phase last told to the log and the metrics ([`Ca::tell`]).
    told: AtomicU8,
}

/// The authorities: the one in force, and during a rotation the new one.
struct Roots {
    /// The root before the rotation under way (which signs in its first phase); the only
    /// one otherwise.
    current: Arc<Authority>,
    rotation: Option<(Plan, Arc<Authority>)>,
}

/// The authorities in force at one instant.
struct InForce {
    signer: Arc<Authority>,
    /// Every root trusted, the signer's first.
    trusted: Vec<Arc<Authority>>,
    rotation: Option<(Plan, Phase)>,
}

impl Roots {
    fn in_force(&self, now: SystemTime) -> InForce {
        let Some((plan, next)) = &self.rotation else {
            return InForce {
                signer: self.current.clone(),
                trusted: vec![self.current.clone()],
                rotation: None,
            };
        };
        let phase = plan.phase(now);
        let (signer, trusted) = match phase {
            Phase::Announcing => (&self.current, vec![self.current.clone(), next.clone()]),
            Phase::Retiring => (next, vec![next.clone(), self.current.clone()]),
            Phase::Over => (next, vec![next.clone()]),
        };
        InForce {
            signer: signer.clone(),
            trusted,
            rotation: (phase != Phase::Over).then(|| (plan.clone(), phase)),
        }
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("cert_ttl", &self.cert_ttl)
            .field("made", &self.made)
            .finish_non_exhaustive()
    }
}

impl Ca {
    pub fn open(settings: &CaSettings) -> Result<Ca, CaError> {
        Self::open_with_clock(settings, Arc::new(SystemTime::now))
    }

    /// [`Ca::open`] reading `clock` for the time (rotation phases, validity).
    pub fn open_with_clock(settings: &CaSettings, clock: Clock) -> Result<Ca, CaError> {
        let now = clock();
        let ttl = settings.cert_ttl;
        let authority = |(key, certs): files::Keyed, path: PathBuf| {
            Authority::new(key, certs, ttl, now)
                .map(Arc::new)
                .map_err(|why| CaError::File { path, why })
        };
        let (made, roots) = match &settings.source {
            CaSource::Generated { dir } => {
                let on_disk = files::open(dir, &settings.trust_domain, now)?;
                let current = authority(on_disk.current, dir.join(files::ROOT_CERT))?;
                let rotation = match on_disk.rotation {
                    Some((plan, next)) => {
                        if plan.overlap() < ttl {
                            tracing::warn!(
                                overlap = %humantime::format_duration(plan.overlap()),
                                cert_ttl = %humantime::format_duration(ttl),
                                "the root rotation under way was planned for shorter certificates: sidecars that have not renewed by the switch will fail handshakes with those that have; go back to the earlier --cert-ttl until it ends"
                            );
                        }
                        Some((plan, authority(next, dir.join(files::NEXT_CERT))?))
                    }
                    None => None,
                };
                (Some(Some(dir.clone())), Roots { current, rotation })
            }
            CaSource::Files { cert, key } => {
                let keyed = (files::read_key(key)?, files::read_certs(cert)?);
                let current = authority(keyed, cert.clone())?;
                (
                    None,
                    Roots {
                        current,
                        rotation: None,
                    },
                )
            }
        };
        Ok(Self::new(settings, made, roots, clock))
    }

    /// A CA whose new root lives only in memory (fuzzing, benchmarks).
    pub fn ephemeral(trust_domain: TrustDomain, cert_ttl: Duration) -> Result<Ca, CaError> {
        let now = SystemTime::now();
        let (key, cert) = authority::new_root(&trust_domain, None, now)?;
        let current = Authority::new(key, vec![cert.der().to_vec()], cert_ttl, now)
            .map_err(CaError::Create)?;
        let settings = CaSettings {
            trust_domain,
            cert_ttl,
            source: CaSource::Generated {
                dir: PathBuf::new(),
            },
        };
        let roots = Roots {
            current: Arc::new(current),
            rotation: None,
        };
        Ok(Self::new(
            &settings,
            Some(None),
            roots,
            Arc::new(SystemTime::now),
        ))
    }

    fn new(settings: &CaSettings, made: Option<Option<PathBuf>>, roots: Roots, clock: Clock) -> Ca {
        let ca = Ca {
            trust_domain: settings.trust_domain.clone(),
            cert_ttl: settings.cert_ttl,
            made,
            roots: RwLock::new(roots),
            clock,
            told: AtomicU8::new(u8::MAX),
        };
        ca.in_force();
        ca
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert_ttl(&self) -> Duration {
        self.cert_ttl
    }

    /// The roots every workload trusts now, DER, the signing one first.
    pub fn bundle(&self) -> Vec<Vec<u8>> {
        self.in_force()
            .trusted
            .iter()
            .map(|a| a.root.clone())
            .collect()
    }

    /// The trust bundle as PEM, for files and tools (`openssl verify -CAfile`).
    pub fn bundle_pem(&self) -> String {
        bundle_pem(&self.bundle())
    }

    /// The roots, what each is to the CA, and the rotation under way.
    pub fn status(&self) -> CaStatus {
        let view = self.in_force();
        let other = match view.rotation {
            Some((_, Phase::Announcing)) => RootRole::Next,
            _ => RootRole::Retiring,
        };
        CaStatus {
            operator: self.made.is_none(),
            roots: view
                .trusted
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let role = if i == 0 { RootRole::Signing } else { other };
                    (a.info.clone(), role)
                })
                .collect(),
            trust_bundle: view.trusted.iter().map(|a| a.root.clone()).collect(),
            rotation: view.rotation,
        }
    }

    /// Starts rotating the root: a new root joins the trust bundle now, signs from one
    /// `overlap` later, and is the only root one more `overlap` later ([`rotation`] says
    /// why). `overlap` is at least the certificate TTL; by default the TTL and a margin.
    pub fn rotate(&self, overlap: Option<Duration>) -> Result<Plan, RotateError> {
        let Some(dir) = &self.made else {
            return Err(RotateError::OperatorCa);
        };
        let overlap = overlap.unwrap_or_else(|| default_overlap(self.cert_ttl));
        let human = |d: Duration| humantime::format_duration(d).to_string();
        if overlap < self.cert_ttl {
            return Err(RotateError::TooShort {
                overlap: human(overlap),
                ttl: human(self.cert_ttl),
                default: human(default_overlap(self.cert_ttl)),
            });
        }
        if overlap > rotation::MAX_OVERLAP {
            return Err(RotateError::TooLong(human(overlap)));
        }
        // A rotation whose end has passed ends first.
        self.in_force();
        let plan = {
            let mut roots = self.write();
            let now = (self.clock)();
            if let Some((plan, _)) = &roots.rotation {
                return Err(RotateError::InProgress {
                    phase: plan.phase(now).as_str(),
                    ends_at: humantime::format_rfc3339_seconds(plan.ends_at).to_string(),
                });
            }
            let created = humantime::format_rfc3339_seconds(now).to_string();
            let (key, cert) = authority::new_root(&self.trust_domain, Some(&created), now)?;
            let plan = Plan::new(now, overlap, authority::fingerprint(cert.der()));
            if let Some(dir) = dir {
                files::start(dir, &plan, &key, cert.der())?;
            }
            let next = Authority::new(key, vec![cert.der().to_vec()], self.cert_ttl, now)
                .map_err(CaError::Create)?;
            info!(
                new_root = %plan.next_sha256,
                switch_at = %humantime::format_rfc3339_seconds(plan.switch_at),
                ends_at = %humantime::format_rfc3339_seconds(plan.ends_at),
                "root rotation started: the new root is in the trust bundle; the old root signs until switch_at and is trusted until ends_at"
            );
            roots.rotation = Some((plan.clone(), Arc::new(next)));
            plan
        };
        self.in_force();
        Ok(plan)
    }

    /// Ends a rotation whose time is over, on disk too, and tells a change of phase: what
    /// a request does first, and what the metrics scrape calls so that the gauges follow
    /// the clock when no certificate is asked for.
    pub fn refresh(&self) {
        self.in_force();
    }

    /// The authorities in force now; a rotation whose end has passed is ended first.
    fn in_force(&self) -> InForce {
        let now = (self.clock)();
        let view = {
            let roots = self.roots.read().unwrap_or_else(PoisonError::into_inner);
            match &roots.rotation {
                Some((plan, _)) if plan.is_over(now) => None,
                _ => Some(roots.in_force(now)),
            }
        };
        let view = view.unwrap_or_else(|| {
            let mut roots = self.write();
            if let Some((plan, next)) = roots.rotation.take_if(|(plan, _)| plan.is_over(now)) {
                if let Some(Some(dir)) = &self.made {
                    // The new root is already the only one in memory; the files follow,
                    // or the next start ends the rotation again.
                    if let Err(e) = files::finish(dir, &plan) {
                        tracing::error!(error = %e, "ending the root rotation on disk failed; the next start will try again");
                    }
                }
                roots.current = next;
            }
            roots.in_force(now)
        });
        self.tell(&view);
        view
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Roots> {
        self.roots.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs a change of the rotation's phase and sets the CA's gauges, once per change.
    fn tell(&self, view: &InForce) {
        let code = match view.rotation {
            None => 0,
            Some((_, Phase::Announcing)) => 1,
            Some((_, Phase::Retiring)) => 2,
            Some((_, Phase::Over)) => 3,
        };
        let before = self.told.swap(code, Ordering::Relaxed);
        if before == code {
            return;
        }
        let metrics = crate::metrics::process();
        metrics.ca_expires(unix_seconds(view.signer.not_after));
        metrics.ca_roots(view.trusted.len(), code);
        match (before, &view.rotation) {
            (_, Some((plan, Phase::Retiring))) => info!(
                signing = %view.signer.info.sha256,
                ends_at = %humantime::format_rfc3339_seconds(plan.ends_at),
                "root rotation: the new root signs from now on; the old root stays in the trust bundle until ends_at"
            ),
            (1 | 2, None) => info!(
                root = %view.signer.info.sha256,
                "root rotation over: the old root has left the trust bundle"
            ),
            (u8::MAX, Some((plan, phase))) => info!(
                phase = phase.as_str(),
                switch_at = %humantime::format_rfc3339_seconds(plan.switch_at),
                ends_at = %humantime::format_rfc3339_seconds(plan.ends_at),
                "root rotation under way: both roots are in the trust bundle"
            ),
            _ => {}
        }
    }

    /// Issues the identity of `service` for the key of `csr` (DER), which must verify.
    pub fn issue_for_service(
        &self,
        csr: &[u8],
        service: &ServiceName,
    ) -> Result<Issued, IssueError> {
        let key = csr_key(csr)?;
        let view = self.in_force();
        self.sign(
            &view,
            &key,
            SpiffeId::for_service(&self.trust_domain, service),
        )
    }

    /// The control plane's own certificate for `key`: `spiffe://DOMAIN/control` (what
    /// sidecars and the CLI check), then `names` (DNS names and IP addresses, for clients
    /// that check a host name). Issued like a workload's: from the root that signs now,
    /// for the certificate TTL.
    pub fn issue_control_plane(
        &self,
        key: &rcgen::KeyPair,
        names: &[ServerName],
    ) -> Result<Issued, IssueError> {
        let spki =
            SubjectPublicKeyInfo::from_der(&rcgen::PublicKeyData::subject_public_key_info(key))
                .map_err(|e| IssueError::Signing(format!("the control plane's key: {e}")))?;
        let key = CsrKey {
            der: Vec::new(),
            spki,
        };
        let mut sans = Vec::new();
        for name in names {
            sans.push(match name {
                ServerName::Dns(name) => SanType::DnsName(
                    name.as_str()
                        .try_into()
                        .map_err(|e| IssueError::Signing(format!("the name {name:?}: {e}")))?,
                ),
                ServerName::Ip(ip) => SanType::IpAddress(*ip),
            });
        }
        let view = self.in_force();
        self.sign_with_names(
            &view,
            &key,
            SpiffeId::control_plane(&self.trust_domain),
            sans,
        )
    }

    /// Renews `current` (DER, a certificate of a root this CA trusts, still valid,
    /// `service`'s) for the key of `csr`, which must be the certificate's own key: the
    /// CSR's signature is the proof that the caller holds it (a certificate alone is
    /// public: every handshake shows it). Every check comes before anything is signed.
    pub fn renew(
        &self,
        csr: &[u8],
        current: &[u8],
        service: &ServiceName,
    ) -> Result<Issued, IssueError> {
        let key = csr_key(csr)?;
        let view = self.in_force();
        let (id, spki) = self.check_current(&view, current)?;
        if id.service().as_ref() != Some(service) {
            return Err(IssueError::OtherService {
                have: id.to_string(),
                asked: service.to_string(),
            });
        }
        if key.der != spki {
            return Err(IssueError::KeyMismatch);
        }
        self.sign(&view, &key, id)
    }

    /// The identity in `current` if an authority trusted now issued it and it is valid
    /// now, and its key. During a rotation that is either root's: certificates of the old
    /// root are renewed until it leaves the bundle.
    fn check_current(&self, view: &InForce, der: &[u8]) -> Result<(SpiffeId, Vec<u8>), IssueError> {
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
        let issued_here = view.trusted.iter().any(|authority| {
            X509Certificate::from_der(&authority.chain[0])
                .is_ok_and(|(_, issuing)| cert.verify_signature(Some(issuing.public_key())).is_ok())
        });
        if !issued_here {
            return Err(refuse("not issued by this mesh's CA".into()));
        }
        if !cert.validity().is_valid_at(asn1_time((self.clock)())) {
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

    fn sign(&self, view: &InForce, key: &CsrKey, id: SpiffeId) -> Result<Issued, IssueError> {
        self.sign_with_names(view, key, id, Vec::new())
    }

    /// [`Ca::sign`], with DNS names and IP addresses after the SPIFFE ID (the control
    /// plane's certificate: tools that check a host name, curl and Prometheus, accept it).
    fn sign_with_names(
        &self,
        view: &InForce,
        key: &CsrKey,
        id: SpiffeId,
        names: Vec<SanType>,
    ) -> Result<Issued, IssueError> {
        let now = (self.clock)();
        let not_before = now - BACKDATE;
        // Never past the issuing certificate's own end: peers would refuse the chain then.
        let not_after = (now + self.cert_ttl).min(view.signer.not_after);
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
        params.subject_alt_names.extend(names);
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
            .signed_by(&key.spki, &view.signer.issuer)
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        let mut chain = vec![leaf.der().to_vec()];
        chain.extend(
            view.signer
                .chain
                .iter()
                .filter(|c| !authority::is_self_signed(c))
                .cloned(),
        );
        Ok(Issued {
            spiffe_id: id,
            chain,
            trust_bundle: view.trusted.iter().map(|a| a.root.clone()).collect(),
            not_before,
            not_after,
        })
    }
}

/// A trust bundle (DER roots) as PEM.
pub fn bundle_pem(bundle: &[Vec<u8>]) -> String {
    bundle.iter().map(|der| pem("CERTIFICATE", der)).collect()
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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
