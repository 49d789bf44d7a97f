//! HTTP/2 (prior knowledge) through the proxy: multiplexed streams, bodies both ways,
//! trailers and the forwarding conventions.

use http::{Method, Version};
use malla_tests::{
    body,
    client::{self, within, Http2},
    peers::HttpPeer,
    proxy::TestProxy,
};

const V: Version = Version::HTTP_2;

fn proxy_to(peer: &HttpPeer) -> TestProxy {
    TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_on_one_connection() {
    let peer = HttpPeer::http2("echo");
    let proxy = proxy_to(&peer);
    let conn = Http2::connect(proxy.outbound()).await.unwrap();
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..32 {
        let conn = conn.clone();
        streams.spawn(async move {
            let data = format!("stream {i} ").repeat(i + 1);
            let req = client::post(V, "echo", &format!("/stream/{i}"), data.clone());
            let response = within("stream", conn.send(req)).await.unwrap();
            let got = client::collect(response).await.unwrap();
            assert_eq!(got.status, 200);
            assert_eq!(got.version, Version::HTTP_2);
            assert_eq!(
                got.header("x-echo-path"),
                Some(format!("/stream/{i}").as_str())
            );
            assert_eq!(got.text(), data);
        });
    }
    while let Some(s) = streams.join_next().await {
        s.expect("a stream task panicked");
    }
    assert_eq!(peer.requests(), 32);
    assert!(!conn.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_is_spoken_to_in_http2_with_forwarding_headers() {
    let peer = HttpPeer::http2("echo");
    let proxy = proxy_to(&peer);
    let conn = Http2::connect(proxy.outbound()).await.unwrap();
    let mut req = client::get(V, "echo", "/headers");
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    req.headers_mut()
        .insert("x-end-to-end", "kept".parse().unwrap());
    let got = client::collect(within("request", conn.send(req)).await.unwrap())
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-echo-version"), Some("HTTP/2.0"));
    assert_eq!(got.header("x-echo-authority"), Some("echo"));
    assert_eq!(
        got.header("x-echo-h-x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(got.header("x-echo-h-via"), Some("2 malla"));
    assert_eq!(got.header("x-echo-h-x-end-to-end"), Some("kept"));
    assert_eq!(got.header("via"), Some("2 malla"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_both_ways() {
    let peer = HttpPeer::http2("echo");
    let proxy = proxy_to(&peer);
    let conn = Http2::connect(proxy.outbound()).await.unwrap();

    let len: u64 = 32 * 1024 * 1024 + 3;
    let (upload, digest) = body::generated(len, None);
    let req = client::request(V, Method::POST, "echo", "/count", upload);
    let got = client::collect(within("upload", conn.send(req)).await.unwrap())
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-body-bytes"), Some(len.to_string().as_str()));
    assert_eq!(
        got.header("x-body-crc32"),
        Some(digest.crc().to_string().as_str())
    );

    let mut req = client::get(V, "echo", "/download");
    req.headers_mut().insert("x-want-bytes", len.into());
    let response = within("download", conn.send(req)).await.unwrap();
    assert_eq!(response.status(), 200);
    let got = within("download body", body::consume(response.into_body()))
        .await
        .unwrap();
    assert_eq!((got.bytes, got.crc), (len, body::generated_crc(len)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_the_client() {
    let peer = HttpPeer::http2("echo");
    let proxy = proxy_to(&peer);
    let conn = Http2::connect(proxy.outbound()).await.unwrap();
    let mut req = client::post(V, "echo", "/trailers", "some data");
    req.headers_mut()
        .insert("x-want-trailers", "1".parse().unwrap());
    let got = client::collect(within("request", conn.send(req)).await.unwrap())
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "some data");
    let trailers = got.trailers.expect("the trailers were dropped");
    assert_eq!(trailers.get("x-peer-trailer").unwrap(), "echo");
    assert_eq!(trailers.get("x-body-bytes").unwrap(), "9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_reach_the_upstream() {
    let peer = HttpPeer::http2("echo");
    let proxy = proxy_to(&peer);
    let conn = Http2::connect(proxy.outbound()).await.unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-trailer", "yes".parse().unwrap());
    let (upload, _) = body::generated(100_000, Some(trailers));
    let req = client::request(V, Method::POST, "echo", "/count", upload);
    let got = client::collect(within("upload", conn.send(req)).await.unwrap())
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-body-bytes"), Some("100000"));
    assert_eq!(got.header("x-body-trailers"), Some("x-client-trailer=yes"));
}

/// A client connection with no stream for `client_idle_timeout` gets GOAWAY and closes,
/// as an HTTP/1 one does; a stream still at work (here a request body still arriving)
/// keeps it open and taking new streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed_but_not_while_a_stream_is_at_work() {
    let peer = HttpPeer::http2("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .limits(|l| l.client_idle_timeout = std::time::Duration::from_millis(200))
        .start();
    let conn = Http2::connect(proxy.outbound()).await.unwrap();
    let response = within("request", conn.send(client::get(V, "echo", "/")))
        .await
        .unwrap();
    assert_eq!(client::collect(response).await.unwrap().status, 200);
    malla_tests::assert_eventually!(conn.is_closed(), "the idle connection was never closed");

    // A request whose body is still arriving after the timeout: the connection stays.
    use http_body_util::BodyExt as _;
    let conn = Http2::connect(proxy.outbound()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<http_body::Frame<bytes::Bytes>, malla_tests::BoxError>,
    >(4);
    let frames =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let streaming = http_body_util::StreamBody::new(frames).boxed();
    let req = client::request(V, Method::POST, "echo", "/count", streaming);
    let pending = tokio::spawn({
        let conn = conn.clone();
        async move { conn.send(req).await }
    });
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
        b"first ",
    ))))
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    // No GOAWAY was sent: the connection still takes new streams.
    let another = within("request", conn.send(client::get(V, "echo", "/"))).await;
    assert_eq!(
        client::collect(another.expect("a new stream on the busy connection"))
            .await
            .unwrap()
            .status,
        200
    );
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
        b"last",
    ))))
    .await
    .unwrap();
    drop(tx);
    let response = within("request", pending).await.unwrap().unwrap();
    let got = client::collect(response).await.unwrap();
    assert_eq!(got.header("x-body-bytes"), Some("10"));
}
