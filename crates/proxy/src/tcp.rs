//! Opaque TCP: one call per client connection, whose attempt is a connect, then bytes
//! copied both ways until both sides close.
//!
//! The call driver ([`crate::call`]) does for a connection what it does for a request:
//! rate limits that name no path, `max_requests` (a connection counts as one), a deposit
//! into the retry budget, a pick avoiding every endpoint already tried, and a failed
//! connect retried on another endpoint within the budget and the backoff, since nothing
//! was sent. A connect that succeeds counts as a success for the endpoint's breaker.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::BytesMut;
use malla_core::policy::Outcome;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::debug;

use crate::{
    call::{Answer, Call, Failure, Judged, Protocol, Timer},
    connect::open,
    endpoint::{Endpoint, InFlight},
    metrics::ConnectionTracker,
    resilience::{
        limits::{Limit, Slot},
        outlier,
    },
    stream::Stream,
    upstream::Upstream,
};

pub async fn proxy(mut client: Stream, prefix: BytesMut, upstream: &Arc<Upstream>) {
    let res = upstream.resilience_full();
    // Idempotent as far as retries go: only failed connects are retried, nothing was sent.
    let call = Call::new(
        upstream,
        &res,
        None,
        (true, false, false),
        tokio::time::Instant::now,
    );
    let _connection = match call.admit(None).await {
        Ok(slot) => slot,
        Err(e) => {
            upstream.error(&e);
            debug!(error = %e, "tcp: closing the client connection");
            return;
        }
    };
    let mut connect = Connect { call: &call };
    let (mut server, claim) = match call.run(&mut connect).await {
        Answer::Response(server, claim) => (server, claim),
        Answer::Error(e) | Answer::Abandoned(e) => {
            upstream.error(&e);
            debug!(error = %e, "tcp: closing the client connection");
            return;
        }
    };
    let endpoint = claim.in_flight.endpoint().clone();
    let _open = ConnectionTracker::open(&endpoint.metrics.open_connections);
    let mut server = Watched {
        stream: &mut server.stream,
        endpoint: &endpoint,
    };
    if !prefix.is_empty() {
        if let Err(e) = server.write_all(&prefix).await {
            debug!(error = %e, "tcp: upstream write failed");
            return;
        }
    }
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((up, down)) => debug!(up, down, endpoint = %endpoint.addr, "tcp stream closed"),
        Err(e) => debug!(error = %e, endpoint = %endpoint.addr, "tcp stream ended with an error"),
    }
}

/// The upstream side of a stream, noting bytes each way for the stall check
/// ([`crate::resilience::stall`]): a relaxed store per chunk at most, none when the
/// millisecond has not changed.
struct Watched<'a> {
    stream: &'a mut Stream,
    endpoint: &'a Endpoint,
}

impl AsyncRead for Watched<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.endpoint.note_received(outlier::now_ms());
        }
        polled
    }
}

impl AsyncWrite for Watched<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut *self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.endpoint.note_sent(outlier::now_ms());
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.stream).poll_shutdown(cx)
    }
}

/// An upstream connection, holding its `max_connections` slot.
struct Server {
    stream: Stream,
    _slot: Option<Slot>,
}

/// A TCP attempt: a connect within the connect timeout.
struct Connect<'a> {
    call: &'a Call<'a>,
}

impl Protocol for Connect<'_> {
    type Response = Server;

    /// A byte stream carries no deadline.
    fn stamp(&mut self, _left: Duration) {}

    async fn attempt(&mut self, in_flight: &InFlight, _timer: &Timer) -> Result<Server, Failure> {
        let (upstream, res) = (self.call.upstream, self.call.res);
        let slot = upstream
            .acquire(Limit::Connections, res)
            .map_err(Failure::connect)?;
        let stream = open(upstream, in_flight.endpoint(), res.connect_timeout)
            .await
            .map_err(Failure::connect)?;
        Ok(Server {
            stream,
            _slot: slot,
        })
    }

    fn judge(&self, _server: &Server) -> Judged {
        Judged {
            status: None,
            outcome: Some(Outcome::Status(200)),
            relayed: false,
            committed: true,
        }
    }

    fn replayable(&self) -> bool {
        false
    }

    fn discard(&mut self, _server: Server) {}
}
