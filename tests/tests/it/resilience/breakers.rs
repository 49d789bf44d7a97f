//! Circuit breakers, the same for HTTP/1, HTTP/2 and gRPC: per-try timeouts that cut a
//! hanging instance, fail-fast when every instance is ejected, half-open probes (and a
//! failed one), the latency detector, and failures a sidecar only relays.

use std::time::Duration;

use malla_core::policy::Percent;
use malla_proxy::{
    config::{BalancerKind, ListenerProtocol},
    resilience::events::EventKind,
};
use malla_tests::{
    assert_eventually,
    cross_version::{Client, Flavor, Peer},
    peers::dead_addr,
    proxy::TestProxy,
};
use tonic::Code;

use super::{breaker_of, breaker_states};

cross_version!(
    a_hanging_instance_is_cut_by_per_try_timeouts_and_ejected,
    all_instances_down_fail_fast_and_recover_through_a_half_open_probe,
    a_failed_probe_reopens_the_breaker,
    a_latency_outlier_is_ejected_when_the_detector_is_on,
    relayed_failures_do_not_eject_the_relaying_instance,
);

/// Upstream calls that reached any of `peers`.
fn reached(peers: &[Peer]) -> u64 {
    peers.iter().map(Peer::requests).sum()
}

/// An instance that hangs is cut by the per-try timeout, the call is retried on a healthy
/// one, and after the configured failures the hung instance is ejected. (The calls are
/// POSTs, and a timeout is not a gRPC status, so the policy allows retrying any call.)
async fn a_hanging_instance_is_cut_by_per_try_timeouts_and_ejected(flavor: Flavor) {
    let peers = [flavor.peer("a"), flavor.peer("hung")];
    peers[1].hold();
    let addrs: Vec<_> = peers.iter().map(Peer::addr).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .balancer(BalancerKind::RoundRobin)
        .policy(|p| {
            p.timeouts.per_try = Some(Duration::from_millis(200));
            p.outlier.consecutive_failures = 2;
            p.retries.non_idempotent = true;
        })
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    for i in 0..20 {
        let outcome = client.call(&format!("call {i}")).await;
        assert_eq!(outcome.assert_ok(), "a", "call {i}");
        assert_eq!(outcome.message, format!("call {i}"));
    }
    assert_eq!(peers[1].requests(), 2);
    assert_eq!(breaker_of(&proxy, "echo", addrs[1]), "ejected");
    peers[1].release();
}

/// Every instance down: once the breakers are open, calls fail fast with a clear error
/// (503 / UNAVAILABLE, `no-healthy-endpoints`) and reach no instance; when the fault
/// clears, a half-open probe after the ejection time closes the breakers and traffic flows
/// again.
async fn all_instances_down_fail_fast_and_recover_through_a_half_open_probe(flavor: Flavor) {
    let peers = [flavor.peer("a"), flavor.peer("b")];
    for p in &peers {
        p.set_status(503);
    }
    let addrs: Vec<_> = peers.iter().map(Peer::addr).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .policy(|p| {
            p.outlier.consecutive_failures = 2;
            p.outlier.base_ejection_time = Duration::from_millis(300);
            p.outlier.max_ejection_percent = Percent::new(100.0).unwrap();
            p.outlier.panic_threshold = Percent::new(0.0).unwrap();
            p.retries.enabled = false;
        })
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    // Two failures each open both breakers.
    for _ in 0..4 {
        client
            .call("x")
            .await
            .assert_upstream_error(flavor, 503, Code::Unavailable);
    }
    assert_eq!(reached(&peers), 4);
    client
        .call("x")
        .await
        .assert_error(flavor, 503, Code::Unavailable, "no-healthy-endpoints");
    assert_eq!(reached(&peers), 4, "failed fast");

    for p in &peers {
        p.set_status(0);
    }
    assert_eventually!(
        client.call("probe").await.is_ok(),
        "a probe after the ejection time succeeds"
    );
    // Probes are real requests: the next ones close the other breaker too.
    assert_eventually!(
        client.call("y").await.is_ok()
            && breaker_states(&proxy, "echo")
                .iter()
                .all(|(_, s)| s == "closed"),
        "both breakers close"
    );
    let kinds: Vec<_> = proxy.events().iter().map(|e| e.kind).collect();
    for kind in [EventKind::Ejected, EventKind::HalfOpen, EventKind::Closed] {
        assert!(kinds.contains(&kind), "{kind:?} in {kinds:?}");
    }
}

