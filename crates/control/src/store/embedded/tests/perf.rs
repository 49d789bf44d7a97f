//! Measurements, not tests: they print figures and assert only correctness. Ignored by
//! default; run them with
//! `cargo test -p malla-control --lib store::embedded::tests::perf -- --ignored --nocapture`.

use std::time::Duration;

use tokio::time::Instant;

use super::{recv, TempDir};
use crate::store::embedded::{EmbeddedStore, Options};
use crate::store::{Precondition, Store};

async fn sequential(store: &EmbeddedStore, n: usize) -> f64 {
    let started = Instant::now();
    for i in 0..n {
        store
            .put(&format!("seq/{i}"), vec![0; 200], None, Precondition::None)
            .await
            .unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// `n` registrations at once, each a lease grant and a put on it.
async fn burst(store: &EmbeddedStore, n: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
                store
                    .put(
                        &format!("burst/{i}"),
                        vec![0; 200],
                        Some(lease.id),
                        Precondition::None,
                    )
                    .await
                    .unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (2 * n) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn write_throughput() {
    for (name, max_batch) in [
        ("group commit", Options::default().max_batch),
        ("one commit per write", 1),
    ] {
        let dir = TempDir::new("perf-writes");
        let options = Options {
            max_batch,
            ..Options::default()
        };
        let store = EmbeddedStore::open_with(dir.path(), options).await.unwrap();
        let single = sequential(&store, 300).await;
        let concurrent = burst(&store, 1_000).await;
        println!(
            "{name:>22}: sequential {single:>7.0} writes/s; 1,000 concurrent registrations \
             (grant + put) {concurrent:>7.0} writes/s"
        );
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn watch_fan_out_latency() {
    const WATCHERS: usize = 1_000;
    const EVENTS: usize = 50;
    let dir = TempDir::new("perf-fanout");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let base = Instant::now();
    let nanos = move || base.elapsed().as_nanos() as u64;
    let revision = store.revision();
    let watchers: Vec<_> = (0..WATCHERS)
        .map(|_| {
            let mut watch = store.watch("svc/", revision).unwrap();
            tokio::spawn(async move {
                let mut received = Vec::with_capacity(EVENTS);
                for _ in 0..EVENTS {
                    let event = recv(&mut watch).await;
                    let i: usize = event.kv.key["svc/".len()..].parse().unwrap();
                    received.push((i, nanos()));
                }
                received
            })
        })
        .collect();

    let mut sent = Vec::new();
    let mut commits = Vec::new();
    for i in 0..EVENTS {
        sent.push(nanos());
        store
            .put(&format!("svc/{i}"), vec![0; 200], None, Precondition::None)
            .await
            .unwrap();
        commits.push(Duration::from_nanos(nanos() - sent[i]));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut received = Vec::new();
    for watcher in watchers {
        received.extend(watcher.await.unwrap());
    }
    let mut first = vec![u64::MAX; EVENTS];
    for &(i, at) in &received {
        first[i] = first[i].min(at);
    }
    let mut end_to_end: Vec<_> = received
        .iter()
        .map(|&(i, at)| Duration::from_nanos(at - sent[i]))
        .collect();
    let mut spread: Vec<_> = received
        .iter()
        .map(|&(i, at)| Duration::from_nanos(at - first[i]))
        .collect();
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
        format!(
            "p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            at(0.5),
            at(0.99),
            at(1.0)
        )
    };
    println!("fan-out to {WATCHERS} watchers, {EVENTS} events (200-byte values):");
    println!(
        "  put start -> each watcher receives: {}",
        stats(&mut end_to_end)
    );
    println!(
        "  first watcher -> each watcher:      {}",
        stats(&mut spread)
    );
    println!(
        "  the put (commit, fsync):            {}",
        stats(&mut commits)
    );
    assert_eq!(store.catch_ups(), 0, "no watcher should lag at this rate");
    store.close().await.unwrap();
}
