//! Resilience, end to end over real sockets: outlier ejection and half-open recovery,
//! retries and their budget, per-try timeouts, deadlines across two hops, service limits,
//! rate limits, fault injection, relayed failures and locality failover.
//!
//! Fault-injecting upstreams are echo peers told to answer a status (`set_status`), to
//! hold requests (`hold`), or addresses where nothing listens. Every count asserted is a
//! count of requests that reached an upstream, which is what a storm would multiply.

use std::{net::SocketAddr, time::Duration};

use http::Version;
use malla_core::policy::{Conditions, Mode, Percent, RateLimit};
use malla_proxy::{config::ListenerProtocol, resilience::events::EventKind};
use malla_tests::{
    assert_eventually,
    client::{self, within, Collected, Http1},
    cross_version::Flavor,
    peers::{dead_addr, HttpPeer},
    proxy::{admin, TestProxy},
    BoxError,
};

/// One GET on a new connection.
async fn get(addr: SocketAddr, headers: &[(&str, &str)]) -> Result<Collected, BoxError> {
    let mut conn = Http1::connect(addr).await?;
    let mut req = client::get(Version::HTTP_11, "echo", "/");
    for (name, value) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes())?,
            http::HeaderValue::from_str(value)?,
        );
    }
    let response = within("request", conn.send(req)).await?;
    client::collect(response).await
}

async fn status(addr: SocketAddr) -> u16 {
    get(addr, &[]).await.map(|c| c.status).unwrap_or(0)
}

fn breaker_states(proxy: &TestProxy, upstream: &str) -> Vec<(String, String)> {
    proxy.upstream(upstream).state()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["breaker"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn breaker_of(proxy: &TestProxy, upstream: &str, addr: SocketAddr) -> String {
    breaker_states(proxy, upstream)
        .into_iter()
        .find(|(a, _)| *a == addr.to_string())
        .map(|(_, s)| s)
        .unwrap_or_default()
}

fn metric(proxy: &TestProxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    admin::metric(&proxy.metrics_text(), name, labels).unwrap_or(0.0)
}

/// With no policy at all (the quick form's defaults), one of three instances answering
/// 500 is invisible: every GET succeeds (retried elsewhere), and the instance is ejected
/// after exactly the default 5 consecutive failures, so it sees no more traffic. (Round
/// robin makes sure the failing instance is chosen; P2C-EWMA would mostly avoid it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_instance_of_three_is_invisible_with_the_defaults() {
    let peers = [
        HttpPeer::http1("a"),
        HttpPeer::http1("b"),
        HttpPeer::http1("bad"),
    ];
    peers[2].set_status(500);
    let addrs: Vec<_> = peers.iter().map(|p| p.addr()).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .balancer(malla_proxy::config::BalancerKind::RoundRobin)
        .outbound("echo")
        .admin()
        .start();
    for i in 0..60 {
        let c = get(proxy.outbound(), &[]).await.unwrap();
        assert_eq!(c.status, 200, "request {i}: {}", c.text());
    }
    assert_eq!(
        peers[2].requests(),
        5,
        "ejected after 5 consecutive failures"
    );
    assert_eq!(breaker_of(&proxy, "echo", addrs[2]), "ejected");
    assert!(proxy
        .events()
        .iter()
        .any(|e| e.kind == EventKind::Ejected && e.endpoint == Some(addrs[2])));
    // The admin listener shows the latest events.
    let (status, body) = admin::get(proxy.admin(), "/events").await.unwrap();
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        doc["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "ejected" && e["endpoint"] == addrs[2].to_string()),
        "{doc:#}"
    );
    assert_eq!(
        metric(&proxy, "malla_proxy_retries_total", &[("upstream", "echo")]),
        5.0,
        "each failure was retried once, on a healthy endpoint"
    );
}

cross_version!(one_failing_instance_is_invisible_in_every_protocol);

/// The same over HTTP/1, HTTP/2 and gRPC (a real tonic client and server): one of three
/// instances failing every call (500, or UNAVAILABLE for gRPC) is retried around and
/// ejected. The cross-version calls are POSTs, so the HTTP flavors opt in to retrying
/// non-idempotent requests; gRPC calls are retried on UNAVAILABLE by default.
async fn one_failing_instance_is_invisible_in_every_protocol(flavor: Flavor) {
    let peers = [flavor.peer("a"), flavor.peer("b"), flavor.peer("bad")];
    peers[2].state().set_status(500);
    let addrs: Vec<_> = peers.iter().map(|p| p.addr()).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .balancer(malla_proxy::config::BalancerKind::RoundRobin)
        .policy(|p| p.retries.non_idempotent = flavor != Flavor::Grpc)
        .outbound("echo")
        .start();
    let mut client = flavor.client(proxy.outbound(), "echo");
    for i in 0..30 {
        let served_by = client
            .call(&format!("call {i}"))
            .await
            .assert_ok()
            .to_string();
        assert_ne!(served_by, "bad", "call {i}");
    }
    assert_eq!(
        peers[2].requests(),
        5,
        "ejected after 5 consecutive failures"
    );
    assert_eq!(breaker_of(&proxy, "echo", addrs[2]), "ejected");
}

/// An instance that hangs is cut by the per-try timeout, the request is retried on a
/// healthy one, and after the configured failures the hung instance is ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_instance_is_cut_by_per_try_timeouts_and_ejected() {
    let peers = [HttpPeer::http1("a"), HttpPeer::http1("hung")];
    peers[1].state().hold();
    let addrs: Vec<_> = peers.iter().map(|p| p.addr()).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .balancer(malla_proxy::config::BalancerKind::RoundRobin)
        .policy(|p| {
            p.timeouts.per_try = Some(Duration::from_millis(200));
            p.outlier.consecutive_failures = 2;
        })
        .outbound("echo")
        .start();
    for i in 0..20 {
        let c = get(proxy.outbound(), &[]).await.unwrap();
        assert_eq!(c.status, 200, "request {i}: {}", c.text());
        assert_eq!(c.header("x-peer"), Some("a"));
    }
    assert_eq!(peers[1].requests(), 2);
    assert_eq!(breaker_of(&proxy, "echo", addrs[1]), "ejected");
    peers[1].state().release();
}

