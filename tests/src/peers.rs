//! Real upstream servers on `127.0.0.1:0`, each started by one function and stopped when its
//! handle is dropped (the accept task is aborted, and with it every connection task).
//!
//! - [`http::HttpPeer`]: HTTP/1.1 or HTTP/2 (prior knowledge) echo server on hyper.
//! - [`grpc::GrpcPeer`]: the `Echo` gRPC service (tonic), every streaming shape.
//! - [`grpc_health::GrpcHealthPeer`]: the standard `grpc.health.v1.Health` service
//!   (tonic-health), with statuses a test flips.
//! - [`websocket::WebSocketPeer`], [`tcp::TcpPeer`]: echo servers.
//! - [`misbehaving`]: raw upstreams that truncate, stall, hang up or send garbage.
//! - [`recording::RecordingPeer`]: records every byte it receives and answers each request,
//!   for the request-smuggling tests.
//!
//! HTTP and gRPC peers share a [`PeerState`]: a name (sent back as `x-peer`), a request
//! counter (so balancing is measured where requests land, not by timing), a log of the
//! paths seen, and a delay and status that a test can change while the peer runs.

pub mod grpc;
pub mod grpc_health;
pub mod http;
pub mod misbehaving;
pub mod recording;
pub mod tcp;
pub mod websocket;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU16, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{net::TcpStream, task::JoinSet};

pub use grpc::GrpcPeer;
pub use grpc_health::GrpcHealthPeer;
pub use http::HttpPeer;
pub use tcp::TcpPeer;
pub use websocket::WebSocketPeer;

/// Most request lines a peer remembers (the oldest are dropped past it).
const SEEN_LIMIT: usize = 10_000;

/// What a peer knows about itself and what the test can tune while it runs.
#[derive(Debug)]
pub struct PeerState {
    name: String,
    requests: AtomicU64,
    /// Added to every response, in milliseconds; shared so a test can hold on to it.
    delay_ms: Arc<AtomicU64>,
    /// The status answered when the request does not ask for one; 0 means 200.
    status: AtomicU16,
    seen: Mutex<Vec<String>>,
    /// `false` while the test holds requests back ([`PeerState::hold`]).
    gate: tokio::sync::watch::Sender<bool>,
}

impl PeerState {
    pub fn new(name: &str) -> Self {
        PeerState {
            name: name.to_string(),
            requests: AtomicU64::new(0),
            delay_ms: Arc::new(AtomicU64::new(0)),
            status: AtomicU16::new(0),
            seen: Mutex::new(Vec::new()),
            gate: tokio::sync::watch::Sender::new(true),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests received so far (counted on arrival, before any delay).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// `"METHOD /path"` of every request received, oldest first.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }

    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// The delay in milliseconds, as a shared atomic a test can keep and change.
    pub fn delay_handle(&self) -> Arc<AtomicU64> {
        self.delay_ms.clone()
    }

    /// The status answered by default (`None`: 200).
    pub fn status(&self) -> Option<u16> {
        match self.status.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Holds every request that arrives from now on (after counting it) until
    /// [`release`](Self::release): a request kept in flight for as long as a test needs,
    /// without guessing a delay.
    pub fn hold(&self) {
        self.gate.send_replace(false);
    }

    /// Lets held requests (and later ones) through.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Waits while the peer is held, then the configured delay.
    pub(crate) async fn wait_turn(&self, extra: Duration) {
        let mut gate = self.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        let delay = self.delay() + extra;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// Counts a request and remembers its request line.
    pub(crate) fn record(&self, method: &str, path: &str) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= SEEN_LIMIT {
            seen.remove(0);
        }
        seen.push(format!("{method} {path}"));
    }
}

/// A running accept loop; dropping it aborts the loop and every connection it spawned.
#[derive(Debug)]
pub struct ServerTask(tokio::task::JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `127.0.0.1:0` and serves every accepted connection with `on_connection` on the
/// current tokio runtime (call it from inside one).
pub fn serve<F, Fut>(on_connection: F) -> (SocketAddr, ServerTask)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = bind();
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let task = tokio::spawn(async move {
        // Owned by the loop: aborting the loop drops the set, which aborts the connections.
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        connections.spawn(on_connection(stream));
                    }
                    // Out of descriptors or the like: let the test see the failure elsewhere.
                    Err(_) => tokio::task::yield_now().await,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    (addr, ServerTask(task))
}

/// A tokio listener on `127.0.0.1:0`.
pub fn bind() -> tokio::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .set_nonblocking(true)
        .expect("set the listener non-blocking");
    tokio::net::TcpListener::from_std(listener)
        .expect("register the listener (start peers from inside a tokio runtime)")
}

/// An address where nothing listens: a port bound and released at once. Connecting to it
/// is refused (until the kernel hands the port out again, which loopback tests never race).
pub fn dead_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}
