//! One connection's service: each request goes to the gRPC API when its `content-type` is
//! `application/grpc*` (what every gRPC client sends), to the HTTP/JSON router otherwise.
//! Both see who is calling: the peer address as tonic's [`TcpConnectInfo`] (for
//! `Request::remote_addr`) and axum's [`ConnectInfo`]. Every request is counted here, in
//! one place for both APIs ([`Metrics`]): an HTTP request when its answer is ready, a gRPC
//! call when its status is known (in the answer's head, or in its trailers at the end of a
//! stream; a stream the client abandons counts as `CANCELLED`).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use axum::{body::Body, extract::ConnectInfo, response::IntoResponse as _};
use bytes::Bytes;
use http::{
    header::{CONTENT_TYPE, USER_AGENT},
    HeaderMap, Request, Response,
};
use http_body::Frame;
use hyper::body::Incoming;
use tokio::time::Instant;
use tonic::{transport::server::TcpConnectInfo, Code};
use tower::ServiceExt as _;

use super::Peer;
use crate::{
    api::http::RouteTemplate,
    metrics::Metrics,
    proxies::{Connection, Proxies},
};

/// Both APIs, ready to serve any number of connections.
#[derive(Clone)]
pub struct Apis {
    http: axum::Router,
    grpc: tonic::service::Routes,
    pub(super) metrics: Arc<Metrics>,
    pub(super) proxies: Arc<Proxies>,
}

impl Apis {
    pub fn new(
        http: axum::Router,
        grpc: tonic::service::Routes,
        metrics: Arc<Metrics>,
        proxies: Arc<Proxies>,
    ) -> Self {
        Apis {
            http,
            grpc: grpc.prepare(),
            metrics,
            proxies,
        }
    }

    /// The service of one connection; `plaintext_refused`: every request on it gets what
    /// to do instead (a plaintext connection to a control plane that requires TLS).
    pub(super) fn for_connection(
        &self,
        peer: Peer,
        tracked: Arc<Connection>,
        plaintext_refused: bool,
    ) -> ConnectionService {
        ConnectionService {
            apis: self.clone(),
            peer,
            tracked,
            plaintext_refused,
        }
    }
}

/// Whether a request is a gRPC call.
pub fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[derive(Clone)]
pub(super) struct ConnectionService {
    apis: Apis,
    peer: Peer,
    /// This connection's entry in the list of proxies.
    tracked: Arc<Connection>,
    plaintext_refused: bool,
}

/// What a plaintext request is told when the control plane requires TLS.
const TLS_REQUIRED: &str = "this control plane requires TLS: give malla HOST:PORT or https://HOST:PORT (not http://) and the control plane's trust bundle, DATA_DIR/trust-bundle.pem on its machine (malla CLI: --ca-file or MALLA_CA_FILE; sidecar: --control-ca or MALLA_CONTROL_CA; curl: --cacert)";

/// The answer to a request on a refused plaintext connection: gRPC's `UNAUTHENTICATED` or
/// the HTTP API's JSON error (`400 tls_required`), either saying what to do.
fn refuse_plaintext<B>(request: &Request<B>) -> Response<Body> {
    if is_grpc(request) {
        return tonic::Status::unauthenticated(TLS_REQUIRED)
            .into_http()
            .map(|_: tonic::body::Body| Body::empty());
    }
    let mut response = crate::api::http::ApiError::new(
        http::StatusCode::BAD_REQUEST,
        "tls_required",
        TLS_REQUIRED,
    )
    .into_response();
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        if self.plaintext_refused {
            self.apis.metrics.plaintext_refused();
            let response = refuse_plaintext(&request);
            return Box::pin(async move { Ok(response) });
        }
        let extensions = request.extensions_mut();
        extensions.insert(self.peer.identity.clone());
        extensions.insert(TcpConnectInfo {
            local_addr: Some(self.peer.local),
            remote_addr: Some(self.peer.remote),
        });
        extensions.insert(ConnectInfo(self.peer.remote));
        let started = Instant::now();
        let metrics = self.apis.metrics.clone();
        if is_grpc(&request) {
            let user_agent = request
                .headers()
                .get(USER_AGENT)
                .and_then(|v| v.to_str().ok());
            self.apis.proxies.called(&self.tracked, user_agent);
            request.extensions_mut().insert(self.tracked.clone());
            let grpc = self.apis.grpc.clone();
            let path = request.uri().path().to_string();
            Box::pin(async move {
                let response = grpc.oneshot(request).await?;
                let in_head = grpc_status(response.headers());
                // UNIMPLEMENTED is what an unknown method gets: its path is no label.
                let route = (in_head != Some(Code::Unimplemented)).then_some(path);
                metrics.grpc_started(route.as_deref(), started.elapsed());
                if let Some(code) = in_head {
                    metrics.grpc_ended(route.as_deref(), code);
                    return Ok(response.map(Body::new));
                }
                Ok(response.map(|body| {
                    Body::new(Observed {
                        inner: body,
                        pending: Some((metrics, route)),
                    })
                }))
            })
        } else {
            let http = self.apis.http.clone();
            let method = request.method().clone();
            Box::pin(async move {
                let response = http.oneshot(request).await?;
                let route = response.extensions().get::<RouteTemplate>();
                metrics.http_request(
                    route.map(|r| r.0.as_str()),
                    &method,
                    response.status(),
                    started.elapsed(),
                );
                Ok(response)
            })
        }
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// A gRPC answer's body that records the call's status from its trailers.
struct Observed<B> {
    inner: B,
    /// Until recorded: the metrics and the route.
    pending: Option<(Arc<Metrics>, Option<String>)>,
}

impl<B> Observed<B> {
    fn end(&mut self, code: Code) {
        if let Some((metrics, route)) = self.pending.take() {
            metrics.grpc_ended(route.as_deref(), code);
        }
    }
}

impl<B> http_body::Body for Observed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = grpc_status(trailers).unwrap_or(Code::Unknown);
                    self.end(code);
                }
            }
            Some(Err(_)) => self.end(Code::Internal),
            None => self.end(Code::Unknown),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        // Dropped before its trailers: the client left (or the connection broke).
        self.end(Code::Cancelled);
    }
}
