//! The harness tested on its own, without the proxy's HTTP paths: peers answer as
//! documented when called directly, clients and parsers read what they should, the
//! macros behave, and a proxy starts on ephemeral ports and stops.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Method, Version};
use malla_tests::{
    assert_eventually, body,
    client::{self, raw::exchange, raw::RawConn, within, Http1, Http2},
    cross_version::Flavor,
    peers::{dead_addr, misbehaving::RawPeer, HttpPeer, TcpPeer, WebSocketPeer},
    proxy::{admin, TestProxy},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::Message;

/// A direct client of either HTTP version.
enum Conn {
    H1(Http1),
    H2(Http2),
}

impl Conn {
    async fn connect(addr: std::net::SocketAddr, version: Version) -> Self {
        if version == Version::HTTP_2 {
            Conn::H2(Http2::connect(addr).await.unwrap())
        } else {
            Conn::H1(Http1::connect(addr).await.unwrap())
        }
    }

    async fn send(&mut self, req: http::Request<body::Body>) -> client::Collected {
        let response = match self {
            Conn::H1(c) => within("request", c.send(req)).await.unwrap(),
            Conn::H2(c) => within("request", c.send(req)).await.unwrap(),
        };
        client::collect(response).await.unwrap()
    }
}

async fn check_http_peer(peer: &HttpPeer, version: Version) {
    let mut conn = Conn::connect(peer.addr(), version).await;
    let mut req = client::post(version, "peer", "/p?q=1", "echo me");
    req.headers_mut().insert("x-test", "1".parse().unwrap());
    let got = conn.send(req).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "echo me");
    assert_eq!(got.header("x-peer"), Some(peer.name()));
    assert_eq!(got.header("x-echo-path"), Some("/p?q=1"));
    assert_eq!(got.header("x-echo-method"), Some("POST"));
    assert_eq!(got.header("x-echo-h-x-test"), Some("1"));
    let expected_version = format!("{version:?}");
    assert_eq!(
        got.header("x-echo-version"),
        Some(expected_version.as_str())
    );

    let mut req = client::get(version, "peer", "/status");
    req.headers_mut()
        .insert("x-want-status", "418".parse().unwrap());
    assert_eq!(conn.send(req).await.status, 418);
    peer.set_status(503);
    assert_eq!(
        conn.send(client::get(version, "peer", "/")).await.status,
        503
    );
    peer.set_status(200);

    let mut req = client::get(version, "peer", "/bytes");
    req.headers_mut()
        .insert("x-want-bytes", "300000".parse().unwrap());
    req.headers_mut()
        .insert("x-want-trailers", "1".parse().unwrap());
    // hyper's HTTP/1 server sends trailers only to clients that accept them.
    req.headers_mut().insert("te", "trailers".parse().unwrap());
    let got = conn.send(req).await;
    assert_eq!(got.body.len(), 300_000);
    assert_eq!(crc32fast::hash(&got.body), body::generated_crc(300_000));
    let trailers = got.trailers.expect("trailers");
    assert_eq!(trailers.get("x-body-bytes").unwrap(), "300000");

    let (upload, digest) = body::generated(1_000_003, None);
    let got = conn
        .send(client::request(
            version,
            Method::POST,
            "peer",
            "/count",
            upload,
        ))
        .await;
    assert_eq!(got.header("x-body-bytes"), Some("1000003"));
    assert_eq!(
        got.header("x-body-crc32"),
        Some(digest.crc().to_string().as_str())
    );
    assert_eq!(digest.crc(), body::generated_crc(1_000_003));

    assert_eq!(peer.requests(), 5);
    assert_eq!(peer.seen()[0], "POST /p?q=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_peer_answers_as_documented() {
    let peer = HttpPeer::http1("h1");
    check_http_peer(&peer, Version::HTTP_11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_peer_answers_as_documented() {
    let peer = HttpPeer::http2("h2");
    check_http_peer(&peer, Version::HTTP_2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_peer_releases_requests() {
    let peer = HttpPeer::http1("held");
    peer.state().hold();
    let addr = peer.addr();
    let call = tokio::spawn(async move {
        let mut conn = Http1::connect(addr).await.unwrap();
        let response = conn
            .send(client::get(Version::HTTP_11, "p", "/"))
            .await
            .unwrap();
        response.status().as_u16()
    });
    assert_eventually!(peer.requests() == 1);
    assert!(!call.is_finished());
    peer.state().release();
    assert_eq!(call.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_peer_answers_every_shape() {
    let peer = malla_tests::peers::GrpcPeer::start("grpc");
    crate::grpc::check_unary(peer.addr(), "grpc", "grpc").await;
    crate::grpc::check_server_stream(peer.addr(), "grpc").await;
    crate::grpc::check_client_stream(peer.addr(), "grpc").await;
    crate::grpc::check_bidi(peer.addr(), "grpc").await;
    crate::grpc::check_failures(peer.addr(), "grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_version_clients_reach_their_peers_directly() {
    for flavor in Flavor::ALL {
        let peer = flavor.peer("direct");
        let mut client = flavor.client(peer.addr(), "direct");
        let outcome = client.call("hi").await;
        assert_eq!(outcome.assert_ok(), "direct", "{flavor:?}");
        assert_eq!(outcome.message, "hi", "{flavor:?}");
        let mut refused = flavor.client(dead_addr(), "x");
        assert!(refused.call("hi").await.failure.is_some(), "{flavor:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_peer_echoes() {
    let peer = WebSocketPeer::start("ws");
    let (mut ws, response) = client::websocket(peer.addr(), "ws", "/").await.unwrap();
    assert_eq!(response.headers().get("x-peer").unwrap(), "ws");
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.close(None).await.unwrap();
    assert_eq!(peer.handshakes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_peers_echo_and_greet() {
    let peer = TcpPeer::echo();
    let mut s = TcpStream::connect(peer.addr()).await.unwrap();
    s.write_all(b"\x00hello").await.unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"\x00hello");
    assert_eq!(peer.bytes(), 6);

    let peer = TcpPeer::greeting(b"hi\r\n");
    let mut s = TcpStream::connect(peer.addr()).await.unwrap();
    let mut greeting = [0u8; 4];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hi\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_peers_misbehave() {
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    let truncating = RawPeer::truncating();
    let (mut conn, r) = exchange(truncating.addr(), req).await;
    let r = r.expect("a head");
    assert_eq!((r.status, r.complete, r.body.len()), (200, false, 10));
    assert!(conn.closed().await);

    let closing = RawPeer::close_after_request();
    let (_, r) = exchange(closing.addr(), req).await;
    assert!(r.is_none());
    assert_eq!(closing.requests(), 1);

    let garbage = RawPeer::malformed();
    let mut conn = RawConn::connect(garbage.addr()).await;
    conn.send(req).await;
    assert_eventually!(garbage.requests() == 1);

    let silent = RawPeer::silent();
    let _conn = RawConn::connect(silent.addr()).await;
    assert_eventually!(silent.connections() == 1);

    let canned = RawPeer::canned(b"HTTP/1.1 204 No Content\r\n\r\n");
    let mut conn = RawConn::connect(canned.addr()).await;
    conn.send(req).await;
    conn.send(req).await;
    assert_eq!(conn.response().await.expect("first").status, 204);
    assert_eq!(conn.response().await.expect("second").status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_stop_when_dropped() {
    let peer = HttpPeer::http1("gone");
    let addr = peer.addr();
    let mut conn = Http1::connect(addr).await.unwrap();
    drop(peer);
    assert_eventually!(TcpStream::connect(addr).await.is_err(), "still accepting");
    // Open connections are cut too.
    let result = within(
        "request",
        conn.send(client::get(Version::HTTP_11, "x", "/")),
    )
    .await;
    assert!(result.is_err(), "a dropped peer still answered");
}

#[tokio::test]
async fn assert_eventually_waits_for_the_condition() {
    let mut tries = 0;
    assert_eventually!(
        {
            tries += 1;
            tries == 5
        },
        "never reached 5"
    );
    assert_eq!(tries, 5);
}

#[tokio::test]
#[should_panic(expected = "gave up")]
async fn assert_eventually_gives_up() {
    assert_eventually!(tries: 3, false, "gave up");
}

#[test]
fn metric_parser_matches_labels() {
    let text = "# HELP x_total a\n# TYPE x counter\n\
                x_total{upstream=\"a\",status_class=\"2xx\"} 3\n\
                x_total{upstream=\"a\",status_class=\"5xx\"} 1\n\
                x_total{upstream=\"b\",status_class=\"2xx\"} 7\n\
                y 2.5\n";
    assert_eq!(
        admin::metric(text, "x_total", &[("upstream", "a")]),
        Some(4.0)
    );
    assert_eq!(
        admin::metric(
            text,
            "x_total",
            &[("upstream", "b"), ("status_class", "2xx")]
        ),
        Some(7.0)
    );
    assert_eq!(admin::metric(text, "x_total", &[("upstream", "c")]), None);
    assert_eq!(admin::metric(text, "y", &[]), Some(2.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_starts_on_ephemeral_ports_and_stops() {
    let peer = HttpPeer::http1("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .outbound("echo")
        .http_proxy()
        .admin()
        .start();
    let bound = proxy.bound().clone();
    let mut ports: Vec<u16> = bound.outbound.iter().map(|a| a.port()).collect();
    ports.extend([proxy.http_proxy().port(), proxy.admin().port()]);
    assert!(ports.iter().all(|p| *p != 0), "{bound:?}");
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 4, "listeners share a port: {bound:?}");
    for addr in [
        proxy.outbound_at(0),
        proxy.outbound_at(1),
        proxy.http_proxy(),
    ] {
        TcpStream::connect(addr).await.unwrap();
    }
    assert_eq!(admin::status(proxy.admin(), "/live").await, 200);
    let admin_addr = proxy.admin();
    let outbound = proxy.outbound();
    within("stop", proxy.stop()).await;
    assert!(
        TcpStream::connect(outbound).await.is_err(),
        "still listening after stop"
    );
    assert_eq!(admin::status(admin_addr, "/live").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_rejects_an_invalid_configuration() {
    let result = std::panic::catch_unwind(|| {
        TestProxy::builder()
            .upstream("Bad_Name", &[dead_addr()])
            .outbound("missing")
            .start()
    });
    let message = match result {
        Ok(_) => panic!("an invalid configuration started"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(message.contains("Bad_Name"), "{message}");
    assert!(message.contains("missing"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_do_not_block_other_peers() {
    // Guards the peers' independence that balancing tests rely on.
    let slow = HttpPeer::http1("slow");
    let fast = HttpPeer::http1("fast");
    slow.set_delay(Duration::from_secs(60));
    let slow_addr = slow.addr();
    let pending = tokio::spawn(async move {
        let mut c = Http1::connect(slow_addr).await.unwrap();
        let _ = c.send(client::get(Version::HTTP_11, "s", "/")).await;
    });
    assert_eventually!(slow.requests() == 1);
    let mut c = Http1::connect(fast.addr()).await.unwrap();
    let r = within("fast", c.send(client::get(Version::HTTP_11, "f", "/")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    pending.abort();
}
