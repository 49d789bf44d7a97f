//! `GET /v1/proxies`: the gRPC clients (sidecars) connected now, with the instance each
//! registered, the version its user agent gives, and the watches it holds; gone when its
//! connection closes. HTTP clients are not listed.

use malla_api::{pb, policy_pb, PoliciesClient, RegistryClient};
use malla_tests::{assert_eventually, control::TestControl};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

async fn proxies(control: &TestControl) -> Vec<Value> {
    let answer = control.api().get("/v1/proxies").await.ok();
    answer["proxies"]
        .as_array()
        .expect("a proxies array")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_is_listed_with_its_instance_version_and_watches_until_it_disconnects() {
    let control = TestControl::start_without_dns().await;
    assert!(proxies(&control).await.is_empty());

    // A sidecar as `malla proxy` connects: one HTTP/2 connection, its user agent.
    let endpoint = Endpoint::from_shared(format!("http://{}", control.http_addr()))
        .expect("a valid URI")
        .user_agent("malla-proxy/9.9.9")
        .expect("a valid user agent");
    let channel: Channel = malla_tests::control::tls::grpc_channel_from(
        endpoint,
        control.http_addr(),
        &control.trust_bundle_path(),
        None,
    )
    .await
    .expect("a gRPC connection");
    let mut registry = RegistryClient::new(control.as_operator(channel.clone()));
    registry
        .register(pb::RegisterRequest {
            mtls: false,
            service: "orders".into(),
            id: "o-1".into(),
            address: "127.0.0.1".into(),
            port: 8080,
            protocol: pb::Protocol::Http.into(),
            labels: Default::default(),
            ttl_seconds: 30,
        })
        .await
        .expect("register");
    let mut watch = registry
        .watch(pb::WatchRequest {
            service: "payments".into(),
            selector: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("a snapshot");
    let mut policy_watch = PoliciesClient::new(channel.clone())
        .watch_policy(policy_pb::WatchPolicyRequest {
            service: "payments".into(),
        })
        .await
        .expect("watch policy")
        .into_inner();
    policy_watch.message().await.expect("the policy state");
    // An HTTP client meanwhile: not a proxy.
    control.api().get("/v1/status").await.ok();

    let list = proxies(&control).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let proxy = &list[0];
    assert!(
        proxy["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{proxy}"
    );
    assert_eq!(proxy["service"], "orders", "{proxy}");
    assert_eq!(proxy["instance"], "o-1", "{proxy}");
    assert_eq!(proxy["version"], "9.9.9", "{proxy}");
    assert_eq!(proxy["watches"], 2, "{proxy}");
    for time in ["connected_since", "last_seen"] {
        let t = proxy[time].as_str().unwrap_or_default();
        assert!(t.len() == 20 && t.ends_with('Z'), "{time}: {proxy}");
    }
    assert!(proxy["last_seen"].as_str() >= proxy["connected_since"].as_str());

    // Watches end, the instance is deregistered: the entry says so.
    drop(watch);
    drop(policy_watch);
    registry
        .deregister(pb::DeregisterRequest {
            service: "orders".into(),
            id: "o-1".into(),
        })
        .await
        .expect("deregister");
    assert_eventually!(proxies(&control)
        .await
        .first()
        .is_some_and(|p| p["watches"] == 0));
    let proxy = &proxies(&control).await[0];
    assert!(
        proxy["service"].is_null() && proxy["instance"].is_null(),
        "{proxy}"
    );

    // The connection closes: the sidecar is gone from the list.
    drop(registry);
    drop(channel);
    assert_eventually!(proxies(&control).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_another_kind_is_listed_without_a_version() {
    let control = TestControl::start_without_dns().await;
    // On the second port, with tonic's own user agent.
    let channel = control.grpc_channel_to(control.grpc_addr()).await;
    RegistryClient::new(control.as_operator(channel.clone()))
        .heartbeat(pb::HeartbeatRequest { lease: 424242 })
        .await
        .expect_err("no such lease");
    let list = proxies(&control).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0]["version"].is_null(), "{list:?}");
    assert!(list[0]["service"].is_null(), "{list:?}");
    assert!(
        list[0]["user_agent"]
            .as_str()
            .is_some_and(|ua| ua.contains("tonic/")),
        "{list:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_sidecar_on_the_one_port_is_listed_with_its_watches() {
    use malla_tests::{identity::over_tls, proxy::TestProxy};

    let control = TestControl::start_without_dns().await;
    // `malla proxy` pointed at the one port (the HTTP API's) over TLS, following `echo`.
    let proxy = TestProxy::builder()
        .upstream("echo", &[])
        .outbound("echo")
        .config(|c| c.control = Some(over_tls(&control)))
        .start();
    assert_eventually!(
        proxies(&control)
            .await
            .first()
            .is_some_and(|p| p["watches"].as_u64() >= Some(1)),
        "the sidecar never appeared with a watch: {:?}",
        proxies(&control).await
    );
    let list = proxies(&control).await;
    assert_eq!(list.len(), 1, "{list:?}");
    // `malla-proxy/<version>`: the workspace's version, which this crate shares.
    assert_eq!(list[0]["version"], env!("CARGO_PKG_VERSION"), "{list:?}");
    proxy.stop().await;
    assert_eventually!(proxies(&control).await.is_empty());
}

/// A sidecar with its certificate holds two connections (reads, and writes that present
/// it) and is listed once, with its identity, its instance and both connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_its_certificate_is_listed_once_with_its_identity() {
    use malla_proxy::config::{ListenerProtocol, MtlsMode};

    let control = TestControl::start_without_dns().await;
    let app = malla_tests::peers::HttpPeer::http1("orders-app");
    let proxy = malla_tests::mesh::server(
        &control,
        "orders",
        app.addr(),
        ListenerProtocol::Auto,
        MtlsMode::Strict,
    )
    .await;
    assert_eventually!(
        proxies(&control)
            .await
            .first()
            .is_some_and(|p| p["instance"].is_string() && p["connections"] == 2),
        "the sidecar never appeared registered over its two connections: {:?}",
        proxies(&control).await
    );
    let list = proxies(&control).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        list[0]["identity"], "spiffe://malla.local/svc/orders",
        "{list:?}"
    );
    assert_eq!(list[0]["service"], "orders", "{list:?}");
    proxy.stop().await;
    assert_eventually!(proxies(&control).await.is_empty());
}
