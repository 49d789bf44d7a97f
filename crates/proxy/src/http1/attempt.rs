//! One HTTP/1 attempt's bytes: the [`Protocol`] the call driver runs, and the relay of the
//! answer it chooses.
//!
//! Two shapes of request:
//!
//! - *Buffered*: the whole request (head and body) is in the session's head buffer. It
//!   goes out in one write, can be sent again on another endpoint, and a reused connection
//!   found dead before it answered is replaced once, transparently.
//! - *Streaming*: the body is still arriving. It is relayed to the endpoint while the
//!   response head is awaited; once bytes of it have left, the request cannot be sent again
//!   (only a failed connect is retried). A response that arrives before the body has all
//!   left (a 413 during an upload) is relayed at once, while the body keeps flowing, and
//!   the exchange ends there for both connections, as Envoy does; its outcome reaches the
//!   breaker when the relay ends rather than at the head.

use std::{
    pin::{pin, Pin},
    sync::Arc,
    time::Duration,
};

use bytes::{Buf, BytesMut};
use malla_core::policy::Outcome;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    time::{Instant, Sleep},
};
use tracing::debug;

use super::{
    body::{self, BodyError},
    head::{self, BodyKind, Parsed, RequestInfo, ResponseInfo},
    linger_close, pool, Session, READ_BUF,
};
use crate::{
    call::{Bound, Call, Failure, Judged, Protocol, Timer},
    endpoint::{Endpoint, InFlight},
    error::ProxyError,
    listener::ListenerCtx,
    metrics::ConnectionTracker,
    resilience::limits::{self, Limit},
    stream::Stream,
};

/// A pooled connection idle for longer than this is checked for a close by its peer
/// before it carries a request.
const PROBE_AFTER: Duration = Duration::from_secs(1);

/// An upstream connection owned by one client connection.
pub(super) struct UpConn {
    endpoint: Arc<Endpoint>,
    pub stream: Stream,
    pub buf: BytesMut,
    pub last_used: Instant,
    /// This worker's pool bounds for the endpoint's upstream.
    max_idle: usize,
    max_age: Duration,
    _active: ConnectionTracker,
    /// Counts against the upstream's `max_connections` while in use.
    _slot: Option<limits::Slot>,
}

impl UpConn {
    fn new(
        endpoint: Arc<Endpoint>,
        stream: Stream,
        slot: Option<limits::Slot>,
        upstream: &crate::upstream::Upstream,
    ) -> Self {
        UpConn {
            _slot: slot,
            max_idle: upstream.config.max_idle_per_endpoint,
            max_age: upstream.config.idle_timeout,
            _active: ConnectionTracker::open(&endpoint.metrics.open_connections),
            endpoint,
            stream,
            buf: BytesMut::with_capacity(READ_BUF),
            last_used: Instant::now(),
        }
    }

    /// Gives the connection back to this worker's pool for other client connections.
    pub fn release(self) {
        pool::checkin(&self.endpoint, self.stream, self.max_idle, self.max_age);
    }
}

/// A response head, with the connection that carries the rest.
pub(super) struct Answered {
    up: UpConn,
    info: ResponseInfo,
    /// An interim response (`100 Continue`...) already reached the client.
    relayed_1xx: bool,
    /// The request body had not all left when the head came: the exchange was finished
    /// in the attempt, and this is how.
    early: Option<Ended>,
    /// The whole request body reached the endpoint (`false`: it stopped reading).
    body_sent: bool,
}

/// How a relayed exchange ended.
#[derive(Clone, Copy)]
struct Ended {
    /// The whole response reached the client.
    relayed: bool,
    /// The whole request body reached the endpoint.
    sent: bool,
}

/// The attempts of one request, as [`Call::run`] drives them.
pub(super) struct Attempts<'s, 'a> {
    session: &'s mut Session<'a>,
    client: &'s mut Stream,
    /// The client's read buffer: a streaming body's first bytes, then what follows it.
    buf: &'s mut BytesMut,
    req: &'s RequestInfo,
    call: &'s Call<'s>,
    timeout_field: TimeoutField,
    /// The body is in the head buffer, after the head: the request can be sent again.
    buffered: bool,
}

impl<'s, 'a> Attempts<'s, 'a> {
    pub fn new(
        session: &'s mut Session<'a>,
        client: &'s mut Stream,
        buf: &'s mut BytesMut,
        req: &'s RequestInfo,
        call: &'s Call<'s>,
        head_end: usize,
        buffered: bool,
    ) -> Self {
        Attempts {
            session,
            client,
            buf,
            req,
            call,
            timeout_field: TimeoutField::new(head_end),
            buffered,
        }
    }

