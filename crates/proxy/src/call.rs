//! One call to an upstream under its resilience policy, written once for every protocol.
//!
//! Every request (an HTTP/1 exchange, an HTTP/2 or gRPC stream, a TCP connection) walks the
//! same sequence, and this module is the only place that walks it:
//!
//! ```text
//! Call::new       deadline: the policy's request timeout, lowered by the caller's budget
//! Call::admit     faults and rate limits (an injected delay waited within the deadline)
//!                 -> max_requests -> one deposit into the retry budget
//! Call::run       loop {
//!                   pick an endpoint, avoiding every one already tried
//!                   -> stamp the time left into the request (deadline propagation)
//!                   -> Protocol::attempt, bounded by a Timer (per-try timeout, deadline)
//!                   -> classify (Protocol::judge) -> record in the endpoint's breaker
//!                   -> retry? (conditions, idempotency, replayable body, max_attempts,
//!                      max_retries, budget, backoff within the deadline) or answer
//!                 }
//! ```
//!
//! A protocol only moves one attempt's bytes: it implements [`Protocol`] (send the request
//! to the endpoint it is given, wait for the response head within the timer, say what the
//! head means, let go of a response that will be retried). So resilience behaves the same
//! on every protocol by construction, as Pingora keeps its `proxy_h1` / `proxy_h2` apart
//! from its one retry loop.
//!
//! The driver is generic over the protocol, not a trait object: the HTTP/1 hot path pays no
//! allocation and no dynamic call for it.

use std::{sync::Arc, time::Duration};

use malla_core::policy::Outcome;
use tokio::time::Instant;

use crate::{
    endpoint::{Endpoint, InFlight},
    error::ProxyError,
    resilience::{
        budget, deadline,
        limits::{Limit, Slot},
        Resilience,
    },
    upstream::Upstream,
};

/// A configured timeout of centuries must not overflow `Instant` arithmetic.
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a protocol does for one attempt of a call.
pub(crate) trait Protocol {
    /// A response head (with whatever the protocol needs to relay the rest).
    type Response;

    /// Writes the time left before the deadline into the request, for the next hop
    /// (`grpc-timeout`, `malla-timeout-ms`).
    fn stamp(&mut self, left: Duration);

    /// Sends the request to the endpoint of `in_flight` and waits for its response head,
    /// failing with [`Timer::expired`] when the timer runs out.
    async fn attempt(
        &mut self,
        in_flight: &InFlight,
        timer: &Timer,
    ) -> Result<Self::Response, Failure>;

    /// What a response head means for the breaker and the retry conditions.
    fn judge(&self, response: &Self::Response) -> Judged;

    /// Whether the request can be sent again now that it has left (its body is kept).
    fn replayable(&self) -> bool;

    /// Lets go of a response that will be retried (a connection may be kept).
    fn discard(&mut self, response: Self::Response);
}

/// What a response head says.
pub(crate) struct Judged {
    /// For the endpoint's latency estimate and response metrics; `None`: not an HTTP
    /// response (a TCP connection), only the latency is noted.
    pub status: Option<u16>,
    /// For the breaker and the retry conditions; `None`: not known at the head (a gRPC
    /// call's status comes in its trailers), recorded by the protocol when it is.
    pub outcome: Option<Outcome>,
    /// Marked `malla-relayed-failure`: not the endpoint's own doing, not recorded.
    pub relayed: bool,
    /// Part of this response, or of the exchange, already reached the client (a `101`, a
    /// relayed `100 Continue`): it is the answer, whatever it says.
    pub committed: bool,
}

/// An attempt that ended without a response head.
pub(crate) struct Failure {
    pub err: ProxyError,
    /// For the breaker and the retry conditions; `None`: not the endpoint's doing (a
    /// service limit, the client's own failure).
    pub outcome: Option<Outcome>,
    /// The request never left: it may go to another endpoint whatever its method.
    pub unsent: bool,
    /// Part of a response already reached the client: nothing can be retried or answered.
    pub partial: bool,
}

