//! A hanging endpoint is reported: an upstream that accepts and never answers leaves
//! calls waiting with no progress; the sidecar's stall check (once a second, on the
//! `malla-resilience` thread) reports `endpoint-stalled` with how many calls wait and
//! for how long, sets `upstream_endpoints_stalled`, sends the event to the control plane,
//! and reports `endpoint-recovered` when the endpoint answers again. Over HTTP/1 and over
//! opaque TCP (no timeout: bytes sent and none back).

use std::{net::SocketAddr, time::Duration};

use http::Version;
use malla_control::events::EventFilter;
use malla_proxy::{
    config::{ControlPlaneConfig, ListenerProtocol},
    resilience::events::EventKind,
};
use malla_tests::{
    assert_eventually,
    client::{self, Http1},
    control::TestControl,
    identity::joining,
    peers::HttpPeer,
    proxy::{admin, TestProxy},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn details(proxy: &TestProxy, kind: EventKind) -> Vec<String> {
    proxy
        .events()
        .into_iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.detail)
        .collect()
}

fn stalled_gauge(proxy: &TestProxy) -> Option<f64> {
    admin::metric(
        &proxy.metrics_text(),
        "malla_proxy_upstream_endpoints_stalled",
        &[("upstream", "echo")],
    )
}

/// One GET through the proxy, on its own connection, in the background (it may wait
/// for as long as the test lasts).
fn spawn_get(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Ok(mut conn) = Http1::connect(addr).await {
            if let Ok(response) = conn.send(client::get(Version::HTTP_11, "echo", "/")).await {
                let _ = client::collect(response).await;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_endpoint_that_accepts_and_never_answers_is_reported_stalled_then_recovered() {
    let mut control = TestControl::start_without_dns().await;
    let peer = HttpPeer::http1("hung");
    peer.state().hold();
    // The per-try timeout of 4 s makes the stall threshold 2 s (half of it); retries and
    // ejections off, so the one endpoint keeps being called.
    // A sidecar of `frontend`, joined with a join token: its events are reported with its
    // certificate. No inbound listener: it registers an address nobody calls.
    let joined = ControlPlaneConfig {
        register_address: Some("127.0.0.1:4143".parse().unwrap()),
        ..joining(&control, "frontend").await
    };
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .policy(|p| {
            p.timeouts.per_try = Some(Duration::from_secs(4));
            p.retries.enabled = false;
            p.outlier.enabled = false;
        })
        .outbound("echo")
        .admin()
        .config(|c| c.control = Some(joined))
        .start();
    let out = proxy.outbound();

    // Calls keep coming and none is answered. (The proxy sends its events to the
    // control plane: they are read there.)
    let reported = |kind: &str| -> Vec<String> {
        control
            .events()
            .query(
                &EventFilter {
                    service: Some("echo".into()),
                    kind: Some(kind.into()),
                },
                10,
            )
            .into_iter()
            .map(|e| e.detail)
            .collect()
    };
    let mut calls = Vec::new();
    for _ in 0..3 {
        calls.push(spawn_get(out));
    }
    assert_eventually!(
        !reported("endpoint-stalled").is_empty(),
        "no endpoint-stalled event reached the control plane: {} {:?}",
        proxy.upstream("echo").state(),
        proxy.events()
    );
    // The check may look before the third call has started (a loaded machine).
    let detail = &reported("endpoint-stalled")[0];
    assert!(
        ["1 call waiting", "2 calls waiting", "3 calls waiting"]
            .iter()
            .any(|calls| detail.starts_with(calls))
            && detail.contains("waiting for a response head for at least")
            && detail.contains("nothing from it yet"),
        "{detail}"
    );
    assert_eq!(stalled_gauge(&proxy), Some(1.0));
    let config = admin::config(proxy.admin()).await;
    assert_eq!(config["upstreams"][0]["endpoints"][0]["stalled"], true);

    // It answers again: recovered. On a loaded machine the held calls may have reached
    // their per-try timeout before the stall was seen at the control plane; a new call
    // is the progress that ends the stall either way.
    peer.state().release();
    calls.push(spawn_get(out));
    assert_eventually!(
        !reported("endpoint-recovered").is_empty(),
        "no endpoint-recovered event reached the control plane"
    );
    assert_eq!(stalled_gauge(&proxy), Some(0.0));
    assert_eq!(reported("endpoint-stalled").len(), 1, "reported once");
    for call in calls {
        let _ = call.await;
    }
    proxy.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_endpoint_that_reads_and_never_writes_is_reported_stalled() {
    // Accepts, reads whatever comes, writes nothing until the test says so.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = socket.read(&mut buf).await;
        let _ = answer_rx.await;
        let _ = socket.write_all(b"at last").await;
        // Keep the socket until the client is done.
        let _ = socket.read(&mut buf).await;
    });
    // A per-try timeout of 1 s: HTTP threshold 1 s, TCP four times that.
    let proxy = TestProxy::builder()
        .upstream("echo", &[addr])
        .policy(|p| p.timeouts.per_try = Some(Duration::from_secs(1)))
        .outbound_with("echo", ListenerProtocol::Tcp)
        .start();

    let mut stream = TcpStream::connect(proxy.outbound()).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    assert_eventually!(
        tries: 1000,
        !details(&proxy, EventKind::EndpointStalled).is_empty(),
        "no endpoint-stalled event"
    );
    let detail = &details(&proxy, EventKind::EndpointStalled)[0];
    assert!(
        detail.contains("1 open TCP stream sent bytes that got no answer for at least"),
        "{detail}"
    );

    answer_tx.send(()).unwrap();
    let mut got = [0u8; 7];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"at last");
    assert_eventually!(
        !details(&proxy, EventKind::EndpointRecovered).is_empty(),
        "no endpoint-recovered event"
    );
    drop(stream);
    let _ = server.await;
    proxy.stop().await;
}
