//! Root rotation under traffic, end to end: two sidecars (4 s certificates, renewed every
//! ~3 s) talk mTLS, each request on a new connection, while the control plane's root is
//! rotated over the HTTP API with a 5 s overlap. The CA first hands out the new root in
//! every bundle while still signing with the old one, then signs with the new one, then
//! drops the old one: no request fails, each sidecar goes through the three states (old
//! certificate with both roots, new certificate with both roots, new certificate with the
//! new root alone), and at the end a certificate of the old root — still valid for an
//! hour — is refused by a sidecar while one of the new root is taken.

use std::{sync::Arc, time::Duration};

use http::{Method, Version};
use malla_control::{
    identity::{Ca, CaSettings, CaSource},
    server::IdentitySettings,
};
use malla_core::{SpiffeId, TrustDomain};
use malla_proxy::{
    config::{ListenerProtocol, MtlsMode},
    identity::Svid,
    tls,
};
use malla_tests::{
    assert_eventually,
    client::{self, collect},
    control::{TempDir, TestControl},
    identity::{state, svid},
    mesh::{security, server, Caller},
    peers::HttpPeer,
    proxy::{admin, TestProxy},
};
use rustls::{
    pki_types::{CertificateDer, UnixTime},
    server::WebPkiClientVerifier,
    RootCertStore,
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

const TTL: Duration = Duration::from_secs(4);

/// Whether `leaf` (DER) chains to `root` (DER), as a sidecar verifies a peer.
fn chains_to(leaf: &[u8], root: &[u8]) -> bool {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(root.to_vec())).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .build()
        .unwrap();
    verifier
        .verify_client_cert(&CertificateDer::from(leaf.to_vec()), &[], UnixTime::now())
        .is_ok()
}

/// What a sidecar holds, as `(signed by the new root, roots in its bundle)`.
fn holding(proxy: &TestProxy, new_root: &[u8]) -> (bool, usize) {
    let svid = state(proxy).current().expect("a certificate");
    (chains_to(&svid.chain[0], new_root), svid.trust_bundle.len())
}