impl Failure {
    /// No connection (or a service limit said no): the request did not leave.
    pub fn connect(err: ProxyError) -> Self {
        let outcome = match err {
            ProxyError::LimitReached { .. } => None,
            _ => Some(Outcome::ConnectFailure),
        };
        Failure {
            err,
            outcome,
            unsent: true,
            partial: false,
        }
    }

    /// The request left and the endpoint failed it (`outcome`).
    pub fn sent(err: ProxyError, outcome: Outcome) -> Self {
        Failure {
            err,
            outcome: Some(outcome),
            unsent: false,
            partial: false,
        }
    }

    /// Not the endpoint's doing: answered as is, never retried.
    pub fn local(err: ProxyError) -> Self {
        Failure {
            err,
            outcome: None,
            unsent: false,
            partial: false,
        }
    }

    /// Part of a response already reached the client.
    pub fn partial(err: ProxyError, outcome: Option<Outcome>) -> Self {
        Failure {
            err,
            outcome,
            unsent: false,
            partial: true,
        }
    }
}

/// How long one attempt may wait for its response head: the per-try timeout, the call's
/// deadline, which no attempt outlives, and the policy's request timeout when it counts
/// from the end of a request body that was still arriving as the call began.
///
/// The per-try timeout counts from the later of the attempt's start and the moment the
/// request body has all left, so a long upload or a client-streaming RPC is not cut by a
/// bound meant for waiting on an answer; the deadline is absolute.
pub(crate) struct Timer {
    /// Zero: none.
    pub per_try: Duration,
    pub deadline: Option<Instant>,
    /// The request timeout, from the moment the request body has all left.
    pub after_body: Option<Duration>,
}

/// Which bound ended an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bound {
    /// The per-try timeout: the endpoint's failure, which may be retried.
    PerTry,
    /// The call's time is up (504 `deadline-exceeded`), never retried.
    Call,
}

impl Timer {
    /// When an attempt that started at `start` runs out of time and on which bound, given
    /// when its request body ended (`None`: still arriving, so the bounds that count from
    /// its end are at least a whole period after `now`). `None`: it cannot.
    pub fn limit(
        &self,
        start: Instant,
        body_end: Option<Instant>,
        now: Instant,
    ) -> Option<(Instant, Bound)> {
        let from = body_end.map_or(now, |end| end.max(start));
        let per_try =
            (!self.per_try.is_zero()).then(|| (from + self.per_try.min(YEAR), Bound::PerTry));
        let request = self
            .after_body
            .map(|t| (body_end.unwrap_or(now) + t.min(YEAR), Bound::Call));
        let deadline = self.deadline.map(|d| (d, Bound::Call));
        // On a tie the call's bound wins: no attempt would have time left.
        [request, deadline, per_try]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
    }

    /// [`Self::limit`] for an attempt whose request has all left now.
    pub fn expiry(&self) -> Option<(Instant, Bound)> {
        let now = Instant::now();
        self.limit(now, Some(now), now)
    }

    /// The failure of an attempt whose timer ran out on `bound`. Both count as a timeout
    /// for the endpoint's breaker.
    pub fn expired(&self, bound: Bound, call: &Call<'_>, addr: std::net::SocketAddr) -> Failure {
        let err = match bound {
            Bound::Call => call.deadline_exceeded(),
            Bound::PerTry => ProxyError::ResponseTimeout {
                addr,
                timeout: self.per_try,
            },
        };
        Failure::sent(err, Outcome::Timeout)
    }
}

/// How a call ended.
pub(crate) enum Answer<R> {
    /// The response to relay. The claim keeps the endpoint in flight (and a retry's slot
    /// held) until the protocol has relayed the response's body.
    Response(R, Claim),
    /// The proxy answers with this error.
    Error(ProxyError),
    /// Part of a response already reached the client: the only signal left is closing
    /// (the error says what happened, for the logs).
    Abandoned(ProxyError),
}

