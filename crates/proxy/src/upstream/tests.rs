use super::*;
use crate::metrics::Metrics;

fn upstream(addrs: &[SocketAddr]) -> Upstream {
    Upstream::new(
        UpstreamConfig::new("u", addrs.iter().map(|a| a.to_string()).collect()),
        Arc::new(Metrics::new()),
        Labels::new(),
        Arc::new(EventLog::default()),
    )
    .unwrap()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn newcomers_start_at_the_average_estimate_of_the_others() {
    let (a, b, c) = (addr(1), addr(2), addr(3));
    let upstream = upstream(&[a, b]);
    // The first endpoints have nothing to go by: the default.
    let default = upstream.endpoints()[0].rtt_estimate_ns();
    assert!(default > 20e6, "{default}");
    upstream.endpoints()[0].seed_rtt_estimate(1e6);
    upstream.endpoints()[1].seed_rtt_estimate(3e6);
    upstream.set_endpoints(&[a, b, c]);
    let endpoints = upstream.endpoints();
    let newcomer = endpoints.iter().find(|e| e.addr == c).unwrap();
    let estimate = newcomer.rtt_estimate_ns();
    assert!(estimate > 1.9e6 && estimate <= 2e6, "{estimate}");
    // Endpoints that stay keep their own estimate.
    assert!(endpoints[0].rtt_estimate_ns() <= 1e6);
}

#[test]
fn failures_eject_within_the_max_share_and_picks_avoid_the_ejected() {
    let u = upstream(&[addr(1), addr(2), addr(3)]);
    let bad = u.endpoints()[0].clone();
    for _ in 0..5 {
        let f = bad.start(false);
        u.record(&f, Outcome::Status(500), false);
    }
    assert_eq!(bad.breaker.state(), State::Ejected);
    for _ in 0..100 {
        assert_ne!(u.pick(None).unwrap().endpoint().addr, bad.addr);
    }
    // 50% of 3 is 1: a second endpoint cannot be ejected.
    let second = u.endpoints()[1].clone();
    for _ in 0..10 {
        u.record(&second.start(false), Outcome::ConnectFailure, false);
    }
    assert_eq!(second.breaker.state(), State::Closed);
    // Relayed failures count for nothing.
    let third = u.endpoints()[2].clone();
    for _ in 0..10 {
        u.record(&third.start(false), Outcome::Status(503), true);
    }
    assert_eq!(third.breaker.state(), State::Closed);
}

#[test]
fn audit_mode_reports_the_ejection_it_does_not_make() {
    let u = upstream(&[addr(1), addr(2), addr(3)]);
    let mut policy = Policy::default();
    policy.outlier.mode = malla_core::policy::Mode::Audit;
    u.set_policy(Some((policy, 7)));
    let bad = u.endpoints()[0].clone();
    for _ in 0..5 {
        u.record(&bad.start(false), Outcome::Status(503), false);
    }
    assert_eq!(bad.breaker.state(), State::Closed);
    let events = u.events.drain(100);
    let audit: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Ejected)
        .collect();
    assert_eq!(audit.len(), 1);
    assert!(audit[0].audit && audit[0].detail.starts_with("would eject"));
    assert_eq!(
        u.state()["policy"]["source"],
        serde_json::json!({"source": "control-plane", "version": 7})
    );
}

#[test]
fn retries_avoid_the_endpoint_that_failed() {
    let u = upstream(&[addr(1), addr(2)]);
    let first = u.endpoints()[0].clone();
    for _ in 0..50 {
        assert_ne!(u.pick(Some(&first)).unwrap().endpoint().addr, first.addr);
    }
    // A single endpoint is retried on itself.
    let solo = upstream(&[addr(1)]);
    let only = solo.endpoints()[0].clone();
    assert_eq!(solo.pick(Some(&only)).unwrap().endpoint().addr, only.addr);
}

#[test]
fn panic_balances_over_every_endpoint() {
    let u = upstream(&[addr(1)]);
    let only = u.endpoints()[0].clone();
    for _ in 0..5 {
        u.record(&only.start(false), Outcome::Reset, false);
    }
    assert_eq!(only.breaker.state(), State::Ejected);
    assert!(u.available.load().panic);
    assert_eq!(u.pick(None).unwrap().endpoint().addr, only.addr);
}

#[test]
fn locality_levels_keep_traffic_local_until_it_degrades() {
    let mut local = Labels::new();
    local.insert("zone", "a").unwrap();
    let u = Upstream::new(
        UpstreamConfig::new("u", vec![]),
        Arc::new(Metrics::new()),
        local,
        Arc::new(EventLog::default()),
    )
    .unwrap();
    let zone = |z: &str| {
        let mut l = Labels::new();
        l.insert("zone", z).unwrap();
        l
    };
    u.set_labeled_endpoints(&[
        (addr(1), zone("a")),
        (addr(2), zone("a")),
        (addr(3), zone("b")),
        (addr(4), zone("b")),
    ]);
    let remote = |u: &Upstream| {
        (0..1000)
            .filter(|_| u.pick(None).unwrap().endpoint().addr.port() >= 3)
            .count()
    };
    assert_eq!(remote(&u), 0);
    // Half of zone a ejected: 50% × 1.4 = 70% stays, ~30% spills to zone b.
    let a1 = u.endpoints()[0].clone();
    for _ in 0..5 {
        u.record(&a1.start(false), Outcome::ConnectFailure, false);
    }
    let spilled = remote(&u);
    assert!((200..400).contains(&spilled), "{spilled}");
}

