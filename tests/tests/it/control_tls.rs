//! A sidecar's connection to its control plane: TLS verified with the control plane's
//! trust bundle (`[control] ca_file`) until the sidecar holds a certificate, its writes
//! (register, heartbeat, deregister) authenticated with that certificate; a CA file of
//! another control plane refused, and `/config` says why; a registering sidecar without
//! an identity told to get a join token; plaintext (`http://`) served by a control plane
//! that still allows it (`--allow-plaintext`), and refused with what to do by one that
//! does not (the default).

use malla_control::serving::ServeSettings;
use malla_proxy::config::{ControlPlaneConfig, ListenerProtocol, MtlsMode};
use malla_tests::{
    assert_eventually,
    control::TestControl,
    identity::{join_token, over_tls},
    mesh,
    peers::HttpPeer,
    proxy::{admin, TestProxy},
};
use serde_json::{json, Value};

/// The `control` part of the sidecar's `/config`, read in-process.
fn control_status(proxy: &TestProxy) -> Value {
    proxy
        .handle()
        .discovery()
        .expect("the sidecar has a control plane")
        .to_json()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// A control plane that still serves plaintext (`malla control --allow-plaintext`).
async fn allowing_plaintext() -> TestControl {
    TestControl::start_serving(ServeSettings {
        allow_plaintext: true,
        ..ServeSettings::default()
    })
    .await
}

/// A sidecar that discovers `echo` from the control plane at `url`.
fn discovering(url: String) -> TestProxy {
    TestProxy::builder()
        .upstream("echo", &[])
        .outbound("echo")
        .admin()
        .config(move |c| c.control = Some(ControlPlaneConfig::new(url)))
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_a_join_token_registers_over_tls() {
    let control = TestControl::start_without_dns().await;
    let app = HttpPeer::http1("payments-app");
    let proxy = mesh::server(
        &control,
        "payments",
        app.addr(),
        ListenerProtocol::Auto,
        MtlsMode::Permissive,
    )
    .await;
    let api = control.api();
    assert_eventually!(
        api.instance_ids("payments", "").await.len() == 1,
        "the sidecar never registered: {}",
        control_status(&proxy)
    );
    let instances = api.instances("payments", "").await;
    assert!(
        instances[0]
            .to_string()
            .contains("spiffe://malla.local/svc/payments"),
        "registered by its certificate: {instances:?}"
    );

    let status = control_status(&proxy);
    let tls = &status["tls"];
    assert_eq!(tls["enabled"], true, "{status}");
    assert_eq!(tls["roots"], "certificate", "{status}");
    assert_eq!(
        tls["client_certificate"], "spiffe://malla.local/svc/payments",
        "{status}"
    );
    assert!(tls["handshakes"].as_u64().unwrap_or(0) >= 2, "{status}");
    assert_eq!(tls["last_error"], Value::Null, "{status}");
    assert_eq!(status["registration"]["registered"], true, "{status}");
    assert_eq!(
        status["registration"]["last_error"],
        Value::Null,
        "{status}"
    );
    // The same in /config over the admin listener.
    let config = admin::config(proxy.admin()).await;
    assert_eq!(config["control"]["tls"]["roots"], "certificate", "{config}");

    // Draining deregisters: that write too is the certificate's.
    proxy.stop().await;
    assert_eventually!(
        api.instance_ids("payments", "").await.is_empty(),
        "the instance is still registered after the sidecar stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_of_another_control_plane_is_refused_and_said_why() {
    let control = TestControl::start_without_dns().await;
    let other = TestControl::start_without_dns().await;
    let wrong = other.trust_bundle_path();
    let config = ControlPlaneConfig {
        ca_file: Some(wrong.clone()),
        ..over_tls(&control)
    };
    let proxy = TestProxy::builder()
        .upstream("echo", &[])
        .outbound("echo")
        .admin()
        .config(move |c| c.control = Some(config))
        .start();
    assert_eventually!(
        control_status(&proxy)["tls"]["last_error"] != Value::Null,
        "no connection error: {}",
        control_status(&proxy)
    );
    let config = admin::config(proxy.admin()).await;
    let tls = &config["control"]["tls"];
    let error = text(&tls["last_error"]);
    assert!(error.contains("not from this mesh's CA"), "{error}");
    assert!(
        error.contains(&format!("control.ca_file {}", wrong.display())),
        "{error}"
    );
    assert!(error.contains("trust-bundle.pem"), "{error}");
    assert_eq!(tls["roots"], "ca_file", "{config}");
    assert_eq!(tls["handshakes"], 0, "{config}");
    // Nothing was learnt from it: the upstream has no endpoint, the sidecar is not ready.
    assert_eq!(admin::status(proxy.admin(), "/ready").await, 503);
    assert!(proxy.upstream("echo").endpoints().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registering_sidecar_without_an_identity_is_told_to_get_a_join_token() {
    let control = TestControl::start_without_dns().await;
    let app = HttpPeer::http1("payments-app");
    let config = ControlPlaneConfig {
        service: Some("payments".into()),
        ..over_tls(&control)
    };
    let proxy = TestProxy::builder()
        .inbound(app.addr(), ListenerProtocol::Auto)
        .admin()
        .config(move |c| c.control = Some(config))
        .start();
    assert_eventually!(
        control_status(&proxy)["registration"]["last_error"] != Value::Null,
        "the registration never failed: {}",
        control_status(&proxy)
    );
    let status = control_status(&proxy);
    let error = text(&status["registration"]["last_error"]);
    assert!(error.contains("Unauthenticated"), "{error}");
    assert!(error.contains("join token"), "{error}");
    assert!(error.contains("MALLA_JOIN_TOKEN"), "{error}");
    assert_eq!(status["registration"]["registered"], false, "{status}");
    // Its reads work: TLS is up, with no certificate to present.
    assert_eq!(status["tls"]["client_certificate"], Value::Null, "{status}");
    assert_eq!(status["tls"]["last_error"], Value::Null, "{status}");
    assert!(control.api().instance_ids("payments", "").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_still_works_where_the_control_plane_allows_it() {
    let control = allowing_plaintext().await;
    let echo = HttpPeer::http1("echo-1");
    control
        .api()
        .register(
            "echo",
            "echo-1",
            &json!({"address": "127.0.0.1", "port": echo.addr().port()}),
        )
        .await;
    let proxy = discovering(format!("http://{}", control.http_addr()));
    assert_eventually!(
        proxy.upstream("echo").endpoints().len() == 1,
        "echo was never discovered over plaintext: {}",
        control_status(&proxy)
    );
    let status = control_status(&proxy);
    assert_eq!(status["tls"]["enabled"], false, "{status}");
    assert!(
        text(&status["tls"]["warning"]).contains("plaintext"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_plaintext_a_certificate_cannot_register_and_the_sidecar_says_so() {
    let control = allowing_plaintext().await;
    let app = HttpPeer::http1("payments-app");
    let config = ControlPlaneConfig {
        service: Some("payments".into()),
        join_token: Some(join_token(&control, "payments").await),
        ..ControlPlaneConfig::new(format!("http://{}", control.http_addr()))
    };
    let proxy = TestProxy::builder()
        .inbound(app.addr(), ListenerProtocol::Auto)
        .admin()
        .config(move |c| c.control = Some(config))
        .start();
    assert_eventually!(
        text(&control_status(&proxy)["registration"]["last_error"]).contains("plaintext"),
        "the registration does not say why it failed: {}",
        control_status(&proxy)
    );
    let status = control_status(&proxy);
    // The join token works without TLS (it is its own credential)...
    assert_eq!(
        status["identity"]["spiffe_id"], "spiffe://malla.local/svc/payments",
        "{status}"
    );
    // ...a write needs the certificate, which plaintext cannot carry.
    let error = text(&status["registration"]["last_error"]);
    assert!(error.contains("HOST:PORT or https://HOST:PORT"), "{error}");
    assert!(control.api().instance_ids("payments", "").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_requires_tls_tells_a_plaintext_sidecar_what_to_do() {
    let control = TestControl::start_without_dns().await;
    let proxy = discovering(format!("http://{}", control.http_addr()));
    let watch_error = |proxy: &TestProxy| {
        text(&control_status(proxy)["watches"]["echo"]["last_error"]).to_string()
    };
    assert_eventually!(
        watch_error(&proxy).contains("requires TLS"),
        "the watch does not say why it failed: {}",
        control_status(&proxy)
    );
    let error = watch_error(&proxy);
    assert!(error.contains("--control-ca"), "{error}");
    assert!(error.contains("trust-bundle.pem"), "{error}");
    assert!(proxy.upstream("echo").endpoints().is_empty());
}