/// A response's hold on its endpoint and on the `max_retries` slot of its retry.
pub(crate) struct Claim {
    pub in_flight: InFlight,
    /// Held, not read: the retry counts against `max_retries` while it is in flight.
    _retry: Option<Slot>,
}

/// One call to an upstream.
pub(crate) struct Call<'a> {
    pub upstream: &'a Upstream,
    pub res: &'a Resilience,
    /// When the response head must be here, every attempt included; `None`: no bound but
    /// the per-try timeout (and [`Timer::after_body`]).
    pub deadline: Option<Instant>,
    /// The request timeout, when it counts from the end of the request body (see
    /// [`Call::new`]).
    after_body: Option<Duration>,
    /// The caller's own budget (`grpc-timeout`, `malla-timeout-ms`), for messages.
    incoming: Option<Duration>,
    idempotent: bool,
    grpc: bool,
}

impl<'a> Call<'a> {
    /// A call that arrived at `arrived` (asked for only when there is a deadline: a clock
    /// read is not free on the hot path).
    ///
    /// The caller's budget (`incoming`) counts from arrival. The policy's request timeout
    /// does too, unless the request body is still arriving (`body_pending`): then it counts
    /// from the moment the body has all left, as Envoy's route timeout does, so a long
    /// upload or client stream is not cut by a bound meant for waiting on an answer.
    pub fn new(
        upstream: &'a Upstream,
        res: &'a Resilience,
        incoming: Option<Duration>,
        (idempotent, grpc, body_pending): (bool, bool, bool),
        arrived: impl FnOnce() -> Instant,
    ) -> Self {
        let request = res.policy.timeouts.request;
        let (from_arrival, after_body) = match body_pending {
            true if !request.is_zero() => (Duration::ZERO, Some(request)),
            _ => (request, None),
        };
        Call {
            deadline: deadline::deadline(arrived, from_arrival, incoming),
            after_body,
            upstream,
            res,
            incoming,
            idempotent,
            grpc,
        }
    }

    /// The request body, pending when the call began, has now all arrived (read ahead to
    /// be replayable): the request timeout counts from now, across every attempt.
    pub fn body_received(&mut self) {
        if let Some(request) = self.after_body.take() {
            let bound = Instant::now() + request.min(YEAR);
            self.deadline = Some(self.deadline.map_or(bound, |d| d.min(bound)));
        }
    }

    /// The checks before any endpoint is involved: fault injection and rate limits (for a
    /// request to `path`; a TCP connection has none), an injected delay waited within the
    /// deadline, then the `max_requests` limit. Admitted, the call counts once towards the
    /// retry budget. The slot is held until the call ends.
    pub async fn admit(&self, path: Option<&[u8]>) -> Result<Option<Slot>, ProxyError> {
        if let Some(delay) = self.upstream.admit(self.res, path)? {
            deadline::wait(delay, self.deadline, self.budget()).await?;
        }
        let slot = self.upstream.acquire(Limit::Requests, self.res)?;
        self.upstream.deposit(self.res);
        Ok(slot)
    }

    /// Whether the request may be sent again once it has left, so that a protocol knows to
    /// keep its body: retries are on, and the method is safe to repeat (or the policy says
    /// any method is, or it is a gRPC call retried on gRPC statuses, as gRPC's own retry
    /// design does).
    pub fn may_resend(&self) -> bool {
        let retries = &self.res.policy.retries;
        self.res.max_attempts > 1
            && (self.idempotent || retries.non_idempotent || (self.grpc && retries.on.has_grpc()))
    }

