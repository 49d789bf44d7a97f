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
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use bytes::BytesMut;
use http::{
    header::{self, Entry, HeaderName, HeaderValue},
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, Method, Request, Response, Uri,
};
use hyper::{body::Incoming, client::conn::TrySendError, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    net::TcpStream,
    time::{Instant, Sleep},
};
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
    let (req, sent) = match upstream_request(&down, req) {
        Ok(prepared) => prepared,
        Err(e) => return Ok(e.http_response(grpc, None)),
    };
    let upstream = match down.ctx.route(host(&req)) {
        Ok(u) => u,
        Err(e) => {
            debug!(error = %e, "h2: no route");
            return Ok(e.http_response(grpc, None));
        }
    };
    let relay = down.ctx.relay_mark(upstream);
    let in_flight = match upstream.pick(None) {
        Ok(f) => f,
        Err(e) => {
            upstream.error(&e);
            debug!(error = %e, "h2: no endpoint");
            return Ok(e.http_response(grpc, relay));
        }
    };
    let endpoint = in_flight.endpoint().clone();
    let mut guard = StreamGuard::new(in_flight, upstream.config.h2_max_concurrent_streams);
    match send(&down, upstream, &endpoint, &mut guard, req, sent).await {
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
            Ok(e.http_response(grpc, relay))
        }
    }
}

/// Sends the request to the endpoint and waits for the response head, at most
/// `response_timeout` after the request body was sent completely (never when it is zero):
/// while the body still streams, the clock does not run, so a long upload or a
/// client-streaming RPC is not cut. The deadline is only checked when the timer fires.
///
/// Written flat, with the rare paths boxed, because this future is part of every stream's
/// task and is moved into it on each spawn.
async fn send(
    down: &Downstream,
    upstream: &Upstream,
    endpoint: &Endpoint,
    guard: &mut StreamGuard,
    req: Request<RequestBody>,
    sent: Option<Arc<SentAt>>,
) -> Result<Response<Incoming>, ProxyError> {
    let config = &upstream.config;
    let settings = Settings {
        connect_timeout: config.connect_timeout,
        max_header_list_size: u32::try_from(down.ctx.shared.config.limits.max_head_bytes)
            .unwrap_or(u32::MAX),
    };
    let mut sender = endpoint.h2.sender(endpoint, &settings).await?;
    // Not registered with the timer until first polled, so untimed requests never are.
    let timer = std::pin::pin!(tokio::time::sleep(config.response_timeout));
    let mut deadline = Deadline {
        timer,
        timeout: config.response_timeout,
        addr: endpoint.addr,
    };
    if !guard.try_acquire() {
        // Waiting for a stream slot counts against the timeout from the start.
        deadline.wait(std::pin::pin!(guard.acquire()), None).await?;
    }
    let sent = sent.as_deref();
    let response = std::pin::pin!(sender.try_send_request(req));
    // Bound in a `let` so that the match's temporaries do not outlive it into the await.
    let retry = match deadline.wait(response, sent).await? {
        Ok(response) => return Ok(response),
        // The connection closed before the request left: it never reached the upstream,
        // so it is safe to send it once more on a fresh connection.
        Err(e) if e.message().is_some() => {
            Box::pin(resend(endpoint, e, &settings, &mut deadline, sent))
        }
        Err(e) => return Err(reset(endpoint.addr, e.error())),
    };
    retry.await
}

/// The rare second try of [`send`], boxed so that it does not grow every request's future.
async fn resend(
    endpoint: &Endpoint,
    mut unsent: TrySendError<Request<RequestBody>>,
    settings: &Settings,
    deadline: &mut Deadline<'_>,
    sent: Option<&SentAt>,
) -> Result<Response<Incoming>, ProxyError> {
    let Some(req) = unsent.take_message() else {
        return Err(reset(endpoint.addr, unsent.error()));
    };
    debug!(addr = %endpoint.addr, "h2: connection closed under the request; reconnecting");
    let mut sender = endpoint.h2.sender(endpoint, settings).await?;
    let response = std::pin::pin!(sender.send_request(req));
    deadline
        .wait(response, sent)
        .await?
        .map_err(|e| reset(endpoint.addr, &e))
}

/// The response deadline of one request (see [`send`]).
struct Deadline<'a> {
    timer: Pin<&'a mut Sleep>,
    /// Zero: no deadline.
    timeout: Duration,
    addr: SocketAddr,
}

impl Deadline<'_> {
    /// Waits for `fut`, or fails with `ResponseTimeout` once the deadline has passed; with
    /// `sent`, the deadline moves out while the request body is still streaming.
    async fn wait<F: Future>(
        &mut self,
        mut fut: Pin<&mut F>,
        sent: Option<&SentAt>,
    ) -> Result<F::Output, ProxyError> {
        let timed = !self.timeout.is_zero();
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Ok(out),
                () = &mut self.timer, if timed => match extended_deadline(sent, self.timeout) {
                    Some(deadline) => self.timer.as_mut().reset(deadline),
                    None => {
                        return Err(ProxyError::ResponseTimeout {
                            addr: self.addr,
                            timeout: self.timeout,
                        })
                    }
                },
            }
        }
    }
}

/// When the response timer fired: the next deadline if the request body is still
/// streaming or finished less than `timeout` ago, `None` once the time is up.
fn extended_deadline(sent: Option<&SentAt>, timeout: Duration) -> Option<Instant> {
    // A configured timeout of centuries must not overflow `Instant` arithmetic.
    let timeout = timeout.min(Duration::from_secs(365 * 24 * 3600));
    let now = Instant::now();
    match sent?.at() {
        None => Some(now + timeout),
        Some(done) if done + timeout > now => Some(done + timeout),
        Some(_) => None,
    }
}

/// The request as it goes upstream (`:scheme`, `:authority`, forwarding fields), and the
/// marker of its body's end (if it has a body).
fn upstream_request(
    down: &Downstream,
    req: Request<Incoming>,
) -> Result<(Request<RequestBody>, Option<Arc<SentAt>>), ProxyError> {
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
    let (body, sent) = RequestBody::new(body);
    Ok((Request::from_parts(head, body), sent))
}

/// The upstream's stream failed before its response head (reset, GOAWAY, connection lost).
fn reset(addr: SocketAddr, e: &hyper::Error) -> ProxyError {
    debug!(%addr, error = %e, "h2: upstream stream failed before the response head");
    ProxyError::UpstreamReset { addr }
}

/// The `Host` the request is for: `:authority`, else the `Host` field.
fn host<B>(req: &Request<B>) -> Option<&[u8]> {
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
