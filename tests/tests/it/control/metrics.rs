//! The control plane's own `/metrics`: known traffic moves the counters it should, by
//! route template (never a raw path), and the gauges follow what is open.

use malla_api::{pb, policy_pb, PoliciesClient, RegistryClient};
use malla_tests::{assert_eventually, control::TestControl};
use serde_json::json;

use super::registration;

/// The value of the sample `series` (name and labels exactly as exposed), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

async fn scrape(control: &TestControl) -> String {
    let reply = control.api().get("/metrics").await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(
        reply.content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    String::from_utf8(reply.body.to_vec()).expect("UTF-8")
}

const INSTANCE: &str = "/v1/services/{service}/instances/{id}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_known_traffic() {
    let control = TestControl::start_without_dns().await;
    let before = scrape(&control).await;
    let api = control.api();

    // HTTP: two registrations, a heartbeat, a deregistration, a 404 and a 405.
    let lease = api
        .register("orders", "o-1", &registration(8080, &[]))
        .await["lease"]
        .as_u64()
        .expect("a lease");
    api.register("orders", "o-2", &registration(8081, &[]))
        .await;
    assert_eq!(api.keepalive(lease).await.status, 200);
    api.deregister("orders", "o-2").await;
    assert_eq!(api.get("/v1/no/such/route/12345").await.status, 404);
    assert_eq!(
        api.get("/v1/services/orders/instances/o-1").await.status,
        405
    );

    // gRPC on the same port: a registration, a heartbeat, a failed deregistration, and a
    // watch of each kind held open.
    let channel = control.grpc_channel().await;
    let mut registry = RegistryClient::new(control.as_operator(channel.clone()));
    let registered = registry
        .register(pb::RegisterRequest {
            mtls: false,
            service: "orders".into(),
            id: "o-3".into(),
            address: "127.0.0.1".into(),
            port: 8082,
            protocol: pb::Protocol::Http.into(),
            labels: Default::default(),
            ttl_seconds: 30,
        })
        .await
        .expect("register")
        .into_inner();
    registry
        .heartbeat(pb::HeartbeatRequest {
            lease: registered.lease,
        })
        .await
        .expect("heartbeat");
    let missing = registry
        .deregister(pb::DeregisterRequest {
            service: "orders".into(),
            id: "nobody".into(),
        })
        .await
        .expect_err("no such instance");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut watch = registry
        .watch(pb::WatchRequest {
            service: "orders".into(),
            selector: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("a snapshot");
    let mut policies = PoliciesClient::new(channel);
    let mut policy_watch = policies
        .watch_policy(policy_pb::WatchPolicyRequest {
            service: "orders".into(),
        })
        .await
        .expect("watch policy")
        .into_inner();
    policy_watch.message().await.expect("the policy state");

    let now = scrape(&control).await;
    let delta = |series: &str| sample(&now, series) - sample(&before, series);
    let http = |route: &str, method: &str, code: u16| {
        format!(
            r#"malla_control_api_requests_total{{api="http",route="{route}",method="{method}",code="{code}"}}"#
        )
    };
    let grpc = |method: &str, code: &str| {
        format!(
            r#"malla_control_api_requests_total{{api="grpc",route="/malla.registry.v1.Registry/{method}",method="POST",code="{code}"}}"#
        )
    };
    assert_eq!(delta(&http(INSTANCE, "PUT", 200)), 2.0, "{now}");
    assert_eq!(delta(&http(INSTANCE, "DELETE", 200)), 1.0, "{now}");
    assert_eq!(delta(&http(INSTANCE, "GET", 405)), 1.0, "{now}");
    assert_eq!(delta(&http("unmatched", "GET", 404)), 1.0, "{now}");
    assert_eq!(
        delta(&http("/v1/leases/{lease}/keepalive", "PUT", 200)),
        1.0,
        "{now}"
    );
    assert!(!now.contains("12345"), "a raw path became a label:\n{now}");
    assert_eq!(delta(&grpc("Register", "OK")), 1.0, "{now}");
    assert_eq!(delta(&grpc("Heartbeat", "OK")), 1.0, "{now}");
    assert_eq!(delta(&grpc("Deregister", "NOT_FOUND")), 1.0, "{now}");
    for (family, api, n) in [
        ("registrations", "http", 2.0),
        ("registrations", "grpc", 1.0),
        ("heartbeats", "http", 1.0),
        ("heartbeats", "grpc", 1.0),
        ("deregistrations", "http", 1.0),
        ("deregistrations", "grpc", 0.0),
    ] {
        let series = format!(r#"malla_control_{family}_total{{api="{api}"}}"#);
        assert_eq!(delta(&series), n, "{series} in\n{now}");
    }
    let registry_watches = r#"malla_control_watch_streams_open{kind="registry"}"#;
    let policy_watches = r#"malla_control_watch_streams_open{kind="policy"}"#;
    assert_eq!(sample(&now, registry_watches), 1.0, "{now}");
    assert_eq!(sample(&now, policy_watches), 1.0, "{now}");
    // The scrape's own connection and the gRPC one, at least.
    assert!(
        sample(&now, "malla_control_connections_open") >= 2.0,
        "{now}"
    );
    let durations = format!(
        r#"malla_control_api_request_duration_seconds_count{{api="http",route="{INSTANCE}"}}"#
    );
    assert_eq!(delta(&durations), 4.0, "{now}");
    // Writes were made durable (process-wide: at least these).
    assert!(
        delta("malla_control_store_write_duration_seconds_count") >= 4.0,
        "{now}"
    );

    // Streams the client abandons: the gauges fall, the calls count as CANCELLED.
    drop(watch);
    drop(policy_watch);
    let cancelled = grpc("Watch", "CANCELLED");
    assert_eventually!({
        let now = scrape(&control).await;
        sample(&now, registry_watches) == 0.0
            && sample(&now, policy_watches) == 0.0
            && sample(&now, &cancelled) == 1.0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiries_and_health_checks_are_counted() {
    let control = TestControl::start_without_dns().await;
    let before = scrape(&control).await;
    let expiries = "malla_control_lease_expiries_total";
    let failed = r#"malla_control_health_checks_total{result="fail"}"#;
    // A 1 s lease left to expire; a TCP check of a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("an address")
        .port();
    let mut body = registration(closed, &[]);
    body["ttl_seconds"] = json!(1);
    control.api().register("orders", "o-1", &body).await;
    control
        .api()
        .put_service(
            "orders",
            &json!({"health_check": {"kind": "tcp", "interval": 0.1, "timeout": 0.1}}),
        )
        .await;
    // Process-wide counters (other tests in this process move them too): at least ours.
    assert_eventually!({
        let now = scrape(&control).await;
        sample(&now, expiries) - sample(&before, expiries) >= 1.0
            && sample(&now, failed) - sample(&before, failed) >= 1.0
    });
}

/// The CA's work is counted: tokens created, certificates issued and refused by reason,
/// the CA certificate's expiry. (The counters are process-wide, and tests share the
/// process: they are compared before and after.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_requests_are_counted() {
    use malla_core::ServiceName;
    let control = TestControl::start_without_dns().await;
    let issued = r#"malla_control_certificate_requests_total{kind="first",result="issued"}"#;
    let used = r#"malla_control_certificate_requests_total{kind="first",result="token-used"}"#;
    let tokens = "malla_control_join_tokens_created_total";
    let before = scrape(&control).await;
    let checkout = ServiceName::new("checkout").unwrap();
    let token = control
        .identity()
        .tokens
        .create(&checkout, None)
        .await
        .unwrap()
        .token;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let credential = malla_control::identity::Credential::JoinToken(token);
    control
        .identity()
        .certify(&checkout, csr.der(), &credential)
        .await
        .unwrap();
    assert!(control
        .identity()
        .certify(&checkout, csr.der(), &credential)
        .await
        .is_err());
    let after = scrape(&control).await;
    assert!(
        sample(&after, issued) >= sample(&before, issued) + 1.0,
        "{after}"
    );
    assert!(
        sample(&after, used) >= sample(&before, used) + 1.0,
        "{after}"
    );
    assert!(
        sample(&after, tokens) >= sample(&before, tokens) + 1.0,
        "{after}"
    );
    let expiry = sample(
        &after,
        "malla_control_ca_certificate_expiry_timestamp_seconds",
    );
    assert!(expiry > 2.0e9, "a root valid ten years: {expiry}");
}