    /// A connection to `endpoint`: the one this client connection holds, one from this
    /// worker's pool, or a new one. The flag says whether it was used before (and so may
    /// be stale).
    async fn connection(&mut self, endpoint: &Arc<Endpoint>) -> Result<(UpConn, bool), ProxyError> {
        let (upstream, res) = (self.call.upstream, self.call.res);
        if let Some(mut up) = self.session.held.take() {
            if Arc::ptr_eq(&up.endpoint, endpoint)
                && (up.last_used.elapsed() < PROBE_AFTER || up.stream.idle_and_open())
            {
                return Ok((up, true));
            }
            if !Arc::ptr_eq(&up.endpoint, endpoint) {
                up.release();
            }
        }
        let slot = upstream.acquire(Limit::Connections, res)?;
        while let Some(mut stream) = pool::checkout(endpoint) {
            if stream.idle_and_open() {
                return Ok((UpConn::new(endpoint.clone(), stream, slot, upstream), true));
            }
        }
        let _pending = upstream.acquire(Limit::PendingRequests, res)?;
        let stream = crate::connect::open(upstream, endpoint, res.connect_timeout).await?;
        Ok((UpConn::new(endpoint.clone(), stream, slot, upstream), false))
    }

    /// The buffered attempt: the whole request in one write, then the response head.
    async fn buffered(&mut self, in_flight: &InFlight, timer: &Timer) -> Result<Answered, Failure> {
        let expiry = timer.expiry();
        let mut resent = false;
        loop {
            let (mut up, reused) = self
                .connection(in_flight.endpoint())
                .await
                .map_err(Failure::connect)?;
            let addr = up.endpoint.addr;
            let may_resend = reused && self.req.idempotent && !resent;
            if let Err(e) = up.stream.write_all(&self.session.req_head).await {
                if may_resend {
                    resent = true;
                    continue;
                }
                debug!(error = %e, "upstream write failed");
                return Err(Failure::sent(
                    ProxyError::UpstreamReset { addr },
                    Outcome::Reset,
                ));
            }
            let (mut ur, _) = up.stream.split();
            let read = read_final_head(
                &mut ur,
                &mut up.buf,
                self.client,
                &mut self.session.resp_head,
                self.req,
                self.session.ctx,
            );
            let result = match expiry {
                None => read.await,
                Some((at, _)) => self
                    .session
                    .head_timer
                    .within(at, read)
                    .await
                    .unwrap_or(Err(HeadError::Timeout)),
            };
            return match result {
                Ok((info, relayed_1xx)) => Ok(Answered {
                    up,
                    info,
                    relayed_1xx,
                    early: None,
                    body_sent: true,
                }),
                Err(HeadError::Closed { relayed_1xx: false }) if may_resend => {
                    resent = true;
                    continue;
                }
                Err(HeadError::Timeout) => {
                    let bound = expiry.map_or(Bound::PerTry, |(_, bound)| bound);
                    Err(timer.expired(bound, self.call, addr))
                }
                Err(e) => Err(e.failure(addr)),
            };
        }
    }

    /// The streaming attempt: the head, then the body relayed as it arrives while the
    /// response head is awaited. The per-try timer starts once the body has left.
    async fn streaming(
        &mut self,
        in_flight: &InFlight,
        timer: &Timer,
    ) -> Result<Answered, Failure> {
        let (mut up, _) = self
            .connection(in_flight.endpoint())
            .await
            .map_err(Failure::connect)?;
        let addr = up.endpoint.addr;
        if let Err(e) = up.stream.write_all(&self.session.req_head).await {
            debug!(error = %e, "upstream write failed");
            return Err(Failure::sent(
                ProxyError::UpstreamReset { addr },
                Outcome::Reset,
            ));
        }
        let (info, relayed_1xx, early, body_sent) = self.stream_body(&mut up, timer).await?;
        Ok(Answered {
            up,
            info,
            relayed_1xx,
            early,
            body_sent,
        })
    }

