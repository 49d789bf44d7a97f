//! One HTTP/2 attempt's frames: the [`Protocol`] the call driver runs for a stream.
//!
//! An attempt takes a stream slot on the endpoint's connection (connecting, or waiting for
//! the attempt already connecting), sends the request and awaits the response head, bounded
//! by the call's [`Timer`]. The request is kept for another attempt in one of two ways:
//! while it never left (hyper gives back a request whose connection closed before it was
//! sent), or as a copy of its head and a recording of its body when the call may resend it
//! ([`Again`], [`super::body::RequestBody`]).
//!
//! The rare paths (connecting, waiting for a slot, resending) are boxed: this future is
//! part of every stream's task and is moved into it on each spawn.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use http::{
    header::HeaderValue, request::Parts, HeaderMap, Method, Request, Response, Uri, Version,
};
use hyper::{body::Incoming, client::conn::http2::SendRequest};
use malla_core::policy::Outcome;
use tokio::time::Instant;
use tracing::debug;

use super::{
    body::{BodyState, RequestBody},
    client::{Settings, StreamPermit},
    grpc_status, reset, Downstream, GRPC_TIMEOUT, MALLA_TIMEOUT, RELAYED_FAILURE,
};
use crate::{
    call::{Bound, Call, Failure, Judged, Protocol, Timer},
    endpoint::{Endpoint, InFlight},
    error::ProxyError,
    resilience::{deadline, limits::Limit},
};

/// A response head, with the stream slot its body holds until it ends.
pub(super) struct Answered {
    pub response: Response<Incoming>,
    pub permit: StreamPermit,
}

/// The attempts of one stream, as [`Call::run`] drives them.
pub(super) struct Streams<'a> {
    call: &'a Call<'a>,
    down: &'a Downstream,
    grpc: bool,
    /// The request while it has not left (the first attempt's, or one given back unsent).
    req: Option<Request<RequestBody>>,
    again: Again,
    /// The time left, written into the request before it is sent.
    left: Option<Duration>,
}

impl<'a> Streams<'a> {
    /// The request for the first attempt, and what another would need: a request the call
    /// may resend keeps a copy of its head and a recording of its body.
    pub fn new(
        call: &'a Call<'a>,
        down: &'a Downstream,
        grpc: bool,
        head: Parts,
        body: Incoming,
    ) -> Self {
        let replay = call
            .may_resend()
            .then_some(call.res.policy.retries.max_replay_bytes);
        let (body, state) = RequestBody::new(body, replay, &down.replay_budget);
        let again = Again {
            head: replay.is_some().then(|| HeadCopy::of(&head)),
            body: state,
        };
        Streams {
            call,
            down,
            grpc,
            req: Some(Request::from_parts(head, body)),
            again,
            left: None,
        }
    }

    /// The response is on its way to the client: no attempt will follow.
    pub fn commit(&self) {
        if let Some(body) = &self.again.body {
            body.commit();
        }
    }

    /// The request for this attempt: the one that never left, else a new one from the
    /// kept head and body, with the time left written in.
    fn request(&mut self) -> Option<Request<RequestBody>> {
        let mut req = self.req.take().or_else(|| self.again.request())?;
        if let Some(left) = self.left {
            let (name, value) = if self.grpc {
                (GRPC_TIMEOUT, deadline::format_grpc_timeout(left))
            } else {
                (MALLA_TIMEOUT, left.as_millis().max(1).to_string())
            };
            if let Ok(value) = HeaderValue::try_from(value) {
                req.headers_mut().insert(name, value);
            }
        }
        Some(req)
    }

    fn settings(&self) -> Settings<'a> {
        Settings {
            connect_timeout: self.call.res.connect_timeout,
            max_header_list_size: u32::try_from(self.down.ctx.shared.config.limits.max_head_bytes)
                .unwrap_or(u32::MAX),
            upstream: self.call.upstream,
            resilience: self.call.res,
        }
    }

    /// The endpoint's connection, made (or waited for) while holding a
    /// `max_pending_requests` slot.
    async fn connect(
        &self,
        endpoint: &Endpoint,
        settings: &Settings<'_>,
    ) -> Result<SendRequest<RequestBody>, ProxyError> {
        let _pending = self
            .call
            .upstream
            .acquire(Limit::PendingRequests, self.call.res)?;
        endpoint.h2.reconnect(endpoint, settings).await
    }

    /// Waits for a stream slot on the endpoint while holding a `max_pending_requests`
    /// slot; the wait counts against the attempt's time.
    async fn wait_for_stream(
        &self,
        permit: &mut StreamPermit,
        timer: &Timer,
        start: Instant,
        addr: std::net::SocketAddr,
    ) -> Result<(), Failure> {
        let _pending = self
            .call
            .upstream
            .acquire(Limit::PendingRequests, self.call.res)
            .map_err(Failure::local)?;
        timed(timer, start, std::pin::pin!(permit.acquire()), None)
            .await
            .map_err(|bound| Failure::local(timer.expired(bound, self.call, addr).err))
    }

    /// The rare second send of an attempt, on a fresh connection, when the first
    /// connection closed before the request left.
    async fn resend(
        &mut self,
        endpoint: &Endpoint,
        settings: &Settings<'_>,
        timer: &Timer,
        start: Instant,
    ) -> Result<Response<Incoming>, Failure> {
        debug!(addr = %endpoint.addr, "h2: connection closed under the request; reconnecting");
        let mut sender = self
            .connect(endpoint, settings)
            .await
            .map_err(Failure::connect)?;
        let unsent = self.req.take().ok_or_else(lost)?;
        let response = std::pin::pin!(sender.try_send_request(unsent));
        match timed(timer, start, response, self.again.body.as_deref()).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(mut e)) => {
                let err = reset(endpoint.addr, e.error());
                // Closed again before it left: another endpoint may take it.
                self.req = e.take_message();
                let mut failure = Failure::sent(err, Outcome::Reset);
                failure.unsent = self.req.is_some();
                Err(failure)
            }
            Err(bound) => Err(timer.expired(bound, self.call, endpoint.addr)),
        }
    }
}

