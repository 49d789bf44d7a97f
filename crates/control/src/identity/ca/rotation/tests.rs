//! The rotation's state machine under a clock the test moves: phases, what signs, what is
//! trusted, renewals across the switch, the files at each step, restarts and crashes.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use malla_core::{ServiceName, TrustDomain};
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::super::{files, Ca, CaSettings, CaSource, Clock, Issued, RootRole};
use super::{default_overlap, Phase, RotateError};
use crate::api::grpc::tests::TempDir;

const TTL: Duration = Duration::from_secs(3600);

/// A wall clock that moves only when the test says.
#[derive(Clone)]
struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    fn new() -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        ManualClock(Arc::new(AtomicU64::new(now.as_millis() as u64)))
    }

    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0.load(Ordering::SeqCst))
    }

    fn set(&self, t: SystemTime) {
        let ms = t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        self.0.store(ms, Ordering::SeqCst);
    }

    fn clock(&self) -> Clock {
        let this = self.clone();
        Arc::new(move || this.now())
    }
}

fn settings(dir: &TempDir) -> CaSettings {
    CaSettings {
        trust_domain: TrustDomain::new("malla.local").unwrap(),
        cert_ttl: TTL,
        source: CaSource::Generated {
            dir: dir.0.join("ca"),
        },
    }
}

fn open(dir: &TempDir, clock: &ManualClock) -> Ca {
    Ca::open_with_clock(&settings(dir), clock.clock()).unwrap()
}

/// A key and a CSR of it.
fn workload() -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    (key, csr)
}

fn checkout() -> ServiceName {
    ServiceName::new("checkout").unwrap()
}

/// Whether `issued`'s leaf is signed by `root` (DER).
fn signed_by(issued: &Issued, root: &[u8]) -> bool {
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
    let (_, root) = X509Certificate::from_der(root).unwrap();
    leaf.verify_signature(Some(root.public_key())).is_ok()
}

fn read(dir: &TempDir, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.0.join("ca").join(name)).ok()
}

