//! HTTP/1.1 through the proxy: methods and bodies, keep-alive, pipelining, chunked
//! transfer, trailers, large bodies and the forwarding conventions (RFC 9110 §7.6).

use http::{Method, Version};
use malla_tests::{
    body,
    client::{self, raw::RawConn, within, Http1},
    peers::{misbehaving::RawPeer, HttpPeer},
    proxy::TestProxy,
};

const V: Version = Version::HTTP_11;

fn proxy_to(peer: &HttpPeer) -> TestProxy {
    TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_with_body() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    let mut conn = Http1::connect(proxy.outbound()).await.unwrap();

    let response = within("GET", conn.send(client::get(V, "echo", "/hello?x=1")))
        .await
        .unwrap();
    let got = client::collect(response).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-peer"), Some("echo"));
    assert_eq!(got.header("x-echo-method"), Some("GET"));
    assert_eq!(got.header("x-echo-path"), Some("/hello?x=1"));
    assert_eq!(got.header("x-echo-version"), Some("HTTP/1.1"));
    assert!(got.body.is_empty());

    let data = "a body with some bytes in it".repeat(100);
    let response = within(
        "POST",
        conn.send(client::post(V, "echo", "/submit", data.clone())),
    )
    .await
    .unwrap();
    let got = client::collect(response).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-echo-method"), Some("POST"));
    assert_eq!(got.text(), data);
    let content_length = data.len().to_string();
    assert_eq!(
        got.header("x-echo-h-content-length"),
        Some(content_length.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_the_client_connection() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    // One client connection, several requests one after another.
    let mut conn = Http1::connect(proxy.outbound()).await.unwrap();
    for i in 0..10 {
        let path = format!("/req/{i}");
        let response = within("request", conn.send(client::get(V, "echo", &path)))
            .await
            .unwrap();
        let got = client::collect(response).await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.header("x-echo-path"), Some(path.as_str()));
        assert!(
            !conn.is_closed(),
            "the proxy closed a keep-alive connection after request {i}"
        );
    }
    assert_eq!(peer.requests(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_get_in_order_responses() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    let mut conn = RawConn::connect(proxy.outbound()).await;
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.extend_from_slice(
            format!("GET /pipelined/{i} HTTP/1.1\r\nHost: echo\r\n\r\n").as_bytes(),
        );
    }
    batch.extend_from_slice(
        b"POST /pipelined/5 HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nhello",
    );
    conn.send(&batch).await;
    for i in 0..6 {
        let response = conn
            .response()
            .await
            .unwrap_or_else(|| panic!("the connection closed before response {i}"));
        assert_eq!(response.status, 200, "{response:?}");
        let path = format!("/pipelined/{i}");
        assert_eq!(
            response.header("x-echo-path"),
            Some(path.as_str()),
            "out of order"
        );
    }
    assert_eq!(peer.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_is_streamed_and_counted() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    let mut conn = Http1::connect(proxy.outbound()).await.unwrap();
    // No content-length: hyper sends it chunked.
    let len = 8 * 1024 * 1024 + 17;
    let (upload, digest) = body::generated(len, None);
    let req = client::request(V, Method::POST, "echo", "/count", upload);
    let response = within("upload", conn.send(req)).await.unwrap();
    let got = client::collect(response).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-echo-h-transfer-encoding"), Some("chunked"));
    assert_eq!(got.header("x-body-bytes"), Some(len.to_string().as_str()));
    assert_eq!(
        got.header("x-body-crc32"),
        Some(digest.crc().to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_is_streamed() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    let mut conn = Http1::connect(proxy.outbound()).await.unwrap();
    let len: u64 = 64 * 1024 * 1024;
    let mut req = client::get(V, "echo", "/download");
    req.headers_mut().insert("x-want-bytes", len.into());
    let response = within("download", conn.send(req)).await.unwrap();
    assert_eq!(response.status(), 200);
    let got = within("download body", body::consume(response.into_body()))
        .await
        .unwrap();
    assert_eq!(got.bytes, len);
    assert_eq!(got.crc, body::generated_crc(len));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_of_a_chunked_response_reach_the_client() {
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\n\r\n";
    let upstream = RawPeer::canned(RESPONSE);
    let proxy = TestProxy::builder()
        .upstream("echo", &[upstream.addr()])
        .outbound("echo")
        .start();
    let mut conn = Http1::connect(proxy.outbound()).await.unwrap();
    for _ in 0..2 {
        let mut req = client::get(V, "echo", "/trailers");
        req.headers_mut().insert("te", "trailers".parse().unwrap());
        let response = within("request", conn.send(req)).await.unwrap();
        let got = client::collect(response).await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "hello world");
        let trailers = got.trailers.expect("the trailers were dropped");
        assert_eq!(trailers.get("x-checksum").unwrap(), "abc123");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_follow_rfc_9110() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    let mut conn = RawConn::connect(proxy.outbound()).await;
    conn.send(
        b"GET /headers HTTP/1.1\r\n\
          Host: echo\r\n\
          X-Forwarded-For: 203.0.113.9\r\n\
          Via: 1.0 fred\r\n\
          Connection: keep-alive, X-Hop\r\n\
          X-Hop: must not cross\r\n\
          Keep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\n\
          X-End-To-End: kept\r\n\r\n",
    )
    .await;
    let r = conn.response().await.expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("x-echo-h-x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(r.header("x-echo-h-via"), Some("1.0 fred, 1.1 malla"));
    assert_eq!(r.header("x-echo-h-x-end-to-end"), Some("kept"));
    assert_eq!(r.header("x-echo-h-host"), Some("echo"));
    for hop in ["x-hop", "keep-alive", "proxy-connection"] {
        let echoed = format!("x-echo-h-{hop}");
        assert_eq!(r.header(&echoed), None, "{hop} crossed the proxy: {r:?}");
    }
    // The response carries the proxy's Via too.
    assert_eq!(r.header("via"), Some("1.1 malla"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_status_and_connection_close() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    let mut conn = RawConn::connect(proxy.outbound()).await;
    conn.send(b"GET /missing HTTP/1.1\r\nHost: echo\r\nX-Want-Status: 404\r\n\r\n")
        .await;
    let r = conn.response().await.expect("a response");
    assert_eq!(r.status, 404);
    assert_eq!(
        r.cause(),
        None,
        "an upstream 404 is not a proxy error: {r:?}"
    );
    // A client's `Connection: close` ends the connection after its response.
    conn.send(b"GET /last HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        .await;
    let r = conn.response().await.expect("a response");
    assert_eq!(r.status, 200);
    assert!(
        conn.closed().await,
        "the proxy kept the connection open after `Connection: close`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_client_is_answered() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    let mut conn = RawConn::connect(proxy.outbound()).await;
    conn.send(b"GET /old HTTP/1.0\r\nHost: echo\r\n\r\n").await;
    let r = conn.response().await.expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-echo-path"), Some("/old"));
    assert!(r.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_honoured() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    let mut conn = RawConn::connect(proxy.outbound()).await;
    conn.send(
        b"POST /continue HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    // The client waits for the interim response before it sends the body.
    let interim = conn.response().await.expect("a 100 Continue");
    assert_eq!(interim.status, 100, "{interim:?}");
    conn.send(b"hello").await;
    let r = conn.response().await.expect("the final response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "hello");
}

/// Responses without a body (to HEAD, 204, 304) leave the connection framed correctly:
/// the next response on it is read intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_responses_keep_framing() {
    let peer = HttpPeer::http1("echo");
    let proxy = proxy_to(&peer);
    let mut conn = RawConn::connect(proxy.outbound()).await;
    conn.send(b"HEAD /head HTTP/1.1\r\nHost: echo\r\nX-Want-Bytes: 1000\r\n\r\n")
        .await;
    let r = conn.head_response().await.expect("a response to HEAD");
    assert_eq!(r.status, 200, "{r:?}");
    for status in ["204", "304"] {
        let req =
            format!("GET /{status} HTTP/1.1\r\nHost: echo\r\nX-Want-Status: {status}\r\n\r\n");
        conn.send(req.as_bytes()).await;
        let r = conn.response().await.expect("a response");
        assert_eq!(r.status.to_string(), status, "{r:?}");
    }
    conn.send(b"POST /after HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nafter")
        .await;
    let r = conn.response().await.expect("a response");
    assert_eq!((r.status, r.text()), (200, "after".to_string()), "{r:?}");
    assert!(
        conn.pending().is_empty(),
        "stray bytes: {:?}",
        conn.pending()
    );
    assert_eq!(peer.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_listener_forwards_to_the_local_app() {
    let app = HttpPeer::http1("app");
    let proxy = TestProxy::builder()
        .inbound(app.addr(), malla_proxy::config::ListenerProtocol::Auto)
        .start();
    let mut conn = Http1::connect(proxy.inbound()).await.unwrap();
    let response = within(
        "inbound",
        conn.send(client::post(V, "app", "/in", "payload")),
    )
    .await
    .unwrap();
    let got = client::collect(response).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-peer"), Some("app"));
    assert_eq!(got.text(), "payload");
}
