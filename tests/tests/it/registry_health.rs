//! Health from the registry obeys the panic threshold: a sidecar keeps the instances the
//! control plane marks unhealthy as endpoints flagged so, sends them no traffic while
//! enough others are available, and balances over every one of them when too few are
//! (a wrong health-check path marks a whole service unhealthy while every instance
//! answers). Against a real control plane, its health checks and its event log.

use std::time::Duration;

use http::Version;
use malla_control::events::EventFilter;
use malla_core::{Health, ServiceName};
use malla_proxy::config::ControlPlaneConfig;
use malla_tests::{
    assert_eventually,
    client::{self, within, Http1},
    control::TestControl,
    identity::joining,
    peers::HttpPeer,
    proxy::{admin, TestProxy},
    BoxError,
};
use serde_json::json;

use crate::discovery::discovering_proxy;

/// Registers `peer` as instance `id` of `echo` through the HTTP API (60 s lease).
async fn register(control: &TestControl, id: &str, peer: &HttpPeer) {
    control
        .api()
        .register(
            "echo",
            id,
            &json!({
                "address": peer.addr().ip().to_string(),
                "port": peer.addr().port(),
                "ttl_seconds": 60,
            }),
        )
        .await;
}

/// A proxy discovering `echo` from `control`: a sidecar of `frontend` joined with a join
/// token (its events are reported with its certificate), registering an address nobody
/// calls.
async fn proxy(control: &TestControl) -> TestProxy {
    let joined = ControlPlaneConfig {
        register_address: Some("127.0.0.1:4143".parse().unwrap()),
        ..joining(control, "frontend").await
    };
    discovering_proxy(joined, |_| {})
}

/// One GET / through the proxy: the status.
async fn get(proxy: &TestProxy) -> Result<u16, BoxError> {
    let mut conn = Http1::connect(proxy.outbound()).await?;
    let response = within(
        "request",
        conn.send(client::get(Version::HTTP_11, "echo", "/")),
    )
    .await?;
    Ok(client::collect(response).await?.status)
}

/// Requests to `/` a peer received (health probes go to another path).
fn served(peer: &HttpPeer) -> usize {
    peer.state()
        .seen()
        .iter()
        .filter(|line| line.as_str() == "GET /")
        .count()
}

/// The events of `kind` the control plane received about `echo`.
fn reported(control: &TestControl, kind: &str) -> Vec<String> {
    let filter = EventFilter {
        service: Some("echo".into()),
        kind: Some(kind.into()),
    };
    control
        .events()
        .query(&filter, 100)
        .into_iter()
        .map(|e| e.detail)
        .collect()
}

