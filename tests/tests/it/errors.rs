//! The answers the proxy makes itself, with their `malla-error` cause: the same for every
//! protocol (HTTP status for HTTP callers, `grpc-status` for gRPC callers). After each
//! error the proxy keeps serving.

use std::time::Duration;

use malla_tests::{
    cross_version::{Client, Flavor, Peer},
    peers::{dead_addr, misbehaving::RawPeer},
    proxy::{TestProxy, TestProxyBuilder},
};
use tonic::Code;

cross_version!(
    no_endpoints,
    connect_refused,
    response_timeout,
    default_request_timeout,
    unknown_host,
    upstream_errors_are_not_proxy_errors
);

/// The proxy answers normally once the upstream has a live endpoint again.
async fn still_serves(proxy: &TestProxy, upstream: &str, peer: &Peer, client: &mut Client) {
    proxy.set_endpoints(upstream, &[peer.addr()]);
    assert_eq!(client.call("again").await.assert_ok(), peer.name());
}

/// An upstream without endpoints: 503 / UNAVAILABLE, `no-endpoints`.
async fn no_endpoints(flavor: Flavor) {
    let peer = flavor.peer("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .start();
    proxy.set_endpoints("echo", &[]);
    let mut client = flavor.client(proxy.outbound(), "echo");
    for _ in 0..3 {
        client
            .call("x")
            .await
            .assert_error(flavor, 503, Code::Unavailable, "no-endpoints");
    }
    assert_eq!(peer.requests(), 0);
    still_serves(&proxy, "echo", &peer, &mut client).await;
}

/// An endpoint that refuses connections: 502 / UNAVAILABLE, `connect-refused`.
async fn connect_refused(flavor: Flavor) {
    let peer = flavor.peer("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[dead_addr()])
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    client
        .call("x")
        .await
        .assert_error(flavor, 502, Code::Unavailable, "connect-refused");
    still_serves(&proxy, "echo", &peer, &mut client).await;
}

/// Calls an endpoint that accepts and never answers, through a proxy `configure`d by the
/// test: the answer must be 504 / DEADLINE_EXCEEDED with `cause`. Returns how many
/// connections reached the silent endpoint; the proxy serves again afterwards.
async fn silent_endpoint(
    flavor: Flavor,
    configure: impl FnOnce(TestProxyBuilder) -> TestProxyBuilder,
    cause: &str,
) -> u64 {
    let silent = RawPeer::silent();
    let peer = flavor.peer("echo");
    let builder = TestProxy::builder().upstream("echo", &[silent.addr()]);
    let proxy = configure(builder).outbound("echo").start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    client
        .call("x")
        .await
        .assert_error(flavor, 504, Code::DeadlineExceeded, cause);
    still_serves(&proxy, "echo", &peer, &mut client).await;
    silent.connections()
}

/// After `response_timeout`, 504 / DEADLINE_EXCEEDED, `response-timeout`.
async fn response_timeout(flavor: Flavor) {
    let short = |b: TestProxyBuilder| b.response_timeout(Duration::from_millis(300));
    let connections = silent_endpoint(flavor, short, "response-timeout").await;
    assert!(
        connections >= 1,
        "the proxy never connected to the endpoint"
    );
}

/// With every default a user gets, the call ends with `deadline-exceeded` at the default
/// request timeout (15 s), retries included, instead of three per-try timeouts with
/// nothing sent back.
async fn default_request_timeout(flavor: Flavor) {
    let connections = silent_endpoint(flavor, |b| b, "deadline-exceeded").await;
    assert_eq!(
        connections, 1,
        "the deadline leaves no time for another attempt"
    );
}

/// The HTTP proxy listener with a `Host` that names no route and no upstream: 404
/// `no-route` (gRPC: UNIMPLEMENTED, as `error.rs` maps it).
async fn unknown_host(flavor: Flavor) {
    let peer = flavor.peer("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .http_proxy()
        .start();
    let mut lost = flavor.client(proxy.http_proxy(), "nowhere.example");
    lost.call("x")
        .await
        .assert_error(flavor, 404, Code::Unimplemented, "no-route");
    let mut found = flavor.client(proxy.http_proxy(), "echo");
    assert_eq!(found.call("y").await.assert_ok(), "echo");
    assert_eq!(peer.requests(), 1);
}

/// An upstream's own error status reaches the client unchanged and without `malla-error`.
async fn upstream_errors_are_not_proxy_errors(flavor: Flavor) {
    let peer = flavor.peer("echo");
    match &peer {
        Peer::Http(p) => p.set_status(503),
        // gRPC errors from the upstream are covered by `grpc::failure_*`.
        Peer::Grpc(_) => return,
    }
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    let outcome = client.call("x").await;
    assert_eq!(outcome.status, 503, "{outcome:?}");
    assert_eq!(outcome.cause, None, "{outcome:?}");
    assert_eq!(outcome.peer.as_deref(), Some("echo"), "{outcome:?}");
}