fn pem_of(der: &[u8]) -> Vec<u8> {
    super::super::pem("CERTIFICATE", der).into_bytes()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_rotation_announces_the_new_root_then_signs_with_it_then_drops_the_old_one() {
    let dir = TempDir::new("rotation-phases");
    let clock = ManualClock::new();
    let ca = open(&dir, &clock);
    let old = ca.bundle()[0].clone();
    let (_, csr) = workload();
    let before = ca.issue_for_service(&csr, &checkout()).unwrap();
    assert_eq!(before.trust_bundle, std::slice::from_ref(&old));
    assert!(ca.status().rotation.is_none());

    // Started: the new root is trusted at once, the old one still signs.
    let t0 = clock.now();
    let plan = ca.rotate(None).unwrap();
    let overlap = default_overlap(TTL);
    assert_eq!(overlap, TTL + Duration::from_secs(360), "TTL + 10 %");
    assert_eq!(plan.switch_at, t0 + overlap);
    assert_eq!(plan.ends_at, t0 + overlap * 2);
    let bundle = ca.bundle();
    assert_eq!(bundle.len(), 2);
    assert_eq!(bundle[0], old, "the signing root first");
    let new = bundle[1].clone();
    assert_ne!(new, old);
    let status = ca.status();
    assert_eq!(status.rotation.as_ref().unwrap().1, Phase::Announcing);
    let roles: Vec<_> = status.roots.iter().map(|(_, r)| *r).collect();
    assert_eq!(roles, [RootRole::Signing, RootRole::Next]);
    assert_ne!(
        status.roots[0].0.subject, status.roots[1].0.subject,
        "two roots trusted at once never share a subject"
    );
    let announced = ca.issue_for_service(&csr, &checkout()).unwrap();
    assert!(signed_by(&announced, &old));
    assert_eq!(announced.trust_bundle, [old.clone(), new.clone()]);
    // On disk: the new root and the plan beside the old root.
    assert_eq!(read(&dir, files::NEXT_CERT), Some(pem_of(&new)));
    assert!(read(&dir, files::ROTATION).is_some());
    #[cfg(unix)]
    assert_eq!(mode(&dir.0.join("ca").join(files::NEXT_KEY)), 0o600);
    // One at a time.
    let e = ca.rotate(None).unwrap_err();
    assert!(matches!(e, RotateError::InProgress { .. }), "{e}");
    assert!(
        e.to_string().contains("already under way (announcing"),
        "{e}"
    );

    // Just before the switch: still the old root; its certificate is renewed after it.
    clock.set(plan.switch_at - Duration::from_secs(1));
    let (key, csr) = workload();
    let late = ca.issue_for_service(&csr, &checkout()).unwrap();
    assert!(signed_by(&late, &old));
    let old_authority = ca.in_force().signer.clone();

    // Switched: the new root signs; the old one is still trusted, and renewed from.
    clock.set(plan.switch_at);
    assert_eq!(ca.bundle(), [new.clone(), old.clone()]);
    let status = ca.status();
    assert_eq!(status.rotation.as_ref().unwrap().1, Phase::Retiring);
    let roles: Vec<_> = status.roots.iter().map(|(_, r)| *r).collect();
    assert_eq!(roles, [RootRole::Signing, RootRole::Retiring]);
    let renewed = ca.renew(&csr, &late.chain[0], &checkout()).unwrap();
    assert!(signed_by(&renewed, &new));
    assert_eq!(renewed.trust_bundle, [new.clone(), old.clone()]);

    // Over: the new root alone, in memory and on disk.
    clock.set(plan.ends_at);
    assert_eq!(ca.bundle(), std::slice::from_ref(&new));
    let status = ca.status();
    assert!(status.rotation.is_none());
    assert_eq!(status.roots.len(), 1);
    let issued = ca.issue_for_service(&csr, &checkout()).unwrap();
    assert!(signed_by(&issued, &new));
    assert_eq!(issued.trust_bundle, std::slice::from_ref(&new));
    assert_eq!(read(&dir, files::ROOT_CERT), Some(pem_of(&new)));
    for gone in [files::NEXT_CERT, files::NEXT_KEY, files::ROTATION] {
        assert_eq!(read(&dir, gone), None, "{gone}");
    }
    #[cfg(unix)]
    assert_eq!(mode(&dir.0.join("ca").join(files::ROOT_KEY)), 0o600);
    let retired: Vec<_> = std::fs::read_dir(dir.0.join("ca").join(files::RETIRED))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(
        retired,
        [pem_of(&old)],
        "the old certificate kept, not its key"
    );

    // A certificate of the old root, still valid for hours (as one made with its key
    // would be), is no longer renewed.
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://malla.local/svc/checkout".try_into().unwrap(),
    )];
    params.not_before = (clock.now() - Duration::from_secs(60)).into();
    params.not_after = (clock.now() + Duration::from_secs(36_000)).into();
    let valid_old = params.signed_by(&key, &old_authority.issuer).unwrap();
    let e = ca
        .renew(&csr, valid_old.der(), &checkout())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not issued by this mesh's CA"), "{e}");

    // The next start finds the new root alone, and a new rotation may begin.
    let again = open(&dir, &clock);
    assert_eq!(again.bundle(), std::slice::from_ref(&new));
    assert!(again.status().rotation.is_none());
    again.rotate(None).unwrap();
    assert_eq!(again.bundle()[0], new);
}

#[test]
fn a_restart_mid_rotation_resumes_it_where_the_clock_says() {
    let dir = TempDir::new("rotation-restart");
    let clock = ManualClock::new();
    let ca = open(&dir, &clock);
    let overlap = Duration::from_secs(7200);
    let plan = ca.rotate(Some(overlap)).unwrap();
    assert_eq!(plan.ends_at - overlap * 2, clock.now());
    let bundle = ca.bundle();
    drop(ca);

    // Restarted in the first phase: both roots, the old one signing.
    clock.set(plan.started_at + Duration::from_secs(600));
    let ca = open(&dir, &clock);
    assert_eq!(ca.bundle(), bundle);
    let status = ca.status();
    let (kept, phase) = status.rotation.unwrap();
    assert_eq!((kept.clone(), phase), (plan.clone(), Phase::Announcing));
    assert_eq!(kept.overlap(), overlap);
    let (_, csr) = workload();
    assert!(signed_by(
        &ca.issue_for_service(&csr, &checkout()).unwrap(),
        &bundle[0]
    ));
    drop(ca);

    // In the second: the new one signs, the old one still trusted.
    clock.set(plan.switch_at + Duration::from_secs(1));
    let ca = open(&dir, &clock);
    assert_eq!(ca.bundle(), [bundle[1].clone(), bundle[0].clone()]);
    assert!(signed_by(
        &ca.issue_for_service(&csr, &checkout()).unwrap(),
        &bundle[1]
    ));
    drop(ca);

    // Down through the end: the start ends the rotation.
    clock.set(plan.ends_at + Duration::from_secs(3600));
    let ca = open(&dir, &clock);
    assert_eq!(ca.bundle(), [bundle[1].clone()]);
    assert!(ca.status().rotation.is_none());
    assert_eq!(read(&dir, files::ROTATION), None);
    assert_eq!(read(&dir, files::ROOT_CERT), Some(pem_of(&bundle[1])));
}

