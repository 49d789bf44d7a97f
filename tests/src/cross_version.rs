//! One test body, run over HTTP/1, HTTP/2 and gRPC (linkerd's `cross_version` tests).
//!
//! A [`Flavor`] starts the matching peer ([`Peer`]) and client ([`Client`]); a call gives
//! an [`Outcome`] in protocol-neutral terms, so the body asserts once what must hold for
//! every protocol. The suites expand a body into one test per flavor with
//! `cross_version!` (see `tests/it/main.rs`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use http::{HeaderMap, Method, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::{
    transport::{Channel, Endpoint},
    Code,
};

use crate::{
    body,
    client::{self, within, Http1, Http2},
    echo_pb::{echo_client::EchoClient, EchoRequest},
    peers::{GrpcPeer, HttpPeer, PeerState},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Http1,
    Http2,
    Grpc,
}

impl Flavor {
    pub const ALL: [Flavor; 3] = [Flavor::Http1, Flavor::Http2, Flavor::Grpc];

    /// An upstream that speaks this flavor.
    pub fn peer(self, name: &str) -> Peer {
        match self {
            Flavor::Http1 => Peer::Http(HttpPeer::http1(name)),
            Flavor::Http2 => Peer::Http(HttpPeer::http2(name)),
            Flavor::Grpc => Peer::Grpc(GrpcPeer::start(name)),
        }
    }

    /// A client of this flavor for the proxy listener at `addr`; `authority` is the `Host`
    /// / `:authority` its requests carry.
    pub fn client(self, addr: SocketAddr, authority: &str) -> Client {
        Client {
            flavor: self,
            addr,
            authority: authority.to_string(),
            http1: None,
            http2: None,
            grpc: None,
            connections: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// An upstream of some flavor.
#[derive(Debug)]
pub enum Peer {
    Http(HttpPeer),
    Grpc(GrpcPeer),
}

impl Peer {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Peer::Http(p) => p.addr(),
            Peer::Grpc(p) => p.addr(),
        }
    }

    pub fn state(&self) -> &Arc<PeerState> {
        match self {
            Peer::Http(p) => p.state(),
            Peer::Grpc(p) => p.state(),
        }
    }

    pub fn name(&self) -> &str {
        self.state().name()
    }

    pub fn requests(&self) -> u64 {
        self.state().requests()
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state().set_delay(delay);
    }

    /// Answers every call with this server error from now on (gRPC: UNAVAILABLE for any
    /// status from 500); 0 or 200 answers normally again.
    pub fn set_status(&self, status: u16) {
        self.state().set_status(status);
    }

    /// Holds every call that arrives from now on until [`Peer::release`].
    pub fn hold(&self) {
        self.state().hold();
    }

    pub fn release(&self) {
        self.state().release();
    }
}

/// What one call gave, whatever the protocol.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The HTTP status (gRPC: the HTTP status is 200 even for errors, so this is 200).
    pub status: u16,
    /// The `grpc-status` (gRPC only).
    pub grpc: Option<Code>,
    /// The `malla-error` cause, when the proxy answered itself.
    pub cause: Option<String>,
    /// The `x-peer` that answered.
    pub peer: Option<String>,
    /// The echoed message (HTTP: the body; gRPC: the reply's or the status's message).
    pub message: String,
    /// The request header fields the upstream saw (HTTP: its `x-echo-h-NAME` fields; gRPC:
    /// the reply's `headers`).
    pub echoed: HashMap<String, String>,
    /// The call failed below HTTP (connection refused, reset, protocol error).
    pub failure: Option<String>,
    /// The response's header fields (gRPC: the response metadata, or for an error the
    /// status's metadata, which holds a trailers-only response's header fields).
    pub headers: HeaderMap,
}

impl Outcome {
    fn failed(why: impl std::fmt::Display) -> Self {
        Outcome {
            failure: Some(why.to_string()),
            ..Outcome::default()
        }
    }

    pub fn is_ok(&self) -> bool {
        self.failure.is_none()
            && self.status == 200
            && self.grpc.is_none_or(|c| c == Code::Ok)
            && self.peer.is_some()
    }

    /// A header field as text (`None` when absent or not text).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The time budget the upstream was given with the request: `malla-timeout-ms`, or
    /// `grpc-timeout` (`None`: neither, or not understood).
    pub fn budget_seen(&self) -> Option<Duration> {
        if let Some(ms) = self.echoed.get("malla-timeout-ms") {
            return ms.trim().parse().ok().map(Duration::from_millis);
        }
        let value = self.echoed.get("grpc-timeout")?.trim();
        let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
        let amount: u64 = amount.parse().ok()?;
        match unit {
            "H" => Some(Duration::from_secs(amount * 3600)),
            "M" => Some(Duration::from_secs(amount * 60)),
            "S" => Some(Duration::from_secs(amount)),
            "m" => Some(Duration::from_millis(amount)),
            "u" => Some(Duration::from_micros(amount)),
            "n" => Some(Duration::from_nanos(amount)),
            _ => None,
        }
    }

