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
    HeaderMap, Method, Request, Response, Uri, Version,
};
use hyper::{body::Incoming, client::conn::http2::SendRequest, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use malla_core::policy::{Outcome, RELAYED_FAILURE_HEADER, TIMEOUT_HEADER};
use tokio::{
    net::TcpStream,
    time::{Instant, Sleep},
};
use tracing::debug;

pub(crate) use client::EndpointClient;

use self::{
    body::{BodyState, Hold, RequestBody, ResponseBody, Unrecorded},
    client::{Settings, StreamGuard},
    rewind::Rewind,
};
use crate::{
    endpoint::Endpoint,
    error::ProxyError,
    forwarding,
    resilience::{
        budget, deadline,
        limits::{Limit, Slot},
        Resilience,
    },
    server::ListenerCtx,
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

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const MALLA_TIMEOUT: HeaderName = HeaderName::from_static(TIMEOUT_HEADER);
const RELAYED_FAILURE: HeaderName = HeaderName::from_static(RELAYED_FAILURE_HEADER);
/// A year, in seconds: the cap on timeouts in `Instant` arithmetic.
const YEAR: u64 = 365 * 24 * 3600;

/// What every stream of one client connection shares.
struct Downstream {
    ctx: Arc<ListenerCtx>,
    client: IpAddr,
    /// `X-Forwarded-For` for requests that carry none, built once per connection.
    xff: HeaderValue,
    /// Streams opened so far, and those whose response is still being relayed: the idle
    /// check compares the first between two ticks and leaves busy connections alone.
    streams: AtomicU64,
    relaying: AtomicU64,
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
        streams: AtomicU64::new(0),
        relaying: AtomicU64::new(0),
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
    let call = Call::new(&down, upstream, &res, &head, grpc, arrived);
    let (req, again) = call.prepare(head, body);
    // Held here, lent to the attempts: an attempt that fails before the request left gives
    // it back in place.
    let mut req = Some(req);
    match call.run(&mut req, &again).await {
        Ok(response) => Ok(response),
        Err(e) => {
            upstream.error(&e);
            debug!(error = %e, "h2: answering with an error");
            Ok(e.http_response(grpc, down.ctx.relay_mark(upstream)))
        }
    }
}

/// One request stream's exchange with its upstream, under the upstream's policy.
///
/// Written flat, with the rare paths boxed (faults and rate limits, connecting, waiting
/// for a stream slot, resending, every attempt after the first), because this future is
/// part of every stream's task and is moved into it on each spawn.
struct Call<'a> {
    down: &'a Arc<Downstream>,
    upstream: &'a Arc<Upstream>,
    res: &'a Resilience,
    grpc: bool,
    idempotent: bool,
    arrived: Instant,
    /// When the response head must be here, every attempt included; `None`: no bound but
    /// the per-try timeout.
    deadline: Option<Instant>,
}

impl<'a> Call<'a> {
    fn new(
        down: &'a Arc<Downstream>,
        upstream: &'a Arc<Upstream>,
        res: &'a Resilience,
        head: &Parts,
        grpc: bool,
        arrived: Instant,
    ) -> Self {
        // The caller's budget: gRPC's own field for gRPC calls, malla's for the others.
        let incoming = if grpc {
            head.headers
                .get(GRPC_TIMEOUT)
                .and_then(|v| deadline::parse_grpc_timeout(v.as_bytes()))
        } else {
            head.headers
                .get(MALLA_TIMEOUT)
                .and_then(|v| deadline::parse_timeout_ms(v.as_bytes()))
        };
        Call {
            down,
            upstream,
            res,
            grpc,
            idempotent: is_idempotent(&head.method),
            arrived,
            deadline: deadline::deadline(|| arrived, res.policy.timeouts.request, incoming),
        }
    }

    /// The request for the first attempt, and what another attempt would need. A request
    /// that may be sent again after it left keeps a copy of its head and a recording of
    /// its body; one that may not is still tried again when it never left (hyper gives it
    /// back when the connection closed before it was sent).
    fn prepare(&self, head: Parts, body: Incoming) -> (Request<RequestBody>, Again) {
        let retries = &self.res.policy.retries;
        let max_attempts = self.res.max_attempts;
        let eligible = max_attempts > 1
            && (self.idempotent || retries.non_idempotent || (self.grpc && retries.on.has_grpc()));
        let (body, state) = RequestBody::new(body, eligible.then_some(retries.max_replay_bytes));
        let again = Again {
            head: eligible.then(|| HeadCopy::of(&head)),
            body: state,
            max_attempts,
        };
        (Request::from_parts(head, body), again)
    }

    /// Faults, rate limits and service limits, then attempts until one answers in a way
    /// that is not retried, or the policy allows no more.
    async fn run(
        &self,
        req: &mut Option<Request<RequestBody>>,
        again: &Again,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (upstream, res) = (self.upstream, self.res);
        let path = req.as_ref().map_or("/", |r| r.uri().path());
        if let Some(delay) = upstream.admit(res, path.as_bytes())? {
            Box::pin(self.delay(delay)).await?;
        }
        let request = upstream.acquire(Limit::Requests, res)?;
        upstream.deposit(res);
        if let Some(req) = req.as_mut() {
            self.stamp(req.headers_mut())?;
        }
        let mut guard = StreamGuard::new(
            upstream.pick(None)?,
            upstream.config.h2_max_concurrent_streams,
        );
        // Not registered with the timer until first polled, so untimed requests never are.
        let first = Timer::first(res.per_try_timeout, self.deadline).unwrap_or(self.arrived);
        let mut timer = Timer {
            sleep: std::pin::pin!(tokio::time::sleep_until(first)),
            per_try: res.per_try_timeout,
            deadline: self.deadline,
        };
        let tried = self
            .attempt(&mut guard, req, &mut timer, again.body.as_deref())
            .await;
        match self.judge(&guard, tried, req.is_some(), 1, again) {
            Step::Relay(resp, unrecorded) => {
                Ok(self.relay(resp, guard, request, unrecorded, again))
            }
            Step::Fail(err) => Err(err),
            Step::Retry(last) => {
                Box::pin(self.retry(last, guard, request, timer, req, again)).await
            }
        }
    }

    /// The attempts after the first, while the last one deserves another and the budget,
    /// the `max_retries` limit and the deadline allow it.
    async fn retry(
        &self,
        mut last: Last,
        mut guard: StreamGuard,
        request: Option<Slot>,
        mut timer: Timer<'_>,
        req: &mut Option<Request<RequestBody>>,
        again: &Again,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let mut attempt = 1;
        // Endpoints tried so far: a retry avoids them all while there are others.
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        loop {
            let Some((slot, wait)) = self.permit(attempt) else {
                return self.conclude(last, guard, request, again);
            };
            // The request is still here if it never left; else it is made again.
            if req.is_none() {
                *req = again.request();
                if req.is_none() {
                    // The body went past the replay cap or failed meanwhile.
                    return self.conclude(last, guard, request, again);
                }
            }
            tried.push(guard.in_flight().endpoint().clone());
            // The failed attempt's stream and endpoint are let go before the backoff.
            drop(last);
            drop(guard);
            let _retry = slot;
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            attempt += 1;
            if let Some(req) = req.as_mut() {
                self.stamp(req.headers_mut())?;
            }
            guard = StreamGuard::new(
                self.upstream
                    .pick_avoiding(|e| tried.iter().any(|t| std::ptr::eq(&**t, e)))?,
                self.upstream.config.h2_max_concurrent_streams,
            );
            timer.restart();
            let tried = self
                .attempt(&mut guard, req, &mut timer, again.body.as_deref())
                .await;
            match self.judge(&guard, tried, req.is_some(), attempt, again) {
                Step::Relay(resp, unrecorded) => {
                    return Ok(self.relay(resp, guard, request, unrecorded, again))
                }
                Step::Fail(err) => return Err(err),
                Step::Retry(next) => last = next,
            }
        }
    }

    /// One attempt on the endpoint of `guard`: a connection, a stream slot, the request
    /// sent and its response head awaited, within the per-try timeout and the deadline.
    /// The request is taken from `req` when it is sent, and put back if hyper gives it
    /// back unsent.
    async fn attempt(
        &self,
        guard: &mut StreamGuard,
        req: &mut Option<Request<RequestBody>>,
        timer: &mut Timer<'_>,
        sent: Option<&BodyState>,
    ) -> Result<Response<Incoming>, Failure> {
        let endpoint = guard.in_flight().endpoint().clone();
        let settings = self.settings();
        let mut sender = match endpoint.h2.live() {
            Some(live) => live,
            None => Box::pin(self.connect(&endpoint, &settings))
                .await
                .map_err(Failure::connect)?,
        };
        if !guard.try_acquire() {
            Box::pin(self.wait_for_stream(guard, timer, endpoint.addr))
                .await
                .map_err(Failure::local)?;
        }
        let Some(unsent) = req.take() else {
            return Err(Failure::local(ProxyError::BadRequest(
                "the request was lost",
            )));
        };
        let response = std::pin::pin!(sender.try_send_request(unsent));
        // Bound in a `let` so that the match's temporaries do not outlive it into the await.
        let resend = match timer.wait(response, sent).await {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(mut e)) => match e.take_message() {
                // The connection closed before the request left: it never reached the
                // upstream, so it is safe to send it once more on a fresh connection.
                Some(unsent) => {
                    *req = Some(unsent);
                    Box::pin(self.resend(&endpoint, req, &settings, timer, sent))
                }
                None => return Err(Failure::sent(reset(endpoint.addr, e.error()))),
            },
            Err(expired) => return Err(self.expired(expired, endpoint.addr)),
        };
        resend.await
    }

    /// The rare second send of [`Self::attempt`], on a fresh connection.
    async fn resend(
        &self,
        endpoint: &Endpoint,
        req: &mut Option<Request<RequestBody>>,
        settings: &Settings<'_>,
        timer: &mut Timer<'_>,
        sent: Option<&BodyState>,
    ) -> Result<Response<Incoming>, Failure> {
        debug!(addr = %endpoint.addr, "h2: connection closed under the request; reconnecting");
        let mut sender = self
            .connect(endpoint, settings)
            .await
            .map_err(Failure::connect)?;
        let Some(unsent) = req.take() else {
            return Err(Failure::local(ProxyError::BadRequest(
                "the request was lost",
            )));
        };
        let response = std::pin::pin!(sender.try_send_request(unsent));
        match timer.wait(response, sent).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(mut e)) => {
                let err = reset(endpoint.addr, e.error());
                // Closed again before it left: another endpoint may take it.
                *req = e.take_message();
                Err(Failure::sent(err))
            }
            Err(expired) => Err(self.expired(expired, endpoint.addr)),
        }
    }

    /// The endpoint's connection, made (or waited for) while holding a
    /// `max_pending_requests` slot.
    async fn connect(
        &self,
        endpoint: &Endpoint,
        settings: &Settings<'_>,
    ) -> Result<SendRequest<RequestBody>, ProxyError> {
        let _pending = self.upstream.acquire(Limit::PendingRequests, self.res)?;
        endpoint.h2.reconnect(endpoint, settings).await
    }

    /// Waits for a stream slot on the endpoint while holding a `max_pending_requests`
    /// slot; the wait counts against the attempt's timeout.
    async fn wait_for_stream(
        &self,
        guard: &mut StreamGuard,
        timer: &mut Timer<'_>,
        addr: SocketAddr,
    ) -> Result<(), ProxyError> {
        let _pending = self.upstream.acquire(Limit::PendingRequests, self.res)?;
        timer
            .wait(std::pin::pin!(guard.acquire()), None)
            .await
            .map_err(|expired| self.expired(expired, addr).err)
    }

    /// Records an attempt's outcome and decides what comes next.
    /// `unsent`: the request never left (it is back in place).
    fn judge(
        &self,
        guard: &StreamGuard,
        tried: Result<Response<Incoming>, Failure>,
        unsent: bool,
        attempt: u32,
        again: &Again,
    ) -> Step {
        let in_flight = guard.in_flight();
        let more = attempt < again.max_attempts;
        match tried {
            Ok(resp) => {
                let status = resp.status().as_u16();
                in_flight.answered(status);
                let relayed = resp.headers().contains_key(RELAYED_FAILURE);
                // A gRPC call's status is in its trailers, unless the response is
                // trailers-only (`grpc-status` in the head).
                let outcome = if self.grpc && status == 200 {
                    grpc_status(resp.headers()).map(Outcome::Grpc)
                } else {
                    Some(Outcome::Status(status))
                };
                let Some(outcome) = outcome else {
                    return Step::Relay(resp, Some(relayed));
                };
                self.upstream.record(in_flight, outcome, relayed);
                if more && self.retryable(outcome, false) && again.possible() {
                    Step::Retry(Last::Answered(resp))
                } else {
                    Step::Relay(resp, None)
                }
            }
            Err(f) => {
                in_flight.failed(f.err.status().as_u16());
                let Some(outcome) = f.outcome else {
                    return Step::Fail(f.err);
                };
                self.upstream.record(in_flight, outcome, false);
                if more
                    && !matches!(f.err, ProxyError::DeadlineExceeded { .. })
                    && self.retryable(outcome, unsent)
                    && (unsent || again.possible())
                {
                    Step::Retry(Last::Failed(f))
                } else {
                    Step::Fail(f.err)
                }
            }
        }
    }

    /// Whether an outcome deserves another try under the retry policy: the condition is
    /// listed, and the request never left (a failed connect), or it is safe to send twice,
    /// or it is a gRPC call and the outcome a gRPC status (gRPC's own retry design).
    fn retryable(&self, outcome: Outcome, unsent: bool) -> bool {
        let policy = &self.res.policy.retries;
        policy.on.matches(outcome)
            && (unsent
                || outcome == Outcome::ConnectFailure
                || self.idempotent
                || policy.non_idempotent
                || (self.grpc && matches!(outcome, Outcome::Grpc(_))))
    }

    /// Whether another attempt may go now: the deadline after the backoff, the
    /// `max_retries` limit and the budget. The slot counts the retry while it is in flight.
    fn permit(&self, attempt: u32) -> Option<(Option<Slot>, Duration)> {
        let wait = budget::backoff(&self.res.policy.retries, attempt);
        if self.deadline.is_some_and(|d| Instant::now() + wait >= d) {
            return None;
        }
        let slot = self.upstream.acquire(Limit::Retries, self.res).ok()?;
        if !self.upstream.withdraw_retry(self.res) {
            return None;
        }
        Some((slot, wait))
    }

    /// No more attempts: the last answer goes to the client.
    fn conclude(
        &self,
        last: Last,
        guard: StreamGuard,
        request: Option<Slot>,
        again: &Again,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        match last {
            Last::Answered(resp) => Ok(self.relay(resp, guard, request, None, again)),
            Last::Failed(f) => Err(f.err),
        }
    }

    /// The response for the client; its body holds the stream, the endpoint and the
    /// request's slot until it ends (and records a gRPC call's status when `unrecorded`
    /// carries whether it was a relayed failure).
    fn relay(
        &self,
        resp: Response<Incoming>,
        guard: StreamGuard,
        request: Option<Slot>,
        unrecorded: Option<bool>,
        again: &Again,
    ) -> Response<ResponseBody> {
        if let Some(body) = &again.body {
            body.commit();
        }
        let (mut head, body) = resp.into_parts();
        append_via(&mut head.headers);
        let unrecorded = unrecorded.map(|relayed| Unrecorded {
            upstream: self.upstream.clone(),
            relayed,
        });
        let hold = Hold::new(guard, request, unrecorded, Relaying::new(self.down));
        Response::from_parts(head, ResponseBody::upstream(body, hold))
    }

    /// Waits an injected delay, within the deadline.
    async fn delay(&self, delay: Duration) -> Result<(), ProxyError> {
        deadline::wait(delay, self.deadline, Duration::ZERO)
            .await
            .map_err(|_| self.deadline_exceeded())
    }

    /// Before an attempt: fails once the deadline has passed (the request is not sent),
    /// else writes the time left into the request's `grpc-timeout` (gRPC) or
    /// `malla-timeout-ms` field for the next hop.
    fn stamp(&self, headers: &mut HeaderMap) -> Result<(), ProxyError> {
        let Some(d) = self.deadline else {
            return Ok(());
        };
        let left = deadline::remaining(d);
        if left.is_zero() {
            return Err(self.deadline_exceeded());
        }
        let (name, value) = if self.grpc {
            (GRPC_TIMEOUT, deadline::format_grpc_timeout(left))
        } else {
            (MALLA_TIMEOUT, left.as_millis().max(1).to_string())
        };
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
        Ok(())
    }

    fn deadline_exceeded(&self) -> ProxyError {
        ProxyError::DeadlineExceeded {
            budget: self.deadline.map_or(Duration::ZERO, |d| {
                d.saturating_duration_since(self.arrived)
            }),
        }
    }

    /// A timer that fired: the per-try timeout is the endpoint's failure (and may be
    /// retried); the deadline ends the call.
    fn expired(&self, expired: Expired, addr: SocketAddr) -> Failure {
        let err = match expired {
            Expired::PerTry => ProxyError::ResponseTimeout {
                addr,
                timeout: self.res.per_try_timeout,
            },
            Expired::Deadline => self.deadline_exceeded(),
        };
        Failure {
            err,
            outcome: Some(Outcome::Timeout),
        }
    }

    fn settings(&self) -> Settings<'a> {
        Settings {
            connect_timeout: self.res.connect_timeout,
            max_header_list_size: u32::try_from(self.down.ctx.shared.config.limits.max_head_bytes)
                .unwrap_or(u32::MAX),
            upstream: self.upstream,
            resilience: self.res,
        }
    }
}

