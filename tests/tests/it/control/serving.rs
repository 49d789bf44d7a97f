//! How the control plane serves: both APIs (HTTP/JSON and gRPC) on each of its ports, a
//! 405 that lists the methods, the request head timeout (half-sent requests and idle HTTP/1
//! connections are closed; gRPC watches are not), and the connection limit.

use std::{net::SocketAddr, time::Duration};

use malla_api::{pb, RegistryClient};
use malla_control::serving::ServeSettings;
use malla_tests::control::tls::{self, OperatorChannel};
use malla_tests::{assert_eventually, client::within, control::api::Api, control::TestControl};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

async fn grpc(control: &TestControl, addr: SocketAddr) -> RegistryClient<OperatorChannel> {
    RegistryClient::new(control.operator_channel_to(addr).await)
}

fn registration(service: &str, id: &str, port: u32) -> pb::RegisterRequest {
    pb::RegisterRequest {
        mtls: false,
        service: service.into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port,
        protocol: pb::Protocol::Http.into(),
        labels: Default::default(),
        ttl_seconds: 30,
    }
}

/// The ids in the first message of a watch (its snapshot).
async fn snapshot_ids(stream: &mut tonic::Streaming<pb::WatchResponse>) -> Vec<String> {
    let message = within("the watch's snapshot", stream.message())
        .await
        .expect("the watch failed")
        .expect("the watch ended");
    match message.event {
        Some(pb::watch_response::Event::Snapshot(s)) => {
            s.instances.into_iter().map(|i| i.id).collect()
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

/// Waits until the server closes `stream` (EOF or a reset), reading and discarding what
/// it sends; panics if it stays open for 20 s.
async fn closed_by_server(stream: &mut (impl AsyncRead + Unpin)) {
    let mut buf = [0u8; 4096];
    within("the server closing the connection", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apis_answer_on_both_ports() {
    let control = TestControl::start_without_dns().await;
    // gRPC on the HTTP port: register, and a watch sees it.
    let mut client = grpc(&control, control.http_addr()).await;
    client
        .register(registration("orders", "o-1", 8080))
        .await
        .expect("register over gRPC on the HTTP port");
    let mut watch = client
        .watch(pb::WatchRequest {
            service: "orders".into(),
            selector: String::new(),
        })
        .await
        .expect("watch over gRPC on the HTTP port")
        .into_inner();
    assert_eq!(snapshot_ids(&mut watch).await, ["o-1"]);

    // HTTP on the gRPC port, and on the HTTP port.
    for addr in [control.grpc_addr(), control.http_addr()] {
        let api = Api::new(addr).with_credentials_of(control.data_dir());
        let instances = api.instance_ids("orders", "").await;
        assert_eq!(instances, ["o-1"], "HTTP on {addr}");
    }

    // gRPC on the gRPC port, as sidecars of earlier versions call it.
    let mut old = grpc(&control, control.grpc_addr()).await;
    old.register(registration("orders", "o-2", 8081))
        .await
        .expect("register over gRPC on the gRPC port");
    let update = within("the watch's update", watch.message())
        .await
        .expect("the watch failed")
        .expect("the watch ended");
    match update.event {
        Some(pb::watch_response::Event::Update(u)) => {
            let ids: Vec<_> = u.upserted.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(ids, ["o-2"]);
        }
        other => panic!("expected an update, got {other:?}"),
    }
}

/// An HTTP/1.1 connection over TLS to `control` at `addr`, verified as a client of the
/// API does (with its trust bundle).
async fn https1(
    control: &TestControl,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config = tls::client_config(&control.trust_bundle_path(), None, b"http/1.1")
        .expect("a client configuration");
    tls::connect(addr, config).await.expect("a TLS connection")
}

/// Sends raw bytes over TLS, reads the answer to the end (the request asks to close).
async fn raw(control: &TestControl, addr: SocketAddr, request: &str) -> String {
    let mut stream = https1(control, addr).await;
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    within("the answer", stream.read_to_end(&mut answer))
        .await
        .expect("read the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_405_lists_the_methods_in_its_allow_header_and_its_message() {
    let control = TestControl::start_without_dns().await;
    // With the operator token: without it the answer is a 401 (it comes first).
    let token = malla_tests::control::api::operator_token(control.data_dir()).unwrap();
    let answer = raw(
        &control,
        control.http_addr(),
        &format!("POST /v1/services/orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 405"), "{answer}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\nallow: get,head,put,delete"), "{answer}");
    assert!(head.contains("content-type: application/json"), "{answer}");
    let json: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(json["error"]["code"], "method_not_allowed", "{answer}");
    assert_eq!(
        json["error"]["message"],
        "/v1/services/orders does not take POST; it takes GET,HEAD,PUT,DELETE (see docs/control.md)"
    );
}

fn short_head_timeout() -> ServeSettings {
    ServeSettings {
        head_timeout: Duration::from_secs(1),
        ..ServeSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_after_the_head_timeout() {
    let control = TestControl::start_serving(short_head_timeout()).await;
    let addr = control.http_addr();
    let starts: [&[u8]; 4] = [
        b"",
        b"GET /v1/status HTTP/1.1\r\nhost: x\r\n",
        b"PUT /v1/services/orders HTTP/1.1\r\nhost: x\r\ncontent-le",
        // Half an HTTP/2 preface: the protocol is not even known yet.
        b"PRI * HTTP/2.0\r\n",
    ];
    let mut slow = Vec::new();
    for i in 0..200 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(starts[i % starts.len()])
            .await
            .expect("send");
        slow.push(stream);
    }
    // Meanwhile, complete requests are served.
    control.api().get("/v1/status").await.ok();
    for stream in &mut slow {
        closed_by_server(stream).await;
    }
    control.api().get("/v1/status").await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_connection_is_closed_after_the_head_timeout_but_a_grpc_watch_is_not() {
    let control = TestControl::start_serving(short_head_timeout()).await;
    // A watch, held over several head timeouts.
    let mut client = grpc(&control, control.http_addr()).await;
    let mut watch = client
        .watch(pb::WatchRequest {
            service: "orders".into(),
            selector: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    assert!(snapshot_ids(&mut watch).await.is_empty());

    // A kept-alive HTTP/1 connection (over TLS, as clients of the API connect), idle after
    // one answer.
    let mut idle = https1(&control, control.http_addr()).await;
    idle.write_all(b"GET /live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("send");
    let mut buf = [0u8; 1024];
    let n = within("the answer", idle.read(&mut buf))
        .await
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    closed_by_server(&mut idle).await;
    // Three more head timeouts: the watch still delivers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    client
        .register(registration("orders", "o-1", 8080))
        .await
        .expect("register");
    let update = within("the watch's update", watch.message())
        .await
        .expect("the watch failed")
        .expect("the watch ended");
    assert!(
        matches!(update.event, Some(pb::watch_response::Event::Update(_))),
        "{update:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let control = TestControl::start_serving(ServeSettings {
        max_connections: 4,
        ..ServeSettings::default()
    })
    .await;
    // Both ports share the limit: two connections on each.
    let mut held = Vec::new();
    for addr in [control.http_addr(), control.grpc_addr()] {
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.expect("connect"));
        }
    }
    // A connection is counted once accepted: wait until the four are, by the fifth's fate.
    for addr in [control.http_addr(), control.grpc_addr()] {
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let _ = extra
            .write_all(b"GET /live HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = within(
            "the server closing the fifth",
            extra.read_to_end(&mut answer),
        )
        .await;
        assert!(
            answer.is_empty(),
            "served beyond the limit: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    // One leaves: a new client is served again.
    held.pop();
    assert_eventually!(
        control
            .api()
            .try_request(http::Method::GET, "/live", "")
            .await
            .is_ok_and(|r| r.status == 200),
        "no connection was served after one of the four closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_64_kib_is_refused_with_431() {
    let control = TestControl::start_without_dns().await;
    let request = format!(
        "GET /v1/status HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let mut stream = TcpStream::connect(control.http_addr())
        .await
        .expect("connect");
    // The server may answer and close before it has read everything: a failed write is fine.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = within("the answer", stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}
