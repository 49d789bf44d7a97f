//! Clients: hyper's HTTP/1 and HTTP/2 client connections over a plain `TcpStream`, tonic
//! for gRPC, tokio-tungstenite for WebSocket, and [`raw`] bytes for what no well-behaved
//! client would send.
//!
//! A client connection is one TCP connection, so tests can tell keep-alive reuse and
//! stream multiplexing from new connections. Every wait is bounded by [`TIMEOUT`].

pub mod raw;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

use crate::{
    body::{self, Body},
    echo_pb::echo_client::EchoClient,
    BoxError,
};

/// The longest any client in the harness waits for anything: long enough for a loaded
/// machine, short enough that a hang fails the test instead of stalling the suite.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `future` with [`TIMEOUT`], panicking with `what` when it takes longer.
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(TIMEOUT, future).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: no answer within {TIMEOUT:?}"),
    }
}

/// Aborts the connection task when the client is dropped.
#[derive(Debug)]
struct ConnTask(JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/1.1 client connection (keep-alive: requests are sent one after another on it).
#[derive(Debug)]
pub struct Http1 {
    send: http1::SendRequest<Body>,
    _conn: ConnTask,
}

impl Http1 {
    pub async fn connect(addr: SocketAddr) -> Result<Self, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Http1 {
            send,
            _conn: ConnTask(task),
        })
    }

    /// Sends a request once the connection is ready for it.
    pub async fn send(&mut self, req: Request<Body>) -> Result<Response<Incoming>, BoxError> {
        self.send.ready().await?;
        Ok(self.send.send_request(req).await?)
    }

    /// Whether the server closed the connection (or it failed).
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }
}

/// One HTTP/2 (prior knowledge) client connection; clones share it, each request is a stream.
#[derive(Clone, Debug)]
pub struct Http2 {
    send: http2::SendRequest<Body>,
    _conn: std::sync::Arc<ConnTask>,
}

impl Http2 {
    pub async fn connect(addr: SocketAddr) -> Result<Self, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http2 {
            send,
            _conn: std::sync::Arc::new(ConnTask(task)),
        })
    }

    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, BoxError> {
        let mut send = self.send.clone();
        send.ready().await?;
        Ok(send.send_request(req).await?)
    }

    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }
}

/// A request for `path` on `authority`: origin-form with `Host` for HTTP/1, absolute URI
/// (`:authority`, `:scheme`) for HTTP/2.
pub fn request(
    version: Version,
    method: Method,
    authority: &str,
    path: &str,
    body: Body,
) -> Request<Body> {
    let builder = Request::builder().method(method);
    let builder = if version == Version::HTTP_2 {
        builder
            .version(Version::HTTP_2)
            .uri(format!("http://{authority}{path}"))
    } else {
        builder.uri(path).header(http::header::HOST, authority)
    };
    builder.body(body).expect("a valid request")
}

pub fn get(version: Version, authority: &str, path: &str) -> Request<Body> {
    request(version, Method::GET, authority, path, body::empty())
}

pub fn post(
    version: Version,
    authority: &str,
    path: &str,
    data: impl Into<Bytes>,
) -> Request<Body> {
    request(version, Method::POST, authority, path, body::full(data))
}

/// A response read to its end.
#[derive(Debug)]
pub struct Collected {
    pub status: u16,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Collected {
    /// A header as text (`None` when absent or not text).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `malla-error` cause, when the proxy answered itself.
    pub fn cause(&self) -> Option<&str> {
        self.header(malla_proxy::error::ERROR_HEADER)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads a response's body and trailers to the end.
pub async fn collect(response: Response<Incoming>) -> Result<Collected, BoxError> {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Collected {
        status: parts.status.as_u16(),
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// A gRPC client of the `Echo` service over one connection to `addr`, with `authority` as
/// the requests' `:authority` (the HTTP proxy listener routes by it).
pub async fn grpc(addr: SocketAddr, authority: &str) -> Result<EchoClient<Channel>, BoxError> {
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))?;
    let connector = tower::service_fn(move |_uri: http::Uri| async move {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        Ok::<_, std::io::Error>(TokioIo::new(stream))
    });
    let channel = endpoint.connect_with_connector(connector).await?;
    Ok(EchoClient::new(channel))
}

/// A WebSocket client connection to `ws://{host}{path}` through `addr`.
pub async fn websocket(
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    BoxError,
> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{host}{path}");
    Ok(tokio_tungstenite::client_async(url, stream).await?)
}
