//! A request goes through the proxy and back, whatever the protocol and the listener.

use malla_tests::{cross_version::Flavor, proxy::TestProxy};

cross_version!(
    through_outbound_listener,
    through_http_proxy_by_upstream_name,
    through_http_proxy_by_route,
    several_clients_at_once
);

/// An outbound listener sends every request to its upstream, and the answers come back.
async fn through_outbound_listener(flavor: Flavor) {
    let peer = flavor.peer("echo-a");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    for i in 0..5 {
        let message = format!("hello {i}");
        let outcome = client.call(&message).await;
        assert_eq!(outcome.assert_ok(), "echo-a");
        assert_eq!(outcome.message, message);
    }
    assert_eq!(peer.requests(), 5);
    proxy.stop().await;
}

/// The HTTP proxy listener routes by `Host` / `:authority` to the upstream of that name.
async fn through_http_proxy_by_upstream_name(flavor: Flavor) {
    let a = flavor.peer("a");
    let b = flavor.peer("b");
    let proxy = TestProxy::builder()
        .upstream("alpha", &[a.addr()])
        .upstream("beta", &[b.addr()])
        .http_proxy()
        .start();
    let mut to_alpha = flavor.client(proxy.http_proxy(), "alpha");
    let mut to_beta = flavor.client(proxy.http_proxy(), "beta:8080");
    assert_eq!(to_alpha.call("x").await.assert_ok(), "a");
    assert_eq!(to_beta.call("y").await.assert_ok(), "b");
    assert_eq!((a.requests(), b.requests()), (1, 1));
}

/// An explicit route maps a host to an upstream.
async fn through_http_proxy_by_route(flavor: Flavor) {
    let peer = flavor.peer("quote");
    let proxy = TestProxy::builder()
        .upstream("shipping-quote", &[peer.addr()])
        .route("quote.example", "shipping-quote")
        .start();
    let mut client = flavor.client(proxy.http_proxy(), "quote.example");
    assert_eq!(client.call("q").await.assert_ok(), "quote");
}

/// Many clients at once, each with its own connection, all answered.
async fn several_clients_at_once(flavor: Flavor) {
    let peer = flavor.peer("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .start();
    let addr = proxy.outbound();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..8 {
        tasks.spawn(async move {
            let mut client = flavor.client(addr, "echo");
            for i in 0..10 {
                let message = format!("client {c} call {i}");
                let outcome = client.call(&message).await;
                outcome.assert_ok();
                assert_eq!(outcome.message, message);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a client task panicked");
    }
    assert_eq!(peer.requests(), 80);
}
