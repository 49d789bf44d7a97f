//! HTTP/1.1, owned end to end.
//!
//! This is the proxy's hot path, so it is written the way Pingora writes its HTTP/1
//! sessions rather than as a hyper server feeding a pooled client: one task per client
//! connection reads request heads into a reused buffer, parses them with `httparse`,
//! rewrites them into a reused output buffer and relays them over an upstream connection
//! that the task *owns* for as long as the balancer keeps choosing the same endpoint (one
//! pool checkout per endpoint switch, not per request). Bodies stream through fixed-size
//! buffers ([`body`]). In steady state a request costs two reads and two writes and no
//! allocation. `shared/PERF.md` has the measurements behind this choice.
//!
//! Per request:
//!
//! ```text
//! read head (idle / head timeouts, size limits) -> parse + validate + rewrite (head.rs)
//!   -> route (Host) -> balance -> connection (held | pool | connect)
//!   -> send head (+ body when it is already buffered)
//!   -> [stream the request body] while waiting for the response head (1xx relayed)
//!   -> rewrite + send the response head -> relay the response body
//!   -> keep both connections, or close what can no longer be trusted
//! ```
//!
//! Requests on one connection are handled strictly in order, so pipelined requests get
//! their responses in order and a request is never read before the previous response is
//! complete. Errors before the response head reach the client as a response from
//! [`ProxyError`]; after it, the only honest signal left is closing the connection.

pub mod body;
pub mod head;
#[doc(hidden)]
pub mod invariants;

use std::{
    future::Future,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::Arc,
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tracing::debug;

use self::{
    body::BodyError,
    head::{BodyKind, Parsed, RequestInfo, ResponseInfo},
};
use malla_core::policy::{Outcome, Retries};

use crate::{
    config::Limits,
    connect::connect,
    endpoint::{Endpoint, InFlight},
    error::ProxyError,
    metrics::ConnectionTracker,
    resilience::{
        budget, deadline,
        limits::{self, Limit},
        Resilience,
    },
    server::ListenerCtx,
    upstream::Upstream,
};

/// Size of the per-connection read buffers.
pub const READ_BUF: usize = 16 * 1024;

/// A pooled connection idle for longer than this is checked for a close by its peer
/// before it carries a request.
const PROBE_AFTER: Duration = Duration::from_secs(1);

/// An upstream connection owned by one client connection.
struct UpConn {
    endpoint: Arc<Endpoint>,
    stream: TcpStream,
    buf: BytesMut,
    last_used: Instant,
    _active: ConnectionTracker,
    /// Counts against the upstream's `max_connections` while in use.
    _slot: Option<limits::Slot>,
}

impl UpConn {
    fn new(endpoint: Arc<Endpoint>, stream: TcpStream, slot: Option<limits::Slot>) -> Self {
        UpConn {
            _slot: slot,
            _active: ConnectionTracker::open(&endpoint.metrics.open_connections),
            endpoint,
            stream,
            buf: BytesMut::with_capacity(READ_BUF),
            last_used: Instant::now(),
        }
    }

    /// Gives the connection back to its endpoint's pool for other client connections.
    fn release(self) {
        self.endpoint.pool.checkin(self.stream);
    }
}

/// What the connection loop does after one exchange.
enum Next {
    KeepAlive,
    Close,
    /// The upstream answered `101 Switching Protocols`: relay bytes both ways.
    Tunnel(UpConn),
}

/// Per-connection state reused across requests.
struct Session<'a> {
    ctx: &'a ListenerCtx,
    limits: &'a Limits,
    client_addr: head::ClientAddr,
    /// The rewritten request head (kept until the response head, for a retry).
    req_head: Vec<u8>,
    /// The rewritten response head.
    resp_head: Vec<u8>,
    held: Option<UpConn>,
}