    /// Whether this is a response with `status` for HTTP, `grpc` for gRPC (whoever answered).
    pub fn is(&self, flavor: Flavor, status: u16, grpc: Code) -> bool {
        self.failure.is_none()
            && match flavor {
                Flavor::Grpc => self.grpc == Some(grpc),
                Flavor::Http1 | Flavor::Http2 => self.status == status,
            }
    }

    /// Asserts the upstream itself answered with an error: `status` for HTTP, `grpc` for
    /// gRPC, and no `malla-error`.
    #[track_caller]
    pub fn assert_upstream_error(&self, flavor: Flavor, status: u16, grpc: Code) {
        assert!(
            self.is(flavor, status, grpc),
            "expected {status} / {grpc:?}: {self:?}"
        );
        assert_eq!(self.cause, None, "not the proxy's answer: {self:?}");
    }

    /// Asserts the upstream answered; returns its name.
    #[track_caller]
    pub fn assert_ok(&self) -> &str {
        assert!(
            self.is_ok(),
            "expected an answer from the upstream, got {self:?}"
        );
        self.peer.as_deref().unwrap_or_default()
    }

    /// Asserts the proxy answered with `cause`: `status` for HTTP, `grpc` for gRPC.
    #[track_caller]
    pub fn assert_error(&self, flavor: Flavor, status: u16, grpc: Code, cause: &str) {
        assert!(self.failure.is_none(), "expected a response, got {self:?}");
        if flavor == Flavor::Grpc {
            assert_eq!(self.grpc, Some(grpc), "grpc-status: {self:?}");
        } else {
            assert_eq!(self.status, status, "status: {self:?}");
        }
        assert_eq!(self.cause.as_deref(), Some(cause), "malla-error: {self:?}");
    }
}

/// A client of some flavor. HTTP/1 uses one keep-alive connection and opens a new one
/// when the proxy closed it; HTTP/2 and gRPC multiplex over one connection (and open a
/// new one when it is gone).
#[derive(Debug)]
pub struct Client {
    flavor: Flavor,
    addr: SocketAddr,
    authority: String,
    http1: Option<Http1>,
    http2: Option<Http2>,
    grpc: Option<EchoClient<Channel>>,
    /// TCP connections opened to the proxy so far (gRPC: by the channel's connector).
    connections: Arc<AtomicUsize>,
}

impl Client {
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// TCP connections this client has opened to the proxy so far: 1 while the first one
    /// stays open.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Sends `message` to the upstream's echo and reads the whole answer.
    pub async fn call(&mut self, message: &str) -> Outcome {
        within("a call through the proxy", self.call_inner(message, None)).await
    }

    /// [`Client::call`] with a time budget for the whole call, as a caller gives it to the
    /// mesh: `malla-timeout-ms` for HTTP, `grpc-timeout` for gRPC (only sent: the client
    /// itself does not enforce it).
    pub async fn call_within(&mut self, message: &str, budget: Duration) -> Outcome {
        within(
            "a call through the proxy",
            self.call_inner(message, Some(budget)),
        )
        .await
    }

    async fn call_inner(&mut self, message: &str, budget: Option<Duration>) -> Outcome {
        let ms = budget.map(|b| b.as_millis().to_string());
        match self.flavor {
            Flavor::Http1 => self.call_http1(message, ms).await,
            Flavor::Http2 => self.call_http2(message, ms).await,
            Flavor::Grpc => self.call_grpc(message, ms).await,
        }
    }

    async fn call_http1(&mut self, message: &str, budget_ms: Option<String>) -> Outcome {
        let reusable = self.http1.as_ref().is_some_and(|c| !c.is_closed());
        if !reusable {
            self.connections.fetch_add(1, Ordering::SeqCst);
            match Http1::connect(self.addr).await {
                Ok(c) => self.http1 = Some(c),
                Err(e) => return Outcome::failed(format!("connect: {e}")),
            }
        }
        let Some(conn) = self.http1.as_mut() else {
            return Outcome::failed("no connection");
        };
        let req = with_budget(
            client::request(
                Version::HTTP_11,
                Method::POST,
                &self.authority,
                "/echo",
                body::full(message.to_string()),
            ),
            budget_ms,
        );
        let result = conn.send(req).await;
        // A response announcing `connection: close` is the last on this connection: hyper
        // may not have seen the close yet when the next request is sent, so drop it now.
        let closing = result.as_ref().is_ok_and(|r| {
            r.headers()
                .get_all(http::header::CONNECTION)
                .iter()
                .any(|v| {
                    v.to_str()
                        .is_ok_and(|v| v.to_ascii_lowercase().contains("close"))
                })
        });
        // Kept until the body is read: dropping it aborts the connection task.
        let last = if closing { self.http1.take() } else { None };
        let outcome = http_outcome(result).await;
        drop(last);
        outcome
    }

