//! Opaque TCP: a `tcp` listener never looks at the bytes; an `auto` listener sends what is
//! neither HTTP/1 nor HTTP/2 (or silence: server-speaks-first protocols) through as TCP.

use std::time::Duration;

use malla_proxy::config::ListenerProtocol;
use malla_tests::{
    assert_eventually,
    client::within,
    peers::{dead_addr, TcpPeer},
    proxy::TestProxy,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Writes `data` and reads the same number of bytes back.
async fn round_trip(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = stream.split();
    let mut back = vec![0u8; data.len()];
    let (wrote, read) = within("round trip", async {
        tokio::join!(w.write_all(data), r.read_exact(&mut back))
    })
    .await;
    wrote.unwrap();
    read.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_echoes_both_ways_and_half_closes() {
    let peer = TcpPeer::echo();
    let proxy = TestProxy::builder()
        .upstream("tcp-echo", &[peer.addr()])
        .outbound_with("tcp-echo", ListenerProtocol::Tcp)
        .start();
    let mut stream = TcpStream::connect(proxy.outbound()).await.unwrap();
    // HTTP-looking bytes are not inspected on a tcp listener.
    assert_eq!(
        round_trip(&mut stream, b"GET / HTTP/1.1\r\n\r\n").await,
        b"GET / HTTP/1.1\r\n\r\n"
    );
    let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    assert!(
        round_trip(&mut stream, &big).await == big,
        "4 MiB came back altered"
    );
    // Half-close: the peer sees EOF, closes, and the proxy passes the close back.
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("close", stream.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(peer.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_listener_passes_non_http_bytes_as_tcp() {
    let peer = TcpPeer::echo();
    let proxy = TestProxy::builder()
        .upstream("tcp-echo", &[peer.addr()])
        .outbound("tcp-echo")
        .start();
    for first in [
        &b"\x00hello"[..],
        b"\x16\x03\x01\x02\x00",
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ] {
        let mut stream = TcpStream::connect(proxy.outbound()).await.unwrap();
        assert_eq!(round_trip(&mut stream, first).await, first);
        assert_eq!(round_trip(&mut stream, b"and more").await, b"and more");
    }
    assert_eq!(peer.connections(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_listener_lets_the_server_speak_first() {
    let peer = TcpPeer::greeting(b"220 ready\r\n");
    let proxy = TestProxy::builder()
        .upstream("smtp", &[peer.addr()])
        .outbound("smtp")
        .limits(|l| l.detect_timeout = Duration::from_millis(200))
        .start();
    let mut stream = TcpStream::connect(proxy.outbound()).await.unwrap();
    let mut greeting = [0u8; 11];
    within("greeting", stream.read_exact(&mut greeting))
        .await
        .unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
    assert_eq!(round_trip(&mut stream, b"HELO x\r\n").await, b"HELO x\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_closes_the_client_connection() {
    let proxy = TestProxy::builder()
        .upstream("refused", &[dead_addr()])
        .outbound_with("refused", ListenerProtocol::Tcp)
        .upstream("empty", &[])
        .outbound_with("empty", ListenerProtocol::Tcp)
        .start();
    for i in 0..2 {
        let mut stream = TcpStream::connect(proxy.outbound_at(i)).await.unwrap();
        let _ = stream.write_all(b"hello").await;
        let mut rest = Vec::new();
        // EOF or reset, never a hang.
        let _ = within("close", stream.read_to_end(&mut rest)).await;
        assert!(rest.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tcp_streams_run_through_a_drain() {
    let peer = TcpPeer::echo();
    let proxy = TestProxy::builder()
        .upstream("tcp-echo", &[peer.addr()])
        .outbound_with("tcp-echo", ListenerProtocol::Tcp)
        .start();
    let addr = proxy.outbound();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    assert_eq!(round_trip(&mut stream, b"before").await, b"before");
    proxy.drain();
    assert_eventually!(
        TcpStream::connect(addr).await.is_err(),
        "new connections are still accepted while draining"
    );
    assert_eq!(round_trip(&mut stream, b"during").await, b"during");
    drop(stream);
    proxy.stop().await;
}
