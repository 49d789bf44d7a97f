//! The bodies the HTTP/2 path relays: hyper's `Incoming` passed straight through (frames,
//! trailers and flow control included), with just enough bookkeeping around it.
//!
//! - [`RequestBody`] notes when the request body has been sent completely: the response
//!   timeout counts from then, so a long upload or a client-streaming RPC is not cut. When
//!   the request may be retried it also records what it sends, so that another attempt can
//!   send it again (see [`BodyState::replay`]).
//! - [`ResponseBody`] carries the request's [`Hold`] (its stream on the endpoint, its
//!   `max_requests` slot) until the response body ends, so the endpoint counts the stream
//!   as in flight exactly as long as it is active; for a gRPC call whose status comes in
//!   the trailers, it reports that status to the outlier detector. It is also the body of
//!   the responses the proxy makes itself.
//!
//! ## Replaying a request body
//!
//! Linkerd's design (`ReplayBody`): the first attempt reads the client's body and records
//! each DATA frame (a `Bytes` clone, no copy) and the trailers as it sends them, up to
//! `max_replay_bytes`. A retry gets a new body that replays the recording and then goes
//! on reading the client's body where the previous attempt left off, still recording, so a
//! retry does not wait for the client to finish, and an upstream that answered before the
//! whole body arrived can be retried too. Only the newest body may read: an older attempt's
//! body, still polled by hyper for a stream that is being abandoned, fails instead, which
//! resets that stream. Past the cap the recording is dropped and no further attempt can be
//! made; once a response is committed to the client, recording stops.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use malla_core::policy::Outcome;
use tokio::time::Instant;

use super::client::StreamPermit;
use crate::{call::Claim, resilience::limits::Slot, upstream::Upstream};

/// What the request of a stream shares with the bodies hyper sends for it: when the body
/// was sent completely and, for a request that may be retried, the recording.
pub(crate) struct BodyState {
    base: Instant,
    /// Nanoseconds after `base`, plus one; `0` while the body is still streaming.
    nanos: AtomicU64,
    /// The recording, for requests that may be sent again.
    log: Option<Mutex<Log>>,
    /// The client's body's size hint, for the replays.
    hint: SizeHint,
}

impl BodyState {
    /// Notes the body sent completely; the first time counts (a replay ends later).
    fn mark(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        let _ = self
            .nanos
            .compare_exchange(0, nanos + 1, Ordering::AcqRel, Ordering::Acquire);
    }

    /// When the body was first sent completely, if it has been.
    pub fn at(&self) -> Option<Instant> {
        match self.nanos.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.base + std::time::Duration::from_nanos(n - 1)),
        }
    }

    fn log(&self) -> Option<MutexGuard<'_, Log>> {
        self.log
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether another attempt could send the body again.
    pub fn can_replay(&self) -> bool {
        self.log().is_some_and(|log| log.replayable())
    }

    /// A body for another attempt: the recording, then the rest of the client's body. The
    /// body of the previous attempt can no longer be read from then on.
    pub fn replay(self: &Arc<Self>) -> Option<RequestBody> {
        let mut log = self.log()?;
        if !log.replayable() {
            return None;
        }
        log.generation = log.generation.wrapping_add(1);
        // The previous reader may be waiting for the client: wake it so that it finds it
        // was superseded and hyper resets its stream.
        if let Some(waker) = log.waker.take() {
            waker.wake();
        }
        Some(RequestBody {
            kind: Kind::Replay(Reader {
                state: self.clone(),
                generation: log.generation,
                cursor: 0,
                trailers_sent: false,
            }),
        })
    }

    /// A response is on its way to the client: no attempt will follow, stop recording.
    pub fn commit(&self) {
        if let Some(mut log) = self.log() {
            log.capped = true;
        }
    }
}

/// The bytes that the recordings of one client connection's streams may hold together:
/// `max_replay_bytes` bounds one request, this bounds a connection with many streams
/// open (a stream past it simply cannot be replayed).
pub(crate) struct ReplayBudget(AtomicU64);

impl ReplayBudget {
    pub fn new(bytes: u64) -> Self {
        ReplayBudget(AtomicU64::new(bytes))
    }

    fn take(&self, n: u64) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(n)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.0.fetch_add(n, Ordering::AcqRel);
    }
}

/// The recording of a request body, shared by the attempts' bodies.
struct Log {
    /// The connection's budget, and what this recording holds of it.
    budget: Arc<ReplayBudget>,
    reserved: u64,
    /// The client's body; `None` once it ended or failed.
    original: Option<Incoming>,
    /// The attempt whose body may read (the newest).
    generation: u32,
    chunks: Chunks,
    trailers: Option<HeaderMap>,
    /// The client's body has ended (everything is recorded, unless capped).
    ended: bool,
    /// The client's body failed: nothing can be sent again.
    failed: bool,
    /// Bytes read from the client's body.
    bytes: u64,
    max_bytes: u64,
    /// Over `max_bytes`, or a response committed: nothing is recorded any more.
    capped: bool,
    /// The reader waiting for the client's body.
    waker: Option<Waker>,
}