/// Every instance down: once the breakers are open, calls fail fast with a clear error
/// and reach no instance; when the fault clears, a half-open probe after the ejection
/// time closes the breakers and traffic flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_instances_down_fail_fast_and_recover_through_a_half_open_probe() {
    let peers = [HttpPeer::http1("a"), HttpPeer::http1("b")];
    for p in &peers {
        p.set_status(503);
    }
    let addrs: Vec<_> = peers.iter().map(|p| p.addr()).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .policy(|p| {
            p.outlier.consecutive_failures = 2;
            p.outlier.base_ejection_time = Duration::from_millis(300);
            p.outlier.max_ejection_percent = Percent::new(100.0).unwrap();
            p.outlier.panic_threshold = Percent::new(0.0).unwrap();
            p.retries.enabled = false;
        })
        .outbound("echo")
        .start();
    // Two failures each open both breakers.
    for _ in 0..4 {
        assert_eq!(status(proxy.outbound()).await, 503);
    }
    let reached = peers[0].requests() + peers[1].requests();
    assert_eq!(reached, 4);
    let c = get(proxy.outbound(), &[]).await.unwrap();
    assert_eq!(c.status, 503);
    assert_eq!(c.cause(), Some("no-healthy-endpoints"), "{}", c.text());
    assert_eq!(
        peers[0].requests() + peers[1].requests(),
        reached,
        "failed fast"
    );

    for p in &peers {
        p.set_status(200);
    }
    assert_eventually!(
        status(proxy.outbound()).await == 200,
        "a probe after the ejection time succeeds"
    );
    // Probes are real requests: the next ones close the other breaker too.
    assert_eventually!(
        status(proxy.outbound()).await == 200
            && breaker_states(&proxy, "echo")
                .iter()
                .all(|(_, s)| s == "closed"),
        "both breakers close"
    );
    let kinds: Vec<_> = proxy.events().iter().map(|e| e.kind).collect();
    for kind in [EventKind::Ejected, EventKind::HalfOpen, EventKind::Closed] {
        assert!(kinds.contains(&kind), "{kind:?} in {kinds:?}");
    }
}

