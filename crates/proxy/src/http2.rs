//! HTTP/2 (prior knowledge) and gRPC, on hyper and h2.
//!
//! A client connection is served by hyper's HTTP/2 server; each stream walks one line:
//!
//! ```text
//! stream -> route (:authority / Host) -> deadline (grpc-timeout / malla-timeout-ms)
//!        -> faults, rate limits, max_requests -> [attempt: pick (breakers) -> stream slot
//!        on the endpoint's shared h2 connection (client.rs) -> upstream stream
//!        -> response head (per-try timeout) -> outlier detector -> retry?]
//!        -> response head back; bodies and trailers relayed frame by frame both ways
//! ```
//!
//! Resilience is the same policy as on HTTP/1 ([`crate::resilience`]), done the h2 way:
//!
//! - The deadline's remaining budget is written into each attempt's `grpc-timeout` (gRPC)
//!   or `malla-timeout-ms`; a passed deadline is answered 504 / `DEADLINE_EXCEEDED`.
//! - Every attempt's outcome feeds the endpoint's breaker: connect failures, resets and
//!   timeouts; the status of a plain response when its head arrives; the `grpc-status` of
//!   a gRPC call from its head when trailers-only, else from its trailers when the
//!   response body ends ([`body::ResponseBody`]).
//! - Retries happen only while nothing of the response has reached the client: on the
//!   head of a plain response (5xx...), on a trailers-only gRPC status (UNAVAILABLE...;
//!   gRPC calls are retried by status, as gRPC's retry design does, never on a status in
//!   trailers after data), or on a failure before any head. A request that may be retried
//!   keeps a copy of its head and records its body up to `max_replay_bytes`
//!   ([`body::RequestBody`]); one that may not is still retried when it never left.
//!
//! Protocol is preserved hop by hop: HTTP/2 clients reach their upstreams over HTTP/2 with
//! prior knowledge, on one multiplexed connection per endpoint shared by every worker
//! ([`client`]). Bodies are hyper's `Incoming` passed straight through, so they stream with
//! h2's flow control bounding memory, request and response flow concurrently (client-,
//! server- and bidirectional-streaming gRPC), and trailers (`grpc-status`) cross unchanged.
//!
//! Forwarding conventions are those of [`crate::forwarding`]. Hop-by-hop fields cannot
//! cross an HTTP/2 hop at all: h2 treats a received `Connection`, `Keep-Alive`,
//! `Proxy-Connection`, `Transfer-Encoding`, `Upgrade` or a `TE` other than `trailers` as a
//! malformed message (RFC 9113 §8.2.2) and hyper strips them again before sending, so this
//! path only adds `X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded` (when present) and
//! `Via`.
//!
//! Errors the proxy answers itself are built by [`ProxyError::http_response`]: gRPC callers
//! get a trailers-only response with `grpc-status`. An upstream reset after the response
//! head was forwarded resets the client's stream (the body yields the error to hyper).
//!
//! Draining: the connection gets a GOAWAY and finishes the streams it has.

mod attempt;
mod body;
mod client;
mod rewind;
#[cfg(test)]
mod tests;