impl Log {
    fn replayable(&self) -> bool {
        !self.capped && !self.failed
    }

    /// Drops the recording and gives its bytes back to the connection's budget.
    fn clear(&mut self) {
        self.chunks.clear();
        self.budget.give(std::mem::take(&mut self.reserved));
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.budget.give(self.reserved);
    }
}

/// Recorded DATA frames; the first inline, so that a one-message body (a unary gRPC call)
/// allocates nothing to be recorded.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    rest: Vec<Bytes>,
}

impl Chunks {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    fn get(&self, i: usize) -> Option<&Bytes> {
        match i {
            0 => self.first.as_ref(),
            _ => self.rest.get(i - 1),
        }
    }

    fn push(&mut self, chunk: Bytes) {
        if self.is_empty() {
            self.first = Some(chunk);
        } else {
            self.rest.push(chunk);
        }
    }

    fn clear(&mut self) {
        self.first = None;
        self.rest = Vec::new();
    }
}

/// Why a request body failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestBodyError {
    #[error("the client's request body failed: {0}")]
    Client(#[from] hyper::Error),
    #[error("the client's request body failed during an earlier attempt")]
    Failed,
    #[error("the request was sent again, on another attempt")]
    Superseded,
}

pub(crate) struct RequestBody {
    kind: Kind,
}

enum Kind {
    /// No body (END_STREAM on the request's HEADERS); what a replay of such a request
    /// sends.
    Empty,
    /// The client's body, passed through.
    Direct {
        inner: Incoming,
        state: Option<Arc<BodyState>>,
    },
    /// A body read through the recording (see [`BodyState::replay`]).
    Replay(Reader),
}

struct Reader {
    state: Arc<BodyState>,
    generation: u32,
    /// The next recorded chunk to send.
    cursor: usize,
    trailers_sent: bool,
}

impl RequestBody {
    /// Wraps a client's request body. With `replay` (the most bytes to record), the body is
    /// recorded so that it can be sent again. The state is `None` when the request has no
    /// body (END_STREAM on its HEADERS), so body-less requests allocate nothing.
    pub fn new(
        inner: Incoming,
        replay: Option<u64>,
        budget: &Arc<ReplayBudget>,
    ) -> (Self, Option<Arc<BodyState>>) {
        if inner.is_end_stream() {
            let body = RequestBody {
                kind: Kind::Direct { inner, state: None },
            };
            return (body, None);
        }
        let mut state = BodyState {
            base: Instant::now(),
            nanos: AtomicU64::new(0),
            log: None,
            hint: inner.size_hint(),
        };
        let Some(max_bytes) = replay else {
            let state = Arc::new(state);
            let body = RequestBody {
                kind: Kind::Direct {
                    inner,
                    state: Some(state.clone()),
                },
            };
            return (body, Some(state));
        };
        state.log = Some(Mutex::new(Log {
            budget: budget.clone(),
            reserved: 0,
            original: Some(inner),
            generation: 0,
            chunks: Chunks::default(),
            trailers: None,
            ended: false,
            failed: false,
            bytes: 0,
            max_bytes,
            capped: false,
            waker: None,
        }));
        let state = Arc::new(state);
        let body = RequestBody {
            kind: Kind::Replay(Reader {
                state: state.clone(),
                generation: 0,
                cursor: 0,
                trailers_sent: false,
            }),
        };
        (body, Some(state))
    }

    /// The body of a retried request that had none.
    pub fn empty() -> Self {
        RequestBody { kind: Kind::Empty }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Direct { inner, state } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                if state.is_some() {
                    let done = match &polled {
                        Poll::Ready(None) => true,
                        Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
                        _ => false,
                    };
                    if done {
                        if let Some(state) = state.take() {
                            state.mark();
                        }
                    }
                }
                polled.map(|f| f.map(|f| f.map_err(RequestBodyError::Client)))
            }
            Kind::Replay(reader) => reader.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Direct { inner, .. } => inner.is_end_stream(),
            Kind::Replay(reader) => reader.state.log().is_some_and(|log| reader.finished(&log)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Direct { inner, .. } => inner.size_hint(),
            Kind::Replay(reader) => reader.state.hint,
        }
    }
}

