//! The inbound mTLS mode set centrally (issue 14): the mesh's default (`malla control
//! --mtls-mode`), a service's own (`mtls` in its authorization policy), and a sidecar's
//! `[inbound] mtls` over both. A sidecar whose configuration sets no mode follows the
//! control plane's: a plaintext caller is refused while the mode in force is strict and let
//! in once a policy makes the service permissive, without restarting the sidecar; deleting
//! the policy returns to the mesh's mode, and a control plane restarted with another mode
//! brings it. mTLS callers get in whatever the mode. `/config` says which mode is in force
//! and where it comes from; refused plaintext is counted.

use std::{sync::Arc, time::Duration};

use http::Version;
use malla_control::server::IdentitySettings;
use malla_core::{authz::PeerMtls, SpiffeId};
use malla_proxy::{
    config::{ListenerProtocol, MtlsMode},
    identity::Svid,
    tls,
};
use malla_tests::{
    assert_eventually, client,
    control::TestControl,
    identity::svid,
    mesh::{security, server, Caller},
    peers::HttpPeer,
    proxy::{admin, TestProxy},
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

const LEDGER: &str = "/v1/authorizations/ledger";

/// A control plane whose mesh mode is `mode`.
async fn control(mode: PeerMtls) -> TestControl {
    TestControl::start_with_identity(IdentitySettings {
        mtls_mode: mode,
        ..Default::default()
    })
    .await
}

/// A sidecar of `ledger` in front of `app`, with a join token; `local`: its own
/// `[inbound] mtls` (`None`: the control plane's).
async fn ledger(control: &TestControl, app: &HttpPeer, local: Option<MtlsMode>) -> TestProxy {
    server(control, "ledger", app.addr(), ListenerProtocol::Auto, local).await
}

/// The `inbound_mtls` part of the sidecar's `/config`.
async fn in_force(proxy: &TestProxy) -> Value {
    admin::config(proxy.admin()).await["inbound_mtls"].clone()
}

/// Waits until the sidecar's mode in force is `mode` from `source`.
async fn wait_for_mode(proxy: &TestProxy, mode: &str, source: &str) {
    assert_eventually!(
        {
            let m = in_force(proxy).await;
            m["mode"] == mode && m["source"] == source
        },
        "the mode in force never became {mode} ({source}): {}",
        in_force(proxy).await
    );
}

/// One HTTP/1.1 request, the whole response as text ("" when the connection was closed
/// without an answer).
async fn exchange<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut stream: S) -> String {
    stream
        .write_all(b"GET /ledger HTTP/1.1\r\nhost: ledger\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_lowercase()
}

/// A plaintext caller (no sidecar, no certificate).
async fn plaintext(proxy: &TestProxy) -> String {
    exchange(TcpStream::connect(proxy.inbound()).await.unwrap()).await
}

/// A caller over mTLS with `client`'s certificate, requiring the ledger's identity.
async fn over_mtls(proxy: &TestProxy, client: &Svid) -> String {
    let ledger = SpiffeId::parse("spiffe://malla.local/svc/ledger").unwrap();
    let config = tls::client_config(client, ledger, &tls::provider()).unwrap();
    let tcp = TcpStream::connect(proxy.inbound()).await.unwrap();
    let stream = TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    exchange(stream).await
}

fn refused(proxy: &TestProxy) -> f64 {
    security(proxy, "inbound", "plaintext-refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_mesh_refuses_plaintext_until_a_service_policy_lets_it_in() {
    let control = control(PeerMtls::Strict).await;
    let api = control.api();
    let identity = api.get("/v1/identity").await.ok();
    assert_eq!(identity["mtls_mode"], "strict", "{identity}");
    let app = HttpPeer::http1("ledger-app");
    let proxy = ledger(&control, &app, None).await;
    let checkout = svid(&control.identity().ca, "checkout");

    // The mesh's mode, as no policy sets one and the sidecar's configuration none.
    wait_for_mode(&proxy, "strict", "mesh").await;
    let m = in_force(&proxy).await;
    assert_eq!(
        (&m["local"], &m["service"], &m["mesh"]),
        (&Value::Null, &Value::Null, &json!("strict")),
        "{m}"
    );
    assert_eq!(
        plaintext(&proxy).await,
        "",
        "plaintext got in, the mesh is strict"
    );
    assert_eq!(refused(&proxy), 1.0);
    let response = over_mtls(&proxy, &checkout).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(
        response.contains("x-echo-h-malla-client-id: spiffe://malla.local/svc/checkout"),
        "{response}"
    );

    // The service made permissive by its policy: plaintext in, the same sidecar.
    let put = api.put(LEDGER, &json!({"mtls": "permissive"})).await.ok();
    wait_for_mode(&proxy, "permissive", "service").await;
    assert_eq!(in_force(&proxy).await["service"], "permissive");
    let authorization = admin::config(proxy.admin()).await["authorization"].clone();
    assert_eq!(authorization["policy"]["version"], put["version"]);
    assert_eq!(authorization["policy"]["mtls"], "permissive");
    let response = plaintext(&proxy).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(!response.contains("malla-client-id"), "{response}");
    let response = over_mtls(&proxy, &checkout).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
    // A caller's sidecar without a certificate (migrating) gets in too.
    let web = Caller {
        service: "web",
        joins: false,
        upstreams: vec![("ledger", ListenerProtocol::Auto)],
    }
    .start(&control)
    .await;
    let response = get(&web).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(security(&web, "outbound", "plaintext-no-identity") >= 1.0);

    // The policy deleted: the mesh's mode again.
    api.delete(LEDGER).await.ok();
    wait_for_mode(&proxy, "strict", "mesh").await;
    assert_eq!(plaintext(&proxy).await, "");
    assert_eq!(refused(&proxy), 2.0, "refused plaintext is still counted");
    let response = over_mtls(&proxy, &checkout).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert_eq!(app.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecars_own_mode_wins_over_the_control_planes() {
    let control = control(PeerMtls::Strict).await;
    let api = control.api();
    let app = HttpPeer::http1("ledger-app");
    let checkout = svid(&control.identity().ca, "checkout");

    // Permissive by its configuration, in a strict mesh: plaintext in.
    let open = ledger(&control, &app, Some(MtlsMode::Permissive)).await;
    wait_for_mode(&open, "permissive", "local").await;
    assert_eventually!(
        in_force(&open).await["mesh"] == "strict",
        "the mesh's mode never reached the sidecar: {}",
        in_force(&open).await
    );
    let m = in_force(&open).await;
    assert_eq!(m["local"], "permissive");
    assert!(
        m["note"].as_str().unwrap().contains("overrides"),
        "the override is shown as such: {m}"
    );
    let response = plaintext(&open).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert_eq!(refused(&open), 0.0);

    // Strict by its configuration, although its service's policy is permissive.
    let closed = ledger(&control, &app, Some(MtlsMode::Strict)).await;
    let put = api.put(LEDGER, &json!({"mtls": "permissive"})).await.ok();
    assert_eventually!(
        admin::config(closed.admin()).await["authorization"]["policy"]["version"] == put["version"],
        "the policy never reached the sidecar"
    );
    wait_for_mode(&closed, "strict", "local").await;
    assert_eq!(in_force(&closed).await["service"], "permissive");
    assert_eq!(plaintext(&closed).await, "");
    assert_eq!(refused(&closed), 1.0);
    // The other one is still permissive, now for two reasons.
    let response = plaintext(&open).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");

    // mTLS gets in either way.
    for proxy in [&open, &closed] {
        let response = over_mtls(proxy, &checkout).await;
        assert!(response.starts_with("http/1.1 200"), "{response}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_service_in_a_permissive_mesh_and_a_mesh_made_strict_by_a_restart() {
    let mut control = control(PeerMtls::Permissive).await;
    let api = control.api();
    assert_eq!(
        api.get("/v1/identity").await.ok()["mtls_mode"],
        "permissive"
    );
    let app = HttpPeer::http1("ledger-app");
    let proxy = ledger(&control, &app, None).await;
    let checkout = svid(&control.identity().ca, "checkout");

    // The mesh's default: plaintext in.
    wait_for_mode(&proxy, "permissive", "mesh").await;
    let response = plaintext(&proxy).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");

    // One service strict.
    api.put(LEDGER, &json!({"mtls": "strict", "default": "allow"}))
        .await
        .ok();
    wait_for_mode(&proxy, "strict", "service").await;
    assert_eq!(plaintext(&proxy).await, "");
    assert_eq!(refused(&proxy), 1.0);
    // A caller's sidecar with its certificate gets in over mTLS.
    let web = Caller {
        service: "web",
        joins: true,
        upstreams: vec![("ledger", ListenerProtocol::Auto)],
    }
    .start(&control)
    .await;
    let response = get(&web).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.header("x-echo-h-malla-client-id"),
        Some("spiffe://malla.local/svc/web")
    );
    assert!(security(&web, "outbound", "mtls") >= 1.0);

    // Deleted, then the control plane restarted with the mesh strict: the sidecar (not
    // restarted) takes the new mode from its new watch, the policy version unchanged (0).
    api.delete(LEDGER).await.ok();
    wait_for_mode(&proxy, "permissive", "mesh").await;
    control.stop().await;
    control.set_identity(IdentitySettings {
        mtls_mode: PeerMtls::Strict,
        ..Default::default()
    });
    control.start_again().await;
    assert_eq!(
        control.api().get("/v1/identity").await.ok()["mtls_mode"],
        "strict"
    );
    wait_for_mode(&proxy, "strict", "mesh").await;
    assert_eq!(plaintext(&proxy).await, "");
    assert_eq!(refused(&proxy), 2.0);
    let response = over_mtls(&proxy, &checkout).await;
    assert!(response.starts_with("http/1.1 200"), "{response}");
}

/// A GET through the caller's outbound listener to `ledger`.
async fn get(web: &TestProxy) -> client::Collected {
    let response = client::Http1::connect(web.outbound())
        .await
        .unwrap()
        .send(client::get(Version::HTTP_11, "ledger", "/ledger"))
        .await
        .unwrap();
    client::collect(response).await.unwrap()
}