/// A half-open probe that fails re-opens the breaker for twice as long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_reopens_the_breaker() {
    let bad = HttpPeer::http1("bad");
    let good = HttpPeer::http1("good");
    bad.set_status(502);
    let proxy = TestProxy::builder()
        .upstream("echo", &[bad.addr(), good.addr()])
        .policy(|p| {
            p.outlier.consecutive_failures = 1;
            p.outlier.base_ejection_time = Duration::from_millis(200);
        })
        .outbound("echo")
        .start();
    assert_eventually!(
        {
            let _ = status(proxy.outbound()).await;
            breaker_of(&proxy, "echo", bad.addr()) == "ejected"
        },
        "the bad endpoint is ejected"
    );
    assert_eventually!(
        {
            let _ = status(proxy.outbound()).await;
            proxy.events().iter().any(|e| {
                e.kind == EventKind::Ejected && e.detail.contains("half-open probe failed")
            })
        },
        "the probe fails and re-ejects"
    );
    let ejections: Vec<_> = proxy
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::Ejected)
        .map(|e| e.detail)
        .collect();
    assert!(ejections[0].ends_with("ejected for 200ms"), "{ejections:?}");
    assert!(ejections[1].ends_with("ejected for 400ms"), "{ejections:?}");
}

/// All instances failing: retries are bounded by the budget (10% of requests plus 1/s
/// over a 10 s window), so 100 requests make at most 100 + 10 + 10 upstream calls
/// however many attempts the policy allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_storm_is_bounded_by_the_budget() {
    let peers = [
        HttpPeer::http1("a"),
        HttpPeer::http1("b"),
        HttpPeer::http1("c"),
    ];
    for p in &peers {
        p.set_status(503);
    }
    let addrs: Vec<_> = peers.iter().map(|p| p.addr()).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .policy(|p| {
            p.outlier.enabled = false;
            p.retries.max_attempts = 5;
            p.retries.budget_ratio = 0.1;
            p.retries.budget_min_per_second = 1;
            p.retries.backoff_base = Duration::from_millis(1);
            p.retries.backoff_max = Duration::from_millis(1);
        })
        .outbound("echo")
        .start();
    for _ in 0..100 {
        assert_eq!(status(proxy.outbound()).await, 503);
    }
    let reached: u64 = peers.iter().map(|p| p.requests()).sum();
    assert!(reached > 100, "some retries were made: {reached}");
    assert!(reached <= 120, "the budget bounds retries: {reached}");
    assert!(
        metric(
            &proxy,
            "malla_proxy_retry_budget_exhausted_total",
            &[("upstream", "echo")]
        ) > 0.0
    );
    assert!(proxy
        .events()
        .iter()
        .any(|e| e.kind == EventKind::RetryBudgetExhausted));
}