/// What comes after an attempt.
enum Step {
    /// The answer for the client; with `Some(relayed)`, a gRPC status still to record.
    Relay(Response<Incoming>, Option<bool>),
    Retry(Last),
    Fail(ProxyError),
}

/// An attempt that deserves another, kept to answer with if there is none.
enum Last {
    Answered(Response<Incoming>),
    Failed(Failure),
}

/// An attempt that ended without a response head.
struct Failure {
    err: ProxyError,
    /// For the outlier detector and the retry conditions; `None`: not the endpoint's doing
    /// (a service limit, a wait for a stream slot).
    outcome: Option<Outcome>,
}

impl Failure {
    /// No connection (or a service limit said no): the request did not leave.
    fn connect(err: ProxyError) -> Self {
        let outcome = match err {
            ProxyError::LimitReached { .. } => None,
            _ => Some(Outcome::ConnectFailure),
        };
        Failure { err, outcome }
    }

    /// The stream failed or the connection was lost.
    fn sent(err: ProxyError) -> Self {
        Failure {
            err,
            outcome: Some(Outcome::Reset),
        }
    }

    fn local(err: ProxyError) -> Self {
        Failure { err, outcome: None }
    }
}

/// What another attempt needs to send the request again once it has left.
struct Again {
    /// The request head, kept when the request may be retried.
    head: Option<HeadCopy>,
    /// The request body's state; `None`: the request has no body.
    body: Option<Arc<BodyState>>,
    max_attempts: u32,
}

