//! The one shared HTTP/2 connection per endpoint, and the stream slots on it.
//!
//! Every request to an endpoint, from every worker thread, multiplexes onto a single
//! connection: HTTP/2 is built for it, the upstream sees one connection per sidecar instead
//! of one per client, and a warm connection (window sizes grown, HPACK tables filled) serves
//! everyone.
//!
//! The slot is read lock-free: the live [`SendRequest`] sits in an `ArcSwapOption`, and a
//! request clones it (two atomic increments) unless it has closed. Only when there is no
//! live connection does a request take the async `connecting` mutex, so a burst of first
//! requests makes one connection: the first connects while the others wait, and they then
//! find the fresh connection, or the error of the attempt they waited for (a dead endpoint
//! is not dialled once per waiting request). A connection is replaced when hyper reports it
//! closed: the peer's GOAWAY, a failed keep-alive PING, an I/O error, or the runtime that
//! drives it stopping.
//!
//! The connection's driver task runs on the runtime of the worker that connected; the other
//! workers only talk to it through `SendRequest`'s channel. Concurrent streams are capped by
//! a semaphore of `h2_max_concurrent_streams` permits per endpoint (on top of the peer's own
//! `SETTINGS_MAX_CONCURRENT_STREAMS`, which h2 honours by queueing): a request takes a
//! permit before it opens its stream and gives it back when its response body ends.
//!
//! Service limits: the connection holds one `max_connections` slot of its upstream for its
//! lifetime (a connect over the limit fails fast and is not shared with the requests that
//! waited for it: each tries for itself).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{Mutex, Semaphore};
use tracing::debug;

use super::body::RequestBody;
use crate::{
    connect,
    endpoint::Endpoint,
    error::ProxyError,
    resilience::{limits::Limit, Resilience},
    upstream::Upstream,
};

/// Flow-control windows on the upstream connection. The connection window is larger than
/// the downstream one because every client's streams to this endpoint share it.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// What a connection to one endpoint is built with (from the upstream's configuration and
/// policy).
pub(crate) struct Settings<'a> {
    pub connect_timeout: Duration,
    pub max_header_list_size: u32,
    /// Whose `max_connections` limit the connection counts against.
    pub upstream: &'a Upstream,
    pub resilience: &'a Resilience,
}

/// The one shared HTTP/2 connection to an endpoint.
#[derive(Default)]
pub(crate) struct EndpointClient {
    current: ArcSwapOption<SendRequest<RequestBody>>,
    /// Serialises connection attempts; holds the error of the last failed one.
    connecting: Mutex<Option<ProxyError>>,
    /// Connection attempts finished so far; lets a waiter tell whether an attempt
    /// completed while it waited.
    attempts: AtomicU64,
    /// Stream slots, sized on first use from the upstream's configuration.
    streams: OnceLock<Semaphore>,
}

impl EndpointClient {
    /// The cold path, when there is no [`Self::live`] connection: connect, or wait for the
    /// attempt already under way.
    pub async fn reconnect(
        &self,
        endpoint: &Endpoint,
        settings: &Settings<'_>,
    ) -> Result<SendRequest<RequestBody>, ProxyError> {
        let seen = self.attempts.load(Ordering::Acquire);
        let mut last_error = self.connecting.lock().await;
        if let Some(live) = self.live() {
            return Ok(live);
        }
        if self.attempts.load(Ordering::Acquire) != seen {
            // The attempt we waited for failed: share its outcome instead of dialling again.
            if let Some(e) = last_error.as_ref() {
                return Err(replay(e, endpoint.addr));
            }
        }
        let result = connect(endpoint, settings).await;
        match &result {
            Ok(send) => {
                self.current.store(Some(Arc::new(send.clone())));
                *last_error = None;
            }
            // The limit may have room again for the next one: not an endpoint's failure.
            Err(ProxyError::LimitReached { .. }) => *last_error = None,
            Err(e) => *last_error = Some(replay(e, endpoint.addr)),
        }
        self.attempts.fetch_add(1, Ordering::Release);
        result
    }

