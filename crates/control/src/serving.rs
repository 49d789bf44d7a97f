//! How the control plane serves its APIs: one accept loop per listening address, each
//! serving the HTTP/JSON API and the gRPC API on the same connections.
//!
//! # One port
//!
//! Both APIs are HTTP. A connection speaks HTTP/1.1 or HTTP/2 with prior knowledge (h2c,
//! what gRPC clients speak), told apart by its first bytes ([`detect`]); each request then
//! goes to gRPC when its `content-type` is `application/grpc*`, to the HTTP router
//! otherwise ([`dispatch`]). The gRPC address (`--grpc-addr`) serves exactly the same, so
//! sidecars configured with the old gRPC port and CLIs with the HTTP port both work.
//!
//! # Limits, and why each
//!
//! - **Request head timeout** ([`ServeSettings::head_timeout`]): a connection must say which
//!   protocol it speaks, and an HTTP/1 request must send its whole head, within it; else the
//!   connection is closed. Without it, clients that send half a request hold a socket and
//!   its buffers for ever (1,500 of them grew the process from 43 to 82 MB).
//! - **HTTP/1 idle timeout**: hyper runs the same head timer while a kept-alive connection
//!   waits for its next request (it starts when hyper begins reading a head, hyper ≥ 1.4),
//!   so an idle HTTP/1 connection is closed after the head timeout too.
//! - **HTTP/2**: no idle timeout, since sidecars hold watch streams open for hours; instead
//!   keep-alive pings ([`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`]) close connections whose
//!   peer vanished. Concurrent streams per connection ([`MAX_CONCURRENT_STREAMS`]: a sidecar
//!   holds one registry watch and one policy watch per service it calls) and the header
//!   list ([`MAX_HEADER_LIST_SIZE`]) are bounded.
//! - **Connection limit** ([`ServeSettings::max_connections`], over all addresses): a
//!   connection beyond it is accepted and closed at once, so its client fails fast and
//!   retries (a sidecar reconnects with backoff) rather than waiting in the kernel's backlog
//!   for a connect timeout; the refusals are logged at most once per [`REFUSAL_LOG_EVERY`].

pub mod detect;
mod dispatch;
pub mod tls;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use hyper::server::conn::{http1, http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::GracefulConnection,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::Instant,
};
use tracing::{debug, warn};

use self::detect::{detect, Prefixed, Protocol};
pub use self::dispatch::Apis;
use self::tls::{ControlTls, PeerIdentity};
use crate::proxies::{Connection, Proxies};

/// The default request head timeout (and HTTP/1 idle timeout).
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The default connection limit: room for thousands of sidecars (one connection each) and
/// the CLI. Each connection is a file descriptor: the process's limit (`ulimit -n`) must be
/// higher.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// HTTP/2 pings on idle connections, so a vanished sidecar's streams are cleaned up.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest HTTP/2 header list, and (about) the largest HTTP/1 head: the read buffer.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const MAX_HTTP1_BUFFER: usize = 64 * 1024;
/// How often refused connections (and failed accepts) are logged, at most.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// The pause after an accept fails for lack of resources (file descriptors), so the loop
/// does not spin while none are free.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The serving limits (`malla control --head-timeout`, `--max-connections`), and whether
/// plaintext connections are served (`--allow-plaintext`).
#[derive(Clone, Debug)]
pub struct ServeSettings {
    pub head_timeout: Duration,
    pub max_connections: usize,
    /// Serve clients that do not speak TLS (migrating sidecars configured with an
    /// `http://` URL) instead of answering them with what to do.
    pub allow_plaintext: bool,
}

impl Default for ServeSettings {
    fn default() -> Self {
        ServeSettings {
            head_timeout: DEFAULT_HEAD_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            allow_plaintext: false,
        }
    }
}

/// The first byte of a TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// What every listener shares: the APIs, the limits, the stop signal.
pub struct Server {
    apis: Apis,
    tls: Arc<ControlTls>,
    settings: ServeSettings,
    slots: Arc<Semaphore>,
    refusals: Throttled,
    stop: watch::Receiver<bool>,
}

