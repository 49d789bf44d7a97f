//! Resilience, end to end over real sockets: outlier ejection and half-open recovery,
//! retries and their budget, per-try timeouts, deadlines across two hops, service limits,
//! rate limits, fault injection, relayed failures and locality failover.
//!
//! What must hold for every protocol is written once and run over HTTP/1, HTTP/2 and gRPC
//! (`cross_version!`), in [`breakers`], [`retries`], [`deadlines`] and [`limits`]. This
//! file keeps what is particular to HTTP/1: the defaults with idempotent GETs (the
//! cross-version calls are POSTs), non-idempotent body replay, the inbound edge's check of
//! a relayed mark in a raw HTTP/1 answer, and zone failover through discovery (its
//! registration helpers take HTTP/1 peers).
//!
//! Fault-injecting upstreams are echo peers told to answer a status (`set_status`), to
//! hold requests (`hold`), or addresses where nothing listens. Every count asserted is a
//! count of requests that reached an upstream, which is what a storm would multiply.

mod breakers;
mod deadlines;
mod limits;
mod retries;

use std::{net::SocketAddr, time::Duration};

use http::Version;
use malla_core::policy::{Conditions, Percent};
use malla_proxy::{config::ListenerProtocol, resilience::events::EventKind};
use malla_tests::{
    assert_eventually,
    client::{self, within, Collected, Http1},
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
    use crate::discovery::{discovering_proxy, joining, register, start_control};
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
    let joined = joining(&control, dir.path(), control.grpc_addr, "client").await;
    let proxy = discovering_proxy(joined, |c| {
        let control = c.control.as_mut().unwrap();
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