    async fn call_http2(&mut self, message: &str, budget_ms: Option<String>) -> Outcome {
        let reusable = self.http2.as_ref().is_some_and(|c| !c.is_closed());
        if !reusable {
            self.connections.fetch_add(1, Ordering::SeqCst);
            match Http2::connect(self.addr).await {
                Ok(c) => self.http2 = Some(c),
                Err(e) => return Outcome::failed(format!("connect: {e}")),
            }
        }
        let Some(conn) = self.http2.as_ref() else {
            return Outcome::failed("no connection");
        };
        let req = with_budget(
            client::request(
                Version::HTTP_2,
                Method::POST,
                &self.authority,
                "/echo",
                body::full(message.to_string()),
            ),
            budget_ms,
        );
        http_outcome(conn.send(req).await).await
    }

    async fn call_grpc(&mut self, message: &str, budget_ms: Option<String>) -> Outcome {
        if self.grpc.is_none() {
            match grpc_channel(self.addr, &self.authority, self.connections.clone()).await {
                Ok(c) => self.grpc = Some(c),
                Err(e) => return Outcome::failed(format!("connect: {e:?}")),
            }
        }
        let Some(grpc) = self.grpc.as_mut() else {
            return Outcome::failed("no connection");
        };
        let mut request = tonic::Request::new(EchoRequest {
            message: message.to_string(),
        });
        if let Some(value) = budget_ms.and_then(|ms| format!("{ms}m").parse().ok()) {
            request.metadata_mut().insert("grpc-timeout", value);
        }
        match grpc.unary(request).await {
            Ok(response) => {
                let headers = response.metadata().clone().into_headers();
                let reply = response.into_inner();
                Outcome {
                    status: 200,
                    grpc: Some(Code::Ok),
                    cause: None,
                    peer: Some(reply.peer),
                    echoed: reply.headers,
                    message: reply.message,
                    failure: None,
                    headers,
                }
            }
            Err(status) => Outcome {
                status: 200,
                grpc: Some(status.code()),
                cause: status
                    .metadata()
                    .get(malla_proxy::error::ERROR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                peer: None,
                echoed: HashMap::new(),
                message: status.message().to_string(),
                failure: None,
                headers: status.metadata().clone().into_headers(),
            },
        }
    }
}

/// `req` with the caller's budget in `malla-timeout-ms`, when there is one.
fn with_budget(
    mut req: http::Request<body::Body>,
    budget_ms: Option<String>,
) -> http::Request<body::Body> {
    if let Some(value) = budget_ms.and_then(|ms| http::HeaderValue::from_str(&ms).ok()) {
        req.headers_mut().insert("malla-timeout-ms", value);
    }
    req
}

async fn http_outcome(
    result: Result<http::Response<hyper::body::Incoming>, crate::BoxError>,
) -> Outcome {
    let response = match result {
        Ok(r) => r,
        Err(e) => return Outcome::failed(format!("request: {e}")),
    };
    let collected = match client::collect(response).await {
        Ok(c) => c,
        Err(e) => return Outcome::failed(format!("body: {e}")),
    };
    Outcome {
        status: collected.status,
        grpc: None,
        cause: collected.cause().map(str::to_string),
        peer: collected.header("x-peer").map(str::to_string),
        message: collected.text(),
        echoed: collected
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let name = name.as_str().strip_prefix("x-echo-h-")?;
                Some((name.to_string(), value.to_str().ok()?.to_string()))
            })
            .collect(),
        failure: None,
        headers: collected.headers,
    }
}

/// [`client::grpc`], counting the connections the channel opens in `connections`.
async fn grpc_channel(
    addr: SocketAddr,
    authority: &str,
    connections: Arc<AtomicUsize>,
) -> Result<EchoClient<Channel>, crate::BoxError> {
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))?;
    let connector = tower::service_fn(move |_uri: http::Uri| {
        connections.fetch_add(1, Ordering::SeqCst);
        async move {
            let stream = TcpStream::connect(addr).await?;
            let _ = stream.set_nodelay(true);
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = endpoint.connect_with_connector(connector).await?;
    Ok(EchoClient::new(channel))
}