/// POST is not retried by default (not idempotent) — unless the policy says so, and then
/// its body is replayed intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_requests_are_retried_only_when_told_and_replay_their_body() {
    let bad = HttpPeer::http1("bad");
    let good = HttpPeer::http1("good");
    bad.set_status(500);
    let post = |addr: SocketAddr| async move {
        let mut conn = Http1::connect(addr).await.unwrap();
        let req = client::post(Version::HTTP_11, "echo", "/", "hello, body");
        client::collect(within("post", conn.send(req)).await.unwrap())
            .await
            .unwrap()
    };
    for non_idempotent in [false, true] {
        let proxy = TestProxy::builder()
            .upstream("echo", &[bad.addr(), good.addr()])
            .balancer(malla_proxy::config::BalancerKind::RoundRobin)
            .policy(|p| {
                p.retries.non_idempotent = non_idempotent;
                p.outlier.enabled = false;
            })
            .outbound("echo")
            .start();
        let statuses: Vec<u16> = {
            let mut out = Vec::new();
            for _ in 0..4 {
                let c = post(proxy.outbound()).await;
                if c.status == 200 {
                    assert_eq!(c.text(), "hello, body");
                }
                out.push(c.status);
            }
            out
        };
        if non_idempotent {
            assert_eq!(statuses, [200; 4]);
        } else {
            assert_eq!(
                statuses.iter().filter(|s| **s == 500).count(),
                2,
                "{statuses:?}"
            );
        }
    }
}

/// A budget given by the client (`malla-timeout-ms`) shrinks at every hop: two sidecars,
/// the first delaying every request by 100 ms (fault injection), and the application
/// behind the second sees what is left. A request whose budget is spent is not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_shrink_across_two_hops() {
    let app = HttpPeer::http1("app");
    let second = TestProxy::builder()
        .inbound(app.addr(), ListenerProtocol::Auto)
        .start();
    let first = TestProxy::builder()
        .upstream("echo", &[second.bound().inbound.unwrap()])
        .policy(|p| {
            p.faults.push(malla_core::policy::Fault {
                path_prefix: None,
                delay_percent: Percent::new(100.0).unwrap(),
                delay: Duration::from_millis(100),
                abort_percent: Percent::default(),
                abort_status: 503,
            })
        })
        .outbound("echo")
        .start();
    let c = get(first.outbound(), &[("malla-timeout-ms", "1000")])
        .await
        .unwrap();
    assert_eq!(c.status, 200, "{}", c.text());
    let seen: u64 = c
        .header("x-echo-h-malla-timeout-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(seen > 0 && seen <= 900, "the app saw {seen} ms left");

    // 50 ms is spent in the first hop's delay: nothing is sent.
    let before = app.requests();
    let c = get(first.outbound(), &[("malla-timeout-ms", "50")])
        .await
        .unwrap();
    assert_eq!(c.status, 504);
    assert_eq!(c.cause(), Some("deadline-exceeded"));
    assert_eq!(app.requests(), before);

    // The policy's own request timeout starts a budget when the client gave none.
    let third = TestProxy::builder()
        .upstream("echo", &[second.bound().inbound.unwrap()])
        .policy(|p| p.timeouts.request = Duration::from_millis(700))
        .outbound("echo")
        .start();
    let c = get(third.outbound(), &[]).await.unwrap();
    let seen: u64 = c
        .header("x-echo-h-malla-timeout-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(seen > 0 && seen <= 700, "{seen}");
}

/// Service limits fail fast with 503 and name the limit; in audit mode the same excess
/// is only counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_limits_fail_fast_and_audit_mode_only_counts() {
    let peer = HttpPeer::http1("slow");
    for mode in [Mode::Enforce, Mode::Audit] {
        let proxy = TestProxy::builder()
            .upstream("echo", &[peer.addr()])
            .policy(|p| {
                p.limits.max_requests = 1;
                p.limits.mode = mode;
            })
            .outbound("echo")
            .start();
        peer.state().hold();
        let held = tokio::spawn(get(proxy.outbound(), &[]));
        let first_requests = peer.requests();
        assert_eventually!(
            peer.requests() > first_requests,
            "the first request is in flight"
        );
        let second = tokio::spawn(get(proxy.outbound(), &[]));
        if mode == Mode::Enforce {
            let c = second.await.unwrap().unwrap();
            assert_eq!(c.status, 503);
            assert_eq!(c.cause(), Some("limit-reached"));
            assert_eq!(c.header("malla-limit"), Some("max_requests"));
            peer.state().release();
        } else {
            assert_eventually!(
                metric(
                    &proxy,
                    "malla_proxy_limit_hits_total",
                    &[("action", "max_requests"), ("mode", "audit")]
                ) == 1.0,
                "the audit counts the excess"
            );
            peer.state().release();
            assert_eq!(second.await.unwrap().unwrap().status, 200);
        }
        assert_eq!(held.await.unwrap().unwrap().status, 200);
    }
}

