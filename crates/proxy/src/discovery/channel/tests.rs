//! The control-plane connector against a rustls server on loopback: the roots it verifies
//! with (`ca_file`, then the certificate's bundle), the certificate it presents, ALPN, what
//! a refusal says, and the writes' wait for the first certificate.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use malla_core::{ServiceName, SpiffeId};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
    ServerConfig,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::TlsAcceptor;

use super::*;

/// A CA of its own.
struct TestCa {
    root: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = params.self_signed(&key).unwrap();
        TestCa {
            root,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate of `id` and its key (PKCS#8 DER).
    fn issue(&self, id: &str) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }

    /// Its trust bundle in a PEM file.
    fn bundle_file(&self, name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "malla-control-ca-{}-{name}.pem",
            std::process::id()
        ));
        std::fs::write(&path, self.root.pem()).unwrap();
        path
    }

    /// `service`'s SVID, as the CA would answer a `Certify`.
    fn svid(&self, service: &str) -> Svid {
        let id = format!("spiffe://test.mesh/svc/{service}");
        let (cert, key) = self.issue(&id);
        Svid {
            spiffe_id: SpiffeId::parse(&id).unwrap(),
            chain: vec![cert],
            key_pkcs8: Arc::new(key),
            trust_bundle: vec![self.root.der().to_vec()],
            not_before: SystemTime::now(),
            not_after: SystemTime::now() + Duration::from_secs(3600),
        }
    }
}

/// What the server saw of one handshake.
#[derive(Debug)]
struct Seen {
    client: Option<SpiffeId>,
    alpn: Option<Vec<u8>>,
}

/// A TLS server on loopback proving `id` with a certificate of `ca`; client certificates
/// optional, verified against `ca`. Reports each handshake that succeeds.
async fn server(ca: &TestCa, id: &str) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (cert, key) = ca.issue(id);
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.root.der().to_vec()))
        .unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .allow_unauthenticated()
        .build()
        .unwrap();
    let mut config = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(tcp).await {
                    let (_, connection) = stream.get_ref();
                    let _ = tx.send(Seen {
                        client: tls::peer_identity(connection),
                        alpn: connection.alpn_protocol().map(<[u8]>::to_vec),
                    });
                    // Held open a while, as a server would.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    drop(stream);
                }
            });
        }
    });
    (addr, rx)
}

fn control_tls(
    addr: SocketAddr,
    ca_file: Option<PathBuf>,
    identity: Option<Arc<IdentityState>>,
) -> Arc<ControlTls> {
    let control = ControlPlaneConfig {
        ca_file,
        ..ControlPlaneConfig::new(addr.to_string())
    };
    let target = control.target().unwrap();
    assert!(target.tls);
    Arc::new(ControlTls::new(&control, target, identity).unwrap())
}

fn identity() -> Arc<IdentityState> {
    Arc::new(IdentityState::new(ServiceName::new("checkout").unwrap()))
}

#[tokio::test]
async fn before_a_certificate_the_ca_file_verifies_and_nothing_is_presented() {
    let ca = TestCa::new("mesh");
    let (addr, mut seen) = server(&ca, "spiffe://test.mesh/control").await;
    let file = ca.bundle_file("before");
    let tls = control_tls(addr, Some(file.clone()), Some(identity()));
    let json = tls.to_json();
    assert_eq!(json["roots"], "ca_file", "{json}");
    assert_eq!(json["roots_file"], file.display().to_string(), "{json}");

    tls.connect().await.unwrap();
    let seen = seen.recv().await.unwrap();
    assert_eq!(seen.client, None);
    assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));
    let json = tls.to_json();
    assert_eq!(json["handshakes"], 1, "{json}");
    assert_eq!(json["last_error"], serde_json::Value::Null, "{json}");
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn with_a_certificate_its_bundle_verifies_and_it_is_presented() {
    let ca = TestCa::new("mesh");
    let (addr, mut seen) = server(&ca, "spiffe://test.mesh/control").await;
    // A CA file of another mesh: no longer used once the certificate is in force.
    let other = TestCa::new("other").bundle_file("with");
    let state = identity();
    state.set(ca.svid("checkout"));
    let tls = control_tls(addr, Some(other.clone()), Some(state));
    let json = tls.to_json();
    assert_eq!(json["roots"], "certificate", "{json}");
    assert_eq!(
        json["client_certificate"], "spiffe://test.mesh/svc/checkout",
        "{json}"
    );

    tls.connect().await.unwrap();
    let seen = seen.recv().await.unwrap();
    assert_eq!(
        seen.client.map(|id| id.to_string()).as_deref(),
        Some("spiffe://test.mesh/svc/checkout")
    );
    let _ = std::fs::remove_file(other);
}