/// A discovered upstream balancing round robin, so that sequential picks see every
/// endpoint the balancer may choose.
fn round_robin() -> Upstream {
    let mut config = UpstreamConfig::new("u", Vec::new());
    config.balancer = crate::config::BalancerKind::RoundRobin;
    Upstream::new(
        config,
        Arc::new(Metrics::new()),
        Labels::new(),
        Arc::new(EventLog::default()),
    )
    .unwrap()
}

fn discovered(ports: &[(u16, bool)]) -> Vec<DiscoveredEndpoint> {
    ports
        .iter()
        .map(|&(port, unhealthy)| DiscoveredEndpoint {
            addr: addr(port),
            labels: Labels::new(),
            unhealthy,
            mtls: false,
        })
        .collect()
}

fn picked_ports(u: &Upstream, n: usize) -> std::collections::BTreeSet<u16> {
    (0..n)
        .map(|_| u.pick(None).unwrap().endpoint().addr.port())
        .collect()
}

fn kinds(u: &Upstream) -> Vec<(EventKind, String)> {
    u.events
        .drain(100)
        .into_iter()
        .map(|e| (e.kind, e.detail))
        .collect()
}

#[test]
fn endpoints_the_control_plane_marks_unhealthy_take_no_traffic_above_the_threshold() {
    let u = round_robin();
    u.set_discovered_endpoints(&discovered(&[(1, false), (2, true), (3, false)]));
    assert_eq!(picked_ports(&u, 200), [1, 3].into());
    assert!(!u.available.load().panic);
    assert_eq!(u.upstream_metrics.endpoints_unhealthy.get(), 1);
    assert_eq!(u.upstream_metrics.panic.get(), 0);
    let state = u.state();
    assert_eq!(state["endpoints_unhealthy"], 1);
    assert_eq!(state["endpoints_available"], 2);
    assert_eq!(state["endpoints"][1]["control_plane_health"], "unhealthy");
    assert!(kinds(&u).is_empty(), "no panic, no event");
}

#[test]
fn every_endpoint_unhealthy_per_the_control_plane_is_panic_over_all_of_them() {
    let u = round_robin();
    u.set_discovered_endpoints(&discovered(&[(1, true), (2, true), (3, true)]));
    assert!(u.available.load().panic);
    assert_eq!(picked_ports(&u, 200), [1, 2, 3].into());
    assert_eq!(u.upstream_metrics.panic.get(), 1);
    let events = kinds(&u);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, EventKind::PanicEntered);
    assert!(
        events[0]
            .1
            .contains("0 of 3 endpoints available (3 unhealthy per the control plane, 0 ejected)"),
        "{}",
        events[0].1
    );
    // Health restored: panic left, one event.
    u.set_discovered_endpoints(&discovered(&[(1, false), (2, false), (3, true)]));
    assert!(!u.available.load().panic);
    assert_eq!(picked_ports(&u, 200), [1, 2].into());
    let events = kinds(&u);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, EventKind::PanicLeft);
    assert_eq!(u.upstream_metrics.panic.get(), 0);
}

#[test]
fn the_panic_threshold_counts_ejections_and_registry_health_together() {
    // 4 endpoints: one unhealthy per the control plane, one ejected: 2 of 4 available is
    // not below 50%; a second ejection would be, but max_ejection_percent (50%) allows
    // two of four.
    let u = round_robin();
    u.set_discovered_endpoints(&discovered(&[
        (1, true),
        (2, false),
        (3, false),
        (4, false),
    ]));
    let eject = |port: u16| {
        let e = u
            .endpoints()
            .iter()
            .find(|e| e.addr.port() == port)
            .unwrap()
            .clone();
        for _ in 0..5 {
            u.record(&e.start(false), Outcome::Status(503), false);
        }
        assert_eq!(e.breaker.state(), State::Ejected);
    };
    eject(2);
    assert!(!u.available.load().panic);
    assert_eq!(picked_ports(&u, 200), [3, 4].into());
    eject(3);
    assert!(u.available.load().panic, "1 of 4 available");
    assert_eq!(picked_ports(&u, 400), [1, 2, 3, 4].into());
    let entered: Vec<_> = kinds(&u)
        .into_iter()
        .filter(|(k, _)| *k == EventKind::PanicEntered)
        .collect();
    assert_eq!(entered.len(), 1);
    assert!(
        entered[0]
            .1
            .contains("1 of 4 endpoints available (1 unhealthy per the control plane, 2 ejected)"),
        "{}",
        entered[0].1
    );
}

#[test]
fn registry_health_obeys_the_threshold_with_outlier_detection_off() {
    let u = round_robin();
    let mut policy = Policy::default();
    policy.outlier.enabled = false;
    u.set_policy(Some((policy.clone(), 2)));
    u.set_discovered_endpoints(&discovered(&[(1, true), (2, true), (3, false)]));
    assert!(u.available.load().panic, "1 of 3 is below 50%");
    assert_eq!(picked_ports(&u, 300), [1, 2, 3].into());
    // A threshold of 0 turns panic off, but registry health alone never empties the
    // upstream.
    policy.outlier.panic_threshold = malla_core::policy::Percent::new(0.0).unwrap();
    u.set_policy(Some((policy, 3)));
    assert!(!u.available.load().panic);
    assert_eq!(picked_ports(&u, 100), [3].into());
    u.set_discovered_endpoints(&discovered(&[(1, true), (2, true), (3, true)]));
    assert!(u.available.load().panic);
    assert_eq!(picked_ports(&u, 300), [1, 2, 3].into());
}