/// A local rate limit answers 429 with `retry-after` once the burst is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let peer = HttpPeer::http1("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .policy(|p| {
            p.rate_limits.push(RateLimit {
                path_prefix: None,
                requests_per_second: 0.5,
                burst: Some(2),
                mode: Mode::Enforce,
            })
        })
        .outbound("echo")
        .start();
    assert_eq!(status(proxy.outbound()).await, 200);
    assert_eq!(status(proxy.outbound()).await, 200);
    let c = get(proxy.outbound(), &[]).await.unwrap();
    assert_eq!(c.status, 429);
    assert_eq!(c.cause(), Some("rate-limited"));
    assert_eq!(c.header("retry-after"), Some("2"));
    assert_eq!(peer.requests(), 2);
}

/// Fault injection aborts the share of requests asked for, before any endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_aborts_requests() {
    let peer = HttpPeer::http1("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .policy(|p| {
            p.faults.push(malla_core::policy::Fault {
                path_prefix: Some("/".into()),
                delay_percent: Percent::default(),
                delay: Duration::ZERO,
                abort_percent: Percent::new(100.0).unwrap(),
                abort_status: 418,
            })
        })
        .outbound("echo")
        .start();
    let c = get(proxy.outbound(), &[]).await.unwrap();
    assert_eq!(c.status, 418);
    assert_eq!(c.cause(), Some("fault-injected"));
    assert_eq!(peer.requests(), 0);
}

/// A gateway sidecar whose own upstream is down relays the failure marked
/// `malla-relayed-failure`: the caller's breaker does not eject the healthy gateway.
/// The same failure from an instance's inbound side (its application is down) is the
/// instance's own, and the caller ejects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_failures_do_not_eject_the_relaying_instance() {
    let gateway = TestProxy::builder()
        .upstream("echo", &[dead_addr()])
        .outbound("echo")
        .start();
    let sick = TestProxy::builder()
        .inbound(dead_addr(), ListenerProtocol::Auto)
        .start();
    let healthy = HttpPeer::http1("healthy");
    let caller = TestProxy::builder()
        .upstream(
            "echo",
            &[
                gateway.outbound(),
                sick.bound().inbound.unwrap(),
                healthy.addr(),
            ],
        )
        .policy(|p| {
            p.outlier.consecutive_failures = 3;
            p.outlier.max_ejection_percent = Percent::new(100.0).unwrap();
            p.retries.enabled = false;
        })
        .balancer(malla_proxy::config::BalancerKind::RoundRobin)
        .outbound("echo")
        .start();
    let mut relayed = 0;
    for _ in 0..12 {
        let c = get(caller.outbound(), &[]).await.unwrap();
        if c.header("malla-relayed-failure") == Some("echo") {
            relayed += 1;
        }
    }
    assert!(
        relayed >= 3,
        "the gateway's answers carry the mark: {relayed}"
    );
    assert_eq!(breaker_of(&caller, "echo", gateway.outbound()), "closed");
    assert_eq!(
        breaker_of(&caller, "echo", sick.bound().inbound.unwrap()),
        "ejected"
    );
}

