//! Idle upstream HTTP/1 connections, one pool per worker thread.
//!
//! A socket is registered with the I/O driver of the runtime that opened it, and only that
//! runtime should ever drive it: a connection handed to another worker would have its
//! wake-ups cross threads (or stall when the owner is busy). So each worker keeps its own
//! idle connections in a thread-local pool, keyed by endpoint, and a client connection
//! only ever takes from and gives back to the pool of the worker serving it. The endpoint
//! itself holds no connection, only the count shown by `/config`.
//!
//! Bounds: at most `max_idle_per_endpoint` idle connections per endpoint per worker, none
//! older than the upstream's `idle_timeout` is handed out, and a sweep every
//! [`SWEEP_EVERY`] closes the expired ones and those of endpoints that are gone.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::time::Instant;

use crate::{endpoint::Endpoint, stream::Stream};

/// How often a worker closes its expired idle connections.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

thread_local! {
    static POOL: RefCell<HashMap<usize, Idle>> = RefCell::new(HashMap::new());
}

/// One endpoint's idle connections on this worker, oldest first.
struct Idle {
    endpoint: Weak<Endpoint>,
    max_age: Duration,
    conns: Vec<(Stream, Instant)>,
}

impl Idle {
    /// Drops the connections past their age; `false` once there is nothing left to keep.
    fn expire(&mut self, now: Instant) -> bool {
        let fresh_from = self
            .conns
            .iter()
            .position(|(_, since)| now.saturating_duration_since(*since) < self.max_age)
            .unwrap_or(self.conns.len());
        self.forget(fresh_from);
        self.conns.drain(..fresh_from);
        !self.conns.is_empty() && self.endpoint.strong_count() > 0
    }

    fn forget(&self, n: usize) {
        if let Some(e) = self.endpoint.upgrade() {
            e.idle_http1.forget(n);
        }
    }
}

fn key(endpoint: &Arc<Endpoint>) -> usize {
    Arc::as_ptr(endpoint) as usize
}

/// The most recently used idle connection to `endpoint` on this worker, if one is younger
/// than `max_age`.
pub fn checkout(endpoint: &Arc<Endpoint>) -> Option<Stream> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let idle = pool.get_mut(&key(endpoint))?;
        // Another endpoint at the address of one that is gone: not its connections.
        if !std::ptr::eq(idle.endpoint.as_ptr(), Arc::as_ptr(endpoint)) {
            return None;
        }
        idle.expire(Instant::now());
        let (stream, _) = idle.conns.pop()?;
        endpoint.idle_http1.forget(1);
        Some(stream)
    })
}

/// Keeps a connection for later requests to `endpoint` from this worker, unless the pool
/// for it is full.
pub fn checkin(endpoint: &Arc<Endpoint>, stream: Stream, max_idle: usize, max_age: Duration) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let idle = pool.entry(key(endpoint)).or_insert_with(|| Idle {
            endpoint: Arc::downgrade(endpoint),
            max_age,
            conns: Vec::new(),
        });
        if idle.endpoint.strong_count() == 0 {
            // The address was reused by a new endpoint: start over.
            idle.conns.clear();
            idle.endpoint = Arc::downgrade(endpoint);
        }
        idle.max_age = max_age;
        if idle.conns.len() < max_idle {
            idle.conns.push((stream, Instant::now()));
            endpoint.idle_http1.add();
        }
    })
}

/// Closes this worker's expired idle connections and forgets endpoints that are gone.
pub fn sweep() {
    let now = Instant::now();
    POOL.with(|pool| pool.borrow_mut().retain(|_, idle| idle.expire(now)));
}

/// Sweeps this worker's pool every [`SWEEP_EVERY`], for as long as the worker runs.
pub async fn sweep_forever() {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn endpoint() -> Arc<Endpoint> {
        let metrics = Metrics::new();
        Arc::new(Endpoint::new(
            "127.0.0.1:1".parse().unwrap(),
            false,
            metrics.endpoint("u", "127.0.0.1:1"),
        ))
    }

    async fn stream() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Stream::Plain(client.unwrap()), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn pools_are_per_endpoint_bounded_and_expire() {
        let (a, b) = (endpoint(), endpoint());
        let mut peers = Vec::new();
        for _ in 0..3 {
            let (s, peer) = stream().await;
            peers.push(peer);
            checkin(&a, s, 2, Duration::from_secs(60));
        }
        assert_eq!(a.idle_http1.count(), 2, "at most max_idle per endpoint");
        assert!(
            checkout(&b).is_none(),
            "another endpoint's connections are not lent"
        );
        assert!(checkout(&a).is_some());
        assert_eq!(a.idle_http1.count(), 1);
        // An expired connection is never handed out.
        let (s, _peer) = stream().await;
        checkin(&b, s, 2, Duration::ZERO);
        assert!(checkout(&b).is_none());
        assert_eq!(b.idle_http1.count(), 0);
        // Endpoints that are gone are forgotten by the sweep.
        drop(a);
        sweep();
        POOL.with(|p| assert!(p.borrow().is_empty()));
    }

    #[test]
    fn another_thread_has_its_own_pool() {
        let e = endpoint();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (s, _peer) = stream().await;
            checkin(&e, s, 4, Duration::from_secs(60));
            let e2 = e.clone();
            let elsewhere = std::thread::spawn(move || checkout(&e2).is_some())
                .join()
                .unwrap();
            assert!(
                !elsewhere,
                "a worker never takes another worker's connection"
            );
            assert!(checkout(&e).is_some());
        });
    }
}