#[test]
fn what_a_crash_leaves_is_recognised_at_the_next_start() {
    let clock = ManualClock::new();

    // A start that wrote the new root but not the plan: the rotation never began.
    let dir = TempDir::new("rotation-crash-start");
    let root = open(&dir, &clock).bundle();
    let ca_dir = dir.0.join("ca");
    std::fs::write(ca_dir.join(files::NEXT_KEY), b"half").unwrap();
    std::fs::write(ca_dir.join(files::NEXT_CERT), b"").unwrap();
    let ca = open(&dir, &clock);
    assert_eq!(ca.bundle(), root);
    assert_eq!(read(&dir, files::NEXT_KEY), None);
    assert_eq!(read(&dir, files::NEXT_CERT), None);

    // An end that replaced the key and crashed before the certificate: root.* do not
    // match, and must not be read; the end is done again.
    let plan = ca.rotate(Some(TTL)).unwrap();
    let new = ca.bundle()[1].clone();
    drop(ca);
    std::fs::copy(ca_dir.join(files::NEXT_KEY), ca_dir.join(files::ROOT_KEY)).unwrap();
    clock.set(plan.ends_at);
    let ca = open(&dir, &clock);
    assert_eq!(ca.bundle(), std::slice::from_ref(&new));
    assert_eq!(read(&dir, files::ROOT_CERT), Some(pem_of(&new)));
    assert_eq!(read(&dir, files::NEXT_KEY), None);
    drop(ca);

    // An end that removed the plan and crashed before next.*: leftovers, removed.
    let ca = open(&dir, &clock);
    let plan = ca.rotate(Some(TTL)).unwrap();
    let newer = ca.bundle()[1].clone();
    drop(ca);
    std::fs::copy(ca_dir.join(files::NEXT_KEY), ca_dir.join(files::ROOT_KEY)).unwrap();
    std::fs::copy(ca_dir.join(files::NEXT_CERT), ca_dir.join(files::ROOT_CERT)).unwrap();
    std::fs::remove_file(ca_dir.join(files::ROTATION)).unwrap();
    clock.set(plan.ends_at);
    let ca = open(&dir, &clock);
    assert_eq!(ca.bundle(), std::slice::from_ref(&newer));
    assert_eq!(read(&dir, files::NEXT_CERT), None);

    // A plan that names another root than next.crt holds: refused, with what to do.
    ca.rotate(Some(TTL)).unwrap();
    drop(ca);
    let text = String::from_utf8(read(&dir, files::ROTATION).unwrap()).unwrap();
    let mut plan: serde_json::Value = serde_json::from_str(&text).unwrap();
    plan["next_sha256"] = "00:11".into();
    std::fs::write(ca_dir.join(files::ROTATION), plan.to_string()).unwrap();
    let e = Ca::open_with_clock(&settings(&dir), clock.clock())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is not the new root rotation.json names") && e.contains("to abandon"),
        "{e}"
    );
}

#[test]
fn what_is_refused_says_why() {
    let dir = TempDir::new("rotation-refused");
    let clock = ManualClock::new();
    let ca = open(&dir, &clock);
    let e = ca.rotate(Some(TTL / 2)).unwrap_err().to_string();
    assert!(
        e.contains("overlap 30m is shorter than the certificate TTL (1h)")
            && e.contains("default (1h 6m)"),
        "{e}"
    );
    let e = ca
        .rotate(Some(Duration::from_secs(400 * 24 * 3600)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("longer than a year"), "{e}");
    assert_eq!(ca.bundle().len(), 1, "nothing started");
    assert_eq!(read(&dir, files::ROTATION), None);
    // The default margin is at least a minute.
    assert_eq!(
        default_overlap(Duration::from_secs(5)),
        Duration::from_secs(65)
    );

    // An operator's CA: not malla's to rotate.
    let root = ca.status().roots[0].0.clone();
    let ca_dir = dir.0.join("ca");
    let operator = CaSettings {
        source: CaSource::Files {
            cert: ca_dir.join(files::ROOT_CERT),
            key: ca_dir.join(files::ROOT_KEY),
        },
        ..settings(&dir)
    };
    let theirs = Ca::open(&operator).unwrap();
    assert!(theirs.status().operator);
    assert_eq!(theirs.status().roots[0].0, root);
    let e = theirs.rotate(None).unwrap_err();
    assert!(matches!(e, RotateError::OperatorCa));
    assert!(e.to_string().contains("--ca-cert"), "{e}");
}