impl Again {
    fn possible(&self) -> bool {
        self.head.is_some() && self.body.as_ref().is_none_or(|b| b.can_replay())
    }

    fn request(&self) -> Option<Request<RequestBody>> {
        let head = self.head.as_ref()?;
        let body = match &self.body {
            None => RequestBody::empty(),
            Some(b) => b.replay()?,
        };
        Some(head.request(body))
    }
}

/// A copy of the request head as it went upstream (hyper consumes the request it sends).
struct HeadCopy {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl HeadCopy {
    fn of(head: &Parts) -> Self {
        HeadCopy {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            headers: head.headers.clone(),
        }
    }

    fn request(&self, body: RequestBody) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// The response timer of one attempt: the per-try timeout, which moves out while the
/// request body is still streaming (so a long upload or a client-streaming RPC is not
/// cut), and the call's deadline, which does not.
struct Timer<'a> {
    sleep: Pin<&'a mut Sleep>,
    /// Zero: none.
    per_try: Duration,
    deadline: Option<Instant>,
}

/// Which bound a timer hit.
enum Expired {
    PerTry,
    Deadline,
}

impl Timer<'_> {
    /// When an attempt that starts now times out, if it can.
    fn first(per_try: Duration, deadline: Option<Instant>) -> Option<Instant> {
        // A configured timeout of centuries must not overflow `Instant` arithmetic.
        let per_try =
            (!per_try.is_zero()).then(|| Instant::now() + per_try.min(Duration::from_secs(YEAR)));
        match (per_try, deadline) {
            (Some(p), Some(d)) => Some(p.min(d)),
            (p, d) => p.or(d),
        }
    }

