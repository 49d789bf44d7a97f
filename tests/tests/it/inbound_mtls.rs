//! mTLS at a sidecar's inbound listener: a sidecar with its service's certificate (a join
//! token) accepts callers that open with TLS and prove an identity of the mesh's CA, and
//! hands the application the caller's SPIFFE ID in `malla-client-id` — over HTTP/1 and
//! HTTP/2 — which nobody else can set: the field is removed from every request first.
//! Plaintext is accepted in permissive mode (the default) and refused in strict mode; a
//! certificate from another CA fails the handshake. Each outcome is counted.

use std::{sync::Arc, time::Duration};

use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use malla_control::identity::Ca;
use malla_core::{ServiceName, SpiffeId, TrustDomain};
use malla_proxy::{
    config::{ListenerProtocol, MtlsMode},
    identity::Svid,
    tls,
};
use malla_tests::{
    assert_eventually,
    control::TestControl,
    identity::svid,
    mesh::server,
    peers::HttpPeer,
    proxy::{admin, TestProxy},
};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

fn payments() -> SpiffeId {
    SpiffeId::parse("spiffe://malla.local/svc/payments").unwrap()
}

/// A sidecar of `payments` in front of `app`, with a join token, in `mode`.
async fn sidecar(control: &TestControl, app: &HttpPeer, mode: MtlsMode) -> TestProxy {
    server(
        control,
        "payments",
        app.addr(),
        ListenerProtocol::Auto,
        mode,
    )
    .await
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    client: &Svid,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = tls::client_config(client, payments(), &tls::provider()).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(), tcp)
        .await
}