/// A half-open probe that fails re-opens the breaker for twice as long.
async fn a_failed_probe_reopens_the_breaker(flavor: Flavor) {
    let bad = flavor.peer("bad");
    let good = flavor.peer("good");
    bad.set_status(502);
    let proxy = TestProxy::builder()
        .upstream("echo", &[bad.addr(), good.addr()])
        .policy(|p| {
            p.outlier.consecutive_failures = 1;
            p.outlier.base_ejection_time = Duration::from_millis(200);
        })
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    assert_eventually!(
        {
            let _ = client.call("x").await;
            breaker_of(&proxy, "echo", bad.addr()) == "ejected"
        },
        "the bad endpoint is ejected"
    );
    assert_eventually!(
        {
            let _ = client.call("x").await;
            proxy.events().iter().any(|e| {
                e.kind == EventKind::Ejected && e.detail.contains("half-open probe failed")
            })
        },
        "the probe fails and re-ejects"
    );
    let ejections: Vec<_> = proxy
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::Ejected)
        .map(|e| e.detail)
        .collect();
    assert!(ejections[0].ends_with("ejected for 200ms"), "{ejections:?}");
    assert!(ejections[1].ends_with("ejected for 400ms"), "{ejections:?}");
}

/// An endpoint much slower than its peers is ejected by the latency detector (opt-in),
/// which P2C-EWMA alone would only send less to.
async fn a_latency_outlier_is_ejected_when_the_detector_is_on(flavor: Flavor) {
    let peers = [flavor.peer("a"), flavor.peer("b"), flavor.peer("slow")];
    peers[2].set_delay(Duration::from_millis(40));
    let addrs: Vec<_> = peers.iter().map(Peer::addr).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .balancer(BalancerKind::RoundRobin)
        .policy(|p| {
            p.outlier.interval = Duration::from_millis(600);
            p.outlier.latency.enabled = true;
            p.outlier.latency.min_requests = 3;
            p.outlier.success_rate.enabled = false;
        })
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    assert_eventually!(
        {
            client.call("x").await.assert_ok();
            breaker_of(&proxy, "echo", addrs[2]) == "ejected"
        },
        "the slow endpoint is ejected: {:#} {:?}",
        proxy.upstream("echo").state(),
        proxy.events()
    );
    let event = proxy
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::Ejected)
        .unwrap();
    assert!(event.detail.contains("mean latency"), "{}", event.detail);
    assert_eq!(event.endpoint, Some(addrs[2]));
}

/// A gateway sidecar whose own upstream is down relays the failure marked
/// `malla-relayed-failure` (gRPC: in the trailers-only response's header fields): the
/// caller's breaker does not eject the healthy gateway. The same failure from an
/// instance's inbound side (its application is down) is the instance's own, and the
/// caller ejects it.
async fn relayed_failures_do_not_eject_the_relaying_instance(flavor: Flavor) {
    let gateway = TestProxy::builder()
        .upstream("echo", &[dead_addr()])
        .outbound("echo")
        .start();
    let sick = TestProxy::builder()
        .inbound(dead_addr(), ListenerProtocol::Auto)
        .start();
    let healthy = flavor.peer("healthy");
    let caller = TestProxy::builder()
        .upstream(
            "echo",
            &[
                gateway.outbound(),
                sick.bound().inbound.unwrap(),
                healthy.addr(),
            ],
        )
        .policy(|p| {
            p.outlier.consecutive_failures = 3;
            p.outlier.max_ejection_percent = Percent::new(100.0).unwrap();
            p.retries.enabled = false;
        })
        .balancer(BalancerKind::RoundRobin)
        .outbound("echo")
        .start();
    let mut client: Client = flavor.client(caller.outbound(), "echo");
    let mut relayed = 0;
    let mut answers = Vec::new();
    for i in 0..12 {
        let outcome = client.call(&format!("call {i}")).await;
        if outcome.header("malla-relayed-failure") == Some("echo") {
            relayed += 1;
        }
        answers.push(outcome);
    }
    assert!(
        relayed >= 3,
        "the gateway's answers carry the mark: {relayed} in {answers:#?}"
    );
    assert_eq!(breaker_of(&caller, "echo", gateway.outbound()), "closed");
    assert_eq!(
        breaker_of(&caller, "echo", sick.bound().inbound.unwrap()),
        "ejected"
    );
}
