//! Load balancing, measured where requests land (the peers count them), never by timing.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use malla_proxy::config::BalancerKind;
use malla_tests::{
    assert_eventually,
    cross_version::{Flavor, Outcome},
    proxy::TestProxy,
};

cross_version!(
    p2c_ewma_avoids_slow_endpoint,
    round_robin_spreads_evenly,
    live_endpoint_changes_lose_no_request
);

/// `clients` concurrent clients, each making `calls` calls one after another.
async fn load(flavor: Flavor, addr: SocketAddr, clients: usize, calls: usize) -> Vec<Outcome> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        tasks.spawn(async move {
            let mut client = flavor.client(addr, "echo");
            let mut outcomes = Vec::with_capacity(calls);
            for i in 0..calls {
                outcomes.push(client.call(&format!("{c}-{i}")).await);
            }
            outcomes
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("a client task panicked"));
    }
    all
}

/// P2C over peak-EWMA: of three endpoints, the one 50 ms slower gets under 15% of 300
/// requests sent by 10 concurrent clients.
async fn p2c_ewma_avoids_slow_endpoint(flavor: Flavor) {
    let fast1 = flavor.peer("fast-1");
    let fast2 = flavor.peer("fast-2");
    let slow = flavor.peer("slow");
    slow.set_delay(Duration::from_millis(50));
    let proxy = TestProxy::builder()
        .upstream("echo", &[fast1.addr(), slow.addr(), fast2.addr()])
        .balancer(BalancerKind::P2cEwma)
        .outbound("echo")
        .start();
    let outcomes = load(flavor, proxy.outbound(), 10, 30).await;
    for o in &outcomes {
        o.assert_ok();
    }
    let counts = [fast1.requests(), fast2.requests(), slow.requests()];
    let total: u64 = counts.iter().sum();
    assert_eq!(
        total, 300,
        "requests per peer (fast-1, fast-2, slow): {counts:?}"
    );
    assert!(
        counts[2] * 100 < 15 * total,
        "the slow endpoint got {} of {total} requests (fast-1, fast-2, slow: {counts:?})",
        counts[2]
    );
}

/// Round robin over three endpoints: 30 sequential requests land 10 on each (±1).
async fn round_robin_spreads_evenly(flavor: Flavor) {
    let peers = [flavor.peer("a"), flavor.peer("b"), flavor.peer("c")];
    let addrs: Vec<_> = peers.iter().map(|p| p.addr()).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .balancer(BalancerKind::RoundRobin)
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    for i in 0..30 {
        client.call(&i.to_string()).await.assert_ok();
    }
    let counts: Vec<u64> = peers.iter().map(|p| p.requests()).collect();
    assert_eq!(counts.iter().sum::<u64>(), 30, "{counts:?}");
    for c in &counts {
        assert!((9..=11).contains(c), "uneven spread (a, b, c): {counts:?}");
    }
}

/// Endpoints added and removed while requests run: no request fails, and every set is used.
async fn live_endpoint_changes_lose_no_request(flavor: Flavor) {
    let [a, b, c] = [flavor.peer("a"), flavor.peer("b"), flavor.peer("c")];
    for p in [&a, &b, &c] {
        // Keep requests in flight while the set changes under them.
        p.set_delay(Duration::from_millis(5));
    }
    let proxy = TestProxy::builder()
        .upstream("echo", &[a.addr()])
        .outbound("echo")
        .start();
    let addr = proxy.outbound();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..4 {
        let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
        tasks.spawn(async move {
            let mut client = flavor.client(addr, "echo");
            // Bounded: the main task stops the loop long before this.
            for i in 0..5_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let outcome = client.call(&format!("{t}-{i}")).await;
                if !outcome.is_ok() {
                    failures.lock().unwrap().push(outcome);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let sets: [&[SocketAddr]; 7] = [
        &[a.addr(), b.addr()],
        &[b.addr(), c.addr()],
        &[c.addr()],
        &[a.addr(), b.addr(), c.addr()],
        &[a.addr()],
        &[b.addr()],
        &[a.addr(), c.addr()],
    ];
    for set in sets {
        proxy.set_endpoints("echo", set);
        let before = done.load(Ordering::SeqCst);
        assert_eventually!(
            done.load(Ordering::SeqCst) >= before + 20,
            "requests stopped completing after switching to {set:?}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(t) = tasks.join_next().await {
        t.expect("a client task panicked");
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failures.len(),
        done.load(Ordering::SeqCst),
        failures.first()
    );
    for p in [&a, &b, &c] {
        assert!(p.requests() > 0, "{} got no request", p.name());
    }
}
