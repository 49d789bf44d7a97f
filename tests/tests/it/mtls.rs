//! mTLS between sidecars at the handshake: the sidecar's TLS configurations
//! (`malla_proxy::tls`) made from SVIDs of a real CA (`malla_control::identity::Ca`), over
//! real loopback TCP with tokio-rustls on both ends. A sidecar of `checkout` calls one of
//! `payments`: TLS 1.3, the hybrid post-quantum key exchange, each side sees the other's
//! SPIFFE ID. Each of these is refused: a client certificate from another CA, an expired
//! one, none at all; a server that is not the expected service.

use std::{sync::Arc, time::Duration};

use malla_control::identity::Ca;
use malla_core::{ServiceName, SpiffeId, TrustDomain};
use malla_proxy::tls::{self, ALPN_MESH};
use malla_tests::identity::svid;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::{ClientConfig, ServerConfig};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn ca(ttl: Duration) -> Ca {
    Ca::ephemeral(TrustDomain::new("malla.local").unwrap(), ttl).unwrap()
}

fn id(service: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://malla.local/svc/{service}")).unwrap()
}

/// What each side saw of one connection attempt.
struct Outcome {
    client: Result<Seen, String>,
    server: Result<Seen, String>,
}

#[derive(Debug)]
struct Seen {
    peer: Option<SpiffeId>,
    version: Option<rustls::ProtocolVersion>,
    group: Option<rustls::NamedGroup>,
    alpn: Option<Vec<u8>>,
}

fn seen(state: &rustls::CommonState) -> Seen {
    Seen {
        peer: tls::peer_identity(state),
        version: state.protocol_version(),
        group: state.negotiated_key_exchange_group().map(|g| g.name()),
        alpn: state.alpn_protocol().map(<[u8]>::to_vec),
    }
}