impl Server {
    pub fn new(
        apis: Apis,
        tls: Arc<ControlTls>,
        settings: ServeSettings,
        stop: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Server {
            apis,
            tls,
            slots: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
            refusals: Throttled::default(),
            stop,
        })
    }

    /// Connections open now, over every address.
    pub fn open_connections(&self) -> usize {
        self.settings.max_connections - self.slots.available_permits()
    }

    /// Accepts on `listener` until the stop signal; then waits for its connections to
    /// finish (they are told to: HTTP/1 after the request in flight, HTTP/2 with a GOAWAY).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let local = listener.local_addr().ok();
        let mut stop = self.stop.clone();
        // Owned here, so aborting this task aborts every connection it serves.
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let accepted = tokio::select! {
                _ = stopped(&mut stop) => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    self.refusals.note(|n| {
                        warn!(error = %e, failures = n, "cannot accept connections (out of file descriptors? raise `ulimit -n`)")
                    });
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                self.apis.metrics.connection_refused();
                let max = self.settings.max_connections;
                self.refusals.note(|n| {
                    warn!(
                        max_connections = max,
                        refused = n,
                        last_client = %remote,
                        "connection limit reached: new connections are closed at once (raise --max-connections if these clients are expected)"
                    )
                });
                drop(stream);
                continue;
            };
            let peer = Peer {
                remote,
                local: local.unwrap_or(remote),
                identity: PeerIdentity::default(),
            };
            connections.spawn(self.clone().connection(stream, peer, slot));
        }
        while connections.join_next().await.is_some() {}
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        mut peer: Peer,
        _slot: OwnedSemaphorePermit,
    ) {
        let _open = self.apis.metrics.connection_opened();
        let _ = stream.set_nodelay(true);
        let mut stop = self.stop.clone();
        let deadline = Instant::now() + self.settings.head_timeout;
        // TLS or not, from the first byte (left in the socket for whoever reads next).
        let mut first = [0u8; 1];
        let peeked = tokio::select! {
            peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => peeked,
            _ = stopped(&mut stop) => return,
        };
        match peeked {
            Ok(Ok(0)) => {}
            Ok(Ok(_)) if first[0] == TLS_HANDSHAKE => {
                let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.config());
                let accepted = tokio::select! {
                    accepted = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => accepted,
                    _ = stopped(&mut stop) => return,
                };
                match accepted {
                    Ok(Ok(tls)) => {
                        self.apis.metrics.tls_handshake("ok");
                        peer.identity = PeerIdentity(tls::peer_identity(tls.get_ref().1));
                        self.serve_connection(tls, peer, deadline, true).await;
                    }
                    Ok(Err(e)) => {
                        self.apis.metrics.tls_handshake("failed");
                        debug!(client = %peer.remote, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        self.apis.metrics.tls_handshake("timeout");
                        debug!(client = %peer.remote, "no TLS handshake within the head timeout; closing");
                    }
                }
            }
            Ok(Ok(_)) => self.serve_connection(stream, peer, deadline, false).await,
            Ok(Err(e)) => {
                debug!(client = %peer.remote, error = %e, "connection failed before its first request");
            }
            Err(_) => {
                debug!(client = %peer.remote, timeout = ?self.settings.head_timeout, "no request within the head timeout; closing");
            }
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 (told by the first bytes) on a connection, TLS or not.
    async fn serve_connection<IO>(
        &self,
        mut stream: IO,
        peer: Peer,
        deadline: Instant,
        secure: bool,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut stop = self.stop.clone();
        let detected = tokio::select! {
            detected = tokio::time::timeout_at(deadline, detect(&mut stream)) => detected,
            _ = stopped(&mut stop) => return,
        };
        let (protocol, prefix) = match detected {
            Ok(Ok(Some(detected))) => detected,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!(client = %peer.remote, error = %e, "connection failed before its first request");
                return;
            }
            Err(_) => {
                debug!(client = %peer.remote, timeout = ?self.settings.head_timeout, "no request within the head timeout; closing");
                return;
            }
        };
        let io = TokioIo::new(Prefixed::new(prefix, stream));
        let tracked = Tracked::new(&self.apis.proxies, &peer);
        let refused = !secure && !self.settings.allow_plaintext;
        let service = self
            .apis
            .for_connection(peer.clone(), tracked.0.clone(), refused);
        match protocol {
            Protocol::Http1 => {
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(self.settings.head_timeout)
                    .max_buf_size(MAX_HTTP1_BUFFER)
                    .keep_alive(true)
                    .serve_connection(io, service);
                drive(connection, stop, peer.remote).await;
            }
            Protocol::Http2 => {
                let connection = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                    .max_header_list_size(MAX_HEADER_LIST_SIZE)
                    .serve_connection(io, service);
                drive(connection, stop, peer.remote).await;
            }
        }
    }
}

/// A connection's entry in the list of proxies, forgotten when the connection ends.
struct Tracked(Arc<Connection>, Arc<Proxies>);

impl Tracked {
    fn new(proxies: &Arc<Proxies>, peer: &Peer) -> Self {
        Tracked(
            proxies.opened(peer.remote, peer.identity.0.clone()),
            proxies.clone(),
        )
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.1.closed(&self.0);
    }
}

/// The two ends of a connection, and who the client proved to be.
#[derive(Clone, Debug)]
pub struct Peer {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub identity: PeerIdentity,
}

/// Runs a connection to its end; on the stop signal, asks it to finish gracefully.
async fn drive<C>(connection: C, mut stop: watch::Receiver<bool>, client: SocketAddr)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut connection = std::pin::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        // A client's own doing (a timeout, a reset, a bad request): not the server's
        // trouble, so not above debug.
        debug!(%client, error = %e, "connection ended with an error");
    }
}

/// Resolves once the stop signal is on (holding no borrow of it afterwards).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accept errors that concern one connection only (it was reset before being accepted).
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

/// Counts occurrences and lets one log line through per [`REFUSAL_LOG_EVERY`].
#[derive(Default)]
struct Throttled {
    count: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Throttled {
    /// Counts one; calls `log` with the total so far when the last line is old enough.
    fn note(&self, log: impl FnOnce(u64)) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let due = {
            let Ok(mut last) = self.last.lock() else {
                return;
            };
            let due = last.is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            log(n);
        }
    }
}