    /// Starts the timer over for a new attempt.
    fn restart(&mut self) {
        if let Some(at) = Self::first(self.per_try, self.deadline) {
            self.sleep.as_mut().reset(at);
        }
    }

    /// Waits for `fut`, or fails once a bound has passed; with `sent`, the per-try bound
    /// moves out while the request body is still streaming. The bounds are only checked
    /// when the timer fires.
    async fn wait<F: Future>(
        &mut self,
        mut fut: Pin<&mut F>,
        sent: Option<&BodyState>,
    ) -> Result<F::Output, Expired> {
        let timed = !self.per_try.is_zero() || self.deadline.is_some();
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Ok(out),
                () = &mut self.sleep, if timed => {
                    let now = Instant::now();
                    let next = match self.deadline {
                        Some(d) if d <= now => return Err(Expired::Deadline),
                        Some(d) if self.per_try.is_zero() => d,
                        deadline => match extended_deadline(sent, self.per_try) {
                            Some(next) => deadline.map_or(next, |d| d.min(next)),
                            None => return Err(Expired::PerTry),
                        },
                    };
                    self.sleep.as_mut().reset(next);
                }
            }
        }
    }
}

/// When the per-try timer fired: the next deadline if the request body is still
/// streaming or finished less than `timeout` ago, `None` once the time is up.
fn extended_deadline(sent: Option<&BodyState>, timeout: Duration) -> Option<Instant> {
    let timeout = timeout.min(Duration::from_secs(YEAR));
    let now = Instant::now();
    match sent?.at() {
        None => Some(now + timeout),
        Some(done) if done + timeout > now => Some(done + timeout),
        Some(_) => None,
    }
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
