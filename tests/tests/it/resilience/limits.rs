//! Admission, the same for HTTP/1, HTTP/2 and gRPC: service limits (enforced and
//! audited), rate limits, fault injection, and a policy changed while a connection stays
//! open. Error answers follow `error.rs`: 503 limit → UNAVAILABLE, 429 →
//! RESOURCE_EXHAUSTED, an injected 418 → UNKNOWN.

use std::time::Duration;

use malla_core::policy::{Fault, Mode, Percent, RateLimit};
use malla_tests::{assert_eventually, cross_version::Flavor, proxy::TestProxy};
use tonic::Code;

use super::metric;

cross_version!(
    service_limits_fail_fast_and_audit_mode_only_counts,
    rate_limits_answer_429_with_retry_after,
    fault_injection_aborts_requests,
    a_new_policy_applies_live_without_dropping_connections,
);

/// A fault that aborts every request with `status`.
fn abort(path_prefix: Option<&str>, status: u16) -> Fault {
    Fault {
        path_prefix: path_prefix.map(str::to_string),
        delay_percent: Percent::default(),
        delay: Duration::ZERO,
        abort_percent: Percent::new(100.0).unwrap(),
        abort_status: status,
    }
}

/// Service limits fail fast with 503 / UNAVAILABLE and name the limit (`malla-limit`);
/// in audit mode the same excess is only counted.
async fn service_limits_fail_fast_and_audit_mode_only_counts(flavor: Flavor) {
    let peer = flavor.peer("slow");
    for mode in [Mode::Enforce, Mode::Audit] {
        let proxy = TestProxy::builder()
            .upstream("echo", &[peer.addr()])
            .policy(|p| {
                p.limits.max_requests = 1;
                p.limits.mode = mode;
            })
            .outbound("echo")
            .start();
        peer.hold();
        let before = peer.requests();
        let mut first = flavor.client(proxy.outbound(), "echo");
        let held = tokio::spawn(async move { first.call("held").await });
        assert_eventually!(peer.requests() > before, "the first request is in flight");
        let mut second = flavor.client(proxy.outbound(), "echo");
        if mode == Mode::Enforce {
            let outcome = second.call("second").await;
            outcome.assert_error(flavor, 503, Code::Unavailable, "limit-reached");
            assert_eq!(
                outcome.header("malla-limit"),
                Some("max_requests"),
                "{outcome:?}"
            );
            peer.release();
        } else {
            let second = tokio::spawn(async move { second.call("second").await });
            assert_eventually!(
                metric(
                    &proxy,
                    "malla_proxy_limit_hits_total",
                    &[("action", "max_requests"), ("mode", "audit")]
                ) == 1.0,
                "the audit counts the excess"
            );
            peer.release();
            second.await.unwrap().assert_ok();
        }
        held.await.unwrap().assert_ok();
    }
}

/// A local rate limit answers 429 / RESOURCE_EXHAUSTED with `retry-after` once the burst
/// is spent (gRPC carries it in the trailers-only response's header fields).
async fn rate_limits_answer_429_with_retry_after(flavor: Flavor) {
    let peer = flavor.peer("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .policy(|p| {
            p.rate_limits.push(RateLimit {
                path_prefix: None,
                requests_per_second: 0.5,
                burst: Some(2),
                mode: Mode::Enforce,
            })
        })
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    client.call("one").await.assert_ok();
    client.call("two").await.assert_ok();
    let outcome = client.call("three").await;
    outcome.assert_error(flavor, 429, Code::ResourceExhausted, "rate-limited");
    assert_eq!(outcome.header("retry-after"), Some("2"), "{outcome:?}");
    assert_eq!(peer.requests(), 2);
}

/// Fault injection aborts the share of requests asked for, before any endpoint: an
/// injected 418 is UNKNOWN for gRPC (gRPC's HTTP status mapping).
async fn fault_injection_aborts_requests(flavor: Flavor) {
    let peer = flavor.peer("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .policy(|p| p.faults.push(abort(Some("/"), 418)))
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    client
        .call("x")
        .await
        .assert_error(flavor, 418, Code::Unknown, "fault-injected");
    assert_eq!(peer.requests(), 0);
}

/// A new policy takes effect on the next request of a connection that stays open.
async fn a_new_policy_applies_live_without_dropping_connections(flavor: Flavor) {
    let peer = flavor.peer("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    client.call("first").await.assert_ok();
    let mut policy = malla_core::Policy::default();
    policy.faults.push(abort(None, 503));
    proxy.upstream("echo").set_policy(Some((policy, 1)));
    client
        .call("second")
        .await
        .assert_error(flavor, 503, Code::Unavailable, "fault-injected");
    proxy.upstream("echo").set_policy(None);
    client.call("third").await.assert_ok();
    assert_eq!(peer.requests(), 2);
    // The proxy's own answer to a call whose (small, fully received) body it did not
    // forward must not cost the caller its connection either.
    assert_eq!(
        client.connections(),
        1,
        "the client connection stayed open throughout"
    );
}
