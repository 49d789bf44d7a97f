//! The HTTP/2 path against real peers: an in-process hyper h2c upstream on an ephemeral
//! port, the proxy started with `crate::start`, and a hyper h2 client (prior knowledge).
//! The resilience tests count what each upstream receives and use round-robin balancing,
//! so which endpoint a request meets first is known.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::{body::Incoming, client::conn::http2::SendRequest, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use malla_core::policy::{Fault, Outlier, Percent, Policy, Retries};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch, Barrier, Notify},
};

use crate::{
    config::{BalancerKind, ListenerProtocol, OutboundConfig, ProxyConfig, UpstreamConfig},
    resilience::{deadline::parse_grpc_timeout, outlier::State},
    ProxyHandle,
};

type TestBody = BoxBody<Bytes, io::Error>;

fn full(text: &'static str) -> TestBody {
    Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body fed frame by frame from the test.
struct ChannelBody(mpsc::Receiver<Result<Frame<Bytes>, io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.get_mut().0.poll_recv(cx)
    }
}

fn channel() -> (mpsc::Sender<Result<Frame<Bytes>, io::Error>>, TestBody) {
    let (tx, rx) = mpsc::channel(4);
    (tx, ChannelBody(rx).boxed())
}

fn data(text: &'static str) -> Result<Frame<Bytes>, io::Error> {
    Ok(Frame::data(Bytes::from_static(text.as_bytes())))
}

struct TestUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    kill: watch::Sender<()>,
}

impl TestUpstream {
    /// Drops every open connection, as a crashed or restarted upstream would.
    fn kill_connections(&self) {
        self.kill.send_replace(());
    }
}

/// An h2c server on 127.0.0.1:0 answering every request with `handler`.
async fn upstream<F, Fut>(handler: F) -> TestUpstream
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let (kill, killed) = watch::channel(());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let mut killed = killed.clone();
            killed.mark_unchanged();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = killed.changed() => {}
                }
            });
        }
    });
    TestUpstream {
        addr,
        connections,
        kill,
    }
}

fn proxy_with(upstream: UpstreamConfig) -> (ProxyHandle, SocketAddr) {
    start(config_for(upstream))
}

fn config_for(upstream: UpstreamConfig) -> ProxyConfig {
    ProxyConfig {
        outbound: vec![OutboundConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: upstream.name.clone(),
            protocol: ListenerProtocol::Http,
        }],
        upstreams: vec![upstream],
        workers: 1,
        drain_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

fn start(config: ProxyConfig) -> (ProxyHandle, SocketAddr) {
    let handle = crate::start(config).unwrap();
    let addr = handle.bound().outbound[0];
    (handle, addr)
}

fn proxy_to(addr: SocketAddr) -> (ProxyHandle, SocketAddr) {
    proxy_with(UpstreamConfig::new("svc", vec![addr.to_string()]))
}

async fn client(addr: SocketAddr) -> SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

fn get(path: &str) -> Request<TestBody> {
    Request::get(format!("http://svc.test{path}"))
        .body(empty())
        .unwrap()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).map_or("", |v| v.to_str().unwrap())
}

/// Bounds every test: a hang is a failure, not a stuck test run.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("test timed out")
}