    /// Relays the request body while waiting for the response head (and, when the head
    /// comes first, relays the response beside the rest of the body).
    async fn stream_body(
        &mut self,
        up: &mut UpConn,
        timer: &Timer,
    ) -> Result<(ResponseInfo, bool, Option<Ended>, bool), Failure> {
        let addr = up.endpoint.addr;
        let (req, ctx, call) = (self.req, self.session.ctx, self.call);
        let resp_head = &mut self.session.resp_head;
        let (mut cr, mut cw) = self.client.split();
        let (mut ur, mut uw) = up.stream.split();
        let mut send = pin!(body::relay(&mut cr, self.buf, &mut uw, req.body));
        // None while the body is being sent; then whether it was sent completely.
        let mut sent: Option<bool> = None;
        // Until the body has left, only the call's deadline bounds the wait.
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        let mut bound = Bound::Call;
        let mut expiry = pin!(tokio::time::sleep_until(timer.deadline.unwrap_or(far)));
        let head = {
            let mut read = pin!(read_final_head(
                &mut ur,
                &mut up.buf,
                &mut cw,
                resp_head,
                req,
                ctx
            ));
            loop {
                tokio::select! {
                    r = &mut send, if sent.is_none() => {
                        match r {
                            Ok(()) => sent = Some(true),
                            // The upstream stopped reading: it may still answer (413...).
                            Err(BodyError::Write(e)) => {
                                debug!(error = %e, "upstream stopped reading the request body");
                                sent = Some(false);
                            }
                            // The client is gone or sent a broken body: the upstream saw a
                            // partial request and neither connection can be trusted.
                            Err(e) => break Err(HeadError::ClientBody(matches!(e, BodyError::Chunked(_)))),
                        }
                        if let Some((at, which)) = timer.expiry() {
                            expiry.as_mut().reset(at);
                            bound = which;
                        }
                    },
                    h = &mut read => break h,
                    _ = &mut expiry => break Err(HeadError::Timeout),
                }
            }
        };
        let (info, relayed_1xx) = match head {
            Ok(head) => head,
            Err(HeadError::Timeout) => return Err(timer.expired(bound, call, addr)),
            Err(e) => return Err(e.failure(addr)),
        };
        // An upgrade whose request body is still streaming is not a tunnel.
        if info.status == 101 {
            return Err(
                HeadError::Invalid("101 Switching Protocols to a request with a body")
                    .failure(addr),
            );
        }
        let early = match sent {
            Some(_) => None,
            None => {
                // The body is still flowing: relay the response beside it, then end.
                head::finish_response(resp_head, true, false);
                let mut relay = pin!(relay_halves(
                    &mut ur,
                    &mut up.buf,
                    &mut cw,
                    resp_head,
                    info.body
                ));
                let (relayed, all_sent) = loop {
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
                Some(Ended {
                    relayed,
                    sent: all_sent,
                })
            }
        };
        let body_sent = sent == Some(true);
        Ok((info, relayed_1xx, early, body_sent))
    }
}

impl Protocol for Attempts<'_, '_> {
    type Response = Answered;

    fn stamp(&mut self, left: Duration) {
        self.timeout_field.set(&mut self.session.req_head, left);
    }

    async fn attempt(&mut self, in_flight: &InFlight, timer: &Timer) -> Result<Answered, Failure> {
        if self.buffered {
            self.buffered(in_flight, timer).await
        } else {
            self.streaming(in_flight, timer).await
        }
    }

    fn judge(&self, response: &Answered) -> Judged {
        let status = response.info.status;
        Judged {
            status: Some(status),
            outcome: Some(Outcome::Status(status)),
            relayed: response.info.relayed,
            committed: status == 101 || response.relayed_1xx || response.early.is_some(),
        }
    }

    fn replayable(&self) -> bool {
        self.buffered
    }

    /// Drops a response that will be retried: the connection stays when the rest of the
    /// response is already read (or there is none), else it is closed.
    fn discard(&mut self, mut response: Answered) {
        let rest = match response.info.body {
            BodyKind::Empty => Some(0),
            BodyKind::Length(n) if n <= response.up.buf.len() as u64 => Some(n as usize),
            _ => None,
        };
        if let Some(n) = rest {
            response.up.buf.advance(n);
            if response.info.reusable && response.up.buf.is_empty() {
                response.up.last_used = Instant::now();
                self.session.held = Some(response.up);
            }
        }
    }
}

/// The relay of the answer the call driver chose.
pub(super) struct Relay {
    resp: Answered,
    /// The client connection ends after this response.
    close: bool,
    minor: u8,
}

impl Relay {
    pub fn new(resp: Answered, req: &RequestInfo, draining: bool) -> Self {
        let close = !req.keep_alive
            || draining
            || resp.info.body == BodyKind::UntilClose
            || !resp.body_sent
            || resp.early.is_some();
        Relay {
            resp,
            close,
            minor: req.minor,
        }
    }

    /// The upstream switches protocols (`101`): the exchange becomes a tunnel.
    pub fn switching(&self) -> bool {
        self.resp.info.status == 101
    }

    pub fn into_conn(self) -> UpConn {
        self.resp.up
    }