pub(crate) async fn serve(
    mut client: TcpStream,
    mut buf: BytesMut,
    peer: SocketAddr,
    ctx: &Arc<ListenerCtx>,
) {
    let mut s = Session {
        ctx,
        limits: &ctx.shared.config.limits,
        client_addr: head::ClientAddr::new(peer.ip()),
        req_head: Vec::with_capacity(1024),
        resp_head: Vec::with_capacity(1024),
        held: None,
    };
    // One drain waiter and one idle timer for the connection's lifetime, re-armed per
    // request: registering a fresh waiter (a mutex on the shared watch) and a fresh timer
    // for every request is measurable on the hot path.
    let mut drain = ctx.shared.drain_signal();
    let mut drained = pin!(drain.wait_for(|d| *d));
    let mut timer = pin!(tokio::time::sleep(
        ctx.shared.config.limits.client_idle_timeout
    ));
    loop {
        let info = match s
            .read_request(&mut client, &mut buf, drained.as_mut(), timer.as_mut())
            .await
        {
            Ok(Some(info)) => info,
            Ok(None) => break,
            Err(err) => {
                debug!(error = %err, %peer, "rejecting request");
                let _ = client.write_all(&err.http1_response(true, None)).await;
                linger_close(&mut client).await;
                break;
            }
        };
        let upstream = match ctx.route(info.host.map(|(a, b)| &buf[a..b])) {
            Ok(u) => u,
            Err(err) => {
                buf.advance(info.head_len);
                let close = info.body != BodyKind::Empty || !info.keep_alive;
                let _ = client.write_all(&err.http1_response(close, None)).await;
                if close {
                    break;
                }
                continue;
            }
        };
        match s.exchange(&mut client, &mut buf, &info, upstream).await {
            Next::KeepAlive if !ctx.shared.is_draining() => {}
            Next::KeepAlive | Next::Close => break,
            Next::Tunnel(up) => {
                tunnel(client, buf, up).await;
                return;
            }
        }
    }
    if let Some(up) = s.held.take() {
        up.release();
    }
}

