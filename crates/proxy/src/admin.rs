//! The admin listener: `/live`, `/ready`, `/metrics` and `/config`.
//!
//! It runs on a thread and runtime of its own, apart from the workers, so a slow scraper
//! never competes with requests on a worker's event loop. It protects itself as a
//! listener exposed to anyone who can reach its port should: a request head must arrive
//! within `limits.head_timeout` (else the connection is closed, so half-sent requests
//! cannot pile up), and at most [`MAX_CONNECTIONS`] connections are served at once (one
//! more is closed as soon as it is accepted).

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
};
use tracing::{debug, warn};

use crate::listener::Shared;

type Body = Full<bytes::Bytes>;

/// Connections the admin listener serves at once: plenty for probes and scrapers; more
/// are closed as they arrive, so that they cannot exhaust the process's descriptors.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// How the admin listener bounds its clients.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    /// A request head (the first of a connection, or the next on a kept-alive one) must
    /// be complete within this; `None`: no bound.
    head_timeout: Option<Duration>,
    max_connections: usize,
}

pub(crate) fn run(
    runtime: tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
) {
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot register the admin listener");
                return;
            }
        };
        // The admin listener outlives the drain so `/ready` reports it; it stops once
        // every worker has finished.
        let stopped = shared.stopped_signal();
        let head_timeout = shared.config.limits.head_timeout;
        let bounds = Bounds {
            head_timeout: Some(head_timeout).filter(|t| !t.is_zero()),
            max_connections: MAX_CONNECTIONS,
        };
        serve(listener, stopped, bounds, move |req| handle(req, &shared)).await;
    });
}

/// Serves `handler` on every connection `listener` accepts, within `bounds`, until
/// `stopped` turns true.
async fn serve<F>(
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
    bounds: Bounds,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Response<Body> + Clone + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, max = bounds.max_connections, "admin: too many connections; closing a new one");
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req)) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.head_timeout);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if shared.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/ready" => match shared.discovery.as_deref().map(|d| d.unsynced()) {
            Some(waiting) if !waiting.is_empty() => Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Body::from(format!(
                    "waiting for the control plane's first endpoints of: {}\n",
                    waiting.join(", ")
                )))
                .unwrap_or_default(),
            _ => text(StatusCode::OK, "ready\n"),
        },
        "/metrics" => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Body::from(shared.metrics.encode()))
            .unwrap_or_default(),
        "/config" => {
            let discovery = shared.discovery.as_deref();
            let mut upstreams: Vec<_> = shared
                .upstreams
                .values()
                .map(|u| {
                    let mut state = u.state();
                    if let Some(d) = discovery.and_then(|d| d.upstream_json(u.name())) {
                        state["discovery"] = d;
                    }
                    state
                })
                .collect();
            upstreams.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            let doc = serde_json::json!({
                "draining": shared.is_draining(),
                "config": shared.config,
                "control": discovery.map(|d| d.to_json()),
                "authorization": discovery.and_then(|d| d.authorization_json()),
                "inbound_mtls": crate::inbound::mtls_json(shared),
                "upstreams": upstreams,
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    serde_json::to_vec_pretty(&doc).unwrap_or_default(),
                ))
                .unwrap_or_default()
        }
        "/events" => {
            let doc = serde_json::json!({
                "events": shared.events.recent(),
                "dropped": shared.events.dropped(),
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    serde_json::to_vec_pretty(&doc).unwrap_or_default(),
                ))
                .unwrap_or_default()
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /metrics, /config or /events\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(body))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        time::Instant,
    };

    use super::*;

    const HALF_A_HEAD: &[u8] = b"GET /live HTTP/1.1\r\nhost: admin\r\nuser-agent: slow";
    const BOUND: Duration = Duration::from_secs(10);

    /// An admin listener answering `ok` to everything, within `bounds`; stopped when the
    /// sender is dropped or set.
    async fn start(bounds: Bounds) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, stopped, bounds, |_req| {
            text(StatusCode::OK, "ok\n")
        }));
        (addr, stop)
    }

    /// A whole request on a new connection: the status line, or `None` when the
    /// connection was closed without an answer.
    async fn get(addr: SocketAddr) -> Option<String> {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut conn).await;
        let answer = String::from_utf8_lossy(&answer);
        answer.lines().next().map(str::to_string)
    }

    /// Everything the server sends until it closes (a reset counts as a close); bounded.
    async fn read_to_close(conn: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(BOUND, conn.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return out,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => panic!("the admin listener kept the connection open for {BOUND:?}"),
            }
        }
    }

    #[tokio::test]
    async fn half_sent_requests_are_closed_at_the_head_timeout() {
        let head_timeout = Duration::from_millis(300);
        let (addr, _stop) = start(Bounds {
            head_timeout: Some(head_timeout),
            max_connections: MAX_CONNECTIONS,
        })
        .await;
        let started = Instant::now();
        let mut slow = Vec::new();
        for i in 0..8 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            // Half of them send half a head, the others nothing at all.
            if i % 2 == 0 {
                conn.write_all(HALF_A_HEAD).await.unwrap();
            }
            slow.push(conn);
        }
        // Meanwhile the admin answers.
        assert_eq!(get(addr).await.as_deref(), Some("HTTP/1.1 200 OK"));
        for mut conn in slow {
            let answer = read_to_close(&mut conn).await;
            assert!(
                !String::from_utf8_lossy(&answer).contains("200 OK"),
                "a half-sent request was answered"
            );
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= head_timeout,
            "closed before the timeout: {elapsed:?}"
        );
        // And afterwards.
        assert_eq!(get(addr).await.as_deref(), Some("HTTP/1.1 200 OK"));
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_at_once() {
        let (addr, _stop) = start(Bounds {
            head_timeout: Some(Duration::from_secs(60)),
            max_connections: 2,
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            conn.write_all(HALF_A_HEAD).await.unwrap();
            held.push(conn);
        }
        // Accepted after the two held ones, and closed without an answer, long before
        // the head timeout.
        let started = Instant::now();
        assert_eq!(get(addr).await, None);
        assert!(started.elapsed() < Duration::from_secs(30));
        // A held connection goes away: its slot is free again (the server learns of the
        // close asynchronously, so a few tries may still be refused).
        drop(held.pop());
        let mut answered = false;
        for _ in 0..200 {
            if get(addr).await.is_some() {
                answered = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(answered, "the admin never answered after a slot was freed");
    }
}