fn unhealthy_endpoints(proxy: &TestProxy) -> usize {
    proxy
        .upstream("echo")
        .endpoints()
        .iter()
        .filter(|e| e.control_unhealthy())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_health_check_marking_every_instance_unhealthy_does_not_blackhole_the_service() {
    let mut control = TestControl::start_without_dns().await;
    let peers = [
        HttpPeer::http1("a"),
        HttpPeer::http1("b"),
        HttpPeer::http1("c"),
    ];
    for (id, peer) in ["a", "b", "c"].iter().zip(&peers) {
        register(&control, id, peer).await;
    }
    let proxy = proxy(&control).await;
    assert_eventually!(proxy.upstream("echo").endpoints().len() == 3);
    assert_eq!(get(&proxy).await.unwrap(), 200);

    // A check that expects a status no instance answers: every instance goes unhealthy
    // although every one of them serves.
    let wrong = json!({"health_check": {"kind": "http", "path": "/healthz", "expect_status": 204,
        "interval": 0.1, "timeout": 1, "healthy_threshold": 1, "unhealthy_threshold": 1}});
    control.api().put_service("echo", &wrong).await;
    assert_eventually!(
        unhealthy_endpoints(&proxy) == 3,
        "the control plane never marked every instance unhealthy"
    );
    let before: Vec<usize> = peers.iter().map(served).collect();
    for i in 0..60 {
        assert_eq!(get(&proxy).await.unwrap(), 200, "request {i}");
    }
    let after: Vec<usize> = peers.iter().map(served).collect();
    assert_eq!(
        after.iter().sum::<usize>() - before.iter().sum::<usize>(),
        60,
        "every request reached an instance"
    );
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "in panic, traffic is balanced over every instance: {before:?} -> {after:?}"
    );

    // Said so: an event at the control plane, the metrics, /config.
    assert_eventually!(
        !reported(&control, "panic-entered").is_empty(),
        "no panic-entered event reached the control plane"
    );
    // Entered when the unhealthy ones took the available share below 50%: with two of
    // three (1 of 3 available) or, when the checker flipped them together, all three.
    let detail = &reported(&control, "panic-entered")[0];
    assert!(
        detail
            .contains("0 of 3 endpoints available (3 unhealthy per the control plane, 0 ejected)")
            || detail.contains(
                "1 of 3 endpoints available (2 unhealthy per the control plane, 0 ejected)"
            ),
        "{detail}"
    );
    let text = proxy.metrics_text();
    let metric = |name| admin::metric(&text, name, &[("upstream", "echo")]);
    assert_eq!(
        metric("malla_proxy_upstream_endpoints_unhealthy"),
        Some(3.0)
    );
    assert_eq!(metric("malla_proxy_upstream_panic"), Some(1.0));
    let config = admin::config(proxy.admin()).await;
    let upstream = &config["upstreams"][0];
    assert_eq!(upstream["panic"], true, "{upstream}");
    assert_eq!(upstream["endpoints_unhealthy"], 3, "{upstream}");
    assert_eq!(
        upstream["endpoints"][0]["control_plane_health"],
        "unhealthy"
    );
    assert_eq!(upstream["discovery"]["serving"], 0);

    // The check fixed: health restored, panic left.
    let right = json!({"health_check": {"kind": "http", "path": "/healthz", "expect_status": 200,
        "interval": 0.1, "timeout": 1, "healthy_threshold": 1, "unhealthy_threshold": 1}});
    control.api().put_service("echo", &right).await;
    assert_eventually!(
        unhealthy_endpoints(&proxy) == 0,
        "the instances never became healthy again"
    );
    assert_eventually!(
        !reported(&control, "panic-left").is_empty(),
        "no panic-left event reached the control plane"
    );
    assert!(!proxy.upstream("echo").state()["panic"].as_bool().unwrap());
    assert_eq!(get(&proxy).await.unwrap(), 200);

    proxy.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_of_three_marked_unhealthy_gets_no_traffic_and_no_panic() {
    let mut control = TestControl::start_without_dns().await;
    let peers = [
        HttpPeer::http1("a"),
        HttpPeer::http1("b"),
        HttpPeer::http1("c"),
    ];
    for (id, peer) in ["a", "b", "c"].iter().zip(&peers) {
        register(&control, id, peer).await;
    }
    let proxy = proxy(&control).await;
    assert_eventually!(proxy.upstream("echo").endpoints().len() == 3);

    let echo = ServiceName::new("echo").unwrap();
    control
        .registry()
        .set_health(&echo, "b", Health::Unhealthy)
        .await
        .unwrap();
    assert_eventually!(unhealthy_endpoints(&proxy) == 1);
    let before = served(&peers[1]);
    for i in 0..30 {
        assert_eq!(get(&proxy).await.unwrap(), 200, "request {i}");
    }
    assert_eq!(served(&peers[1]), before, "unhealthy b received traffic");
    assert!(served(&peers[0]) > 0 && served(&peers[2]) > 0);
    assert!(!proxy.upstream("echo").state()["panic"].as_bool().unwrap());
    // Still listed, flagged, for the operator.
    assert_eq!(proxy.upstream("echo").endpoints().len(), 3);

    // Healthy again: it takes traffic again.
    control
        .registry()
        .set_health(&echo, "b", Health::Healthy)
        .await
        .unwrap();
    assert_eventually!(unhealthy_endpoints(&proxy) == 0);
    for _ in 0..30 {
        assert_eq!(get(&proxy).await.unwrap(), 200);
    }
    assert!(served(&peers[1]) > before, "b never took traffic again");
    // Give the event reporter a moment: no panic was ever reported.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(reported(&control, "panic-entered").is_empty());

    proxy.stop().await;
    control.stop().await;
}
