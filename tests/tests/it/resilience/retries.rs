//! Retries, the same for HTTP/1, HTTP/2 and gRPC: a failing instance retried around and
//! ejected, and a retry storm bounded by the budget.
//!
//! The cross-version calls are POSTs, so the HTTP flavors opt in to retrying
//! non-idempotent requests; gRPC calls are retried on UNAVAILABLE by default.

use std::time::Duration;

use malla_proxy::{config::BalancerKind, resilience::events::EventKind};
use malla_tests::{
    cross_version::{Flavor, Peer},
    proxy::TestProxy,
};
use tonic::Code;

use super::{breaker_of, metric};

cross_version!(
    one_failing_instance_is_invisible_in_every_protocol,
    a_retry_storm_is_bounded_by_the_budget,
);

/// One of three instances failing every call (500, or UNAVAILABLE for gRPC) is retried
/// around and ejected.
async fn one_failing_instance_is_invisible_in_every_protocol(flavor: Flavor) {
    let peers = [flavor.peer("a"), flavor.peer("b"), flavor.peer("bad")];
    peers[2].set_status(500);
    let addrs: Vec<_> = peers.iter().map(Peer::addr).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .balancer(BalancerKind::RoundRobin)
        .policy(|p| p.retries.non_idempotent = flavor != Flavor::Grpc)
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    for i in 0..30 {
        let served_by = client
            .call(&format!("call {i}"))
            .await
            .assert_ok()
            .to_string();
        assert_ne!(served_by, "bad", "call {i}");
    }
    assert_eq!(
        peers[2].requests(),
        5,
        "ejected after 5 consecutive failures"
    );
    assert_eq!(breaker_of(&proxy, "echo", addrs[2]), "ejected");
}

/// All instances failing: retries are bounded by the budget (10% of requests plus 1/s
/// over a 10 s window), so 100 calls make at most 100 + 10 + 10 upstream calls however
/// many attempts the policy allows.
async fn a_retry_storm_is_bounded_by_the_budget(flavor: Flavor) {
    let peers = [flavor.peer("a"), flavor.peer("b"), flavor.peer("c")];
    for p in &peers {
        p.set_status(503);
    }
    let addrs: Vec<_> = peers.iter().map(Peer::addr).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .policy(|p| {
            p.outlier.enabled = false;
            p.retries.max_attempts = 5;
            p.retries.budget_ratio = 0.1;
            p.retries.budget_min_per_second = 1;
            p.retries.backoff_base = Duration::from_millis(1);
            p.retries.backoff_max = Duration::from_millis(1);
            p.retries.non_idempotent = flavor != Flavor::Grpc;
        })
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    for i in 0..100 {
        client
            .call(&format!("call {i}"))
            .await
            .assert_upstream_error(flavor, 503, Code::Unavailable);
    }
    let reached: u64 = peers.iter().map(Peer::requests).sum();
    assert!(reached > 100, "some retries were made: {reached}");
    assert!(reached <= 120, "the budget bounds retries: {reached}");
    assert!(
        metric(
            &proxy,
            "malla_proxy_retry_budget_exhausted_total",
            &[("upstream", "echo")]
        ) > 0.0
    );
    assert!(proxy
        .events()
        .iter()
        .any(|e| e.kind == EventKind::RetryBudgetExhausted));
}