/// One HTTP/1.1 request (with a forged `malla-client-id`), the whole response as text.
async fn http1_exchange<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut stream: S) -> String {
    stream
        .write_all(
            b"GET /hello HTTP/1.1\r\nhost: payments\r\nmalla-client-id: spiffe://malla.local/svc/admin\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_lowercase()
}

fn security(proxy: &TestProxy, security: &str, group: &str) -> f64 {
    admin::metric(
        &proxy.metrics_text(),
        "malla_proxy_inbound_connections_by_security_total",
        &[("security", security), ("group", group)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_sees_the_callers_identity_and_nobody_can_forge_it() {
    let control = TestControl::start_without_dns().await;
    let app = HttpPeer::http1("payments-app");
    let proxy = sidecar(&control, &app, MtlsMode::Permissive).await;
    let checkout = svid(&control.identity().ca, "checkout");

    // HTTP/1 over mTLS: the caller's identity, not the forged one.
    let response = http1_exchange(tls_connect(proxy.inbound(), &checkout).await.unwrap()).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(
        response.contains("x-echo-h-malla-client-id: spiffe://malla.local/svc/checkout\r\n"),
        "{response}"
    );
    assert!(!response.contains("svc/admin"), "{response}");

    // Plaintext (permissive): served, and the forged field is gone.
    let response = http1_exchange(TcpStream::connect(proxy.inbound()).await.unwrap()).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(!response.contains("malla-client-id"), "{response}");

    // Another CA's certificate: no handshake.
    let other = Ca::ephemeral(
        TrustDomain::new("malla.local").unwrap(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let mut intruder = svid(&other, "checkout");
    intruder.trust_bundle = control.identity().ca.bundle().to_vec();
    let refused = match tls_connect(proxy.inbound(), &intruder).await {
        // TLS 1.3: the client may finish before the server's verdict; reading tells.
        Ok(stream) => !http1_exchange(stream).await.starts_with("http/1.1 200"),
        Err(_) => true,
    };
    assert!(refused, "a foreign certificate was accepted");

    assert_eventually!(security(&proxy, "mtls", "X25519MLKEM768") == 1.0);
    assert_eq!(security(&proxy, "plaintext", ""), 1.0);
    assert_eventually!(security(&proxy, "handshake-failed", "") == 1.0);
    assert_eq!(app.requests(), 2);
}

/// HTTP/2 inside the tunnel (prior knowledge), to an HTTP/2 application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_mtls_carries_the_identity_too() {
    let control = TestControl::start_without_dns().await;
    let app = HttpPeer::http2("payments-app");
    let proxy = sidecar(&control, &app, MtlsMode::Permissive).await;
    let checkout = svid(&control.identity().ca, "checkout");
    let stream = tls_connect(proxy.inbound(), &checkout).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = Request::get("http://payments/h2")
        .header("malla-client-id", "spiffe://malla.local/svc/admin")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-echo-h-malla-client-id"],
        "spiffe://malla.local/svc/checkout"
    );
    let _ = response.into_body().collect().await;

    assert_eq!(app.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_refuses_plaintext() {
    let control = TestControl::start_without_dns().await;
    let app = HttpPeer::http1("payments-app");
    let proxy = sidecar(&control, &app, MtlsMode::Strict).await;
    let response = http1_exchange(TcpStream::connect(proxy.inbound()).await.unwrap()).await;
    assert_eq!(response, "", "plaintext got an answer in strict mode");
    assert_eq!(security(&proxy, "plaintext-refused", ""), 1.0);
    let checkout = svid(&control.identity().ca, "checkout");
    let response = http1_exchange(tls_connect(proxy.inbound(), &checkout).await.unwrap()).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert_eq!(app.requests(), 1);
}

/// curl (an independent TLS client) with an SVID from files, as docs/identity.md shows:
/// it offers h2 and http/1.1 by ALPN, and its identity reaches the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_mesh_certificate_is_a_caller_like_any_sidecar() {
    let control = TestControl::start_without_dns().await;
    let app = HttpPeer::http1("payments-app");
    let proxy = sidecar(&control, &app, MtlsMode::Strict).await;
    let ca = &control.identity().ca;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = ca
        .issue_for_service(csr.der(), &ServiceName::new("checkout").unwrap())
        .unwrap();
    let dir = malla_tests::control::TempDir::new("inbound-curl");
    let pem = |label: &str, der: &[u8]| pem::encode(&pem::Pem::new(label, der));
    std::fs::write(
        dir.path().join("checkout.crt"),
        pem("CERTIFICATE", &issued.chain[0]),
    )
    .unwrap();
    std::fs::write(dir.path().join("checkout.key"), key.serialize_pem()).unwrap();
    let port = proxy.inbound().port();
    let args: Vec<String> = [
        "-sS",
        "-k",
        "--http1.1",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--cert",
        &dir.path().join("checkout.crt").display().to_string(),
        "--key",
        &dir.path().join("checkout.key").display().to_string(),
        "--resolve",
        &format!("malla.mesh:{port}:127.0.0.1"),
        &format!("https://malla.mesh:{port}/curl"),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(&args)
            .output()
            .expect("curl runs")
    })
    .await
    .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        out.status.success(),
        "{headers}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(
        headers.contains("x-echo-h-malla-client-id: spiffe://malla.local/svc/checkout"),
        "{headers}"
    );
}

/// Hostile bytes where a handshake should be (a TLS record header, then garbage; a record
/// that never completes): the connection is closed and counted, the listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_a_tls_record_header_closes_the_connection_only() {
    let control = TestControl::start_without_dns().await;
    let app = HttpPeer::http1("payments-app");
    let proxy = sidecar(&control, &app, MtlsMode::Permissive).await;
    for garbage in [
        &b"\x16\x03\x01\x00\x05hello"[..],
        &b"\x16\x03\x03\xff\xff\x01\x00"[..],
        &b"\x16GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
    ] {
        let mut stream = TcpStream::connect(proxy.inbound()).await.unwrap();
        stream.write_all(garbage).await.unwrap();
        let _ = stream.shutdown().await;
        let mut out = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection was not closed");
        assert!(
            !String::from_utf8_lossy(&out).contains("HTTP/1.1 200"),
            "{out:?}"
        );
    }
    assert_eventually!(security(&proxy, "handshake-failed", "") == 3.0);
    let checkout = svid(&control.identity().ca, "checkout");
    let response = http1_exchange(tls_connect(proxy.inbound(), &checkout).await.unwrap()).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert_eq!(app.requests(), 1);
}
