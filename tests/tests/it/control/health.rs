//! Active health checks against real peers: HTTP (an [`HttpPeer`] whose status the test
//! flips), TCP (a live peer and a dead port), gRPC (tonic-health's real server).

use malla_tests::{
    assert_eventually,
    control::{api::ids, TestControl},
    peers::{dead_addr, GrpcHealthPeer, HttpPeer, TcpPeer},
};
use serde_json::{json, Value};

use super::registration;

/// A check every 100 ms, flipping after `healthy` successes / `unhealthy` failures.
fn check(kind: Value, healthy: u32, unhealthy: u32) -> Value {
    let mut check = kind;
    check["interval"] = json!(0.1);
    check["timeout"] = json!(1);
    check["healthy_threshold"] = json!(healthy);
    check["unhealthy_threshold"] = json!(unhealthy);
    json!({ "health_check": check })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_follows_the_peer_status() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = HttpPeer::http1("app");
    api.put_service(
        "app",
        &check(json!({"kind": "http", "path": "/healthz"}), 1, 3),
    )
    .await;
    api.register("app", "app-1", &registration(peer.addr().port(), &[]))
        .await;

    assert_eventually!(api.health("app", "app-1").await.as_deref() == Some("healthy"));
    assert!(
        peer.seen().iter().all(|line| line == "GET /healthz"),
        "{:?}",
        peer.seen()
    );

    peer.set_status(503);
    let before = peer.requests();
    assert_eventually!(api.health("app", "app-1").await.as_deref() == Some("unhealthy"));
    // It took `unhealthy_threshold` consecutive failures, not one.
    assert!(
        peer.requests() - before >= 3,
        "unhealthy after {} probes",
        peer.requests() - before
    );
    assert_eq!(
        ids(&api.list("app", "", "serving=true").await.ok()),
        [""; 0]
    );
    let services = api.get("/v1/services").await.ok();
    assert_eq!(services["services"][0]["serving"], 0, "{services}");
    assert_eq!(services["services"][0]["instances"], 1, "{services}");

    peer.set_status(200);
    assert_eventually!(api.health("app", "app-1").await.as_deref() == Some("healthy"));
    assert_eq!(
        ids(&api.list("app", "", "serving=true").await.ok()),
        ["app-1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_with_expected_status() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = HttpPeer::http1("app");
    peer.set_status(204);
    api.put_service(
        "app",
        &check(
            json!({"kind": "http", "path": "/ready?deep=1", "expect_status": 204}),
            1,
            1,
        ),
    )
    .await;
    api.register("app", "a", &registration(peer.addr().port(), &[]))
        .await;
    assert_eventually!(api.health("app", "a").await.as_deref() == Some("healthy"));
    assert_eq!(peer.seen()[0], "GET /ready?deep=1");
    // 200 is not what was asked for.
    peer.set_status(200);
    assert_eventually!(api.health("app", "a").await.as_deref() == Some("unhealthy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_tells_a_dead_port_from_a_live_one() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let live = TcpPeer::echo();
    api.put_service("db", &check(json!({"kind": "tcp"}), 1, 2))
        .await;
    api.register("db", "live", &registration(live.addr().port(), &[]))
        .await;
    api.register("db", "dead", &registration(dead_addr().port(), &[]))
        .await;
    assert_eventually!(api.health("db", "dead").await.as_deref() == Some("unhealthy"));
    assert_eventually!(api.health("db", "live").await.as_deref() == Some("healthy"));
    assert!(live.connections() >= 1);
    assert_eq!(
        ids(&api.list("db", "", "serving=true").await.ok()),
        ["live"]
    );
    assert_eq!(ids(&api.list("db", "", "").await.ok()), ["dead", "live"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_check_against_a_real_health_server() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = GrpcHealthPeer::start();
    peer.set("shop.v1.Cart", true).await;
    // One service checks the whole server (""), one a named gRPC service, one a name the
    // server does not know (NOT_FOUND: unhealthy).
    api.put_service("whole", &check(json!({"kind": "grpc"}), 1, 1))
        .await;
    api.put_service(
        "cart",
        &check(json!({"kind": "grpc", "service": "shop.v1.Cart"}), 1, 1),
    )
    .await;
    api.put_service(
        "unknown",
        &check(json!({"kind": "grpc", "service": "shop.v1.Nope"}), 1, 1),
    )
    .await;
    let port = peer.addr().port();
    for service in ["whole", "cart", "unknown"] {
        let mut body = registration(port, &[]);
        body["protocol"] = json!("grpc");
        api.register(service, "i-1", &body).await;
    }
    assert_eventually!(api.health("whole", "i-1").await.as_deref() == Some("healthy"));
    assert_eventually!(api.health("cart", "i-1").await.as_deref() == Some("healthy"));
    assert_eventually!(api.health("unknown", "i-1").await.as_deref() == Some("unhealthy"));

    peer.set("shop.v1.Cart", false).await;
    assert_eventually!(api.health("cart", "i-1").await.as_deref() == Some("unhealthy"));
    assert_eq!(api.health("whole", "i-1").await.as_deref(), Some("healthy"));
    peer.set("shop.v1.Cart", true).await;
    assert_eventually!(api.health("cart", "i-1").await.as_deref() == Some("healthy"));
}

/// A grpc check against something that is not a gRPC server fails instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_check_against_an_http1_server_is_unhealthy() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = HttpPeer::http1("not-grpc");
    api.put_service("odd", &check(json!({"kind": "grpc"}), 1, 1))
        .await;
    api.register("odd", "i-1", &registration(peer.addr().port(), &[]))
        .await;
    assert_eventually!(api.health("odd", "i-1").await.as_deref() == Some("unhealthy"));
}

/// Stopping the control plane stops its probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_control_plane_stops_probing() {
    let mut control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = HttpPeer::http1("app");
    api.put_service(
        "app",
        &check(json!({"kind": "http", "path": "/healthz"}), 1, 1),
    )
    .await;
    api.register("app", "a", &registration(peer.addr().port(), &[]))
        .await;
    assert_eventually!(api.health("app", "a").await.as_deref() == Some("healthy"));
    control.stop().await;
    // A probe in flight may still land; after that, none (10 intervals of quiet).
    let settled = peer.requests() + 1;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        peer.requests() <= settled,
        "probes went on after the control plane stopped: {} more",
        peer.requests() - settled + 1
    );
}

/// A wrong check marks every instance unhealthy; removing the check (`PUT` of a spec
/// without one) gives them back their unchecked health, `unknown`, which serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_check_resets_health_to_unknown() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = HttpPeer::http1("app");
    api.put_service(
        "app",
        &check(
            json!({"kind": "http", "path": "/wrong", "expect_status": 299}),
            1,
            1,
        ),
    )
    .await;
    for id in ["a", "b"] {
        api.register("app", id, &registration(peer.addr().port(), &[]))
            .await;
    }
    for id in ["a", "b"] {
        assert_eventually!(api.health("app", id).await.as_deref() == Some("unhealthy"));
    }
    api.put_service("app", &json!({})).await;
    for id in ["a", "b"] {
        assert_eventually!(api.health("app", id).await.as_deref() == Some("unknown"));
    }
    assert_eq!(
        ids(&api.list("app", "", "serving=true").await.ok()),
        ["a", "b"]
    );
}

/// A store that records an instance as unhealthy under a service with no check (as the
/// defect left it, or as an older version wrote it) is repaired when the control plane
/// opens it: the instance is `unknown` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_health_without_a_check_is_reset_on_open() {
    use malla_control::store::{embedded::EmbeddedStore, Precondition, Store};
    let mut control = TestControl::start_without_dns().await;
    control.stop().await;
    let store = EmbeddedStore::open(control.data_dir()).await.unwrap();
    store
        .put(
            "/malla/services/app",
            b"{}".to_vec(),
            None,
            Precondition::None,
        )
        .await
        .unwrap();
    let stale = json!({"id": "a", "service": "app", "address": "127.0.0.1", "port": 9,
                       "health": "unhealthy"});
    store
        .put(
            "/malla/instances/app/a",
            serde_json::to_vec(&stale).unwrap(),
            None,
            Precondition::None,
        )
        .await
        .unwrap();
    store.close().await.unwrap();

    control.start_again().await;
    let api = control.api();
    assert_eventually!(api.health("app", "a").await.as_deref() == Some("unknown"));
    assert_eq!(ids(&api.list("app", "", "serving=true").await.ok()), ["a"]);
}

/// A health flip decided by the control plane's checks is an event of the service (kind
/// `health-changed`, naming the instance and why), in `GET /v1/events` and in
/// `GET /v1/services/{s}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flips_are_events_of_the_service() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = HttpPeer::http1("app");
    api.put_service(
        "app",
        &check(json!({"kind": "http", "path": "/healthz"}), 1, 1),
    )
    .await;
    api.register("app", "a", &registration(peer.addr().port(), &[]))
        .await;
    assert_eventually!(api.health("app", "a").await.as_deref() == Some("healthy"));
    peer.set_status(503);
    assert_eventually!(api.health("app", "a").await.as_deref() == Some("unhealthy"));

    let flips = |events: &Value| -> Vec<String> {
        events
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["kind"] == "health-changed")
            .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let described = api.get("/v1/services/app").await.ok();
    let details = flips(&described["events"]);
    assert_eq!(details.len(), 2, "{described}");
    assert!(
        details[0].starts_with("instance a (") && details[0].contains("unknown -> healthy"),
        "{details:?}"
    );
    assert!(
        details[1].contains("healthy -> unhealthy") && details[1].contains("status 503"),
        "{details:?}"
    );
    let events = api.get("/v1/events?service=app").await.ok();
    assert_eq!(flips(&events["events"]), details, "{events}");

    // Removing the check resets the health, and says so.
    api.put_service("app", &json!({})).await;
    assert_eventually!(api.health("app", "a").await.as_deref() == Some("unknown"));
    let described = api.get("/v1/services/app").await.ok();
    let details = flips(&described["events"]);
    assert!(
        details
            .last()
            .is_some_and(|d| d.contains("unhealthy -> unknown")),
        "{details:?}"
    );
}
