//! Restarts on the same data directory: what was acknowledged is still there, leases go on
//! with the time they had left, and revisions keep increasing.

use std::time::Duration;

use malla_control::store::Store as _;
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
    assert_eq!(
        api.get("/v1/services/orders").await.ok(),
        before_orders,
        "instances, labels, protocol, health"
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

/// An instance with a 3 s lease whose control plane restarts 1 s after registering still
/// expires about 3 s after registering, not 3 s after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_resume_with_their_remaining_time() {
    let mut control = TestControl::start_without_dns().await;
    let api = control.api();
    let registered_at = Instant::now();
    let registered = api
        .register(
            "orders",
            "short",
            &json!({"address": "127.0.0.1", "port": 8081, "ttl_seconds": 3}),
        )
        .await;
    let lease = registered["lease"].as_u64().unwrap();
    api.register(
        "orders",
        "long",
        &json!({"address": "127.0.0.1", "port": 8082, "ttl_seconds": 3600}),
    )
    .await;

    tokio::time::sleep_until(registered_at + Duration::from_secs(1)).await;
    control.restart().await;
    let api = control.api();
    let since_registration = registered_at.elapsed();
    assert!(
        since_registration < Duration::from_millis(2500),
        "the restart took too long for this test to mean anything: {since_registration:?}"
    );
    assert_eq!(api.instance_ids("orders", "").await, ["long", "short"]);

    // Read the lease without renewing it: what is left is the TTL minus the time since
    // registering (downtime included), not a fresh TTL.
    let left = control
        .registry()
        .store()
        .lease(lease)
        .await
        .unwrap()
        .remaining;
    let at_most =
        Duration::from_secs(3).saturating_sub(since_registration) + Duration::from_millis(250);
    assert!(
        left <= at_most,
        "the lease has {left:?} left {since_registration:?} after a 3 s registration"
    );

    assert_eventually!(api.instance_ids("orders", "").await == ["long"]);
    let gone_after = registered_at.elapsed();
    assert!(
        gone_after < Duration::from_secs(6),
        "the 3 s lease lasted {gone_after:?} across a restart"
    );
}

/// A lease whose deadline passed while the control plane was down expires as it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_that_expire_during_downtime_are_gone_on_start() {
    let mut control = TestControl::start_without_dns().await;
    let api = control.api();
    let registered_at = Instant::now();
    api.register(
        "orders",
        "short",
        &json!({"address": "127.0.0.1", "port": 8081, "ttl_seconds": 1}),
    )
    .await;
    control.stop().await;
    tokio::time::sleep_until(registered_at + Duration::from_millis(1500)).await;
    control.start_again().await;
    let api = control.api();
    assert_eventually!(
        tries: 25,
        api.instance_ids("orders", "").await.is_empty(),
        "an expired lease outlived the downtime"
    );
}