impl Reader {
    fn finished(&self, log: &Log) -> bool {
        finished(log, self.generation, self.cursor, self.trailers_sent)
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let state = &self.state;
        let Some(mut log) = state.log() else {
            return Poll::Ready(None);
        };
        if log.generation != self.generation {
            return Poll::Ready(Some(Err(RequestBodyError::Superseded)));
        }
        // The recording first.
        if let Some(chunk) = log.chunks.get(self.cursor) {
            let chunk = chunk.clone();
            self.cursor += 1;
            if finished(&log, self.generation, self.cursor, self.trailers_sent) {
                state.mark();
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if log.capped && !log.chunks.is_empty() {
            // Nothing will be replayed any more, and this reader is past the recording.
            log.clear();
            self.cursor = 0;
        }
        if log.ended {
            if !self.trailers_sent {
                if let Some(trailers) = &log.trailers {
                    self.trailers_sent = true;
                    let frame = Frame::trailers(trailers.clone());
                    state.mark();
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
            state.mark();
            return Poll::Ready(None);
        }
        if log.failed {
            return Poll::Ready(Some(Err(RequestBodyError::Failed)));
        }
        // Then the client's body, where the previous reader left off.
        let log = &mut *log;
        let Some(original) = log.original.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *original).poll_frame(cx) {
            Poll::Pending => {
                if !log.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    log.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                log.ended = true;
                log.original = None;
                state.mark();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                log.failed = true;
                log.original = None;
                Poll::Ready(Some(Err(RequestBodyError::Client(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let mut ended = original.is_end_stream();
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    log.bytes += len;
                    if !log.capped && (log.bytes > log.max_bytes || !log.budget.take(len)) {
                        log.capped = true;
                        log.clear();
                        self.cursor = 0;
                    }
                    if !log.capped {
                        log.reserved += len;
                        log.chunks.push(data.clone());
                        self.cursor += 1;
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    if !log.capped {
                        log.trailers = Some(trailers.clone());
                    }
                    self.trailers_sent = true;
                    ended = true;
                }
                if ended {
                    log.ended = true;
                    log.original = None;
                    if finished(log, self.generation, self.cursor, self.trailers_sent) {
                        state.mark();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

/// Everything of the body has been sent by the reader of `generation` at `cursor`.
fn finished(log: &Log, generation: u32, cursor: usize, trailers_sent: bool) -> bool {
    log.generation == generation
        && log.ended
        && cursor >= log.chunks.len()
        && (trailers_sent || log.trailers.is_none())
}

/// What a relayed response holds until its body ends.
pub(crate) struct Hold {
    /// The endpoint, in flight (and a retry's `max_retries` slot).
    claim: Claim,
    _stream: StreamPermit,
    /// The request's `max_requests` slot.
    _request: Option<Slot>,
    /// A gRPC call whose status comes in the trailers: its outcome is recorded when the
    /// body ends.
    unrecorded: Option<Unrecorded>,
    /// Keeps the client connection from being closed as idle while the body streams.
    _relaying: super::Relaying,
}

/// The outlier detector's due for a gRPC call whose status is still to come.
pub(crate) struct Unrecorded {
    pub upstream: Arc<Upstream>,
    /// `malla-relayed-failure` was on the response head.
    pub relayed: bool,
}

impl Hold {
    pub fn new(
        (claim, stream): (Claim, StreamPermit),
        request: Option<Slot>,
        unrecorded: Option<Unrecorded>,
        relaying: super::Relaying,
    ) -> Self {
        Hold {
            claim,
            _stream: stream,
            _request: request,
            unrecorded,
            _relaying: relaying,
        }
    }

    /// The response body ended: records a gRPC call's outcome from how it ended (its
    /// trailers, if any; `Err`: reset).
    fn end(self, ending: Result<Option<&HeaderMap>, ()>) {
        if let Some(u) = self.unrecorded {
            let outcome = match ending {
                Err(()) => Outcome::Reset,
                Ok(trailers) => trailers
                    .and_then(super::grpc_status)
                    .map_or(Outcome::Status(200), Outcome::Grpc),
            };
            u.upstream.record(&self.claim.in_flight, outcome, u.relayed);
        }
    }
}

pub(crate) enum ResponseBody {
    /// The upstream's body, relayed while the stream holds its endpoint.
    Upstream { body: Incoming, hold: Option<Hold> },
    /// A response the proxy made itself.
    Local(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: Incoming, hold: Hold) -> Self {
        ResponseBody::Upstream {
            body,
            hold: Some(hold),
        }
    }
}

impl Default for ResponseBody {
    fn default() -> Self {
        ResponseBody::Local(None)
    }
}

impl From<String> for ResponseBody {
    fn from(text: String) -> Self {
        ResponseBody::Local(Some(Bytes::from(text)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream { body, hold } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                let ending = match &polled {
                    Poll::Ready(None) => Some(Ok(None)),
                    Poll::Ready(Some(Err(_))) => Some(Err(())),
                    Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref() {
                        Some(trailers) => Some(Ok(Some(trailers))),
                        None => body.is_end_stream().then_some(Ok(None)),
                    },
                    Poll::Pending => None,
                };
                if let Some(ending) = ending {
                    // The stream is over: release the endpoint now rather than when hyper
                    // gets round to dropping the body.
                    if let Some(hold) = hold.take() {
                        hold.end(ending);
                    }
                }
                polled
            }
            ResponseBody::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Local(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Local(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::ReplayBudget;

    #[test]
    fn a_connection_budget_is_shared_and_given_back() {
        let budget = ReplayBudget::new(100);
        assert!(budget.take(60));
        assert!(
            !budget.take(60),
            "two streams cannot hold more than the connection's budget"
        );
        assert!(budget.take(40));
        budget.give(60);
        assert!(budget.take(60));
        assert!(!budget.take(1));
    }
}
