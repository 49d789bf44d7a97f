//! Policy resources end to end: a policy written through the control plane's HTTP API
//! reaches a sidecar over gRPC and is in force (`/config` says which version), an invalid
//! one changes nothing, a delete returns the sidecar to the defaults; and the resilience
//! events a sidecar records reach the control plane (`GET /v1/events`).

use std::{net::SocketAddr, time::Duration};

use http::Version;
use malla_control::{
    policies::policy_key,
    store::{Precondition, Store},
};
use malla_core::ServiceName;
use malla_proxy::config::ControlPlaneConfig;
use malla_tests::{
    assert_eventually,
    client::{self, within, Http1},
    control::TestControl,
    identity::joining,
    peers::{dead_addr, HttpPeer},
    proxy::{admin, TestProxy},
};
use serde_json::{json, Value};

/// A sidecar of `frontend` calling `quote` (a live peer) and `broken` (nothing listens),
/// both with static endpoints, following the control plane for their policies. It joins
/// with a join token of `frontend`, whose certificate its events are reported with.
async fn sidecar(control: &TestControl, quote: SocketAddr) -> TestProxy {
    let control = ControlPlaneConfig {
        instance_id: Some("frontend-1".into()),
        register_address: Some("127.0.0.1:1".parse().unwrap()),
        ..joining(control, "frontend").await
    };
    TestProxy::builder()
        .upstream("quote", &[quote])
        .outbound("quote")
        .upstream("broken", &[dead_addr()])
        .connect_timeout(Duration::from_millis(200))
        .outbound("broken")
        .admin()
        .config(|c| c.control = Some(control))
        .start()
}

/// The `/config` entry of one upstream.
async fn upstream(proxy: &TestProxy, name: &str) -> Value {
    let config = admin::config(proxy.admin()).await;
    config["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no upstream {name} in /config: {config}"))
}

