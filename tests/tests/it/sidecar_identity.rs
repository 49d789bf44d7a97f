//! A sidecar's own identity: with a join token for its service it gets the service's
//! certificate from the control plane's CA (a key generated in the sidecar, a CSR, the
//! token once), shows it in `/config` and metrics, and renews it by itself at about 70 %
//! of its life with its current certificate. A token already used is refused with a message
//! that says what to do, and the sidecar keeps serving.

use std::time::Duration;

use malla_control::server::IdentitySettings;
use malla_core::ServiceName;
use malla_proxy::config::ControlPlaneConfig;
use malla_tests::{
    assert_eventually,
    control::TestControl,
    identity::joined,
    peers::HttpPeer,
    proxy::{admin, TestProxy},
};

fn sidecar(control: &TestControl, token: Option<String>) -> TestProxy {
    let peer = HttpPeer::http1("app");
    let control = ControlPlaneConfig {
        register_address: Some("127.0.0.1:4143".parse().unwrap()),
        ..joined(control, "checkout", token)
    };
    TestProxy::builder()
        .upstream("app", &[peer.addr()])
        .outbound("app")
        .admin()
        .config(move |c| c.control = Some(control))
        .start()
}

fn identity(config: &serde_json::Value) -> &serde_json::Value {
    &config["control"]["identity"]
}

