//! A sidecar's authorization policy, end to end: applied through the control plane's HTTP
//! API, it reaches the sidecars of its service over gRPC (`WatchAuthorization`) and is in
//! force there (`/config` says which version, mode, default and how many rules; the
//! sidecar's `Authorizer` decides by it); a change replaces it, a control-plane restart
//! does not lose it, and a delete returns to allowing everything. These tests ask the
//! `Authorizer` directly; `authz_enforce` calls through real sidecars.

use malla_proxy::{
    authz::{DecidedBy, Inbound, Outcome},
    config::ControlPlaneConfig,
};
use malla_tests::{
    assert_eventually,
    control::{TempDir, TestControl},
    identity::{joining, over_tls},
    peers::HttpPeer,
    proxy::{admin, TestProxy},
};
use serde_json::{json, Value};

const PAYMENTS: &str = "/v1/authorizations/payments";

/// A sidecar of `payments`, joined with a join token, following the control plane at its
/// HTTP address (kept across a restart) over TLS.
async fn sidecar(control: &TestControl, app: &HttpPeer) -> TestProxy {
    let control = ControlPlaneConfig {
        register_address: Some("127.0.0.1:4143".parse().unwrap()),
        ..joining(control, "payments").await
    };
    TestProxy::builder()
        .upstream("app", &[app.addr()])
        .outbound("app")
        .admin()
        .config(move |c| c.control = Some(control))
        .start()
}

async fn authorization(proxy: &TestProxy) -> Value {
    admin::config(proxy.admin()).await["authorization"].clone()
}

/// What the sidecar decides for a plaintext TCP connection to port 8080.
fn tcp_verdict(proxy: &TestProxy) -> (Outcome, DecidedBy, Option<u64>) {
    let authorizer = proxy
        .handle()
        .discovery()
        .and_then(|d| d.authorizer())
        .expect("a sidecar that registers a service has an authorizer");
    let v = authorizer.check(&Inbound::tcp(None, 8080));
    (v.outcome, v.by, v.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_applied_through_the_control_plane_reaches_the_sidecar() {
    let mut control = TestControl::start_in(TempDir::new("authz-push"), false).await;
    let api = control.api();
    let app = HttpPeer::http1("app");
    let proxy = sidecar(&control, &app).await;

    // Connected, no policy: everything allowed.
    assert_eventually!(
        authorization(&proxy).await["watch"]["connected"] == true,
        "the authorization watch never connected: {}",
        authorization(&proxy).await
    );
    let config = authorization(&proxy).await;
    assert_eq!(config["service"], "payments");
    assert_eq!(config["policy"], Value::Null);
    assert_eq!(
        tcp_verdict(&proxy),
        (Outcome::Allow, DecidedBy::NoPolicy, None)
    );

    // Applied: in force within a bounded wait.
    let v1 = api
        .put(
            PAYMENTS,
            &json!({"default": "deny", "rule": [
                {"action": "allow", "from": ["checkout"], "methods": ["POST"], "paths": ["/v1/charges"]},
                {"action": "deny", "grpc": ["payments.v1.Admin/*"]},
            ]}),
        )
        .await
        .ok()["version"]
        .as_u64()
        .unwrap();
    let expected = json!({"version": v1, "mode": "enforce", "default": "deny", "rules": 2});
    assert_eventually!(
        authorization(&proxy).await["policy"] == expected,
        "version {v1} never reached the sidecar: {}",
        authorization(&proxy).await
    );
    assert_eq!(
        tcp_verdict(&proxy),
        (Outcome::Deny, DecidedBy::Rule(1), Some(v1)),
        "a deny rule with HTTP conditions denies TCP"
    );
    let denied = admin::metric(
        &proxy.metrics_text(),
        "malla_proxy_inbound_authz_decisions_total",
        &[
            ("decision", "deny"),
            ("source", "unauthenticated"),
            ("protocol", "tcp"),
        ],
    );
    assert_eq!(denied, Some(1.0));

    // Changed: the new version replaces it.
    let v2 = api
        .put(
            PAYMENTS,
            &json!({"mode": "audit", "default": "deny", "rule": [
                {"action": "allow", "from": ["checkout"]},
                {"action": "allow", "ports": [9100]},
                {"action": "deny", "from": ["*"], "paths": ["/admin/*"]},
            ]}),
        )
        .await
        .ok()["version"]
        .as_u64()
        .unwrap();
    assert!(v2 > v1);
    let expected = json!({"version": v2, "mode": "audit", "default": "deny", "rules": 3});
    assert_eventually!(
        authorization(&proxy).await["policy"] == expected,
        "version {v2} never replaced {v1}: {}",
        authorization(&proxy).await
    );
    assert_eq!(
        tcp_verdict(&proxy),
        (Outcome::AuditDeny, DecidedBy::Default, Some(v2)),
        "audit mode: would deny, lets through"
    );

    // The control plane goes away: the policy in force stays. It comes back (same data
    // directory, same address): the sidecar reconnects and still has the same version,
    // and what is applied next reaches it.
    let address = control.http_addr();
    control.stop().await;
    assert_eventually!(
        authorization(&proxy).await["watch"]["connected"] == false,
        "the sidecar never noticed the control plane had gone: {}",
        authorization(&proxy).await
    );
    assert_eq!(authorization(&proxy).await["policy"], expected);
    control.start_again().await;
    assert_eq!(
        control.http_addr(),
        address,
        "the control plane came back elsewhere"
    );
    let api = control.api();
    assert_eventually!(
        authorization(&proxy).await["watch"]["connected"] == true,
        "the sidecar never reconnected: {}",
        authorization(&proxy).await
    );
    assert_eq!(authorization(&proxy).await["policy"], expected);
    assert_eq!(authorization(&proxy).await["watch"]["rejected"], 0);
    let v3 = api.put(PAYMENTS, &json!({"default": "allow"})).await.ok()["version"]
        .as_u64()
        .unwrap();
    assert!(v3 > v2);
    assert_eventually!(
        authorization(&proxy).await["policy"]["version"] == v3,
        "version {v3} (after the restart) never reached the sidecar: {}",
        authorization(&proxy).await
    );

    // Deleted: none in force, everything allowed again.
    api.delete(PAYMENTS).await.ok();
    assert_eventually!(
        authorization(&proxy).await["policy"] == Value::Null,
        "the delete never reached the sidecar: {}",
        authorization(&proxy).await
    );
    assert_eq!(
        tcp_verdict(&proxy),
        (Outcome::Allow, DecidedBy::NoPolicy, None)
    );
}

/// A sidecar that registers no service has no authorization state: nothing to follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_without_a_service_has_no_authorization() {
    let control = TestControl::start_without_dns().await;
    let app = HttpPeer::http1("app");
    let config = over_tls(&control);
    let proxy = TestProxy::builder()
        .upstream("app", &[app.addr()])
        .outbound("app")
        .admin()
        .config(move |c| c.control = Some(config))
        .start();
    let config = admin::config(proxy.admin()).await;
    assert_eq!(config["authorization"], Value::Null, "{config}");
    assert!(proxy
        .handle()
        .discovery()
        .is_some_and(|d| d.authorizer().is_none()));
}
