//! Several workers, as every user runs them (one per core by default): each serves the
//! connections the kernel gives its own listener copy, keeps its own idle upstream
//! connections (a socket is only driven by the worker runtime that opened it), and drains.

use http::Version;
use malla_tests::{
    assert_eventually,
    client::{self, within, Http1},
    peers::HttpPeer,
    proxy::TestProxy,
};

fn idle_upstream_connections(proxy: &TestProxy) -> u64 {
    proxy.upstream("echo").state()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["idle_http1_connections"].as_u64().unwrap())
        .sum()
}

/// One request on a new client connection, which then closes.
async fn one_request(proxy: &TestProxy, i: usize) {
    let mut conn = Http1::connect(proxy.outbound()).await.unwrap();
    let path = format!("/{i}");
    let req = client::get(Version::HTTP_11, "echo", &path);
    let response = within("request", conn.send(req)).await.unwrap();
    assert_eq!(client::collect(response).await.unwrap().status, 200);
}

/// Client connections one after another, spread by the kernel over two workers: each
/// worker reuses the upstream connection it pooled, and never one pooled by the other, so
/// the pools end up holding exactly one connection per worker (a pool shared by the
/// workers would hold one in all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_serves_and_keeps_its_own_pool() {
    let peer = HttpPeer::http1("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .workers(2)
        .start();
    // 40 connections from 40 source ports: the chance that SO_REUSEPORT puts all of
    // them on one worker is 2^-39.
    for i in 0..40 {
        one_request(&proxy, i).await;
    }
    assert_eq!(peer.requests(), 40);
    assert_eventually!(
        idle_upstream_connections(&proxy) == 2,
        "expected one idle upstream connection per worker, found {}",
        idle_upstream_connections(&proxy)
    );
    // Draining closes every worker's listener.
    proxy.drain();
    assert_eventually!(
        tokio::net::TcpStream::connect(proxy.outbound())
            .await
            .is_err(),
        "a worker still accepts connections while draining"
    );
}
