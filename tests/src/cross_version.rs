//! One test body, run over HTTP/1, HTTP/2 and gRPC (linkerd's `cross_version` tests).
//!
//! A [`Flavor`] starts the matching peer ([`Peer`]) and client ([`Client`]); a call gives
//! an [`Outcome`] in protocol-neutral terms, so the body asserts once what must hold for
//! every protocol. The suites expand a body into one test per flavor with
//! `cross_version!` (see `tests/it/main.rs`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{Method, Version};
use tonic::{transport::Channel, Code};

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
    /// The call failed below HTTP (connection refused, reset, protocol error).
    pub failure: Option<String>,
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
/// when the proxy closed it; HTTP/2 and gRPC multiplex over one connection.
#[derive(Debug)]
pub struct Client {
    flavor: Flavor,
    addr: SocketAddr,
    authority: String,
    http1: Option<Http1>,
    http2: Option<Http2>,
    grpc: Option<EchoClient<Channel>>,
}

impl Client {
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Sends `message` to the upstream's echo and reads the whole answer.
    pub async fn call(&mut self, message: &str) -> Outcome {
        within("a call through the proxy", self.call_inner(message)).await
    }

    async fn call_inner(&mut self, message: &str) -> Outcome {
        match self.flavor {
            Flavor::Http1 => self.call_http1(message).await,
            Flavor::Http2 => self.call_http2(message).await,
            Flavor::Grpc => self.call_grpc(message).await,
        }
    }

    async fn call_http1(&mut self, message: &str) -> Outcome {
        let reusable = self.http1.as_ref().is_some_and(|c| !c.is_closed());
        if !reusable {
            match Http1::connect(self.addr).await {
                Ok(c) => self.http1 = Some(c),
                Err(e) => return Outcome::failed(format!("connect: {e}")),
            }
        }
        let Some(conn) = self.http1.as_mut() else {
            return Outcome::failed("no connection");
        };
        let req = client::request(
            Version::HTTP_11,
            Method::POST,
            &self.authority,
            "/echo",
            body::full(message.to_string()),
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

    async fn call_http2(&mut self, message: &str) -> Outcome {
        let reusable = self.http2.as_ref().is_some_and(|c| !c.is_closed());
        if !reusable {
            match Http2::connect(self.addr).await {
                Ok(c) => self.http2 = Some(c),
                Err(e) => return Outcome::failed(format!("connect: {e}")),
            }
        }
        let Some(conn) = self.http2.as_ref() else {
            return Outcome::failed("no connection");
        };
        let req = client::request(
            Version::HTTP_2,
            Method::POST,
            &self.authority,
            "/echo",
            body::full(message.to_string()),
        );
        http_outcome(conn.send(req).await).await
    }

    async fn call_grpc(&mut self, message: &str) -> Outcome {
        if self.grpc.is_none() {
            match client::grpc(self.addr, &self.authority).await {
                Ok(c) => self.grpc = Some(c),
                Err(e) => return Outcome::failed(format!("connect: {e:?}")),
            }
        }
        let Some(grpc) = self.grpc.as_mut() else {
            return Outcome::failed("no connection");
        };
        let request = EchoRequest {
            message: message.to_string(),
        };
        match grpc.unary(request).await {
            Ok(response) => {
                let reply = response.into_inner();
                Outcome {
                    status: 200,
                    grpc: Some(Code::Ok),
                    cause: None,
                    peer: Some(reply.peer),
                    message: reply.message,
                    failure: None,
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
                message: status.message().to_string(),
                failure: None,
            },
        }
    }
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
        failure: None,
    }
}
