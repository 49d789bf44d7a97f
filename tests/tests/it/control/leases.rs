//! Leases: an instance whose lease is not renewed leaves the registry; heartbeats keep it.

use std::time::Duration;

use malla_tests::{assert_eventually, client::within, control::TestControl};
use serde_json::json;
use tokio::time::Instant;

fn lease_of(registered: &serde_json::Value) -> u64 {
    registered["lease"]
        .as_u64()
        .unwrap_or_else(|| panic!("no lease in {registered}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_removes_the_instance_and_tells_watchers() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let (_, mut changes) = control.registry().subscribe();
    let short = api
        .register(
            "orders",
            "short",
            &json!({"address": "127.0.0.1", "port": 8081, "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(short["ttl_seconds"], 1);
    api.register(
        "orders",
        "long",
        &json!({"address": "127.0.0.1", "port": 8082, "ttl_seconds": 3600}),
    )
    .await;
    assert_eq!(api.instance_ids("orders", "").await, ["long", "short"]);

    assert_eventually!(
        api.instance_ids("orders", "").await == ["long"],
        "the 1 s lease never expired"
    );
    // Renewing an expired lease says what to do.
    let late = api.keepalive(lease_of(&short)).await;
    let message = late.error(404, "lease_not_found");
    assert!(message.contains("register again"), "{message}");

    // Watchers saw it come and go.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let change = within("registry changes", changes.recv()).await.unwrap();
        let id = change
            .after
            .as_ref()
            .or(change.before.as_ref())
            .map(|i| i.id.clone())
            .unwrap();
        seen.push((id, change.after.is_some()));
    }
    assert_eq!(
        seen,
        [
            ("short".to_string(), true),
            ("long".to_string(), true),
            ("short".to_string(), false)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_the_instance_past_its_ttl() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let registered = api
        .register(
            "orders",
            "beating",
            &json!({"address": "127.0.0.1", "port": 8081, "ttl_seconds": 1}),
        )
        .await;
    let lease = lease_of(&registered);
    let start = Instant::now();
    // Three TTLs with a heartbeat every 250 ms (a sidecar would send one every third).
    let mut beats = 0;
    while start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let renewed = api.keepalive(lease).await.ok();
        beats += 1;
        assert_eq!(renewed["lease"], lease, "{renewed}");
        assert_eq!(renewed["ttl_seconds"], 1, "{renewed}");
        let remaining = renewed["remaining_seconds"].as_f64().unwrap();
        assert!(remaining > 0.5 && remaining <= 1.0, "{renewed}");
        assert_eq!(api.instance_ids("orders", "").await, ["beating"]);
    }
    assert!(beats >= 8, "only {beats} heartbeats");

    // Without heartbeats it goes.
    assert_eventually!(api.instance_ids("orders", "").await.is_empty());
}