fn requests(proxy: &TestProxy, kind: &str, result: &str) -> f64 {
    admin::metric(
        &proxy.metrics_text(),
        "malla_proxy_identity_certificate_requests_total",
        &[("kind", kind), ("result", result)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_a_join_token_gets_its_services_certificate() {
    let control = TestControl::start_without_dns().await;
    let checkout = ServiceName::new("checkout").unwrap();
    let token = control
        .identity()
        .tokens
        .create(&checkout, None)
        .await
        .unwrap()
        .token;
    let proxy = sidecar(&control, Some(token.clone()));

    let mut config = serde_json::Value::Null;
    assert_eventually!(
        {
            config = admin::config(proxy.admin()).await;
            identity(&config)["spiffe_id"] == "spiffe://malla.local/svc/checkout"
        },
        "no certificate: {config}"
    );
    let id = identity(&config);
    assert_eq!(id["trust_bundle_roots"], 1, "{id}");
    assert_eq!(id["last_error"], serde_json::Value::Null, "{id}");
    let left = id["expires_in_seconds"].as_u64().unwrap();
    assert!(left > 23 * 3600 && left <= 24 * 3600, "{id}");
    assert!(!config.to_string().contains("PRIVATE"), "no key in /config");
    assert!(!config.to_string().contains(&token), "no token in /config");
    assert_eq!(requests(&proxy, "first", "ok"), 1.0);
    let expiry = admin::metric(
        &proxy.metrics_text(),
        "malla_proxy_identity_certificate_expiry_timestamp_seconds",
        &[],
    )
    .unwrap();
    assert!(expiry > 1.7e9, "{expiry}");

    // The token is spent: a second sidecar with it is refused, says why, keeps serving.
    let second = sidecar(&control, Some(token));
    let mut config = serde_json::Value::Null;
    assert_eventually!(
        {
            config = admin::config(second.admin()).await;
            identity(&config)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("already used"))
        },
        "{config}"
    );
    assert_eq!(identity(&config)["spiffe_id"], serde_json::Value::Null);
    assert!(identity(&config)["last_error"]
        .as_str()
        .unwrap()
        .contains("malla token create --service"));
    assert!(requests(&second, "first", "refused") >= 1.0);
    assert_eq!(admin::status(second.admin(), "/live").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_renewed_before_it_expires_with_the_same_key() {
    // Certificates valid for 5 s (plus the CA's 60 s backdating): renewed about every
    // 3.5 s, leaving a loaded machine 1.5 s to get the renewal through before expiry (a
    // renewal with an expired certificate is refused, as it must be).
    let control = TestControl::start_with_identity(IdentitySettings {
        cert_ttl: Duration::from_secs(5),
        ..IdentitySettings::default()
    })
    .await;
    let checkout = ServiceName::new("checkout").unwrap();
    let token = control
        .identity()
        .tokens
        .create(&checkout, None)
        .await
        .unwrap()
        .token;
    let proxy = sidecar(&control, Some(token));
    let state = || {
        proxy
            .handle()
            .discovery()
            .and_then(|d| d.identity().cloned())
            .expect("the sidecar has an identity")
    };
    assert_eventually!(state().current().is_some());
    let first = state().current().unwrap();
    assert_eventually!(
        tries: 1500,
        requests(&proxy, "renewal", "ok") >= 2.0,
        "renewals: {}",
        proxy.metrics_text()
    );
    let renewed = state().current().unwrap();
    assert!(renewed.not_after > first.not_after);
    assert_eq!(renewed.spiffe_id, first.spiffe_id);
    assert!(
        std::sync::Arc::ptr_eq(&renewed.key_pkcs8, &first.key_pkcs8),
        "same key"
    );
    assert_ne!(renewed.chain[0], first.chain[0]);
    assert_eq!(requests(&proxy, "renewal", "refused"), 0.0);
    assert_eq!(requests(&proxy, "first", "ok"), 1.0, "one token use");
}

/// With `identity_dir`, a restarted sidecar puts its kept certificate in force at once and
/// renews with it: no new join token. Without a token or anything kept, it says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_renews_with_its_kept_identity() {
    let control = TestControl::start_with_identity(IdentitySettings {
        cert_ttl: Duration::from_secs(6),
        ..IdentitySettings::default()
    })
    .await;
    let checkout = ServiceName::new("checkout").unwrap();
    let token = control
        .identity()
        .tokens
        .create(&checkout, None)
        .await
        .unwrap()
        .token;
    let dir = malla_tests::control::TempDir::new("sidecar-identity-dir");
    let identity_dir = dir.path().join("identity");
    let with_dir = |token: Option<String>| {
        let peer = HttpPeer::http1("app");
        let control = ControlPlaneConfig {
            register_address: Some("127.0.0.1:4143".parse().unwrap()),
            identity_dir: Some(identity_dir.clone()),
            ..joined(&control, "checkout", token)
        };
        TestProxy::builder()
            .upstream("app", &[peer.addr()])
            .outbound("app")
            .admin()
            .config(move |c| c.control = Some(control))
            .start()
    };
    let state = |proxy: &TestProxy| {
        proxy
            .handle()
            .discovery()
            .and_then(|d| d.identity().cloned())
            .expect("an identity")
    };

    let first = with_dir(Some(token));
    assert_eventually!(state(&first).current().is_some());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(identity_dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(identity_dir.join("bundle.pem").exists());
    drop(first);
    let on_disk: Vec<Vec<u8>> =
        pem::parse_many(std::fs::read(identity_dir.join("chain.pem")).unwrap())
            .unwrap()
            .into_iter()
            .map(pem::Pem::into_contents)
            .collect();

    // Restarted without a token: the kept certificate at once, then renewed with it.
    let second = with_dir(None);
    assert_eventually!(state(&second).current().is_some());
    let kept = state(&second).current().unwrap();
    assert_eq!(kept.chain, on_disk, "the kept certificate");
    assert_eq!(
        kept.spiffe_id.to_string(),
        "spiffe://malla.local/svc/checkout"
    );
    assert_eq!(requests(&second, "first", "ok"), 0.0, "no token used");
    assert_eventually!(
        requests(&second, "renewal", "ok") >= 1.0,
        "{}",
        second.metrics_text()
    );
    assert_ne!(state(&second).current().unwrap().chain, on_disk);
    drop(second);

    // Nothing kept and no token: it says what to do, and keeps serving.
    let _ = std::fs::remove_dir_all(&identity_dir);
    let third = with_dir(None);
    let mut config = serde_json::Value::Null;
    assert_eventually!(
        {
            config = admin::config(third.admin()).await;
            identity(&config)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("malla token create --service"))
        },
        "{config}"
    );
    assert_eq!(admin::status(third.admin(), "/live").await, 200);
}