    /// Sends the response head and relays the body (unless the attempt already did).
    /// Returns the upstream connection when it can carry another request, and whether the
    /// client connection stays open.
    pub async fn finish(self, client: &mut Stream, head: &mut Vec<u8>) -> (Option<UpConn>, bool) {
        let Relay {
            mut resp,
            close,
            minor,
        } = self;
        let ended = match resp.early {
            Some(ended) => {
                if ended.relayed && !ended.sent {
                    linger_close(client).await;
                }
                ended
            }
            None => {
                head::finish_response(head, close, minor == 0 && !close);
                let (mut ur, _) = resp.up.stream.split();
                let relayed =
                    relay_halves(&mut ur, &mut resp.up.buf, client, head, resp.info.body).await;
                Ended {
                    relayed,
                    sent: resp.body_sent,
                }
            }
        };
        let reusable = ended.relayed && ended.sent && resp.info.reusable && resp.up.buf.is_empty();
        (
            reusable.then_some(resp.up),
            ended.relayed && ended.sent && !close,
        )
    }
}

/// The response-head timer of a client connection, armed once and moved lazily: a new
/// request's expiry is almost always later than the previous one's, so the timer keeps its
/// earlier wake-up and, when that comes first, simply moves on to the real expiry. In the
/// common case a request costs no timer-wheel update at all (one per per-try timeout, per
/// connection, instead of an insert and a removal per request).
pub(super) struct HeadTimer(Pin<Box<Sleep>>);

impl HeadTimer {
    pub fn new() -> Self {
        HeadTimer(Box::pin(tokio::time::sleep(Duration::from_secs(3600))))
    }

    /// Runs `fut` until it completes (`Some`) or `at` passes (`None`).
    async fn within<F: std::future::Future>(&mut self, at: Instant, fut: F) -> Option<F::Output> {
        if self.0.deadline() > at {
            self.0.as_mut().reset(at);
        }
        let mut fut = pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                () = self.0.as_mut() => {
                    if Instant::now() >= at {
                        return None;
                    }
                    self.0.as_mut().reset(at);
                }
            }
        }
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

/// Why an attempt ended before a final response head.
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

impl HeadError {
    /// The failure for the call driver (a timeout is the timer's, see [`Timer::expired`]).
    fn failure(self, addr: std::net::SocketAddr) -> Failure {
        let reset = ProxyError::UpstreamReset { addr };
        match self {
            HeadError::Closed { relayed_1xx: true } | HeadError::ClientWrite => {
                Failure::partial(reset, Some(Outcome::Reset))
            }
            HeadError::Closed { .. } | HeadError::Io => Failure::sent(reset, Outcome::Reset),
            HeadError::Timeout => Failure::sent(
                ProxyError::ResponseTimeout {
                    addr,
                    timeout: Duration::ZERO,
                },
                Outcome::Timeout,
            ),
            HeadError::Invalid(reason) => Failure::sent(
                ProxyError::UpstreamProtocol {
                    addr,
                    reason: reason.to_string(),
                },
                Outcome::Status(502),
            ),
            // A broken chunked body is answered 400; a client that went away is not.
            HeadError::ClientBody(true) => {
                Failure::local(ProxyError::BadRequest("invalid chunked request body"))
            }
            HeadError::ClientBody(false) => Failure::partial(
                ProxyError::BadRequest("the client's request body failed"),
                None,
            ),
        }
    }
}

/// Reads response heads until a final one (or a 101), relaying 1xx interim responses to
/// the client. The final head, rewritten, is left in `out` without its last CRLF; the
/// flag says whether an interim response reached the client.
async fn read_final_head<R, W>(
    ur: &mut R,
    ubuf: &mut BytesMut,
    cw: &mut W,
    out: &mut Vec<u8>,
    req: &RequestInfo,
    ctx: &ListenerCtx,
) -> Result<(ResponseInfo, bool), HeadError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let limits = &ctx.shared.config.limits;
    let max_headers = limits.max_headers.min(head::MAX_HEADERS);
    let mut relayed_1xx = false;
    loop {
        if !ubuf.is_empty() {
            match head::parse_response(ubuf, max_headers, req.is_head, out) {
                Ok(Parsed::Complete(mut resp)) => {
                    ubuf.advance(resp.head_len);
                    if resp
                        .relayed_value(out)
                        .is_some_and(|v| !ctx.trusts_relayed_failure(v))
                    {
                        resp.drop_relayed(out);
                    }
                    match resp.status {
                        101 if req.upgrade => return Ok((resp, relayed_1xx)),
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
                        _ => return Ok((resp, relayed_1xx)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_head_timer_fires_at_each_expiry_however_it_was_left() {
        let mut timer = HeadTimer::new();
        let start = Instant::now();
        let first = start + Duration::from_secs(15);
        assert_eq!(timer.within(first, async { 7 }).await, Some(7));
        // A later expiry: the timer keeps its earlier wake-up, then moves on.
        let second = start + Duration::from_secs(20);
        assert_eq!(
            timer.within(second, std::future::pending::<()>()).await,
            None
        );
        assert_eq!(Instant::now(), second);
        // An earlier expiry than the one it holds is honoured too.
        let third = Instant::now() + Duration::from_secs(1);
        timer.0.as_mut().reset(third + Duration::from_secs(60));
        assert_eq!(
            timer.within(third, std::future::pending::<()>()).await,
            None
        );
        assert_eq!(Instant::now(), third);
    }
}