use std::{
    borrow::Cow,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::BytesMut;
use http::{
    header::{self, Entry, HeaderName, HeaderValue},
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, Method, Request, Response, Uri,
};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use malla_core::policy::{RELAYED_FAILURE_HEADER, TIMEOUT_HEADER};
use tokio::time::Instant;
use tracing::debug;

pub(crate) use client::EndpointClient;

use self::{
    attempt::{Answered, Streams},
    body::{Hold, ReplayBudget, ResponseBody, Unrecorded},
    rewind::Rewind,
};
use crate::{
    authz,
    call::{Answer, Call, Claim},
    error::ProxyError,
    forwarding,
    listener::ListenerCtx,
    resilience::{deadline, limits::Slot},
    stream::Stream,
    upstream::Upstream,
};

/// PING an idle connection this often; a PING unanswered this long closes it.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams one client connection may have open at once.
const MAX_CLIENT_STREAMS: u32 = 1024;
/// Flow-control windows offered to clients: what one stream / one connection may have in
/// flight towards the proxy, which bounds what the proxy buffers for them.
const CLIENT_STREAM_WINDOW: u32 = 1024 * 1024;
const CLIENT_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
/// What the request bodies kept for replay may hold together on one client connection.
pub const CONNECTION_REPLAY_BUDGET: u64 = 4 * 1024 * 1024;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const MALLA_TIMEOUT: HeaderName = HeaderName::from_static(TIMEOUT_HEADER);
const RELAYED_FAILURE: HeaderName = HeaderName::from_static(RELAYED_FAILURE_HEADER);

/// What every stream of one client connection shares.
struct Downstream {
    ctx: Arc<ListenerCtx>,
    client: IpAddr,
    /// `X-Forwarded-For` for requests that carry none, built once per connection.
    xff: HeaderValue,
    /// The SPIFFE ID the caller proved with mTLS, and as `malla-client-id`.
    peer: Option<malla_core::SpiffeId>,
    identity: Option<HeaderValue>,
    /// Streams opened so far, and those whose response is still being relayed: the idle
    /// check compares the first between two ticks and leaves busy connections alone.
    streams: AtomicU64,
    relaying: AtomicU64,
    /// What the streams' recordings for replay may hold together.
    replay_budget: Arc<ReplayBudget>,
}

/// A stream at work on a client connection: waiting for its response head, or relaying
/// its response body (see [`IdleCheck`]).
pub(crate) struct Relaying(Arc<Downstream>);

impl Relaying {
    fn new(down: &Arc<Downstream>) -> Self {
        down.relaying.fetch_add(1, Ordering::Relaxed);
        Relaying(down.clone())
    }
}

impl Drop for Relaying {
    fn drop(&mut self) {
        self.0.relaying.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one client connection that opened with the HTTP/2 preface; `prefix` holds the
/// bytes detection already read (the preface at least).
pub(crate) async fn serve(
    stream: Stream,
    prefix: BytesMut,
    peer: SocketAddr,
    identity: Option<&malla_core::SpiffeId>,
    ctx: &Arc<ListenerCtx>,
) {
    let client = peer.ip();
    let down = Arc::new(Downstream {
        ctx: ctx.clone(),
        client,
        xff: HeaderValue::try_from(client.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        identity: identity.and_then(|id| HeaderValue::try_from(id.to_string()).ok()),
        peer: identity.cloned(),
        streams: AtomicU64::new(0),
        relaying: AtomicU64::new(0),
        replay_budget: Arc::new(ReplayBudget::new(CONNECTION_REPLAY_BUDGET)),
    });
    let idle = IdleCheck::new(down.clone(), ctx.shared.config.limits.client_idle_timeout);
    let max_head = u32::try_from(ctx.shared.config.limits.max_head_bytes).unwrap_or(u32::MAX);
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CLIENT_STREAMS)
        .initial_stream_window_size(CLIENT_STREAM_WINDOW)
        .initial_connection_window_size(CLIENT_CONNECTION_WINDOW)
        .max_header_list_size(max_head)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
    let service = service_fn(move |req| forward(down.clone(), req));
    let conn = builder.serve_connection(TokioIo::new(Rewind::new(stream, prefix)), service);
    let mut conn = std::pin::pin!(conn);
    let mut drain = ctx.shared.drain_signal();
    let finished = tokio::select! {
        result = conn.as_mut() => Some(result),
        _ = drain.wait_for(|draining| *draining) => None,
        () = idle.wait() => None,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            // GOAWAY: no new streams; the open ones run to their end.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, %peer, "h2 client connection ended with an error");
    }
}

/// Closes client connections that have been idle for `client_idle_timeout`, like the
/// HTTP/1 path does (hyper's HTTP/2 server has no idle timeout of its own): no new stream
/// and no response being relayed. It looks once per timeout, so the hot path pays two
/// uncontended atomic adds per stream and no timer: a connection idle for between one and
/// two timeouts gets GOAWAY. A long-lived stream (a gRPC watch) keeps its connection.
struct IdleCheck {
    down: Arc<Downstream>,
    timeout: Duration,
}

impl IdleCheck {
    fn new(down: Arc<Downstream>, timeout: Duration) -> Self {
        IdleCheck { down, timeout }
    }

    /// Completes once a whole timeout went by without a new stream.
    async fn wait(&self) {
        // A configured timeout of centuries must not overflow `Instant` arithmetic.
        let period = self.timeout.min(Duration::from_secs(365 * 24 * 3600));
        let mut seen = self.down.streams.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(period).await;
            let now = self.down.streams.load(Ordering::Relaxed);
            if now == seen && self.down.relaying.load(Ordering::Relaxed) == 0 {
                return;
            }
            seen = now;
        }
    }
}

/// One client stream, start to response head. Never fails: errors become responses.
async fn forward(
    down: Arc<Downstream>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    down.streams.fetch_add(1, Ordering::Relaxed);
    // Busy until the response head; the response body holds its own while it streams.
    let _busy = Relaying::new(&down);
    let arrived = Instant::now();
    let grpc = is_grpc(req.headers());
    if let Some(authorizer) = down.ctx.enforcing() {
        let call = authz::Inbound::from_request(down.peer.as_ref(), down.ctx.port, &req);
        if let Err(e) = crate::inbound::authorize(authorizer, &call) {
            return Ok(e.http_response(grpc, None));
        }
    }
    let (head, body) = match upstream_head(&down, req) {
        Ok(prepared) => prepared,
        Err(e) => return Ok(e.http_response(grpc, None)),
    };
    let upstream = match down.ctx.route(host(&head)) {
        Ok(u) => u,
        Err(e) => {
            debug!(error = %e, "h2: no route");
            return Ok(e.http_response(grpc, None));
        }
    };
    let res = upstream.resilience_full();
    let kind = (
        is_idempotent(&head.method),
        grpc,
        !http_body::Body::is_end_stream(&body),
    );
    let call = Call::new(upstream, &res, caller_budget(&head, grpc), kind, || arrived);
    let answer = match call.admit(Some(head.uri.path().as_bytes())).await {
        Ok(request) => {
            let mut streams = Streams::new(&call, &down, grpc, head, body);
            match call.run(&mut streams).await {
                Answer::Response(answered, claim) => {
                    streams.commit();
                    return Ok(relay(&down, upstream, grpc, answered, claim, request));
                }
                // (HTTP/2 sends nothing to the client before the response head, so nothing
                // is ever abandoned.)
                Answer::Error(e) | Answer::Abandoned(e) => e,
            }
        }
        Err(e) => e,
    };
    upstream.error(&answer);
    debug!(error = %answer, "h2: answering with an error");
    Ok(answer.http_response(grpc, down.ctx.relay_mark(upstream)))
}

/// The caller's budget: gRPC's own field for gRPC calls, malla's for the others.
fn caller_budget(head: &Parts, grpc: bool) -> Option<Duration> {
    if grpc {
        head.headers
            .get(GRPC_TIMEOUT)
            .and_then(|v| deadline::parse_grpc_timeout(v.as_bytes()))
    } else {
        head.headers
            .get(MALLA_TIMEOUT)
            .and_then(|v| deadline::parse_timeout_ms(v.as_bytes()))
    }
}

/// The response for the client; its body holds the stream, the endpoint and the
/// request's slot until it ends, and records a gRPC call's status from its trailers when
/// the head did not carry it.
fn relay(
    down: &Arc<Downstream>,
    upstream: &Arc<Upstream>,
    grpc: bool,
    answered: Answered,
    claim: Claim,
    request: Option<Slot>,
) -> Response<ResponseBody> {
    let Answered { response, permit } = answered;
    let (mut head, body) = response.into_parts();
    if let Some(value) = head.headers.get(RELAYED_FAILURE) {
        if !down.ctx.trusts_relayed_failure(value.as_bytes()) {
            head.headers.remove(RELAYED_FAILURE);
        }
    }
    let unrecorded = (grpc
        && head.status == http::StatusCode::OK
        && grpc_status(&head.headers).is_none())
    .then(|| Unrecorded {
        upstream: upstream.clone(),
        relayed: head.headers.contains_key(RELAYED_FAILURE),
    });
    append_via(&mut head.headers);
    let hold = Hold::new((claim, permit), request, unrecorded, Relaying::new(down));
    Response::from_parts(head, ResponseBody::upstream(body, hold))
}

/// The request head as it goes upstream (`:scheme`, `:authority`, forwarding fields),
/// and its body.
fn upstream_head(
    down: &Downstream,
    req: Request<Incoming>,
) -> Result<(Parts, Incoming), ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is not supported over HTTP/2",
        ));
    }
    let (mut head, body) = req.into_parts();
    // h2 bounds the head's size (SETTINGS_MAX_HEADER_LIST_SIZE); the field count is ours.
    if head.headers.len() > down.ctx.shared.config.limits.max_headers {
        return Err(ProxyError::TooManyHeaders);
    }
    upstream_uri(&mut head.uri, &head.headers)?;
    request_headers(&mut head.headers, down);
    Ok((head, body))
}

