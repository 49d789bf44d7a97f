//! HTTP/2 (prior knowledge) and gRPC, on hyper and h2.
//!
//! A client connection is served by hyper's HTTP/2 server; each stream walks one line:
//!
//! ```text
//! stream -> route (:authority / Host) -> balance (pick) -> stream slot on the endpoint's
//!        -> shared h2 connection (client.rs) -> upstream stream; response head back,
//!        -> bodies and trailers relayed frame by frame in both directions
//! ```
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

mod body;
mod client;
mod rewind;
#[cfg(test)]
mod tests;

use std::{
    borrow::Cow,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::BytesMut;
use http::{
    header::{self, Entry, HeaderName, HeaderValue},
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, Method, Request, Response, Uri,
};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, time::Instant};
use tracing::debug;

pub(crate) use client::EndpointClient;

use self::{
    body::{RequestBody, ResponseBody, SentAt},
    client::{Settings, StreamGuard},
    rewind::Rewind,
};
use crate::{
    endpoint::Endpoint, error::ProxyError, forwarding, server::ListenerCtx, upstream::Upstream,
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

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// What every stream of one client connection shares.
struct Downstream {
    ctx: Arc<ListenerCtx>,
    client: IpAddr,
    /// `X-Forwarded-For` for requests that carry none, built once per connection.
    xff: HeaderValue,
}

/// Serves one client connection that opened with the HTTP/2 preface; `prefix` holds the
/// bytes detection already read (the preface at least).
pub(crate) async fn serve(
    stream: TcpStream,
    prefix: BytesMut,
    peer: SocketAddr,
    ctx: &Arc<ListenerCtx>,
) {
    let client = peer.ip();
    let down = Arc::new(Downstream {
        ctx: ctx.clone(),
        client,
        xff: HeaderValue::try_from(client.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
    });
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

/// One client stream, start to response head. Never fails: errors become responses.
async fn forward(
    down: Arc<Downstream>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let grpc = is_grpc(req.headers());
    let upstream = match down.ctx.route(host(&req)) {
        Ok(u) => u,
        Err(e) => {
            debug!(error = %e, "h2: no route");
            return Ok(e.http_response(grpc));
        }
    };
    let endpoint = match upstream.pick() {
        Ok(e) => e,
        Err(e) => {
            upstream.error(&e);
            debug!(error = %e, "h2: no endpoint");
            return Ok(e.http_response(grpc));
        }
    };
    let mut guard = StreamGuard::new(endpoint.start(), upstream.config.h2_max_concurrent_streams);
    match send(&down, upstream, &endpoint, &mut guard, req).await {
        Ok(response) => {
            guard.in_flight().answered(response.status().as_u16());
            let (mut head, body) = response.into_parts();
            append_via(&mut head.headers);
            Ok(Response::from_parts(
                head,
                ResponseBody::upstream(body, guard),
            ))
        }
        Err(e) => {
            upstream.error(&e);
            guard.in_flight().failed(e.status().as_u16());
            debug!(error = %e, "h2: answering with an error");
            Ok(e.http_response(grpc))
        }
    }
}

/// Sends the request to the endpoint and waits for the response head.
async fn send(
    down: &Downstream,
    upstream: &Upstream,
    endpoint: &Endpoint,
    guard: &mut StreamGuard,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is not supported over HTTP/2",
        ));
    }
    let (mut head, body) = req.into_parts();
    upstream_uri(&mut head.uri, &head.headers)?;
    request_headers(&mut head.headers, down);
    let (body, sent) = RequestBody::new(body);
    let req = Request::from_parts(head, body);

    let config = &upstream.config;
    let settings = Settings {
        connect_timeout: config.connect_timeout,
        max_header_list_size: u32::try_from(down.ctx.shared.config.limits.max_head_bytes)
            .unwrap_or(u32::MAX),
    };
    let addr = endpoint.addr;
    let mut sender = endpoint.h2.sender(endpoint, &settings).await?;
    let exchange = async {
        guard.acquire().await;
        match sender.try_send_request(req).await {
            Ok(response) => Ok(response),
            Err(mut e) => match e.take_message() {
                // The connection closed before the request left: it never reached the
                // upstream, so it is safe to send it once more on a fresh connection.
                Some(req) => {
                    debug!(%addr, "h2: connection closed under the request; reconnecting");
                    let mut sender = endpoint.h2.sender(endpoint, &settings).await?;
                    sender.send_request(req).await.map_err(|e| reset(addr, &e))
                }
                None => Err(reset(addr, e.error())),
            },
        }
    };
    if config.response_timeout.is_zero() {
        return exchange.await;
    }
    with_response_timeout(exchange, config.response_timeout, sent.as_deref(), addr).await
}

/// Waits for `exchange`, giving up `timeout` after the request body was sent completely.
/// While the body still streams the clock does not run: the deadline is only checked when
/// the timer fires, and moved out when the body is not done yet.
async fn with_response_timeout<F>(
    exchange: F,
    timeout: Duration,
    sent: Option<&SentAt>,
    addr: SocketAddr,
) -> Result<Response<Incoming>, ProxyError>
where
    F: std::future::Future<Output = Result<Response<Incoming>, ProxyError>>,
{
    let mut exchange = std::pin::pin!(exchange);
    let mut deadline = Instant::now() + timeout;
    loop {
        if let Ok(result) = tokio::time::timeout_at(deadline, exchange.as_mut()).await {
            return result;
        }
        let now = Instant::now();
        deadline = match sent {
            // Still sending the body: look again one timeout later.
            Some(s) => match s.at() {
                None => now + timeout,
                Some(done) if done + timeout > now => done + timeout,
                Some(_) => break,
            },
            None => break,
        };
    }
    Err(ProxyError::ResponseTimeout { addr, timeout })
}

/// The upstream's stream failed before its response head (reset, GOAWAY, connection lost).
fn reset(addr: SocketAddr, e: &hyper::Error) -> ProxyError {
    debug!(%addr, error = %e, "h2: upstream stream failed before the response head");
    ProxyError::UpstreamReset { addr }
}

/// The `Host` the request is for: `:authority`, else the `Host` field.
fn host(req: &Request<Incoming>) -> Option<&[u8]> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => req.headers().get(header::HOST).map(|h| h.as_bytes()),
    }
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

/// `X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded` and `Via` (see [`forwarding`]).
fn request_headers(headers: &mut HeaderMap, down: &Downstream) {
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