/// One connection from `client` to `server`, with an echo of a few bytes when both agree.
async fn connect(client: ClientConfig, server: ServerConfig) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(seen(tls.get_ref().1))
    });
    let connector = TlsConnector::from(Arc::new(client));
    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(tls::server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        Ok::<_, String>(seen(tls.get_ref().1))
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("the client finished");
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server finished")
        .unwrap();
    Outcome { client, server }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_handshake_tls13_post_quantum_and_see_each_others_identity() {
    let ca = ca(Duration::from_secs(3600));
    let provider = tls::provider();
    let checkout = svid(&ca, "checkout");
    let payments = svid(&ca, "payments");
    let outcome = connect(
        tls::client_config(&checkout, id("payments"), &provider).unwrap(),
        tls::server_config(&payments, &provider).unwrap(),
    )
    .await;
    let client = outcome.client.expect("the client connected");
    let server = outcome.server.expect("the server accepted");
    assert_eq!(server.peer, Some(id("checkout")), "the caller's identity");
    assert_eq!(client.peer, Some(id("payments")));
    assert_eq!(server.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(server.group, Some(rustls::NamedGroup::X25519MLKEM768));
    assert_eq!(server.alpn.as_deref(), Some(ALPN_MESH));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let provider = tls::provider();
    let mesh = ca(Duration::from_secs(3600));
    let other = ca(Duration::from_secs(3600));
    // The intruder trusts the mesh's root (it is public), but its certificate is its own CA's.
    let mut intruder = svid(&other, "checkout");
    intruder.trust_bundle = mesh.bundle().to_vec();
    let outcome = connect(
        tls::client_config(&intruder, id("payments"), &provider).unwrap(),
        tls::server_config(&svid(&mesh, "payments"), &provider).unwrap(),
    )
    .await;
    // Its root has the mesh root's name, so the signature check is what fails.
    let server = outcome.server.unwrap_err();
    assert!(
        server.contains("UnknownIssuer") || server.contains("BadSignature"),
        "{server}"
    );
    assert!(outcome.client.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused() {
    let provider = tls::provider();
    // Valid for 1 s (after the CA's 60 s backdating).
    let short = ca(Duration::from_secs(1));
    let expired = svid(&short, "checkout");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The server's certificate, issued now, is valid for the handshake.
    let fresh_ca_same_root_server = svid(&short, "payments");
    let outcome = connect(
        tls::client_config(&expired, id("payments"), &provider).unwrap(),
        tls::server_config(&fresh_ca_same_root_server, &provider).unwrap(),
    )
    .await;
    let server = outcome.server.unwrap_err();
    assert!(server.contains("certificate expired"), "{server}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_the_expected_service_is_refused() {
    let provider = tls::provider();
    let ca = ca(Duration::from_secs(3600));
    // The client calls payments; the endpoint answers with checkout's certificate.
    let outcome = connect(
        tls::client_config(&svid(&ca, "web"), id("payments"), &provider).unwrap(),
        tls::server_config(&svid(&ca, "checkout"), &provider).unwrap(),
    )
    .await;
    let client = outcome.client.unwrap_err();
    assert!(client.contains("NotValidForName"), "{client}");
    assert!(outcome.server.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let provider = tls::provider();
    let ca = ca(Duration::from_secs(3600));
    let payments = svid(&ca, "payments");
    // A client that checks the server as a sidecar does, but presents no certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.bundle()[0].clone().into()).unwrap();
    let verifier = tls::SpiffeServerVerifier::new(
        Arc::new(roots),
        tls::Expected::Id(id("payments")),
        &provider,
    );
    let anonymous = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let outcome = connect(anonymous, tls::server_config(&payments, &provider).unwrap()).await;
    let server = outcome.server.unwrap_err();
    assert!(server.contains("peer sent no certificates"), "{server}");
}

/// OpenSSL (an independent TLS implementation, with no ML-KEM in 3.0) as the calling
/// sidecar: it presents an SVID written to files as an operator would, verifies the
/// server's chain against the trust bundle, and falls back to X25519; the server sees its
/// SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_presents_an_svid_and_falls_back_to_x25519() {
    let ca = ca(Duration::from_secs(3600));
    let provider = tls::provider();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = ca
        .issue_for_service(csr.der(), &ServiceName::new("checkout").unwrap())
        .unwrap();
    let dir = malla_tests::control::TempDir::new("mtls-openssl");
    let pem = |label: &str, der: &[u8]| pem::encode(&pem::Pem::new(label, der));
    let cert_file = dir.path().join("svid.pem");
    let key_file = dir.path().join("svid.key");
    let bundle_file = dir.path().join("bundle.pem");
    std::fs::write(&cert_file, pem("CERTIFICATE", &issued.chain[0])).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::write(&bundle_file, pem("CERTIFICATE", &ca.bundle()[0])).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(
        tls::server_config(&svid(&ca, "payments"), &provider).unwrap(),
    ));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(seen(tls.get_ref().1))
    });
    let args: Vec<std::ffi::OsString> = vec![
        "s_client".into(),
        "-connect".into(),
        addr.to_string().into(),
        "-tls1_3".into(),
        "-alpn".into(),
        "malla/1".into(),
        "-cert".into(),
        cert_file.into(),
        "-key".into(),
        key_file.into(),
        "-CAfile".into(),
        bundle_file.into(),
        "-verify_return_error".into(),
        "-ign_eof".into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = std::process::Command::new("openssl")
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl runs (Debian's openssl package)");
        // Written, then closed: with -ign_eof openssl waits for the server to close.
        child.stdin.take().unwrap().write_all(b"ping").unwrap();
        child.wait_with_output().unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("openssl finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .expect("the server accepted openssl");
    assert_eq!(server.peer, Some(id("checkout")), "{stdout}");
    assert_eq!(
        server.group,
        Some(rustls::NamedGroup::X25519),
        "the fallback"
    );
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    assert!(stdout.contains("ALPN protocol: malla/1"), "{stdout}");
    assert!(stdout.contains("ping"), "the echo: {stdout}");
}