#[tokio::test]
async fn a_ca_file_of_another_mesh_is_refused_and_said_why() {
    let ca = TestCa::new("mesh");
    let (addr, _seen) = server(&ca, "spiffe://test.mesh/control").await;
    let wrong = TestCa::new("other").bundle_file("wrong");
    let tls = control_tls(addr, Some(wrong.clone()), None);
    let err = tls.connect().await.unwrap_err().to_string();
    assert!(err.contains("not from this mesh's CA"), "{err}");
    assert!(err.contains("control.ca_file"), "{err}");
    assert!(err.contains("trust-bundle.pem"), "{err}");
    let json = tls.to_json();
    assert_eq!(json["failures"], 1, "{json}");
    assert_eq!(json["last_error"], err, "{json}");
    let _ = std::fs::remove_file(wrong);
}

#[tokio::test]
async fn a_server_that_is_not_the_control_plane_is_refused() {
    let ca = TestCa::new("mesh");
    // A workload's certificate from the same CA: it chains, but names a service.
    let (addr, _seen) = server(&ca, "spiffe://test.mesh/svc/impostor").await;
    let file = ca.bundle_file("impostor");
    let tls = control_tls(addr, Some(file.clone()), None);
    let err = tls.connect().await.unwrap_err().to_string();
    assert!(
        err.contains("does not prove the control plane's identity"),
        "{err}"
    );
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn writes_connect_once_the_first_certificate_is_in_force() {
    let ca = TestCa::new("mesh");
    let (addr, mut seen) = server(&ca, "spiffe://test.mesh/control").await;
    let file = ca.bundle_file("writes");
    let state = identity();
    let tls = control_tls(addr, Some(file.clone()), Some(state.clone()));
    let mut writes = Connect {
        tls: tls.clone(),
        first_certificate: true,
    };
    let uri: Uri = format!("https://{addr}").parse().unwrap();
    let connecting = tokio::spawn(writes.call(uri));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!connecting.is_finished(), "connected before a certificate");
    assert!(seen.try_recv().is_err());
    state.set(ca.svid("checkout"));
    connecting.await.unwrap().unwrap();
    let seen = seen.recv().await.unwrap();
    assert_eq!(
        seen.client.map(|id| id.to_string()).as_deref(),
        Some("spiffe://test.mesh/svc/checkout")
    );
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn the_writes_channel_is_remade_for_each_certificate() {
    let ca = TestCa::new("mesh");
    let file = ca.bundle_file("remade");
    let state = identity();
    let tls = control_tls(
        "127.0.0.1:1".parse().unwrap(),
        Some(file.clone()),
        Some(state.clone()),
    );
    let endpoint = Endpoint::from_static("https://127.0.0.1:1");
    let channels = Channels::new(endpoint, Some(tls));
    // The certificate the current writes channel was made for.
    let made_for = |channels: &Channels| {
        let writes = channels.writes.as_ref().unwrap();
        let current = writes.current.lock().unwrap();
        current
            .as_ref()
            .map(|(svid, _)| svid.as_ref().map(Arc::as_ptr))
    };
    let _ = channels.writes();
    assert_eq!(
        made_for(&channels),
        Some(None),
        "made before the first certificate"
    );
    let _ = channels.writes();
    state.set(ca.svid("checkout"));
    let _ = channels.writes();
    let first = made_for(&channels).flatten().unwrap();
    let _ = channels.writes();
    assert_eq!(
        made_for(&channels).flatten(),
        Some(first),
        "the same while it is in force"
    );
    state.set(ca.svid("checkout"));
    let _ = channels.writes();
    assert_ne!(
        made_for(&channels).flatten(),
        Some(first),
        "a new one after a renewal"
    );
    let _ = std::fs::remove_file(file);
}

#[test]
fn host_and_port() {
    let t = |a: &str| {
        host_port(&ControlTarget {
            authority: a.to_string(),
            tls: true,
        })
    };
    assert_eq!(t("127.0.0.1:7780"), ("127.0.0.1".to_string(), 7780));
    assert_eq!(t("[::1]:7781"), ("::1".to_string(), 7781));
    assert_eq!(t("control.mesh:443"), ("control.mesh".to_string(), 443));
}