#[tokio::test]
async fn forwards_a_request_with_forwarding_headers() {
    let up = upstream(|req: Request<Incoming>| async move {
        let h = req.headers();
        Response::builder()
            .header("seen-uri", req.uri().to_string())
            .header("seen-xff", header(h, "x-forwarded-for"))
            .header("seen-xfp", header(h, "x-forwarded-proto"))
            .header("seen-via", header(h, "via"))
            .header("seen-forwarded", header(h, "forwarded"))
            .body(full("hello"))
            .unwrap()
    })
    .await;
    let (proxy, addr) = proxy_to(up.addr);
    within(async {
        let mut c = client(addr).await;
        let req = Request::get("http://svc.test/a/b?c=d")
            .header("x-forwarded-for", "10.9.8.7")
            .header("forwarded", "for=10.9.8.7")
            .body(empty())
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(header(h, "seen-uri"), "http://svc.test/a/b?c=d");
        assert_eq!(header(h, "seen-xff"), "10.9.8.7, 127.0.0.1");
        assert_eq!(header(h, "seen-xfp"), "http");
        assert_eq!(header(h, "seen-via"), "2 malla");
        assert_eq!(
            header(h, "seen-forwarded"),
            "for=10.9.8.7, for=127.0.0.1;proto=http"
        );
        assert_eq!(header(h, "via"), "2 malla");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");

        // Without forwarding headers of its own, the request gets them from the proxy.
        let resp = c.send_request(get("/")).await.unwrap();
        assert_eq!(header(resp.headers(), "seen-xff"), "127.0.0.1");
        assert_eq!(header(resp.headers(), "seen-forwarded"), "");
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn streams_bodies_and_trailers_both_ways() {
    // Echoes each request frame as it arrives, then answers the request's trailers with its
    // own: a bidirectional stream, which only works if neither direction is buffered whole.
    let up = upstream(|req: Request<Incoming>| async move {
        let (tx, body) = channel();
        let mut incoming = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = incoming.frame().await {
                let echo = match frame.into_data() {
                    Ok(data) => Frame::data(data),
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        let mut out = HeaderMap::new();
                        out.insert("grpc-status", "0".parse().unwrap());
                        out.insert("echo", trailers["x-client-trailer"].clone());
                        Frame::trailers(out)
                    }
                };
                if tx.send(Ok(echo)).await.is_err() {
                    return;
                }
            }
        });
        Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    })
    .await;
    let (proxy, addr) = proxy_to(up.addr);
    within(async {
        let mut c = client(addr).await;
        let (tx, body) = channel();
        tx.send(data("one")).await.unwrap();
        let req = Request::post("http://svc.test/echo.Echo/Chat")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut rb = resp.into_body();
        let next = |f: Frame<Bytes>| f.into_data().unwrap();
        assert_eq!(next(rb.frame().await.unwrap().unwrap()), "one");
        tx.send(data("two")).await.unwrap();
        assert_eq!(next(rb.frame().await.unwrap().unwrap()), "two");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-client-trailer", "hi".parse().unwrap());
        tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
        drop(tx);
        let trailers = rb.frame().await.unwrap().unwrap().into_trailers().unwrap();
        assert_eq!(header(&trailers, "grpc-status"), "0");
        assert_eq!(header(&trailers, "echo"), "hi");
        assert!(rb.frame().await.is_none());
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn too_many_header_fields_is_431() {
    let up = upstream(|_req| async { Response::new(full("reached")) }).await;
    let mut config = config_for(UpstreamConfig::new("svc", vec![up.addr.to_string()]));
    config.limits.max_headers = 4;
    let (proxy, addr) = start(config);
    within(async {
        let mut c = client(addr).await;
        let mut req = get("/");
        for i in 0..5 {
            req.headers_mut().insert(
                http::HeaderName::try_from(format!("x-field-{i}")).unwrap(),
                "v".parse().unwrap(),
            );
        }
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(
            header(resp.headers(), "malla-error"),
            "request-header-too-large"
        );
    })
    .await;
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn no_endpoints_is_503() {
    let (proxy, addr) = proxy_with(UpstreamConfig::new("svc", vec![]));
    within(async {
        let mut c = client(addr).await;
        let resp = c.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(resp.headers(), "malla-error"), "no-endpoints");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            body.starts_with(b"malla: upstream svc has no endpoints"),
            "{body:?}"
        );
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn grpc_to_a_refused_endpoint_is_unavailable() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let (proxy, addr) = proxy_to(dead);
    within(async {
        let mut c = client(addr).await;
        let req = Request::post("http://svc.test/pkg.Svc/Call")
            .header("content-type", "application/grpc+proto")
            .header("te", "trailers")
            .body(full("\0\0\0\0\0"))
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(resp.headers(), "grpc-status"), "14");
        assert_eq!(header(resp.headers(), "malla-error"), "connect-refused");
        assert!(resp.body().is_end_stream(), "a trailers-only response");
    })
    .await;
    let metrics = proxy.metrics().encode();
    assert!(
        metrics.contains(r#"malla_proxy_errors_total{upstream="svc",cause="connect-refused"} 1"#),
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_share_one_upstream_connection() {
    const N: usize = 100;
    // Every request waits for all the others: they are all in flight at once.
    let barrier = Arc::new(Barrier::new(N));
    let up = upstream(move |_req| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            Response::new(full("ok"))
        }
    })
    .await;
    let (proxy, addr) = proxy_to(up.addr);
    within(async {
        let c = client(addr).await;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..N {
            let mut c = c.clone();
            set.spawn(async move {
                let resp = c.send_request(get(&format!("/{i}"))).await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                resp.into_body().collect().await.unwrap().to_bytes()
            });
        }
        while let Some(body) = set.join_next().await {
            assert_eq!(body.unwrap(), "ok");
        }
    })
    .await;
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn streams_per_endpoint_are_capped() {
    let (active, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let up = upstream({
        let (active, peak) = (active.clone(), peak.clone());
        move |_req| {
            let (active, peak) = (active.clone(), peak.clone());
            async move {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                active.fetch_sub(1, Ordering::SeqCst);
                Response::new(full("ok"))
            }
        }
    })
    .await;
    let mut config = UpstreamConfig::new("svc", vec![up.addr.to_string()]);
    config.h2_max_concurrent_streams = 2;
    let (proxy, addr) = proxy_with(config);
    within(async {
        let c = client(addr).await;
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let mut c = c.clone();
            set.spawn(async move { c.send_request(get("/")).await.unwrap().status() });
        }
        while let Some(status) = set.join_next().await {
            assert_eq!(status.unwrap(), StatusCode::OK);
        }
    })
    .await;
    assert_eq!(peak.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;
}

/// `malla_proxy_upstream_open_connections` for the one endpoint of `svc`.
fn open_upstream_connections(proxy: &ProxyHandle) -> i64 {
    let metrics = proxy.metrics().encode();
    metrics
        .lines()
        .find(|l| l.starts_with("malla_proxy_upstream_open_connections{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no open-connections gauge in {metrics}"))
}

#[tokio::test]
async fn a_lost_upstream_connection_is_replaced() {
    let up = upstream(|_req| async { Response::new(full("ok")) }).await;
    let (proxy, addr) = proxy_to(up.addr);
    within(async {
        let mut c = client(addr).await;
        assert_eq!(
            c.send_request(get("/")).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(open_upstream_connections(&proxy), 1);
        up.kill_connections();
        while open_upstream_connections(&proxy) != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            c.send_request(get("/")).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(open_upstream_connections(&proxy), 1);
    })
    .await;
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_reset_after_the_head_resets_the_client_stream() {
    // The upstream fails its body only once the client has read the first chunk: a reset
    // discards data still buffered on the receiving side.
    let read = Arc::new(Notify::new());
    let up = upstream({
        let read = read.clone();
        move |_req| {
            let read = read.clone();
            async move {
                let (tx, body) = channel();
                tokio::spawn(async move {
                    let _ = tx.send(data("partial")).await;
                    read.notified().await;
                    let _ = tx.send(Err(io::Error::other("boom"))).await;
                });
                Response::new(body)
            }
        }
    })
    .await;
    let (proxy, addr) = proxy_to(up.addr);
    within(async {
        let mut c = client(addr).await;
        let resp = c.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut rb = resp.into_body();
        assert_eq!(
            rb.frame().await.unwrap().unwrap().into_data().unwrap(),
            "partial"
        );
        read.notify_one();
        assert!(
            rb.frame().await.unwrap().is_err(),
            "the client's stream is reset"
        );
        // The connection survives for the next request.
        read.notify_one();
        let resp = c.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn response_timeout_counts_from_the_end_of_the_request_body() {
    // Answers once the whole request body is in, or never when the path says so.
    let up = upstream(|req: Request<Incoming>| async move {
        if req.uri().path() == "/never" {
            std::future::pending::<()>().await;
        }
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(if body.len() == 3 { "all" } else { "partial" }))
    })
    .await;
    let mut config = UpstreamConfig::new("svc", vec![up.addr.to_string()]);
    config.response_timeout = Duration::from_millis(150);
    let (proxy, addr) = proxy_with(config);
    within(async {
        let mut c = client(addr).await;
        let req = Request::post("http://svc.test/never")
            .header("content-type", "application/grpc")
            .body(empty())
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(header(resp.headers(), "grpc-status"), "4");
        assert_eq!(header(resp.headers(), "malla-error"), "response-timeout");

        // An upload slower than the timeout is not cut: the clock starts when it ends.
        let (tx, body) = channel();
        tokio::spawn(async move {
            for chunk in ["a", "b", "c"] {
                tokio::time::sleep(Duration::from_millis(120)).await;
                tx.send(data(chunk)).await.unwrap();
            }
        });
        let req = Request::post("http://svc.test/upload").body(body).unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "all");
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn draining_lets_open_streams_finish() {
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let up = upstream({
        let (arrived, release) = (arrived.clone(), release.clone());
        move |_req| {
            let (arrived, release) = (arrived.clone(), release.clone());
            async move {
                arrived.notify_one();
                release.notified().await;
                Response::new(full("finished"))
            }
        }
    })
    .await;
    let (proxy, addr) = proxy_to(up.addr);
    within(async {
        let mut c = client(addr).await;
        let mut in_flight = {
            let mut c = c.clone();
            tokio::spawn(async move { c.send_request(get("/slow")).await })
        };
        arrived.notified().await;
        proxy.drain();
        // Let the GOAWAY reach the client before the stream completes.
        tokio::select! {
            _ = &mut in_flight => panic!("the stream ended before its response"),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        release.notify_one();
        let resp = in_flight.await.unwrap().unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "finished");
        assert!(
            c.send_request(get("/")).await.is_err(),
            "no new streams after GOAWAY"
        );
    })
    .await;
    proxy.shutdown().await;
}

mod resilience;
