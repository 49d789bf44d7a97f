//! The bodies the HTTP/2 path relays: hyper's `Incoming` passed straight through (frames,
//! trailers and flow control included), with just enough bookkeeping around it.
//!
//! - [`RequestBody`] notes when the request body has been sent completely: the response
//!   timeout counts from then, so a long upload or a client-streaming RPC is not cut.
//! - [`ResponseBody`] carries the request's [`StreamGuard`] until the response body ends,
//!   so the endpoint counts the stream as in flight (and keeps its stream slot) exactly as
//!   long as it is active; it is also the body of the responses the proxy makes itself.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::client::StreamGuard;

/// When a request body finished sending, shared between the body (polled by hyper) and
/// the request waiting for its response head.
pub(crate) struct SentAt {
    base: Instant,
    /// Nanoseconds after `base`, plus one; `0` while the body is still streaming.
    nanos: AtomicU64,
}

impl SentAt {
    fn mark(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.nanos.store(nanos + 1, Ordering::Release);
    }

    /// When the body was sent completely, if it has been.
    pub fn at(&self) -> Option<Instant> {
        match self.nanos.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.base + std::time::Duration::from_nanos(n - 1)),
        }
    }
}

pub(crate) struct RequestBody {
    inner: Incoming,
    sent: Option<Arc<SentAt>>,
}

impl RequestBody {
    /// Wraps a client's request body; the `SentAt` is `None` when the request has no body
    /// (END_STREAM on its HEADERS), so body-less requests allocate nothing.
    pub fn new(inner: Incoming) -> (Self, Option<Arc<SentAt>>) {
        let sent = (!inner.is_end_stream()).then(|| {
            Arc::new(SentAt {
                base: Instant::now(),
                nanos: AtomicU64::new(0),
            })
        });
        let body = RequestBody {
            inner,
            sent: sent.clone(),
        };
        (body, sent)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if this.sent.is_some() {
            let done = match &polled {
                Poll::Ready(None) => true,
                Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
                _ => false,
            };
            if done {
                if let Some(sent) = this.sent.take() {
                    sent.mark();
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub(crate) enum ResponseBody {
    /// The upstream's body, relayed while the stream holds its endpoint.
    Upstream {
        body: Incoming,
        guard: Option<StreamGuard>,
    },
    /// A response the proxy made itself.
    Local(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: Incoming, guard: StreamGuard) -> Self {
        ResponseBody::Upstream {
            body,
            guard: Some(guard),
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
            ResponseBody::Upstream { body, guard } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                let ended = match &polled {
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    Poll::Pending => false,
                };
                if ended {
                    // The stream is over: release the endpoint now rather than when hyper
                    // gets round to dropping the body.
                    *guard = None;
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
