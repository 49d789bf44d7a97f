//! A registry with many instances in one service: registration throughput over the HTTP
//! API, the control plane's memory, the size of a full snapshot, and DNS queries per second.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use anyhow::{bail, Context as _};
use serde_json::json;
use tokio::time::Instant;

use crate::{dns, process::ControlProcess};

/// Registrations in flight at once.
const CONCURRENCY: usize = 64;
/// Instances of the small service.
pub const SMALL: usize = 10;
/// Registrations timed together.
const CHUNK: usize = 1_000;

#[derive(Clone, Debug, Default)]
pub struct Scale {
    pub instances: usize,
    pub concurrency: usize,
    pub register_seconds: f64,
    /// `(from, to, registrations per second)` of each chunk of registrations.
    pub chunk_rates: Vec<(usize, usize, f64)>,
    /// Bytes: RSS once ready, after the registrations, and the peak.
    pub rss_idle: u64,
    pub rss_loaded: u64,
    pub rss_peak: u64,
    pub snapshot_bytes: usize,
    pub snapshot_ms: f64,
    pub small_snapshot_bytes: usize,
    pub dns: Vec<dns::DnsLoad>,
    pub rss_after_dns: u64,
    /// `DELETE /v1/services/big`: milliseconds, instances removed, and whether it was one
    /// revision (the answer's revision is the one after the revision before it).
    pub delete_ms: f64,
    pub delete_removed: u64,
    pub delete_one_revision: bool,
}

/// Registers instances `from..to` of `service` (ids `SERVICE-N`) over HTTP,
/// `CONCURRENCY` at a time.
async fn register_many(
    control: &ControlProcess,
    service: &'static str,
    from: usize,
    count: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(from));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY.min(count - from) {
        let (api, next) = (control.api(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= count {
                    return anyhow::Ok(());
                }
                // 10.0.0.1 onwards, one address each; two labels, as a fleet would carry.
                let n = k + 1;
                let [a, b, c] = [(n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff];
                let body = json!({
                    "address": format!("10.{a}.{b}.{c}"),
                    "port": 8080,
                    "labels": {"env": if k % 2 == 0 { "prod" } else { "dev" },
                               "zone": format!("zone-{}", k % 4)},
                    "ttl_seconds": 3600,
                });
                let path = format!("/v1/services/{service}/instances/{service}-{k:05}");
                let reply = api
                    .try_request(http::Method::PUT, &path, body.to_string())
                    .await
                    .map_err(|e| anyhow::anyhow!("registering {path}: {e}"))?;
                if reply.status != 200 {
                    bail!("registering {path}: {reply}");
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

pub async fn run(malla: &Path, instances: usize, dns_seconds: f64) -> anyhow::Result<Scale> {
    let control = ControlProcess::start(malla).await?;
    let (rss_idle, _) = control.rss()?;
    register_many(&control, "small", 0, SMALL).await?;
    // In chunks, to see whether a registration costs more as the service grows.
    let started = Instant::now();
    let mut chunk_rates = Vec::new();
    let mut done = 0;
    while done < instances {
        let end = (done + CHUNK).min(instances);
        let chunk = Instant::now();
        register_many(&control, "big", done, end).await?;
        chunk_rates.push((
            done,
            end,
            (end - done) as f64 / chunk.elapsed().as_secs_f64(),
        ));
        done = end;
    }
    let register_seconds = started.elapsed().as_secs_f64();
    let (rss_loaded, _) = control.rss()?;

    let api = control.api();
    let started = Instant::now();
    let snapshot = api
        .try_request(
            http::Method::GET,
            "/v1/services/big/instances",
            bytes::Bytes::new(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("snapshot: {e}"))?;
    let snapshot_ms = started.elapsed().as_secs_f64() * 1e3;
    let listed = snapshot.json["instances"].as_array().map_or(0, Vec::len);
    if listed != instances {
        bail!("the snapshot lists {listed} instances, not {instances}");
    }
    let small = api
        .try_request(
            http::Method::GET,
            "/v1/services/small/instances",
            bytes::Bytes::new(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("snapshot: {e}"))?;

    let mut loads = Vec::new();
    for (name, count) in [("small.svc.malla", SMALL), ("big.svc.malla", instances)] {
        let load = dns::load(control.dns, name, count, 4, dns_seconds)
            .await
            .with_context(|| format!("DNS load on {name}"))?;
        if load.answered == 0 {
            bail!("no DNS answer for {name} from {}", control.dns);
        }
        loads.push(load);
    }
    let (rss_after_dns, rss_peak) = control.rss()?;

    // The whole service in one write.
    let status = api
        .try_request(http::Method::GET, "/v1/status", bytes::Bytes::new())
        .await
        .map_err(|e| anyhow::anyhow!("status: {e}"))?;
    let before = status.json["revision"].as_u64().unwrap_or_default();
    let started = Instant::now();
    let deleted = api
        .try_request(
            http::Method::DELETE,
            "/v1/services/big",
            bytes::Bytes::new(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("deleting big: {e}"))?;
    let delete_ms = started.elapsed().as_secs_f64() * 1e3;
    if deleted.status != 200 {
        bail!("deleting big: {deleted}");
    }
    let delete_removed = deleted.json["instances_removed"]
        .as_u64()
        .unwrap_or_default();
    let delete_one_revision = deleted.json["revision"].as_u64() == Some(before + 1);
    Ok(Scale {
        instances,
        concurrency: CONCURRENCY,
        register_seconds,
        chunk_rates,
        rss_idle,
        rss_loaded,
        rss_peak,
        snapshot_bytes: snapshot.body.len(),
        snapshot_ms,
        small_snapshot_bytes: small.body.len(),
        dns: loads,
        rss_after_dns,
        delete_ms,
        delete_removed,
        delete_one_revision,
    })
}