    /// A sender on the live connection, if there is one (the hot path: lock-free).
    pub fn live(&self) -> Option<SendRequest<RequestBody>> {
        let current = self.current.load();
        match current.as_deref() {
            Some(send) if !send.is_closed() => Some(send.clone()),
            _ => None,
        }
    }

    fn streams(&self, max: u32) -> &Semaphore {
        self.streams.get_or_init(|| {
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            Semaphore::new(max.min(Semaphore::MAX_PERMITS))
        })
    }
}

async fn connect(
    endpoint: &Endpoint,
    settings: &Settings<'_>,
) -> Result<SendRequest<RequestBody>, ProxyError> {
    let addr = endpoint.addr;
    let slot = settings
        .upstream
        .acquire(Limit::Connections, settings.resilience)?;
    let stream = connect::open(settings.upstream, endpoint, settings.connect_timeout).await?;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(settings.max_header_list_size)
        .keep_alive_interval(super::KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(super::KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let handshake = builder.handshake::<_, RequestBody>(TokioIo::new(stream));
    let (send, conn) = match tokio::time::timeout(settings.connect_timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            return Err(ProxyError::Connect {
                addr,
                source: std::io::Error::other(e),
            })
        }
        Err(_) => {
            return Err(ProxyError::ConnectTimeout {
                addr,
                timeout: settings.connect_timeout,
            })
        }
    };
    let open = endpoint.metrics.open_connections.clone();
    open.inc();
    tokio::spawn(async move {
        match conn.await {
            Ok(()) => debug!(%addr, "upstream h2 connection closed"),
            Err(e) => debug!(%addr, error = %e, "upstream h2 connection failed"),
        }
        open.dec();
        drop(slot);
    });
    debug!(%addr, "upstream h2 connection open");
    Ok(send)
}

/// A copy of a connect error for the requests that waited on the same attempt.
fn replay(e: &ProxyError, addr: std::net::SocketAddr) -> ProxyError {
    match e {
        ProxyError::ConnectRefused { addr } => ProxyError::ConnectRefused { addr: *addr },
        ProxyError::ConnectTimeout { addr, timeout } => ProxyError::ConnectTimeout {
            addr: *addr,
            timeout: *timeout,
        },
        ProxyError::Connect { addr, source } => ProxyError::Connect {
            addr: *addr,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        ProxyError::Handshake { addr, reason } => ProxyError::Handshake {
            addr: *addr,
            reason: reason.clone(),
        },
        // Connecting fails only in the ways above.
        other => ProxyError::Connect {
            addr,
            source: std::io::Error::other(other.to_string()),
        },
    }
}

/// One of an endpoint's HTTP/2 stream slots, once taken, held until the response body
/// ends.
pub(crate) struct StreamPermit {
    endpoint: Arc<Endpoint>,
    max_streams: u32,
    taken: bool,
}

impl StreamPermit {
    pub fn new(endpoint: Arc<Endpoint>, max_streams: u32) -> Self {
        StreamPermit {
            endpoint,
            max_streams,
            taken: false,
        }
    }

    /// Takes a free stream slot on the endpoint if there is one.
    pub fn try_acquire(&mut self) -> bool {
        if !self.taken {
            let streams = self.endpoint.h2.streams(self.max_streams);
            if let Ok(p) = streams.try_acquire() {
                // Given back by hand in `drop`, so the permit needs no `Arc<Semaphore>`.
                p.forget();
                self.taken = true;
            }
        }
        self.taken
    }

    /// Waits for a free stream slot on the endpoint.
    pub async fn acquire(&mut self) {
        if self.taken {
            return;
        }
        let streams = self.endpoint.h2.streams(self.max_streams);
        if let Ok(p) = streams.acquire().await {
            p.forget();
            self.taken = true;
        }
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if self.taken {
            self.endpoint.h2.streams(self.max_streams).add_permits(1);
        }
    }
}
