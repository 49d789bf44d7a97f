//! Deadlines across two hops, the same for HTTP/1, HTTP/2 and gRPC: the caller's budget
//! (`malla-timeout-ms`, or `grpc-timeout`) shrinks at every hop, and a call whose budget
//! is spent is not sent.

use std::time::Duration;

use malla_core::policy::{Fault, Percent};
use malla_proxy::config::ListenerProtocol;
use malla_tests::{cross_version::Flavor, proxy::TestProxy};
use tonic::Code;

cross_version!(deadlines_shrink_across_two_hops);

/// Two sidecars, the first delaying every call by 100 ms (fault injection), and the
/// application behind the second's inbound side sees what is left of the caller's budget.
/// A budget the first hop's delay spends is answered 504 / DEADLINE_EXCEEDED,
/// `deadline-exceeded`, and nothing is sent. The policy's own request timeout starts a
/// budget when the caller gave none.
async fn deadlines_shrink_across_two_hops(flavor: Flavor) {
    let app = flavor.peer("app");
    let second = TestProxy::builder()
        .inbound(app.addr(), ListenerProtocol::Auto)
        .start();
    let inbound = second.bound().inbound.unwrap();
    let first = TestProxy::builder()
        .upstream("echo", &[inbound])
        .policy(|p| {
            p.faults.push(Fault {
                path_prefix: None,
                delay_percent: Percent::new(100.0).unwrap(),
                delay: Duration::from_millis(100),
                abort_percent: Percent::default(),
                abort_status: 503,
            })
        })
        .outbound("echo")
        .start();
    let mut client = flavor.client(first.outbound(), "echo");
    let outcome = client.call_within("x", Duration::from_millis(1000)).await;
    assert_eq!(outcome.assert_ok(), "app");
    let seen = outcome.budget_seen();
    assert!(
        seen.is_some_and(|s| !s.is_zero() && s <= Duration::from_millis(900)),
        "the app saw {seen:?} left: {outcome:?}"
    );

    // 50 ms is spent in the first hop's delay: nothing is sent. (A gRPC client enforces
    // its own deadline too, and its timer and the proxy's fire at the same moment: either
    // answer may reach it first.)
    let before = app.requests();
    let spent = client.call_within("y", Duration::from_millis(50)).await;
    let own_timeout = flavor == Flavor::Grpc
        && spent.grpc == Some(Code::Cancelled)
        && spent.message.contains("Timeout expired");
    if !own_timeout {
        spent.assert_error(flavor, 504, Code::DeadlineExceeded, "deadline-exceeded");
    }
    assert_eq!(app.requests(), before);

    let third = TestProxy::builder()
        .upstream("echo", &[inbound])
        .policy(|p| p.timeouts.request = Duration::from_millis(700))
        .outbound("echo")
        .start();
    let mut client = flavor.client(third.outbound(), "echo");
    let outcome = client.call("z").await;
    assert_eq!(outcome.assert_ok(), "app");
    let seen = outcome.budget_seen();
    assert!(
        seen.is_some_and(|s| !s.is_zero() && s <= Duration::from_millis(700)),
        "the app saw {seen:?} left: {outcome:?}"
    );
}