impl Protocol for Streams<'_> {
    type Response = Answered;

    fn stamp(&mut self, left: Duration) {
        self.left = Some(left);
    }

    async fn attempt(&mut self, in_flight: &InFlight, timer: &Timer) -> Result<Answered, Failure> {
        let start = Instant::now();
        let endpoint = in_flight.endpoint();
        let settings = self.settings();
        let mut sender = match endpoint.h2.live() {
            Some(live) => live,
            None => Box::pin(self.connect(endpoint, &settings))
                .await
                .map_err(Failure::connect)?,
        };
        let mut permit = StreamPermit::new(
            endpoint.clone(),
            self.call.upstream.config.h2_max_concurrent_streams,
        );
        if !permit.try_acquire() {
            Box::pin(self.wait_for_stream(&mut permit, timer, start, endpoint.addr)).await?;
        }
        let req = self.request().ok_or_else(lost)?;
        let response = std::pin::pin!(sender.try_send_request(req));
        // Bound in a `let` so that the match's temporaries do not outlive it into the await.
        let resend = match timed(timer, start, response, self.again.body.as_deref()).await {
            Ok(Ok(response)) => return Ok(Answered { response, permit }),
            Ok(Err(mut e)) => match e.take_message() {
                // The connection closed before the request left: it never reached the
                // upstream, so it is safe to send it once more on a fresh connection.
                Some(unsent) => {
                    self.req = Some(unsent);
                    Box::pin(self.resend(endpoint, &settings, timer, start))
                }
                None => {
                    return Err(Failure::sent(
                        reset(endpoint.addr, e.error()),
                        Outcome::Reset,
                    ))
                }
            },
            Err(bound) => return Err(timer.expired(bound, self.call, endpoint.addr)),
        };
        let response = resend.await?;
        Ok(Answered { response, permit })
    }

    fn judge(&self, answered: &Answered) -> Judged {
        let response = &answered.response;
        let status = response.status().as_u16();
        // A gRPC call's status is in its trailers, unless the response is trailers-only
        // (`grpc-status` in the head): then it is recorded when the body ends.
        let outcome = if self.grpc && status == 200 {
            grpc_status(response.headers()).map(Outcome::Grpc)
        } else {
            Some(Outcome::Status(status))
        };
        Judged {
            status: Some(status),
            outcome,
            relayed: response.headers().contains_key(RELAYED_FAILURE),
            committed: false,
        }
    }

    fn replayable(&self) -> bool {
        self.req.is_some() || self.again.possible()
    }

    fn discard(&mut self, answered: Answered) {
        drop(answered);
    }
}

fn lost() -> Failure {
    Failure::local(ProxyError::BadRequest("the request was lost"))
}

/// Waits for `fut` within the timer of an attempt that started at `start`; `body` tells
/// when the request body ended (`None`: the request has none), from which the per-try
/// and request timeouts count. The bounds are checked only when the timer fires, so a
/// streaming body costs no timer updates.
async fn timed<F: Future>(
    timer: &Timer,
    start: Instant,
    mut fut: Pin<&mut F>,
    body: Option<&BodyState>,
) -> Result<F::Output, Bound> {
    let body_end = |now: Instant| match body {
        None => Some(start.min(now)),
        Some(b) => b.at(),
    };
    let Some((first, _)) = timer.limit(start, body_end(start), start) else {
        return Ok(fut.await);
    };
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(first));
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return Ok(out),
            () = &mut sleep => {
                let now = Instant::now();
                match timer.limit(start, body_end(now), now) {
                    Some((at, bound)) if at <= now => return Err(bound),
                    Some((at, _)) => sleep.as_mut().reset(at),
                    None => return Ok(fut.await),
                }
            }
        }
    }
}

/// What another attempt needs to send the request again once it has left.
struct Again {
    /// The request head, kept when the request may be resent.
    head: Option<HeadCopy>,
    /// The request body's state; `None`: the request has no body.
    body: Option<Arc<BodyState>>,
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