async fn source(proxy: &TestProxy, name: &str) -> Value {
    upstream(proxy, name).await["policy"]["source"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_applied_through_the_control_plane_is_in_force_at_the_sidecar() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = HttpPeer::http1("quote");
    let proxy = sidecar(&control, peer.addr()).await;

    // Connected, no policy: the defaults.
    assert_eventually!(
        upstream(&proxy, "quote").await["discovery"]["policy_watch"]["connected"] == true,
        "the policy watch never connected: {}",
        upstream(&proxy, "quote").await
    );
    assert_eq!(source(&proxy, "quote").await, json!({"source": "defaults"}));

    let applied = api
        .put(
            "/v1/policies/quote",
            &json!({"retries": {"max_attempts": 2}, "timeouts": {"request": "3s"}}),
        )
        .await
        .ok();
    let version = applied["version"].as_u64().unwrap();
    let expected = json!({"source": "control-plane", "version": version});
    assert_eventually!(
        source(&proxy, "quote").await == expected,
        "the sidecar never put version {version} in force: {}",
        upstream(&proxy, "quote").await
    );
    let state = upstream(&proxy, "quote").await;
    assert_eq!(state["policy"]["spec"]["retries"]["max_attempts"], 2);
    assert_eq!(state["policy"]["spec"]["timeouts"]["request"], "3s");
    assert_eq!(state["discovery"]["policy_version"], version);
    let metric = admin::metric(
        &proxy.metrics_text(),
        "malla_proxy_policy_version",
        &[("upstream", "quote")],
    );
    assert_eq!(metric, Some(version as f64));
    // Only `quote`'s callers follow it.
    assert_eq!(
        source(&proxy, "broken").await,
        json!({"source": "defaults"})
    );

    // Traffic flows under it.
    let mut conn = Http1::connect(proxy.outbound_at(0)).await.unwrap();
    let response = within(
        "request",
        conn.send(client::get(Version::HTTP_11, "quote", "/")),
    )
    .await
    .unwrap();
    assert_eq!(client::collect(response).await.unwrap().status, 200);

    // An invalid policy is refused by the control plane; the sidecar keeps the version.
    let refused = api
        .put(
            "/v1/policies/quote",
            &json!({"retries": {"max_attempts": 0}}),
        )
        .await;
    assert!(
        refused
            .error(400, "invalid_argument")
            .contains("retries.max_attempts"),
        "{refused}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(source(&proxy, "quote").await, expected);

    // A new version replaces it; a delete returns to the defaults.
    let next = api
        .put(
            "/v1/policies/quote",
            &json!({"retries": {"max_attempts": 4}}),
        )
        .await
        .ok();
    let next_version = next["version"].as_u64().unwrap();
    assert!(next_version > version);
    assert_eventually!(
        source(&proxy, "quote").await
            == json!({"source": "control-plane", "version": next_version})
    );
    api.delete("/v1/policies/quote").await.ok();
    assert_eventually!(
        source(&proxy, "quote").await == json!({"source": "defaults"}),
        "the delete never reached the sidecar: {}",
        upstream(&proxy, "quote").await
    );
    assert_eq!(
        upstream(&proxy, "quote").await["discovery"]["policy_version"],
        Value::Null
    );
}

/// Version skew: a policy written through a control plane newer than the sidecar, with
/// fields this sidecar does not know at several depths, reaches it over `WatchPolicy` as
/// the newer control plane stored it. The sidecar applies the rest, and lists and counts
/// what it ignored; a policy invalid for another reason is still refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_from_a_newer_control_plane_applies_without_the_fields_the_sidecar_does_not_know()
{
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = HttpPeer::http1("quote");
    let proxy = sidecar(&control, peer.addr()).await;
    assert_eventually!(
        upstream(&proxy, "quote").await["discovery"]["policy_watch"]["connected"] == true,
        "the policy watch never connected: {}",
        upstream(&proxy, "quote").await
    );

    // This control plane's own API stays strict: an unknown field is an operator's typo.
    let newer = json!({
        "service": "quote",
        "timeouts": {"request": "3s"},
        "retries": {"max_attempts": 2, "hedging": {"max_parallel": 2}},
        "rate_limit": [{"requests_per_second": 1000, "window": "1s"}],
        "mirror": {"to": "shadow", "percent": 5}
    });
    let refused = api.put("/v1/policies/quote", &newer).await;
    assert!(
        refused
            .error(400, "invalid_argument")
            .contains("retries.hedging: unknown field `hedging`"),
        "{refused}"
    );

    // What a newer control plane stores (and this one relays as stored; `json!` writes
    // the keys sorted, so the fields are met in that order).
    let store = control.registry().store();
    let key = policy_key(&ServiceName::new("quote").unwrap());
    let version = store
        .put(
            &key,
            newer.to_string().into_bytes(),
            None,
            Precondition::None,
        )
        .await
        .unwrap();
    let expected = json!({"source": "control-plane", "version": version});
    assert_eventually!(
        source(&proxy, "quote").await == expected,
        "the sidecar never put version {version} in force: {}",
        upstream(&proxy, "quote").await
    );
    let state = upstream(&proxy, "quote").await;
    assert_eq!(state["policy"]["spec"]["retries"]["max_attempts"], 2);
    assert_eq!(state["policy"]["spec"]["timeouts"]["request"], "3s");
    assert_eq!(
        state["policy"]["spec"]["rate_limit"][0]["requests_per_second"],
        1000.0
    );
    let watch = &state["discovery"]["policy_watch"];
    assert_eq!(
        watch["unknown_fields"],
        json!(["mirror", "rate_limit[0].window", "retries.hedging"]),
        "{state}"
    );
    assert_eq!(watch["rejected"], 0);
    assert_eq!(watch["last_error"], Value::Null);
    let unknown = |proxy: &TestProxy| {
        admin::metric(
            &proxy.metrics_text(),
            "malla_proxy_policy_unknown_fields_total",
            &[("upstream", "quote")],
        )
    };
    assert_eq!(unknown(&proxy), Some(3.0));

    // Traffic flows under it.
    let mut conn = Http1::connect(proxy.outbound_at(0)).await.unwrap();
    let response = within(
        "request",
        conn.send(client::get(Version::HTTP_11, "quote", "/")),
    )
    .await
    .unwrap();
    assert_eq!(client::collect(response).await.unwrap().status, 200);

    // Invalid for another reason than an unknown field: refused whole, as before.
    let invalid = json!({"service": "quote", "retries": {"max_attempts": 0, "hedging": {}}});
    let refused_version = store
        .put(
            &key,
            invalid.to_string().into_bytes(),
            None,
            Precondition::None,
        )
        .await
        .unwrap();
    assert_eventually!(
        upstream(&proxy, "quote").await["discovery"]["policy_watch"]["rejected"] == 1,
        "the sidecar never refused version {refused_version}: {}",
        upstream(&proxy, "quote").await
    );
    let state = upstream(&proxy, "quote").await;
    assert_eq!(state["policy"]["source"], expected);
    let error = state["discovery"]["policy_watch"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("retries.max_attempts: 0 is not between 1 and 10"),
        "{error}"
    );
    // The fields ignored are those of the policy in force, counted once.
    assert_eq!(
        state["discovery"]["policy_watch"]["unknown_fields"],
        json!(["mirror", "rate_limit[0].window", "retries.hedging"])
    );
    assert_eq!(unknown(&proxy), Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilience_events_reach_the_control_plane() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let peer = HttpPeer::http1("quote");
    let proxy = sidecar(&control, peer.addr()).await;
    let broken = proxy.outbound_at(1);

    // Nothing listens behind `broken`: every attempt is a connect failure, and after the
    // default 5 in a row its endpoint is ejected.
    assert_eventually!(
        {
            if let Ok(mut conn) = Http1::connect(broken).await {
                let _ = within(
                    "request",
                    conn.send(client::get(Version::HTTP_11, "broken", "/")),
                )
                .await;
            }
            let events = api.get("/v1/events?kind=ejected").await.ok();
            events["events"].as_array().is_some_and(|e| !e.is_empty())
        },
        "no ejection reached the control plane: {}",
        api.get("/v1/events").await.ok()
    );
    let events = api.get("/v1/events?kind=ejected").await.ok();
    let event = &events["events"][0];
    assert_eq!(event["upstream"], "broken");
    assert_eq!(event["service"], "broken");
    assert_eq!(event["endpoint"], dead_addr_text(&proxy));
    assert_eq!(
        event["reporter"],
        json!({"service": "frontend", "instance_id": "frontend-1"})
    );
    // The reporter's service finds it too.
    let by_reporter = api
        .get("/v1/events?service=frontend&kind=ejected")
        .await
        .ok();
    assert!(!by_reporter["events"].as_array().unwrap().is_empty());
}

/// The address of `broken`'s endpoint, as `/config` shows it.
fn dead_addr_text(proxy: &TestProxy) -> Value {
    proxy.upstream("broken").state()["endpoints"][0]["address"].clone()
}
