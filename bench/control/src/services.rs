//! Write cost against the number of services: registrations per second (64 in flight) and
//! the latency of one registration at a time, with 10 services present and again with
//! 10,000. A write that copies or scans every service gets slower as they grow; the goal is
//! flat.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::bail;
use serde_json::json;
use tokio::time::Instant;

use crate::process::ControlProcess;
use malla_tests::control::api::Api;

/// Registrations in flight at once for the rate.
const CONCURRENCY: usize = 64;

/// What one round measured, with `services` services in the registry.
#[derive(Clone, Debug, Default)]
pub struct Round {
    pub services: usize,
    /// Registrations of the concurrent run, and how long it took.
    pub concurrent: usize,
    pub concurrent_seconds: f64,
    /// Every call's latency in the concurrent run.
    pub concurrent_latency: Vec<Duration>,
    /// One registration at a time.
    pub sequential_latency: Vec<Duration>,
}

impl Round {
    pub fn rate(&self) -> f64 {
        self.concurrent as f64 / self.concurrent_seconds
    }
}

#[derive(Clone, Debug, Default)]
pub struct Services {
    pub rounds: Vec<Round>,
}

async fn register(api: &Api, service: &str, id: &str, n: usize) -> anyhow::Result<Duration> {
    let [a, b, c] = [(n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff];
    let body = json!({
        "address": format!("10.{a}.{b}.{c}"),
        "port": 8080,
        "labels": {"env": "prod"},
        "ttl_seconds": 3600,
    });
    let path = format!("/v1/services/{service}/instances/{id}");
    let started = Instant::now();
    let reply = api
        .try_request(http::Method::PUT, &path, body.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("registering {path}: {e}"))?;
    if reply.status != 200 {
        bail!("registering {path}: {reply}");
    }
    Ok(started.elapsed())
}

/// Runs `count` registrations made by `each(k)` (service, id), `concurrency` at a time;
/// returns every call's latency and the elapsed time.
async fn run_many(
    control: &ControlProcess,
    count: usize,
    concurrency: usize,
    each: impl Fn(usize) -> (String, String) + Clone + Send + 'static,
) -> anyhow::Result<(Vec<Duration>, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(count) {
        let (api, next, each) = (control.api(), next.clone(), each.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= count {
                    return anyhow::Ok(latencies);
                }
                let (service, id) = each(k);
                latencies.push(register(&api, &service, &id, k + 1).await?);
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok((all, started.elapsed().as_secs_f64()))
}

/// Fills the registry to `services` services (one instance each), then measures.
pub async fn run(malla: &Path, sizes: &[usize], registrations: usize) -> anyhow::Result<Services> {
    let control = ControlProcess::start(malla).await?;
    let mut present = 0;
    let mut rounds = Vec::new();
    for &size in sizes {
        if size > present {
            // Services `fill-N`, one instance each; `present` are there already.
            let from = present;
            let next = Arc::new(AtomicUsize::new(from));
            let mut tasks = Vec::new();
            for _ in 0..CONCURRENCY {
                let (api, next) = (control.api(), next.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= size {
                            return anyhow::Ok(());
                        }
                        register(&api, &format!("fill-{k:05}"), "i-0", k + 1).await?;
                    }
                }));
            }
            for task in tasks {
                task.await??;
            }
            present = size;
        }
        eprintln!("  {size} services: {registrations} registrations, {CONCURRENCY} in flight");
        // New instances of one service per round, so every call writes a new key.
        let probe = format!("probe-{}", rounds.len());
        let each = {
            let probe = probe.clone();
            move |k| (probe.clone(), format!("c-{k:05}"))
        };
        let (concurrent_latency, concurrent_seconds) =
            run_many(&control, registrations, CONCURRENCY, each).await?;
        eprintln!(
            "  {size} services: {} registrations one at a time",
            registrations / 4
        );
        let seq = move |k| (probe.clone(), format!("s-{k:05}"));
        let (sequential_latency, _) = run_many(&control, registrations / 4, 1, seq).await?;
        rounds.push(Round {
            services: size,
            concurrent: registrations,
            concurrent_seconds,
            concurrent_latency,
            sequential_latency,
        });
    }
    Ok(Services { rounds })
}