/// One HTTP/1.1 exchange over `client`'s mTLS connection to a sidecar of `checkout`:
/// whether it was answered 200.
async fn called_with(inbound: std::net::SocketAddr, client: &Svid) -> bool {
    let checkout = SpiffeId::parse("spiffe://malla.local/svc/checkout").unwrap();
    let config = tls::client_config(client, checkout, &tls::provider()).unwrap();
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let Ok(mut stream) = TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(), tcp)
        .await
    else {
        return false;
    };
    // TLS 1.3: the client may finish before the server's verdict; the answer tells.
    if stream
        .write_all(b"GET /hello HTTP/1.1\r\nhost: checkout\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    out.starts_with(b"HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_under_mtls_traffic_without_a_failed_request() {
    let control = TestControl::start_with_identity(IdentitySettings {
        cert_ttl: TTL,
        ..IdentitySettings::default()
    })
    .await;
    // The old root's files, kept aside: at the end a certificate of it is tried.
    let kept = TempDir::new("old-root");
    for name in ["root.crt", "root.key"] {
        std::fs::copy(
            control.data_dir().join("ca").join(name),
            kept.path().join(name),
        )
        .unwrap();
    }
    let app = HttpPeer::http1("checkout-app");
    let checkout = server(
        &control,
        "checkout",
        app.addr(),
        ListenerProtocol::Auto,
        MtlsMode::Strict,
    )
    .await;
    let web = Caller {
        service: "web",
        joins: true,
        upstreams: vec![("checkout", ListenerProtocol::Auto)],
    }
    .start_with(&control, |u| u.max_idle_per_endpoint = 0)
    .await;
    let old_root = control.identity().ca.bundle()[0].clone();

    // `malla identity rotate --overlap 5s`.
    let started = control
        .api()
        .request(
            Method::POST,
            "/v1/identity/rotate",
            json!({"overlap": "5s"}).to_string(),
        )
        .await;
    assert_eq!(started.status, 200, "{started}");
    let answer = started.json;
    assert_eq!(answer["rotation"]["phase"], "announcing", "{answer}");
    assert_eq!(answer["rotation"]["overlap_seconds"], 5);
    let roles: Vec<_> = answer["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(roles, ["signing", "next"], "{answer}");
    let bundle = control.identity().ca.bundle();
    assert_eq!(bundle[0], old_root);
    let new_root = bundle[1].clone();
    // A second one waits for this one to end.
    let again = control
        .api()
        .request(Method::POST, "/v1/identity/rotate", "{}")
        .await;
    assert_eq!(again.status, 409, "{again}");
    assert!(again.message().contains("already under way"), "{again}");

    // Traffic, each request on a new mTLS connection, until the rotation is over and both
    // sidecars have renewed since (a new-root certificate, the new root alone); bounded.
    let (mut ok, mut failed) = (0u64, Vec::new());
    let (mut seen_web, mut seen_checkout) = (Vec::new(), Vec::new());
    let done = |proxy: &TestProxy| holding(proxy, &new_root) == (true, 1);
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let note = |seen_web: &mut Vec<_>, seen_checkout: &mut Vec<_>| {
        for (proxy, seen) in [(&web, seen_web), (&checkout, seen_checkout)] {
            let now = holding(proxy, &new_root);
            if seen.last() != Some(&now) {
                seen.push(now);
            }
        }
    };
    while !(done(&web) && done(&checkout)) && tokio::time::Instant::now() < until {
        note(&mut seen_web, &mut seen_checkout);
        let request = client::get(Version::HTTP_11, "checkout", "/hello");
        let response = client::Http1::connect(web.outbound())
            .await
            .unwrap()
            .send(request)
            .await
            .unwrap();
        let response = collect(response).await.unwrap();
        match response.status {
            200 => ok += 1,
            _ => failed.push(format!("{}: {}", response.status, response.text())),
        }
    }
    note(&mut seen_web, &mut seen_checkout);
    eprintln!("{ok} requests during the rotation; web went through {seen_web:?}, checkout through {seen_checkout:?}");
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok + failed.len() as u64
    );
    assert!(ok >= 20, "{ok} requests");
    assert!(
        security(&web, "outbound", "mtls") >= ok as f64,
        "a handshake per request"
    );
    // Each sidecar learnt the new root while holding a certificate of the old one, then
    // got one of the new root while still trusting both, then the new root alone.
    for (name, seen) in [("web", &seen_web), ("checkout", &seen_checkout)] {
        for state in [(false, 2), (true, 2), (true, 1)] {
            assert!(
                seen.contains(&state),
                "{name} never held {state:?}: {seen:?}"
            );
        }
        let switched = seen.iter().position(|s| s.0).unwrap();
        assert!(
            seen[..switched].contains(&(false, 2)),
            "{name} held a new-root certificate before trusting the new root: {seen:?}"
        );
    }

    // Over: the control plane's bundle is the new root, and so is each sidecar's.
    let identity = control.api().get("/v1/identity").await.ok();
    assert!(identity["rotation"].is_null(), "{identity}");
    assert_eq!(identity["roots"].as_array().unwrap().len(), 1);
    assert_eq!(
        control.identity().ca.bundle(),
        std::slice::from_ref(&new_root)
    );
    for proxy in [&web, &checkout] {
        let svid = state(proxy).current().unwrap();
        assert_eq!(svid.trust_bundle, std::slice::from_ref(&new_root));
        assert!(chains_to(&svid.chain[0], &new_root));
        assert!(!chains_to(&svid.chain[0], &old_root));
        let config = admin::config(proxy.admin()).await;
        assert_eq!(
            config["control"]["identity"]["trust_bundle_roots"], 1,
            "{config}"
        );
    }
    assert!(!control.data_dir().join("ca/rotation.json").exists());

    // A certificate of the old root, valid for another hour, is refused by checkout now
    // that the old root has left its bundle; one of the new root is taken.
    let old_ca = Ca::open(&CaSettings {
        trust_domain: TrustDomain::new("malla.local").unwrap(),
        cert_ttl: Duration::from_secs(3600),
        source: CaSource::Files {
            cert: kept.path().join("root.crt"),
            key: kept.path().join("root.key"),
        },
    })
    .unwrap();
    let mut forged = svid(&old_ca, "web");
    assert!(forged.not_after > std::time::SystemTime::now() + Duration::from_secs(3000));
    forged.trust_bundle = vec![new_root.clone()];
    let failed_before = security(&checkout, "inbound", "handshake-failed");
    assert!(
        !called_with(checkout.inbound(), &forged).await,
        "a certificate of the retired root was accepted"
    );
    assert_eventually!(security(&checkout, "inbound", "handshake-failed") > failed_before);
    let current = svid(&control.identity().ca, "web");
    assert!(called_with(checkout.inbound(), &current).await);
}
