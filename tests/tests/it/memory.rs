//! Memory: a body streams through the proxy; it is never buffered whole.
//!
//! The proxy runs in this process, so the measure is the process's resident set
//! (`VmRSS` in `/proc/self/status`), sampled while a 1 GiB upload goes client → proxy →
//! peer over HTTP/1.1. The body is generated on the fly and counted (never stored) at the
//! peer, so client and peer hold a few chunks at most. The allowed growth, 32 MiB, is the
//! slack for what else moves in the process meanwhile: the test's own chunk buffers,
//! socket buffers, allocator caches and the other tests of this binary running in
//! parallel. A proxy that buffered the body would grow by up to 1 GiB.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use http::{Method, Version};
use malla_tests::{
    body,
    client::{self, Http1},
    peers::HttpPeer,
    proxy::TestProxy,
};

const GIB: u64 = 1024 * 1024 * 1024;
/// Allowed growth of the resident set during the upload.
const SLACK_KIB: u64 = 32 * 1024;

/// The process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabyte_upload_streams_with_flat_memory() {
    let peer = HttpPeer::http1("sink");
    let proxy = TestProxy::builder()
        .upstream("sink", &[peer.addr()])
        .outbound("sink")
        .start();
    let mut conn = Http1::connect(proxy.outbound()).await.unwrap();

    // Warm up: connections, pools and buffers exist before the baseline.
    let (warm, _) = body::generated(16 * 1024 * 1024, None);
    let req = client::request(Version::HTTP_11, Method::POST, "sink", "/count", warm);
    let got = client::collect(conn.send(req).await.unwrap())
        .await
        .unwrap();
    assert_eq!(got.status, 200);

    let before = rss_kib();
    // A sampler, not a wait: it records the peak every 20 ms while the upload runs
    // (bounded to 5 minutes, aborted when the upload ends).
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            for _ in 0..15_000 {
                peak.fetch_max(rss_kib(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let (upload, digest) = body::generated(GIB, None);
    let req = client::request(Version::HTTP_11, Method::POST, "sink", "/count", upload);
    let upload = async {
        let response = conn.send(req).await.unwrap();
        client::collect(response).await.unwrap()
    };
    let got = tokio::time::timeout(Duration::from_secs(300), upload)
        .await
        .expect("the 1 GiB upload did not finish within 5 minutes");
    let after = rss_kib();
    sampler.abort();
    let peak = peak.load(Ordering::SeqCst).max(after);
    eprintln!("resident set: before {before} KiB, peak {peak} KiB, after {after} KiB");
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-body-bytes"), Some(GIB.to_string().as_str()));
    assert_eq!(
        got.header("x-body-crc32"),
        Some(digest.crc().to_string().as_str())
    );
    assert!(
        peak.saturating_sub(before) <= SLACK_KIB,
        "the resident set grew by {} KiB during a 1 GiB upload (before {before} KiB, peak \
         {peak} KiB, after {after} KiB; allowed {SLACK_KIB} KiB)",
        peak.saturating_sub(before)
    );
}