/// An application cannot exempt its own instance from its callers' ejection by marking
/// its failures `malla-relayed-failure`: the inbound edge removes a mark that no recent
/// failure of one of the sidecar's upstreams bears out, and keeps one that does (the
/// application relays what its dependency did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_cannot_exempt_itself_with_the_relayed_mark() {
    let app = malla_tests::peers::misbehaving::RawPeer::canned(
        b"HTTP/1.1 503 Service Unavailable\r\nmalla-relayed-failure: dep\r\ncontent-length: 0\r\n\r\n",
    );
    let sidecar = TestProxy::builder()
        .upstream("dep", &[dead_addr()])
        .outbound("dep")
        .inbound(app.addr(), ListenerProtocol::Auto)
        .admin()
        .start();
    let inbound = sidecar.bound().inbound.unwrap();
    let c = get(inbound, &[]).await.unwrap();
    assert_eq!(c.status, 503);
    assert_eq!(
        c.header("malla-relayed-failure"),
        None,
        "a claim nothing bears out is removed"
    );
    let metrics = admin::metrics(sidecar.admin()).await;
    assert!(
        metrics.contains("malla_proxy_inbound_untrusted_relayed_failure_total 1"),
        "{metrics}"
    );
    // The application's dependency fails through this sidecar: now the claim holds.
    let failed = get(sidecar.outbound(), &[]).await.unwrap();
    assert_eq!(failed.status, 502);
    let c = get(inbound, &[]).await.unwrap();
    assert_eq!(c.header("malla-relayed-failure"), Some("dep"));
}

/// Policy input in a sidecar's own configuration is validated with the field named.
#[test]
fn invalid_local_policies_are_rejected_with_the_field() {
    let text = r#"
        [[upstream]]
        name = "echo"
        endpoints = ["127.0.0.1:1"]
        [upstream.policy.retries]
        max_attempts = 0
        [upstream.policy.outlier]
        failure_on = ["5xx", "grpc-bogus"]
        [[outbound]]
        listen = "127.0.0.1:0"
        upstream = "echo"
    "#;
    let err = malla_proxy::ProxyConfig::from_toml(text, "proxy.toml").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("unknown gRPC status \"bogus\""), "{text}");
    let conditions = Conditions::parse(&["5xx"]).unwrap();
    assert!(conditions.matches(malla_core::policy::Outcome::Status(503)));
}

/// Failover between zones: a sidecar in zone `a` keeps its traffic in `a` while `a` is
/// healthy; when both instances of `a` fail they are ejected and the traffic moves to
/// zone `b` (the retries hide the failures from the client); when `a` heals, its half-open
/// probes close the breakers and the traffic comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_moves_traffic_to_the_other_zone_and_back() {
    use crate::discovery::{discovering_proxy, register, start_control};
    let dir = malla_tests::control::TempDir::new("failover");
    let control = start_control(dir.path(), crate::discovery::any_port()).await;
    let local = [HttpPeer::http1("a1"), HttpPeer::http1("a2")];
    let remote = [HttpPeer::http1("b1"), HttpPeer::http1("b2")];
    for (i, p) in local.iter().enumerate() {
        register(&control, "echo", &format!("a{i}"), p, &[("zone", "a")]).await;
    }
    for (i, p) in remote.iter().enumerate() {
        register(&control, "echo", &format!("b{i}"), p, &[("zone", "b")]).await;
    }
    let me = HttpPeer::http1("me");
    let proxy = discovering_proxy(control.grpc_addr, |c| {
        let control = c.control.as_mut().unwrap();
        control.service = Some("client".into());
        control.register_address = Some(me.addr());
        control.labels.insert("zone".into(), "a".into());
        let policy = c.upstreams[0].policy.get_or_insert_with(Default::default);
        policy.outlier.consecutive_failures = 2;
        policy.outlier.base_ejection_time = Duration::from_millis(500);
        policy.outlier.max_ejection_percent = Percent::new(50.0).unwrap();
    });
    assert_eventually!(
        proxy.upstream("echo").endpoints().len() == 4,
        "all four discovered"
    );
    let peer_of = |c: &Collected| c.header("x-peer").unwrap_or_default().to_string();
    for _ in 0..20 {
        let c = get(proxy.outbound(), &[]).await.unwrap();
        assert!(peer_of(&c).starts_with('a'), "local first: {}", peer_of(&c));
    }
    assert_eq!(remote[0].requests() + remote[1].requests(), 0);

    // Zone a degrades: its instances are ejected and zone b takes over, invisibly.
    for p in &local {
        p.set_status(503);
    }
    for i in 0..20 {
        let c = get(proxy.outbound(), &[]).await.unwrap();
        assert_eq!(
            c.status,
            200,
            "request {i}: {} from {}",
            c.text(),
            peer_of(&c)
        );
        assert!(peer_of(&c).starts_with('b'), "failed over: {}", peer_of(&c));
    }
    let state = proxy.upstream("echo").state();
    let ejected = state["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["breaker"] == "ejected")
        .count();
    assert_eq!(ejected, 2, "{state:#}");

    // Zone a heals: probes close its breakers and the traffic comes home.
    for p in &local {
        p.set_status(0);
    }
    assert_eventually!(
        {
            let c = get(proxy.outbound(), &[]).await.unwrap();
            let b_before = remote[0].requests() + remote[1].requests();
            let mut all_local = c.status == 200;
            for _ in 0..10 {
                let c = get(proxy.outbound(), &[]).await.unwrap();
                all_local &= c.status == 200 && peer_of(&c).starts_with('a');
            }
            all_local && remote[0].requests() + remote[1].requests() == b_before
        },
        "traffic returns to zone a"
    );
}

