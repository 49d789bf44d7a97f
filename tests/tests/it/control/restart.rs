//! Restarts on the same data directory: what was acknowledged is still there, leases get
//! their full TTL again (however long the outage), and revisions keep increasing.

use std::time::Duration;

use malla_tests::{assert_eventually, control::TestControl};
use serde_json::json;
use tokio::time::Instant;

use super::registration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_specs_survive_a_restart() {
    let mut control = TestControl::start().await;
    let api = control.api();
    let spec = json!({"health_check": {"kind": "tcp", "interval": 60, "timeout": 1,
                                       "healthy_threshold": 3, "unhealthy_threshold": 4}});
    api.put_service("billing", &spec).await;
    api.put_service("empty", &json!({})).await;
    let mut body = registration(8081, &[("env", "prod"), ("malla.dev/zone", "eu-1")]);
    body["protocol"] = json!("http2");
    body["ttl_seconds"] = json!(3600);
    let registered = api.register("orders", "o-1", &body).await;
    api.register("orders", "o-2", &registration(8082, &[("env", "dev")]))
        .await;
    let before_services = api.get("/v1/services").await.ok();
    let before_orders = api.get("/v1/services/orders").await.ok();
    let before_billing = api.get("/v1/services/billing").await.ok();
    let before_revision = before_services["revision"].as_u64().unwrap();

    control.restart().await;
    let api = control.api();

    let after_services = api.get("/v1/services").await.ok();
    assert_eq!(after_services["services"], before_services["services"]);
    assert_eq!(
        after_services["revision"].as_u64().unwrap(),
        before_revision
    );
    // The same but for the leases' time left, which runs.
    let without_time_left = |mut v: serde_json::Value| {
        for instance in v["instances"].as_array_mut().into_iter().flatten() {
            if let Some(lease) = instance["lease"].as_object_mut() {
                lease.remove("remaining_seconds");
            }
        }
        v
    };
    assert_eq!(
        without_time_left(api.get("/v1/services/orders").await.ok()),
        without_time_left(before_orders),
        "instances, labels, protocol, health, annotations, registration, leases"
    );
    assert_eq!(api.get("/v1/services/billing").await.ok(), before_billing);
    assert_eq!(api.instance_ids("orders", "env=prod").await, ["o-1"]);

    // The lease is the same lease: heartbeats go on.
    let lease = registered["lease"].as_u64().unwrap();
    let renewed = api.keepalive(lease).await.ok();
    assert_eq!(renewed["ttl_seconds"], 3600);
    // Revisions go on from where they were; new leases do not reuse old ids.
    let new = api
        .register("orders", "o-3", &registration(8083, &[]))
        .await;
    assert!(new["revision"].as_u64().unwrap() > before_revision);
    assert_ne!(new["lease"], registered["lease"]);
    assert!(new["lease"].as_u64().unwrap() > lease);

    // DNS answers from the reloaded registry too.
    assert!(control.dns_addr().port() != 0);
}

/// The race of a restart after an outage longer than the lease TTL, forced rather than
/// timed: the persisted deadlines are moved an hour into the past while the control plane is
/// down. On start every lease has its full TTL again (etcd's grace when a leader takes
/// over): the instances are listed, a sidecar-style watcher that syncs at once gets them in
/// its snapshot (not an empty set), and a heartbeat renews them. A lease nobody renews
/// still expires, one TTL after the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_get_their_full_ttl_after_an_outage_longer_than_it() {
    use malla_api::{pb, RegistryClient, WatchEvent};
    use malla_control::store::embedded::EmbeddedStore;

    let mut control = TestControl::start_without_dns().await;
    let api = control.api();
    let renewed = api
        .register(
            "orders",
            "renewed",
            &json!({"address": "127.0.0.1", "port": 8081, "ttl_seconds": 60}),
        )
        .await;
    api.register(
        "orders",
        "forgotten",
        &json!({"address": "127.0.0.1", "port": 8082, "ttl_seconds": 6}),
    )
    .await;
    control.stop().await;
    let moved =
        EmbeddedStore::age_leases_while_closed(control.data_dir(), Duration::from_secs(3600))
            .unwrap();
    assert_eq!(moved, 2);

    control.start_again().await;
    let started = Instant::now();
    let api = control.api();
    // A watcher that resyncs at once, as a sidecar reconnecting does.
    let mut client = RegistryClient::new(control.grpc_channel_to(control.grpc_addr()).await);
    let mut stream = client
        .watch(pb::WatchRequest {
            service: "orders".into(),
            selector: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = malla_tests::client::within("the watch snapshot", stream.message())
        .await
        .unwrap()
        .expect("the watch ended");
    match WatchEvent::try_from(first).unwrap() {
        WatchEvent::Snapshot { instances, .. } => {
            let mut ids: Vec<_> = instances.iter().map(|i| i.id.as_str()).collect();
            ids.sort();
            assert_eq!(ids, ["forgotten", "renewed"]);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    assert_eq!(
        api.instance_ids("orders", "").await,
        ["forgotten", "renewed"]
    );
    let lease = renewed["lease"].as_u64().unwrap();
    let beat = api.keepalive(lease).await.ok();
    assert_eq!(beat["remaining_seconds"], 60.0, "{beat}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the checks above took longer than the 6 s TTL: they prove nothing"
    );

    // Nobody renews `forgotten`: it goes one TTL (6 s) after the start, not before.
    assert_eventually!(tries: 1500, api.instance_ids("orders", "").await == ["renewed"]);
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "expired {:?} after the start, before its TTL",
        started.elapsed()
    );
}
