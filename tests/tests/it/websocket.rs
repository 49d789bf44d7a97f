//! WebSocket: the HTTP/1 upgrade goes through the proxy, then frames flow both ways.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use malla_proxy::config::ListenerProtocol;
use malla_tests::{
    client::{self, within},
    peers::WebSocketPeer,
    proxy::TestProxy,
};
use tokio_tungstenite::tungstenite::Message;

async fn echo_through(addr: SocketAddr, host: &str) {
    let (mut ws, response) = within(
        "websocket handshake",
        client::websocket(addr, host, "/chat"),
    )
    .await
    .unwrap_or_else(|e| panic!("the WebSocket handshake through the proxy failed: {e}"));
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers().get("x-peer").unwrap(), "ws");
    for i in 0..20 {
        let text = Message::text(format!("message {i}"));
        within("send", ws.send(text.clone())).await.unwrap();
        let echoed = within("echo", ws.next())
            .await
            .expect("the stream ended")
            .unwrap();
        assert_eq!(echoed, text);
    }
    let big = Message::binary(vec![7u8; 256 * 1024]);
    within("send", ws.send(big.clone())).await.unwrap();
    let echoed = within("echo", ws.next())
        .await
        .expect("the stream ended")
        .unwrap();
    assert_eq!(echoed, big);
    within("close", ws.close(None)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_an_auto_listener() {
    let peer = WebSocketPeer::start("ws");
    let proxy = TestProxy::builder()
        .upstream("ws", &[peer.addr()])
        .outbound("ws")
        .start();
    echo_through(proxy.outbound(), "ws").await;
    assert_eq!(peer.handshakes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_http_listeners() {
    let peer = WebSocketPeer::start("ws");
    let proxy = TestProxy::builder()
        .upstream("ws", &[peer.addr()])
        .outbound_with("ws", ListenerProtocol::Http)
        .http_proxy()
        .start();
    echo_through(proxy.outbound(), "ws").await;
    echo_through(proxy.http_proxy(), "ws").await;
    assert_eq!(peer.handshakes(), 2);
}