impl Session<'_> {
    /// Reads and parses the next request head. `None`: the client closed, idled out, or the
    /// proxy is draining between requests.
    async fn read_request(
        &mut self,
        client: &mut TcpStream,
        buf: &mut BytesMut,
        mut drained: Pin<&mut impl Future>,
        mut timer: Pin<&mut tokio::time::Sleep>,
    ) -> Result<Option<RequestInfo>, ProxyError> {
        let max_headers = self.limits.max_headers.min(head::MAX_HEADERS);
        let mut head_deadline = None;
        loop {
            if !buf.is_empty() {
                match head::parse_request(buf, max_headers, &self.client_addr, &mut self.req_head)?
                {
                    Parsed::Complete(info) if info.head_len <= self.limits.max_head_bytes => {
                        return Ok(Some(info))
                    }
                    Parsed::Complete(_) => {
                        return Err(ProxyError::HeadTooLarge {
                            limit: self.limits.max_head_bytes,
                        })
                    }
                    Parsed::Partial if buf.len() >= self.limits.max_head_bytes => {
                        return Err(ProxyError::HeadTooLarge {
                            limit: self.limits.max_head_bytes,
                        })
                    }
                    Parsed::Partial => {}
                }
            }
            let deadline = if buf.is_empty() {
                Instant::now() + self.limits.client_idle_timeout
            } else {
                // The whole head must arrive within the head timeout, however it trickles.
                *head_deadline.get_or_insert_with(|| Instant::now() + self.limits.head_timeout)
            };
            // Re-arming a timer costs a timer-wheel update: extend the idle timer only when
            // it falls short by more than a slack (an idle close may come up to 1 s, or a
            // quarter of the idle timeout, late). An expired timer is always short.
            let slack = (self.limits.client_idle_timeout / 4).min(Duration::from_secs(1));
            let current = timer.deadline();
            if current > deadline || current + slack < deadline {
                timer.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                read = body::fill(client, buf) => match read {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => {}
                },
                _ = drained.as_mut(), if buf.is_empty() => return Ok(None),
                _ = timer.as_mut() => {
                    return if buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(ProxyError::HeadTimeout(self.limits.head_timeout))
                    };
                }
            }
        }
    }

    /// One request/response exchange with an upstream, under its resilience policy:
    /// deadline, faults, rate limits and service limits first, then one or more attempts.
    async fn exchange(
        &mut self,
        client: &mut TcpStream,
        buf: &mut BytesMut,
        req: &RequestInfo,
        upstream: &Upstream,
    ) -> Next {
        let res = upstream.resilience_full();
        let deadline = deadline::deadline(Instant::now, res.policy.timeouts.request, req.timeout);
        let admitted = upstream.admit(&res, req.path(buf));
        buf.advance(req.head_len);
        let delayed = match admitted {
            Ok(Some(delay)) => deadline::wait(delay, deadline, budget(&res, req)).await,
            Ok(None) => Ok(()),
            Err(err) => Err(err),
        };
        if let Err(err) = delayed {
            return self.fail(client, req, upstream, None, err).await;
        }
        let _request = match upstream.acquire(Limit::Requests, &res) {
            Ok(slot) => slot,
            Err(err) => return self.fail(client, req, upstream, None, err).await,
        };
        upstream.deposit(&res);

        // The body is "complete" when it is already in the buffer: it goes out with the
        // head in one write, and the request can be sent again (a retry, or a dead pooled
        // connection). A small body still on its way is read first when the request may
        // be retried, so that it can be replayed.
        let mut complete_len = match req.body {
            BodyKind::Empty => Some(0),
            BodyKind::Length(n) if n <= buf.len() as u64 => Some(n as usize),
            _ => None,
        };
        if let BodyKind::Length(n) = req.body {
            let retries = &res.policy.retries;
            if complete_len.is_none()
                && res.max_attempts > 1
                && n <= retries.max_replay_bytes
                && (req.idempotent || retries.non_idempotent)
                && !req.expect_continue
            {
                complete_len = self.read_body(client, buf, n as usize).await;
                if complete_len.is_none() {
                    return Next::Close;
                }
            }
        }
        let head_end = self.req_head.len();
        if let Some(n) = complete_len {
            self.req_head.extend_from_slice(&buf[..n]);
            buf.advance(n);
            return self
                .exchange_buffered(client, req, upstream, &res, deadline, head_end)
                .await;
        }
        self.exchange_streaming(client, buf, req, upstream, &res, deadline, head_end)
            .await
    }

    /// Reads the rest of a `Content-Length` body into `buf` (at most the head timeout);
    /// `None` when the client went away or was too slow.
    async fn read_body(
        &mut self,
        client: &mut TcpStream,
        buf: &mut BytesMut,
        n: usize,
    ) -> Option<usize> {
        let deadline = Instant::now() + self.limits.head_timeout;
        buf.reserve(n.saturating_sub(buf.len()));
        while buf.len() < n {
            match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
                Ok(Ok(read)) if read > 0 => {}
                _ => return None,
            }
        }
        Some(n)
    }

    /// The request is entirely in `req_head` (head ends at `head_end`): attempts, retried
    /// as the policy allows, then the answer relayed.
    #[allow(clippy::too_many_arguments)]
    async fn exchange_buffered(
        &mut self,
        client: &mut TcpStream,
        req: &RequestInfo,
        upstream: &Upstream,
        res: &Resilience,
        deadline: Option<Instant>,
        head_end: usize,
    ) -> Next {
        let retries = &res.policy.retries;
        let max_attempts = res.max_attempts;
        // Endpoints tried so far (allocated only when a retry happens).
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut timeout_field = TimeoutField::new(head_end);
        let mut _retry_slot = None;
        let mut attempt = 0;
        let (in_flight, up, resp) = loop {
            attempt += 1;
            let in_flight =
                match upstream.pick_avoiding(|e| tried.iter().any(|t| std::ptr::eq(&**t, e))) {
                    Ok(f) => f,
                    Err(err) => return self.fail(client, req, upstream, None, err).await,
                };
            let (timeout, deadline_bound) = match deadline {
                None => (res.per_try_timeout, false),
                Some(d) => {
                    let left = deadline::remaining(d);
                    if left.is_zero() {
                        let err = ProxyError::DeadlineExceeded {
                            budget: budget(res, req),
                        };
                        return self.fail(client, req, upstream, None, err).await;
                    }
                    timeout_field.set(&mut self.req_head, left);
                    let bounded = res.per_try_timeout.is_zero() || left < res.per_try_timeout;
                    (if bounded { left } else { res.per_try_timeout }, bounded)
                }
            };
            let failure = match self
                .attempt(client, req, upstream, &in_flight, res, timeout)
                .await
            {
                Ok((up, resp)) => {
                    let outcome = Outcome::Status(resp.status);
                    upstream.record(&in_flight, outcome, resp.relayed);
                    in_flight.answered(resp.status);
                    if resp.status == 101
                        || attempt >= max_attempts
                        || !retryable(retries, req, outcome)
                    {
                        break (in_flight, up, resp);
                    }
                    match self.retry_permit(upstream, res, attempt, deadline).await {
                        Some(slot) => {
                            _retry_slot = slot;
                            self.discard(up, &resp);
                            tried.push(in_flight.endpoint().clone());
                            continue;
                        }
                        None => break (in_flight, up, resp),
                    }
                }
                Err(failure) => failure,
            };
            let AttemptError {
                err,
                outcome,
                partial,
            } = failure;
            if let Some(outcome) = outcome {
                upstream.record(&in_flight, outcome, false);
                let deadline_hit = deadline_bound && outcome == Outcome::Timeout;
                if !partial
                    && !deadline_hit
                    && attempt < max_attempts
                    && retryable(retries, req, outcome)
                {
                    if let Some(slot) = self.retry_permit(upstream, res, attempt, deadline).await {
                        in_flight.failed(err.status().as_u16());
                        _retry_slot = slot;
                        tried.push(in_flight.endpoint().clone());
                        continue;
                    }
                }
                if deadline_hit {
                    in_flight.failed(504);
                    let err = ProxyError::DeadlineExceeded {
                        budget: budget(res, req),
                    };
                    return self.fail(client, req, upstream, None, err).await;
                }
            }
            if partial {
                in_flight.failed(502);
                return Next::Close;
            }
            return self
                .fail(client, req, upstream, Some(&in_flight), err)
                .await;
        };
        let mut up = up;
        if resp.status == 101 {
            return self.switch_protocols(client, up).await;
        }
        let close =
            !req.keep_alive || self.ctx.shared.is_draining() || resp.body == BodyKind::UntilClose;
        head::finish_response(&mut self.resp_head, close, req.minor == 0 && !close);
        let relayed = relay_response(&mut up, client, &mut self.resp_head, &resp).await;
        // In flight until the body is relayed, as P2C's load counts it.
        drop(in_flight);
        self.finish(up, &resp, relayed, true, close)
    }

    /// Sends the buffered request to the endpoint of `in_flight` and reads its final
    /// response head (relaying 1xx). A reused connection found dead before it answered is
    /// replaced once, transparently: the request never reached the endpoint.
    async fn attempt(
        &mut self,
        client: &mut TcpStream,
        req: &RequestInfo,
        upstream: &Upstream,
        in_flight: &InFlight,
        res: &Resilience,
        timeout: Duration,
    ) -> Result<(UpConn, ResponseInfo), AttemptError> {
        let mut resent = false;
        loop {
            let (mut up, reused) = self
                .connection(in_flight.endpoint(), upstream, res)
                .await
                .map_err(AttemptError::connect)?;
            let may_resend = reused && req.idempotent && !resent;
            if let Err(e) = up.stream.write_all(&self.req_head).await {
                if may_resend {
                    resent = true;
                    continue;
                }
                debug!(error = %e, "upstream write failed");
                let addr = up.endpoint.addr;
                return Err(AttemptError::sent(
                    ProxyError::UpstreamReset { addr },
                    Outcome::Reset,
                ));
            }
            let (mut ur, _) = up.stream.split();
            let read = read_final_head(
                &mut ur,
                &mut up.buf,
                client,
                &mut self.resp_head,
                req,
                self.limits,
            );
            let result = if timeout.is_zero() {
                read.await
            } else {
                tokio::time::timeout(timeout, read)
                    .await
                    .unwrap_or(Err(HeadError::Timeout))
            };
            match result {
                Ok(resp) => return Ok((up, resp)),
                Err(HeadError::Closed { relayed_1xx: false }) if may_resend => {
                    resent = true;
                    continue;
                }
                Err(e) => return Err(AttemptError::head(e, up.endpoint.addr, timeout)),
            }
        }
    }

    /// Whether a retry may go now: the budget, the retries limit, and the time left after
    /// the backoff (which it waits). The slot counts the retry while it is in flight.
    async fn retry_permit(
        &mut self,
        upstream: &Upstream,
        res: &Resilience,
        attempt: u32,
        deadline: Option<Instant>,
    ) -> Option<Option<limits::Slot>> {
        let slot = upstream.acquire(Limit::Retries, res).ok()?;
        if !upstream.withdraw_retry(res) {
            return None;
        }
        let wait = budget::backoff(&res.policy.retries, attempt);
        if deadline.is_some_and(|d| Instant::now() + wait >= d) {
            return None;
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Some(slot)
    }

    /// Drops a response that will be retried: the connection stays when the rest of the
    /// response is already read (or there is none), else it is closed.
    fn discard(&mut self, mut up: UpConn, resp: &ResponseInfo) {
        let rest = match resp.body {
            BodyKind::Empty => Some(0),
            BodyKind::Length(n) if n <= up.buf.len() as u64 => Some(n as usize),
            _ => None,
        };
        if let Some(n) = rest {
            up.buf.advance(n);
            if resp.reusable && up.buf.is_empty() {
                up.last_used = Instant::now();
                self.held = Some(up);
            }
        }
    }

    /// The request body is still arriving: stream it while waiting for the response.
    /// Only a failed connect is retried here (nothing was sent); once body bytes left,
    /// they cannot be sent again.
    #[allow(clippy::too_many_arguments)]
    async fn exchange_streaming(
        &mut self,
        client: &mut TcpStream,
        buf: &mut BytesMut,
        req: &RequestInfo,
        upstream: &Upstream,
        res: &Resilience,
        deadline: Option<Instant>,
        head_end: usize,
    ) -> Next {
        let retries = &res.policy.retries;
        let max_attempts = res.max_attempts;
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut _retry_slot = None;
        let mut attempt = 0;
        let (in_flight, mut up) = loop {
            attempt += 1;
            let in_flight =
                match upstream.pick_avoiding(|e| tried.iter().any(|t| std::ptr::eq(&**t, e))) {
                    Ok(f) => f,
                    Err(err) => return self.fail(client, req, upstream, None, err).await,
                };
            match self.connection(in_flight.endpoint(), upstream, res).await {
                Ok((up, _)) => break (in_flight, up),
                Err(err) => {
                    let failure = AttemptError::connect(err);
                    if let Some(outcome) = failure.outcome {
                        upstream.record(&in_flight, outcome, false);
                        if attempt < max_attempts && retryable(retries, req, outcome) {
                            if let Some(slot) =
                                self.retry_permit(upstream, res, attempt, deadline).await
                            {
                                in_flight.failed(502);
                                _retry_slot = slot;
                                tried.push(in_flight.endpoint().clone());
                                continue;
                            }
                        }
                    }
                    return self
                        .fail(client, req, upstream, Some(&in_flight), failure.err)
                        .await;
                }
            }
        };
        let addr = up.endpoint.addr;
        if let Some(d) = deadline {
            let left = deadline::remaining(d);
            if left.is_zero() {
                let err = ProxyError::DeadlineExceeded {
                    budget: budget(res, req),
                };
                return self
                    .fail(client, req, upstream, Some(&in_flight), err)
                    .await;
            }
            TimeoutField::new(head_end).set(&mut self.req_head, left);
        }
        if let Err(e) = up.stream.write_all(&self.req_head).await {
            debug!(error = %e, "upstream write failed");
            upstream.record(&in_flight, Outcome::Reset, false);
            let err = ProxyError::UpstreamReset { addr };
            return self
                .fail(client, req, upstream, Some(&in_flight), err)
                .await;
        }
        let timeout = match deadline {
            Some(d) if res.per_try_timeout.is_zero() => deadline::remaining(d),
            Some(d) => res.per_try_timeout.min(deadline::remaining(d)),
            None => res.per_try_timeout,
        };
        let limits = self.limits;
        let draining = self.ctx.shared.is_draining();
        let outcome = {
            let (mut cr, mut cw) = client.split();
            let (mut ur, mut uw) = up.stream.split();
            let mut send = pin!(body::relay(&mut cr, buf, &mut uw, req.body));
            // None while the body is being sent; then whether it was sent completely.
            let mut sent: Option<bool> = None;
            let mut deadline = pin!(tokio::time::sleep(Duration::from_secs(86400 * 365)));
            let head = {
                let mut read = pin!(read_final_head(
                    &mut ur,
                    &mut up.buf,
                    &mut cw,
                    &mut self.resp_head,
                    req,
                    limits
                ));
                loop {
                    tokio::select! {
                        r = &mut send, if sent.is_none() => match r {
                            Ok(()) => {
                                sent = Some(true);
                                if !timeout.is_zero() {
                                    deadline.as_mut().reset(Instant::now() + timeout);
                                }
                            }
                            // The upstream stopped reading: it may still answer (413...).
                            Err(BodyError::Write(e)) => {
                                debug!(error = %e, "upstream stopped reading the request body");
                                sent = Some(false);
                                if !timeout.is_zero() {
                                    deadline.as_mut().reset(Instant::now() + timeout);
                                }
                            }
                            // The client is gone or sent a broken body: the upstream saw a
                            // partial request and neither connection can be trusted.
                            Err(e) => break Err(HeadError::ClientBody(matches!(e, BodyError::Chunked(_)))),
                        },
                        h = &mut read => break h,
                        _ = &mut deadline => break Err(HeadError::Timeout),
                    }
                }
            };
            match head {
                Err(e) => Streamed::Failed(e),
                // An upgrade whose request body is still streaming is not a tunnel.
                Ok(resp) if resp.status == 101 => Streamed::Failed(HeadError::Invalid(
                    "101 Switching Protocols to a request with a body",
                )),
                Ok(resp) => {
                    // A response that arrives before the request body is complete ends the
                    // exchange for both connections once relayed (as Envoy does).
                    let close = !req.keep_alive
                        || draining
                        || resp.body == BodyKind::UntilClose
                        || sent != Some(true);
                    head::finish_response(&mut self.resp_head, close, req.minor == 0 && !close);
                    upstream.record(&in_flight, Outcome::Status(resp.status), resp.relayed);
                    in_flight.answered(resp.status);
                    let mut relay = pin!(relay_halves(
                        &mut ur,
                        &mut up.buf,
                        &mut cw,
                        &mut self.resp_head,
                        resp.body
                    ));
                    let (relayed, sent) = loop {
                        tokio::select! {
                            r = &mut send, if sent.is_none() => {
                                sent = Some(r.is_ok());
                                if r.is_err() {
                                    break (false, false);
                                }
                            }
                            r = &mut relay => break (r, sent == Some(true)),
                        }
                    };
                    Streamed::Relayed {
                        resp,
                        relayed,
                        sent,
                        close,
                    }
                }
            }
        };
        match outcome {
            Streamed::Relayed {
                resp,
                relayed,
                sent,
                close,
            } => {
                if relayed && !sent {
                    linger_close(client).await;
                }
                self.finish(up, &resp, relayed, sent, close)
            }
            Streamed::Failed(HeadError::ClientBody(invalid)) => {
                in_flight.failed(400);
                if invalid {
                    let err = ProxyError::BadRequest("invalid chunked request body");
                    upstream.error(&err);
                    let _ = client.write_all(&err.http1_response(true, None)).await;
                }
                Next::Close
            }
            Streamed::Failed(e) => {
                drop(up);
                if let Some(outcome) = AttemptError::head(e.clone(), addr, timeout).outcome {
                    upstream.record(&in_flight, outcome, false);
                }
                self.fail_head(client, req, upstream, &in_flight, e, addr, timeout)
                    .await;
                Next::Close
            }
        }
    }

    /// After a relayed response: keep or drop the upstream connection, continue or close.
    fn finish(
        &mut self,
        mut up: UpConn,
        resp: &ResponseInfo,
        relayed: bool,
        sent: bool,
        close: bool,
    ) -> Next {
        if relayed && sent && resp.reusable && up.buf.is_empty() {
            up.last_used = Instant::now();
            self.held = Some(up);
        }
        if relayed && sent && !close {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// A connection to `endpoint`: the one this client connection holds, a pooled one, or
    /// a new one. The flag says whether it was used before (and so may be stale).
    async fn connection(
        &mut self,
        endpoint: &Arc<Endpoint>,
        upstream: &Upstream,
        res: &Resilience,
    ) -> Result<(UpConn, bool), ProxyError> {
        if let Some(up) = self.held.take() {
            if Arc::ptr_eq(&up.endpoint, endpoint)
                && (up.last_used.elapsed() < PROBE_AFTER || alive(&up.stream))
            {
                return Ok((up, true));
            }
            if Arc::ptr_eq(&up.endpoint, endpoint) {
                drop(up);
            } else {
                up.release();
            }
        }
        let slot = upstream.acquire(Limit::Connections, res)?;
        while let Some(stream) = endpoint.pool.checkout(upstream.config.idle_timeout) {
            if alive(&stream) {
                return Ok((UpConn::new(endpoint.clone(), stream, slot), true));
            }
        }
        let _pending = upstream.acquire(Limit::PendingRequests, res)?;
        let stream = connect(endpoint.addr, res.connect_timeout).await?;
        Ok((UpConn::new(endpoint.clone(), stream, slot), false))
    }

    /// Switches to a tunnel after `101 Switching Protocols`.
    async fn switch_protocols(&mut self, client: &mut TcpStream, up: UpConn) -> Next {
        head::finish_response(&mut self.resp_head, false, false);
        if client.write_all(&self.resp_head).await.is_err() {
            return Next::Close;
        }
        Next::Tunnel(up)
    }

    /// Answers the client with `err` before any response byte was sent.
    async fn fail(
        &mut self,
        client: &mut TcpStream,
        req: &RequestInfo,
        upstream: &Upstream,
        in_flight: Option<&InFlight>,
        err: ProxyError,
    ) -> Next {
        debug!(error = %err, upstream = upstream.name(), "answering with an error");
        upstream.error(&err);
        if let Some(f) = in_flight {
            f.failed(err.status().as_u16());
        }
        // A request body the proxy did not consume leaves the connection unusable.
        let close = !req.keep_alive || req.body != BodyKind::Empty || self.ctx.shared.is_draining();
        let response = err.http1_response(close, self.ctx.relay_mark(upstream));
        if client.write_all(&response).await.is_err() || close {
            return Next::Close;
        }
        Next::KeepAlive
    }

    #[allow(clippy::too_many_arguments)]
    async fn fail_head(
        &mut self,
        client: &mut TcpStream,
        req: &RequestInfo,
        upstream: &Upstream,
        in_flight: &InFlight,
        e: HeadError,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Next {
        let err = match e {
            HeadError::Closed { relayed_1xx: true } | HeadError::ClientWrite => {
                // Part of a response already reached the client.
                in_flight.failed(502);
                return Next::Close;
            }
            HeadError::Closed { .. } | HeadError::Io => ProxyError::UpstreamReset { addr },
            HeadError::Timeout => ProxyError::ResponseTimeout { addr, timeout },
            HeadError::Invalid(reason) => ProxyError::UpstreamProtocol {
                addr,
                reason: reason.to_string(),
            },
            HeadError::ClientBody(_) => return Next::Close,
        };
        self.fail(client, req, upstream, Some(in_flight), err).await
    }
}

/// A request's whole time budget, for the `deadline-exceeded` message.
fn budget(res: &Resilience, req: &RequestInfo) -> Duration {
    deadline::budget(res.policy.timeouts.request, req.timeout).unwrap_or_default()
}

/// Whether a failed attempt may be tried again under the retry policy: the condition is
/// listed, and the request never reached the endpoint (a failed connect) or is safe to
/// send twice.
fn retryable(policy: &Retries, req: &RequestInfo, outcome: Outcome) -> bool {
    policy.on.matches(outcome)
        && (outcome == Outcome::ConnectFailure || req.idempotent || policy.non_idempotent)
}

/// Why an attempt failed before a response head.
struct AttemptError {
    err: ProxyError,
    /// For the breaker and the retry conditions; `None`: not the endpoint's doing (a
    /// service limit).
    outcome: Option<Outcome>,
    /// Part of a response (a 1xx) already reached the client: nothing can be retried or
    /// answered any more.
    partial: bool,
}

impl AttemptError {
    fn connect(err: ProxyError) -> Self {
        let outcome = match err {
            ProxyError::LimitReached { .. } => None,
            _ => Some(Outcome::ConnectFailure),
        };
        AttemptError {
            err,
            outcome,
            partial: false,
        }
    }

    fn sent(err: ProxyError, outcome: Outcome) -> Self {
        AttemptError {
            err,
            outcome: Some(outcome),
            partial: false,
        }
    }

    fn head(e: HeadError, addr: SocketAddr, timeout: Duration) -> Self {
        let (err, outcome) = match e {
            HeadError::Closed { relayed_1xx: true } | HeadError::ClientWrite => {
                return AttemptError {
                    err: ProxyError::UpstreamReset { addr },
                    outcome: Some(Outcome::Reset),
                    partial: true,
                }
            }
            HeadError::Closed { .. } | HeadError::Io => {
                (ProxyError::UpstreamReset { addr }, Outcome::Reset)
            }
            HeadError::Timeout => (
                ProxyError::ResponseTimeout { addr, timeout },
                Outcome::Timeout,
            ),
            HeadError::Invalid(reason) => (
                ProxyError::UpstreamProtocol {
                    addr,
                    reason: reason.to_string(),
                },
                Outcome::Status(502),
            ),
            HeadError::ClientBody(_) => {
                return AttemptError {
                    err: ProxyError::BadRequest("the client's request body failed"),
                    outcome: None,
                    partial: true,
                }
            }
        };
        AttemptError::sent(err, outcome)
    }
}

/// The `malla-timeout-ms` field of a request head, rewritten before each attempt with the
/// time left, just before the head's final CRLF (`head_end` is where the head ends).
struct TimeoutField {
    at: usize,
    len: usize,
}

impl TimeoutField {
    fn new(head_end: usize) -> Self {
        TimeoutField {
            at: head_end.saturating_sub(2),
            len: 0,
        }
    }

    fn set(&mut self, head: &mut Vec<u8>, left: Duration) {
        use std::io::Write as _;
        // Formatted on the stack: this runs for every request that has a deadline.
        let mut field = [0u8; 64];
        let mut w = &mut field[..];
        let _ = write!(
            w,
            "{}: {}\r\n",
            malla_core::policy::TIMEOUT_HEADER,
            left.as_millis().max(1)
        );
        let n = 64 - w.len();
        head.splice(self.at..self.at + self.len, field[..n].iter().copied());
        self.len = n;
    }
}

/// An idle connection may have been closed by the endpoint; one non-blocking read tells
/// (no data and no EOF means it is alive).
fn alive(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// How a streamed exchange ended.
enum Streamed {
    Relayed {
        resp: ResponseInfo,
        relayed: bool,
        sent: bool,
        close: bool,
    },
    Failed(HeadError),
}

#[derive(Clone, Debug)]
enum HeadError {
    /// The upstream closed before a final response head.
    Closed {
        relayed_1xx: bool,
    },
    Io,
    Timeout,
    Invalid(&'static str),
    /// Writing an interim (1xx) response to the client failed.
    ClientWrite,
    /// The client's body failed while waiting (`true`: invalid framing).
    ClientBody(bool),
}

/// Reads response heads until a final one (or a 101), relaying 1xx interim responses to
/// the client. The final head, rewritten, is left in `out` without its last CRLF.
async fn read_final_head<R, W>(
    ur: &mut R,
    ubuf: &mut BytesMut,
    cw: &mut W,
    out: &mut Vec<u8>,
    req: &RequestInfo,
    limits: &Limits,
) -> Result<ResponseInfo, HeadError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max_headers = limits.max_headers.min(head::MAX_HEADERS);
    let mut relayed_1xx = false;
    loop {
        if !ubuf.is_empty() {
            match head::parse_response(ubuf, max_headers, req.is_head, out) {
                Ok(Parsed::Complete(resp)) => {
                    ubuf.advance(resp.head_len);
                    match resp.status {
                        101 if req.upgrade => return Ok(resp),
                        101 => {
                            return Err(HeadError::Invalid(
                                "101 Switching Protocols without an upgrade request",
                            ))
                        }
                        100..=199 => {
                            // Interim responses go to HTTP/1.1 clients (RFC 9110 §15.2).
                            if req.minor == 1 {
                                head::finish_response(out, false, false);
                                cw.write_all(out)
                                    .await
                                    .map_err(|_| HeadError::ClientWrite)?;
                                relayed_1xx = true;
                            }
                            continue;
                        }
                        _ => return Ok(resp),
                    }
                }
                Ok(Parsed::Partial) if ubuf.len() >= limits.max_head_bytes => {
                    return Err(HeadError::Invalid("response head too large"))
                }
                Ok(Parsed::Partial) => {}
                Err(reason) => return Err(HeadError::Invalid(reason)),
            }
        }
        match body::fill(ur, ubuf).await {
            Ok(0) if ubuf.is_empty() => return Err(HeadError::Closed { relayed_1xx }),
            Ok(0) => {
                return Err(HeadError::Invalid(
                    "connection closed in the middle of the response head",
                ))
            }
            Ok(_) => {}
            Err(_) => return Err(HeadError::Io),
        }
    }
}

/// Sends the response head (with the body too when it is small and already here) and
/// relays the rest of the body. `true` when the whole response reached the client.
async fn relay_response(
    up: &mut UpConn,
    client: &mut TcpStream,
    head: &mut Vec<u8>,
    resp: &ResponseInfo,
) -> bool {
    let (mut ur, _) = up.stream.split();
    relay_halves(&mut ur, &mut up.buf, client, head, resp.body).await
}

async fn relay_halves<R, W>(
    ur: &mut R,
    ubuf: &mut BytesMut,
    cw: &mut W,
    head: &mut Vec<u8>,
    mut body: BodyKind,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let BodyKind::Length(n) = body {
        if n <= ubuf.len() as u64 && n <= READ_BUF as u64 {
            head.extend_from_slice(&ubuf[..n as usize]);
            ubuf.advance(n as usize);
            body = BodyKind::Empty;
        }
    }
    if cw.write_all(head).await.is_err() {
        return false;
    }
    match body::relay(ur, ubuf, cw, body).await {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %e, "response body relay ended early");
            false
        }
    }
}

/// Relays bytes both ways after a protocol switch until both sides are done.
async fn tunnel(mut client: TcpStream, client_buf: BytesMut, mut up: UpConn) {
    if !client_buf.is_empty() && up.stream.write_all(&client_buf).await.is_err() {
        return;
    }
    if !up.buf.is_empty() {
        let pending = std::mem::take(&mut up.buf);
        if client.write_all(&pending).await.is_err() {
            return;
        }
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut up.stream).await {
        debug!(error = %e, "tunnel ended with an error");
    }
}

/// Closes a connection whose client may still be sending (an early response or an
/// error): shut our side, then read and discard for a short, bounded while so the
/// client receives the response instead of a reset.
async fn linger_close(client: &mut TcpStream) {
    let _ = client.shutdown().await;
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(1);
    for _ in 0..256 {
        match tokio::time::timeout_at(deadline, client.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}