    /// Attempts until one answers in a way that is not retried, or the policy allows no
    /// more.
    pub async fn run<P: Protocol>(&self, protocol: &mut P) -> Answer<P::Response> {
        // Endpoints tried so far (allocated only when a retry happens).
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut retry_slot = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let in_flight = match self
                .upstream
                .pick_avoiding(|e| tried.iter().any(|t| std::ptr::eq(&**t, e)))
            {
                Ok(f) => f,
                Err(err) => return Answer::Error(err),
            };
            // The time left for the next hop: what remains of the deadline, and at most
            // the whole request timeout when it counts from a body still arriving.
            let left = match (self.deadline.map(deadline::remaining), self.after_body) {
                (Some(left), _) if left.is_zero() => {
                    return Answer::Error(self.deadline_exceeded())
                }
                (Some(left), after_body) => Some(after_body.map_or(left, |t| t.min(left))),
                (None, after_body) => after_body,
            };
            if let Some(left) = left {
                protocol.stamp(left);
            }
            let timer = Timer {
                per_try: self.res.per_try_timeout,
                deadline: self.deadline,
                after_body: self.after_body,
            };
            let more = attempt < self.res.max_attempts;
            // Each arm either answers or yields the permit for another attempt.
            let (slot, wait) = match protocol.attempt(&in_flight, &timer).await {
                Ok(response) => {
                    let judged = protocol.judge(&response);
                    match judged.status {
                        Some(status) => in_flight.answered(status),
                        None => in_flight.connected(),
                    }
                    let Some(outcome) = judged.outcome else {
                        return Answer::Response(response, claim(in_flight, retry_slot));
                    };
                    self.upstream.record(&in_flight, outcome, judged.relayed);
                    let permit = (!judged.committed
                        && more
                        && self.retryable(outcome, false)
                        && protocol.replayable())
                    .then(|| self.permit(attempt))
                    .flatten();
                    let Some(permit) = permit else {
                        return Answer::Response(response, claim(in_flight, retry_slot));
                    };
                    protocol.discard(response);
                    permit
                }
                Err(failure) => {
                    in_flight.failed(failure.err.status().as_u16());
                    if let Some(outcome) = failure.outcome {
                        self.upstream.record(&in_flight, outcome, false);
                    }
                    if failure.partial {
                        return Answer::Abandoned(failure.err);
                    }
                    // The deadline ends the call: no attempt would have time left.
                    let over = matches!(failure.err, ProxyError::DeadlineExceeded { .. });
                    let permit = failure
                        .outcome
                        .filter(|&outcome| {
                            more && !over
                                && self.retryable(outcome, failure.unsent)
                                && (failure.unsent || protocol.replayable())
                        })
                        .and_then(|_| self.permit(attempt));
                    let Some(permit) = permit else {
                        return Answer::Error(failure.err);
                    };
                    permit
                }
            };
            retry_slot = slot;
            tried.push(in_flight.endpoint().clone());
            // The failed attempt lets go of its endpoint before the backoff.
            drop(in_flight);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// Whether an outcome deserves another try under the retry policy: the condition is
    /// listed, and the request never left (a failed connect), or it is safe to send twice,
    /// or it is a gRPC call and the outcome a gRPC status.
    fn retryable(&self, outcome: Outcome, unsent: bool) -> bool {
        let policy = &self.res.policy.retries;
        policy.on.matches(outcome)
            && (unsent
                || outcome == Outcome::ConnectFailure
                || self.idempotent
                || policy.non_idempotent
                || (self.grpc && matches!(outcome, Outcome::Grpc(_))))
    }

    /// Whether another attempt may go: the deadline leaves time after the backoff, the
    /// `max_retries` limit has room and the budget a retry. The slot counts the retry
    /// while it is in flight; the backoff is for the caller to wait, once the failed
    /// attempt has let go of its endpoint.
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

    /// The call's whole time budget, for the `deadline-exceeded` message.
    pub fn budget(&self) -> Duration {
        deadline::budget(self.res.policy.timeouts.request, self.incoming).unwrap_or_default()
    }

    pub fn deadline_exceeded(&self) -> ProxyError {
        ProxyError::DeadlineExceeded {
            budget: self.budget(),
        }
    }
}

fn claim(in_flight: InFlight, retry: Option<Slot>) -> Claim {
    Claim {
        in_flight,
        _retry: retry,
    }
}
