//! An HTTP echo server on hyper, speaking HTTP/1.1 or HTTP/2 with prior knowledge (h2c).
//!
//! Every response carries `x-peer: NAME`, `x-echo-method`, `x-echo-path` (path and query),
//! `x-echo-version` (`HTTP/1.1`, `HTTP/2.0`), `x-echo-authority` when the URI has one, and
//! each request header as `x-echo-h-NAME` (values of a repeated field joined by `", "`).
//!
//! What the response is made of is asked per request:
//!
//! | request | response |
//! |---|---|
//! | any path | the request body, echoed |
//! | `POST /count` | reads the body streaming (never buffered): `x-body-bytes`, `x-body-crc32`, `x-body-trailers` (`name=value; ...`) and the body `"BYTES CRC"` |
//! | `x-want-status: N` | status `N` (else the peer's [`set_status`](HttpPeer::set_status), else 200) |
//! | `x-want-bytes: N` | a generated body of `N` bytes ([`crate::body::generated`]), streamed |
//! | `x-want-trailers: 1` | trailers `x-peer-trailer: NAME` and `x-body-bytes: N` after the body (announced in `trailer`; HTTP/1: hyper sends them only when the request carried `te: trailers`) |
//! | `x-want-delay-ms: N` | waits `N` ms before answering, on top of the peer's delay |

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, server::conn, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{serve, PeerState, ServerTask};
use crate::body::{self, Body};

/// Largest body the echo path buffers (use `/count` for more).
const ECHO_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    /// HTTP/2 with prior knowledge (cleartext).
    Http2,
}

/// A running HTTP echo server; stops when dropped.
#[derive(Debug)]
pub struct HttpPeer {
    addr: SocketAddr,
    version: HttpVersion,
    state: Arc<PeerState>,
    _task: ServerTask,
}

impl HttpPeer {
    pub fn http1(name: &str) -> Self {
        Self::start(name, HttpVersion::Http1)
    }

    pub fn http2(name: &str) -> Self {
        Self::start(name, HttpVersion::Http2)
    }

    pub fn start(name: &str, version: HttpVersion) -> Self {
        let state = Arc::new(PeerState::new(name));
        let shared = state.clone();
        let (addr, task) = serve(move |stream| connection(stream, version, shared.clone()));
        HttpPeer {
            addr,
            version,
            state,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn version(&self) -> HttpVersion {
        self.version
    }

    pub fn state(&self) -> &Arc<PeerState> {
        &self.state
    }

    pub fn name(&self) -> &str {
        self.state.name()
    }

    pub fn requests(&self) -> u64 {
        self.state.requests()
    }

    pub fn seen(&self) -> Vec<String> {
        self.state.seen()
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.set_delay(delay);
    }

    pub fn set_status(&self, status: u16) {
        self.state.set_status(status);
    }
}

async fn connection(stream: TcpStream, version: HttpVersion, state: Arc<PeerState>) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(req, &state).await) }
    });
    let io = TokioIo::new(stream);
    // A connection error (client gone, bad bytes) just ends this connection.
    let _ = match version {
        HttpVersion::Http1 => {
            conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
        }
        HttpVersion::Http2 => {
            conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
                .await
        }
    };
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

async fn handle(req: Request<Incoming>, state: &PeerState) -> Response<Body> {
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    state.record(req.method().as_str(), &path);

    let headers = req.headers();
    let extra = Duration::from_millis(header_u64(headers, "x-want-delay-ms").unwrap_or(0));
    state.wait_turn(extra).await;
    let status = header_u64(headers, "x-want-status")
        .and_then(|s| u16::try_from(s).ok())
        .or(state.status())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let want_bytes = header_u64(headers, "x-want-bytes");
    let want_trailers = headers.contains_key("x-want-trailers");

    let mut response = Response::builder().status(status);
    if want_trailers {
        // hyper's HTTP/1 encoder sends only the trailer fields the head announces.
        response = response.header(http::header::TRAILER, "x-peer-trailer, x-body-bytes");
    }
    let out = response.headers_mut().expect("a fresh builder has headers");
    echo_headers(&req, &path, state.name(), out);

    let (parts, incoming) = req.into_parts();
    if parts.method == http::Method::POST && parts.uri.path() == "/count" {
        return match body::consume(incoming).await {
            Ok(c) => response
                .header("x-body-trailers", trailer_names(c.trailers.as_ref()))
                .header("x-body-bytes", c.bytes)
                .header("x-body-crc32", c.crc)
                .body(body::full(format!("{} {}", c.bytes, c.crc)))
                .expect("valid response"),
            Err(e) => plain(StatusCode::BAD_REQUEST, &format!("body error: {e}")),
        };
    }
    let trailers = |n: u64| {
        want_trailers.then(|| {
            let mut t = HeaderMap::new();
            t.insert("x-peer-trailer", header_value(state.name()));
            t.insert("x-body-bytes", HeaderValue::from(n));
            t
        })
    };
    if let Some(n) = want_bytes {
        // Drain the request body first so HTTP/1 keep-alive stays usable.
        let _ = body::consume(incoming).await;
        let (body, _) = body::generated(n, trailers(n));
        return response.body(body).expect("valid response");
    }
    let data = match http_body_util::Limited::new(incoming, ECHO_LIMIT)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("body error: {e}")),
    };
    let body = match trailers(data.len() as u64) {
        Some(t) => with_trailers(data, t),
        None => body::full(data),
    };
    response.body(body).expect("valid response")
}

/// The echo headers every response carries.
fn echo_headers<B>(req: &Request<B>, path: &str, name: &str, out: &mut HeaderMap) {
    out.insert("x-peer", header_value(name));
    out.insert("x-echo-method", header_value(req.method().as_str()));
    out.insert("x-echo-path", header_value(path));
    out.insert(
        "x-echo-version",
        header_value(&format!("{:?}", req.version())),
    );
    if let Some(authority) = req.uri().authority() {
        out.insert("x-echo-authority", header_value(authority.as_str()));
    }
    for key in req.headers().keys() {
        let values: Vec<&[u8]> = req
            .headers()
            .get_all(key)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let joined = values.join(&b", "[..]);
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(format!("x-echo-h-{key}").as_bytes()),
            HeaderValue::from_bytes(&joined),
        ) {
            out.insert(n, v);
        }
    }
}

/// `name=value` of each trailer, joined by `"; "` (empty without trailers).
fn trailer_names(trailers: Option<&HeaderMap>) -> HeaderValue {
    let text: Vec<String> = trailers
        .into_iter()
        .flatten()
        .map(|(n, v)| format!("{n}={}", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    header_value(&text.join("; "))
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn with_trailers(data: Bytes, trailers: HeaderMap) -> Body {
    let frames = futures_util::stream::iter([
        Ok::<_, crate::BoxError>(http_body::Frame::data(data)),
        Ok(http_body::Frame::trailers(trailers)),
    ]);
    http_body_util::StreamBody::new(frames).boxed()
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(body::full(text.to_string()));
    *response.status_mut() = status;
    response
}
