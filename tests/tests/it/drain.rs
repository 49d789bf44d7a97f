//! Draining: the proxy stops taking connections, says so on `/ready`, and lets the work in
//! flight finish before it stops.

use std::time::Duration;

use malla_tests::{assert_eventually, cross_version::Flavor, proxy::admin, proxy::TestProxy};
use tokio::net::TcpStream;

cross_version!(in_flight_request_completes_while_draining);

/// A request in flight when the drain starts completes; meanwhile `/ready` is 503 and new
/// connections are refused; then the proxy stops by itself.
async fn in_flight_request_completes_while_draining(flavor: Flavor) {
    let peer = flavor.peer("slow");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .admin()
        .drain_timeout(Duration::from_secs(15))
        .start();
    let (addr, admin_addr) = (proxy.outbound(), proxy.admin());
    assert_eq!(admin::status(admin_addr, "/ready").await, 200);

    // Warm up (and prove the path works), then hold the next request at the peer.
    let mut client = flavor.client(addr, "echo");
    client.call("warm-up").await.assert_ok();
    peer.state().hold();
    let in_flight = tokio::spawn(async move { client.call("slow").await });
    assert_eventually!(
        peer.requests() == 2,
        "the slow request never reached the peer"
    );

    proxy.drain();
    assert_eventually!(
        admin::status(admin_addr, "/ready").await == 503,
        "/ready did not turn 503 while draining"
    );
    assert_eq!(admin::status(admin_addr, "/live").await, 200);
    assert_eventually!(
        TcpStream::connect(addr).await.is_err(),
        "new connections are still accepted while draining"
    );
    assert!(!in_flight.is_finished(), "the held request finished early");

    peer.state().release();
    let outcome = in_flight.await.expect("the client task panicked");
    assert_eq!(outcome.assert_ok(), "slow");
    assert_eq!(outcome.message, "slow");

    proxy.stop().await;
    assert_eventually!(
        admin::status(admin_addr, "/live").await == 0,
        "the admin listener outlived the proxy"
    );
}

/// Idle client connections are closed when the drain starts (HTTP/1: closed; HTTP/2:
/// GOAWAY, then closed), so the proxy stops without waiting for its drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_on_drain() {
    use malla_tests::client::{self, Http1, Http2};

    let h1_peer = malla_tests::peers::HttpPeer::http1("h1");
    let h2_peer = malla_tests::peers::HttpPeer::http2("h2");
    let proxy = TestProxy::builder()
        .upstream("one", &[h1_peer.addr()])
        .outbound("one")
        .upstream("two", &[h2_peer.addr()])
        .outbound("two")
        .start();
    let mut h1 = Http1::connect(proxy.outbound_at(0)).await.unwrap();
    let r = h1
        .send(client::get(http::Version::HTTP_11, "one", "/"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    client::collect(r).await.unwrap();
    let h2 = Http2::connect(proxy.outbound_at(1)).await.unwrap();
    let r = h2
        .send(client::get(http::Version::HTTP_2, "two", "/"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    client::collect(r).await.unwrap();

    proxy.drain();
    assert_eventually!(h1.is_closed(), "the idle HTTP/1 connection stayed open");
    assert_eventually!(h2.is_closed(), "the idle HTTP/2 connection stayed open");
    proxy.stop().await;
}
