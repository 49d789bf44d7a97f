//! gRPC through the proxy: every streaming shape, statuses and trailing metadata intact.
//!
//! The checks are plain functions of an address and an authority, so `harness` runs them
//! against the peer directly (proving the checks) and this module through the proxy.

use std::net::SocketAddr;

use futures_util::StreamExt;
use malla_tests::{
    client::{self, within},
    echo_pb::{EchoRequest, FailRequest, StreamRequest},
    peers::GrpcPeer,
    proxy::TestProxy,
};
use tonic::Code;

/// Unary: the reply, the peer's response metadata, and the request headers it saw.
pub async fn check_unary(addr: SocketAddr, authority: &str, peer: &str) {
    let mut grpc = client::grpc(addr, authority).await.unwrap();
    let mut request = tonic::Request::new(EchoRequest {
        message: "hello".into(),
    });
    request
        .metadata_mut()
        .insert("x-custom", "from-client".parse().unwrap());
    let response = within("unary", grpc.unary(request)).await.unwrap();
    assert_eq!(response.metadata().get("x-peer").unwrap(), peer);
    let reply = response.into_inner();
    assert_eq!(
        (reply.message.as_str(), reply.peer.as_str()),
        ("hello", peer)
    );
    assert_eq!(
        reply.headers.get("x-custom").map(String::as_str),
        Some("from-client")
    );
    assert_eq!(
        reply.headers.get("te").map(String::as_str),
        Some("trailers")
    );
    assert_eq!(
        reply.headers.get("content-type").map(String::as_str),
        Some("application/grpc")
    );
}

/// Server streaming: every message in order, then OK.
pub async fn check_server_stream(addr: SocketAddr, authority: &str) {
    let mut grpc = client::grpc(addr, authority).await.unwrap();
    let request = StreamRequest {
        message: "item".into(),
        count: 200,
        ..Default::default()
    };
    let mut stream = within("server stream", grpc.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    let mut index = 0u64;
    while let Some(reply) = within("next message", stream.next()).await {
        let reply = reply.unwrap_or_else(|s| panic!("the stream failed after {index}: {s:?}"));
        assert_eq!(reply.index, index);
        assert_eq!(reply.message, format!("item {index}"));
        index += 1;
    }
    assert_eq!(index, 200);
}

/// Client streaming: every message arrives, in order.
pub async fn check_client_stream(addr: SocketAddr, authority: &str) {
    let mut grpc = client::grpc(addr, authority).await.unwrap();
    let messages: Vec<EchoRequest> = (0..100)
        .map(|i| EchoRequest {
            message: i.to_string(),
        })
        .collect();
    let expected: Vec<String> = (0..100).map(|i: i32| i.to_string()).collect();
    let reply = within(
        "client stream",
        grpc.client_stream(futures_util::stream::iter(messages)),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(reply.index, 100);
    assert_eq!(reply.message, expected.join(","));
}

/// Bidirectional streaming, in lock step: each reply arrives before the next request is
/// sent, so nothing on the way may wait for the end of a stream.
pub async fn check_bidi(addr: SocketAddr, authority: &str) {
    let mut grpc = client::grpc(addr, authority).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let requests =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(EchoRequest {
        message: "0".into(),
    })
    .await
    .unwrap();
    let mut replies = within("bidi", grpc.bidi(requests))
        .await
        .unwrap()
        .into_inner();
    for i in 0..50u64 {
        let reply = within("bidi reply", replies.next())
            .await
            .expect("the reply stream ended early")
            .unwrap();
        assert_eq!((reply.index, reply.message), (i, i.to_string()));
        if i < 49 {
            tx.send(EchoRequest {
                message: (i + 1).to_string(),
            })
            .await
            .unwrap();
        }
    }
    drop(tx);
    assert!(within("end of bidi", replies.next()).await.is_none());
}

fn failure() -> FailRequest {
    FailRequest {
        code: Code::FailedPrecondition as i32,
        message: "not now: ñandú 100%".into(),
        trailers: [
            ("x-custom-trailer".to_string(), "v1".to_string()),
            ("x-retry-hint".to_string(), "later".to_string()),
        ]
        .into_iter()
        .collect(),
    }
}

fn assert_failure(status: &tonic::Status) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "not now: ñandú 100%", "{status:?}");
    assert_eq!(
        status.metadata().get("x-custom-trailer").unwrap(),
        "v1",
        "{status:?}"
    );
    assert_eq!(
        status.metadata().get("x-retry-hint").unwrap(),
        "later",
        "{status:?}"
    );
    assert!(
        status
            .metadata()
            .get(malla_proxy::error::ERROR_HEADER)
            .is_none(),
        "the upstream's status was replaced by the proxy's: {status:?}"
    );
}

/// A non-OK status with trailing metadata: trailers-only (unary) and after data (stream).
pub async fn check_failures(addr: SocketAddr, authority: &str) {
    let mut grpc = client::grpc(addr, authority).await.unwrap();
    let status = within("fail", grpc.fail(failure())).await.unwrap_err();
    assert_failure(&status);

    let request = StreamRequest {
        message: "before failing".into(),
        count: 10,
        fail: Some(failure()),
        fail_after: 3,
    };
    let mut stream = within("failing stream", grpc.server_stream(request))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        let reply = within("next", stream.next()).await.unwrap().unwrap();
        assert_eq!(reply.index, i);
    }
    let status = within("status", stream.next())
        .await
        .expect("the stream ended without its status")
        .unwrap_err();
    assert_failure(&status);
}

fn proxy_to(peer: &GrpcPeer) -> TestProxy {
    TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .http_proxy()
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary() {
    let peer = GrpcPeer::start("grpc-echo");
    let proxy = proxy_to(&peer);
    check_unary(proxy.outbound(), "echo", "grpc-echo").await;
    check_unary(proxy.http_proxy(), "echo", "grpc-echo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming() {
    let peer = GrpcPeer::start("grpc-echo");
    let proxy = proxy_to(&peer);
    check_server_stream(proxy.outbound(), "echo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streaming() {
    let peer = GrpcPeer::start("grpc-echo");
    let proxy = proxy_to(&peer);
    check_client_stream(proxy.outbound(), "echo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_streaming() {
    let peer = GrpcPeer::start("grpc-echo");
    let proxy = proxy_to(&peer);
    check_bidi(proxy.outbound(), "echo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_status_and_trailing_metadata_arrive_intact() {
    let peer = GrpcPeer::start("grpc-echo");
    let proxy = proxy_to(&peer);
    check_failures(proxy.outbound(), "echo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_calls_multiplex_on_one_channel() {
    let peer = GrpcPeer::start("grpc-echo");
    let proxy = proxy_to(&peer);
    let grpc = client::grpc(proxy.outbound(), "echo").await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let mut grpc = grpc.clone();
        calls.spawn(async move {
            let reply = within(
                "unary",
                grpc.unary(EchoRequest {
                    message: format!("call {i}"),
                }),
            )
            .await
            .unwrap()
            .into_inner();
            assert_eq!(reply.message, format!("call {i}"));
        });
    }
    while let Some(c) = calls.join_next().await {
        c.expect("a call panicked");
    }
    assert_eq!(peer.requests(), 50);
}
