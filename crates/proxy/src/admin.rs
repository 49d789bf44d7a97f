//! The admin listener: `/live`, `/ready`, `/metrics` and `/config`.
//!
//! It runs on a thread and runtime of its own, apart from the workers, so a slow scraper
//! never competes with requests on a worker's event loop.

use std::{convert::Infallible, sync::Arc};

use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

use crate::server::Shared;

type Body = Full<bytes::Bytes>;

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
        let mut stopped = shared.stopped_signal();
        loop {
            let accepted = tokio::select! {
                _ = stopped.wait_for(|s| *s) => return,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(req, &shared)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
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