/// An endpoint much slower than its peers is ejected by the latency detector (opt-in),
/// which P2C-EWMA alone would only send less to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_outlier_is_ejected_when_the_detector_is_on() {
    let peers = [
        HttpPeer::http1("a"),
        HttpPeer::http1("b"),
        HttpPeer::http1("slow"),
    ];
    peers[2].set_delay(Duration::from_millis(40));
    let addrs: Vec<_> = peers.iter().map(|p| p.addr()).collect();
    let proxy = TestProxy::builder()
        .upstream("echo", &addrs)
        .balancer(malla_proxy::config::BalancerKind::RoundRobin)
        .policy(|p| {
            p.outlier.interval = Duration::from_millis(600);
            p.outlier.latency.enabled = true;
            p.outlier.latency.min_requests = 3;
            p.outlier.success_rate.enabled = false;
        })
        .outbound("echo")
        .start();
    assert_eventually!(
        {
            assert_eq!(status(proxy.outbound()).await, 200);
            breaker_of(&proxy, "echo", addrs[2]) == "ejected"
        },
        "the slow endpoint is ejected: {:#} {:?}",
        proxy.upstream("echo").state(),
        proxy.events()
    );
    let event = proxy
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::Ejected)
        .unwrap();
    assert!(event.detail.contains("mean latency"), "{}", event.detail);
    assert_eq!(event.endpoint, Some(addrs[2]));
}

/// A new policy takes effect on the next request of a connection that stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_policy_applies_live_without_dropping_connections() {
    let peer = HttpPeer::http1("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .start();
    let mut conn = Http1::connect(proxy.outbound()).await.unwrap();
    let get = || client::get(Version::HTTP_11, "echo", "/");
    let first = client::collect(conn.send(get()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    let mut policy = malla_core::Policy::default();
    policy.faults.push(malla_core::policy::Fault {
        path_prefix: None,
        delay_percent: Percent::default(),
        delay: Duration::ZERO,
        abort_percent: Percent::new(100.0).unwrap(),
        abort_status: 503,
    });
    proxy.upstream("echo").set_policy(Some((policy, 1)));
    let second = client::collect(conn.send(get()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(second.cause(), Some("fault-injected"));
    proxy.upstream("echo").set_policy(None);
    let third = client::collect(conn.send(get()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(third.status, 200);
    assert!(
        !conn.is_closed(),
        "the client connection stayed open throughout"
    );
}