/// The upstream's stream failed before its response head (reset, GOAWAY, connection lost).
fn reset(addr: SocketAddr, e: &hyper::Error) -> ProxyError {
    debug!(%addr, error = %e, "h2: upstream stream failed before the response head");
    ProxyError::UpstreamReset { addr }
}

/// The `Host` the request is for: `:authority`, else the `Host` field.
fn host(head: &Parts) -> Option<&[u8]> {
    match head.uri.authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => head.headers.get(header::HOST).map(|h| h.as_bytes()),
    }
}

/// Methods that may be sent twice (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// A gRPC status in a head or trailers (an unreadable one is UNKNOWN).
fn grpc_status(headers: &HeaderMap) -> Option<u8> {
    let value = headers.get(GRPC_STATUS)?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2),
    )
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

/// HTTP/2 needs `:scheme` and `:authority`: the upstream hop is cleartext (`http`) and the
/// authority is the one the client used. Most requests already fit and are left as is.
fn upstream_uri(uri: &mut Uri, headers: &HeaderMap) -> Result<(), ProxyError> {
    if uri.scheme() == Some(&Scheme::HTTP) && uri.authority().is_some() {
        return Ok(());
    }
    let authority = match uri.authority() {
        Some(a) => a.clone(),
        None => headers
            .get(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .ok_or(ProxyError::BadRequest(
                "the request has neither :authority nor Host",
            ))?,
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *uri = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    Ok(())
}

/// `X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded` and `Via` (see [`forwarding`]), and
/// `malla-client-id` from the handshake only.
fn request_headers(headers: &mut HeaderMap, down: &Downstream) {
    headers.remove(forwarding::CLIENT_ID_HEADER);
    if let Some(id) = &down.identity {
        headers.insert(forwarding::CLIENT_ID_HEADER, id.clone());
    }
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Vacant(v) => {
            v.insert(down.xff.clone());
        }
        Entry::Occupied(mut o) => {
            let value = forwarding::x_forwarded_for(Some(&joined(&o)), down.client);
            if let Ok(v) = HeaderValue::try_from(value) {
                o.insert(v);
            }
        }
    }
    headers
        .entry(X_FORWARDED_PROTO)
        .or_insert(HeaderValue::from_static("http"));
    if let Entry::Occupied(mut o) = headers.entry(header::FORWARDED) {
        let value = forwarding::forwarded(&joined(&o), down.client, "http");
        if let Ok(v) = HeaderValue::try_from(value) {
            o.insert(v);
        }
    }
    append_via(headers);
}

fn append_via(headers: &mut HeaderMap) {
    match headers.entry(header::VIA) {
        Entry::Vacant(v) => {
            v.insert(HeaderValue::from_static(forwarding::VIA_HTTP2));
        }
        Entry::Occupied(mut o) => {
            let value = forwarding::via(Some(&joined(&o)), forwarding::VIA_HTTP2);
            if let Ok(v) = HeaderValue::try_from(value) {
                o.insert(v);
            }
        }
    }
}

/// A field's values as one comma-separated list (a field may be sent several times).
fn joined<'a>(entry: &'a header::OccupiedEntry<'_, HeaderValue>) -> Cow<'a, [u8]> {
    let mut values = entry.iter();
    let first = values.next().map_or(&b""[..], |v| v.as_bytes());
    let mut rest = values.peekable();
    if rest.peek().is_none() {
        return Cow::Borrowed(first);
    }
    let mut all = first.to_vec();
    for v in rest {
        all.extend_from_slice(b", ");
        all.extend_from_slice(v.as_bytes());
    }
    Cow::Owned(all)
}
