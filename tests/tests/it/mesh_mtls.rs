//! Sidecar to sidecar over mTLS, end to end: two sidecars that joined the mesh with join
//! tokens, one calling the other's service found through the control plane. The called
//! sidecar registers its instance as accepting mTLS once it holds its certificate; the
//! caller connects over TLS and requires the called service's SPIFFE ID; the application
//! behind sees the caller's identity. Over HTTP/1.1, HTTP/2 and opaque TCP. A caller
//! without a certificate falls back to plaintext, which permissive mode accepts and strict
//! mode refuses; an instance that proves another service's identity is refused by the
//! caller with an error that names the identity it expected.

use std::time::Duration;

use http::Version;
use malla_control::registry::Registration;
use malla_control::server::IdentitySettings;
use malla_core::ServiceName;
use malla_proxy::config::{ListenerProtocol, MtlsMode};
use malla_tests::{
    client::{self, collect, Collected},
    control::TestControl,
    mesh::{security, server, Caller},
    peers::{HttpPeer, TcpPeer},
    proxy::{admin, TestProxy},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A sidecar of `web` whose app calls `upstream` (discovered) on its outbound listener;
/// with a join token when `joins`.
async fn caller(
    control: &TestControl,
    upstream: &str,
    protocol: ListenerProtocol,
    joins: bool,
) -> TestProxy {
    web(upstream, protocol, joins).start(control).await
}

fn web<'a>(upstream: &'a str, protocol: ListenerProtocol, joins: bool) -> Caller<'a> {
    Caller {
        service: "web",
        joins,
        upstreams: vec![(upstream, protocol)],
    }
}

async fn get(proxy: &TestProxy, version: Version, authority: &str) -> Collected {
    let request = client::get(version, authority, "/hello");
    let response = match version {
        Version::HTTP_2 => client::Http2::connect(proxy.outbound())
            .await
            .unwrap()
            .send(request)
            .await
            .unwrap(),
        _ => client::Http1::connect(proxy.outbound())
            .await
            .unwrap()
            .send(request)
            .await
            .unwrap(),
    };
    collect(response).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_talk_mtls_over_http1_and_http2_and_the_app_sees_the_caller() {
    let control = TestControl::start_without_dns().await;
    let (h1_app, h2_app) = (
        HttpPeer::http1("checkout-app"),
        HttpPeer::http2("orders-app"),
    );
    let checkout = server(
        &control,
        "checkout",
        h1_app.addr(),
        ListenerProtocol::Auto,
        MtlsMode::Strict,
    )
    .await;
    let orders = server(
        &control,
        "orders",
        h2_app.addr(),
        ListenerProtocol::Auto,
        MtlsMode::Strict,
    )
    .await;

    // Registered as accepting mTLS, once the certificate was there.
    let instances = control
        .registry()
        .instances(&ServiceName::new("checkout").unwrap(), &Default::default())
        .map(|(_, i)| i)
        .unwrap_or_default();
    assert_eq!(instances.len(), 1);
    assert!(instances[0].mtls, "{instances:?}");
    assert_eq!(instances[0].socket_addr(), checkout.inbound());

    for (upstream, version, server) in [
        ("checkout", Version::HTTP_11, &checkout),
        ("orders", Version::HTTP_2, &orders),
    ] {
        let web = caller(&control, upstream, ListenerProtocol::Auto, true).await;
        for _ in 0..3 {
            let response = get(&web, version, upstream).await;
            assert_eq!(response.status, 200, "{upstream}: {}", response.text());
            assert_eq!(
                response.header("x-echo-h-malla-client-id"),
                Some("spiffe://malla.local/svc/web"),
                "{upstream}: {:?}",
                response.headers
            );
        }
        assert!(security(&web, "outbound", "mtls") >= 1.0, "{upstream}");
        let mtls = admin::metric(
            &web.metrics_text(),
            "malla_proxy_outbound_connections_by_security_total",
            &[
                ("security", "mtls"),
                ("group", "X25519MLKEM768"),
                ("alpn", "malla/1"),
            ],
        );
        assert!(
            mtls >= Some(1.0),
            "{upstream}: the hybrid post-quantum group and the mesh's ALPN"
        );
        assert!(security(server, "inbound", "mtls") >= 1.0, "{upstream}");
        assert_eq!(security(server, "inbound", "plaintext-refused"), 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_between_sidecars_travels_over_mtls() {
    let control = TestControl::start_without_dns().await;
    let app = TcpPeer::echo();
    let db = server(
        &control,
        "db",
        app.addr(),
        ListenerProtocol::Tcp,
        MtlsMode::Strict,
    )
    .await;
    let web = caller(&control, "db", ListenerProtocol::Tcp, true).await;

    let mut stream = tokio::net::TcpStream::connect(web.outbound())
        .await
        .unwrap();
    stream.write_all(b"ping over mtls").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut echoed))
        .await
        .expect("an echo in time")
        .unwrap();
    assert_eq!(echoed, b"ping over mtls");
    assert!(security(&web, "outbound", "mtls") >= 1.0);
    assert!(security(&db, "inbound", "mtls") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_without_a_certificate_is_plaintext_accepted_when_permissive_refused_when_strict()
{
    let control = TestControl::start_without_dns().await;
    let (open_app, strict_app) = (HttpPeer::http1("open"), HttpPeer::http1("closed"));
    let open = server(
        &control,
        "open",
        open_app.addr(),
        ListenerProtocol::Auto,
        MtlsMode::Permissive,
    )
    .await;
    let strict = server(
        &control,
        "closed",
        strict_app.addr(),
        ListenerProtocol::Auto,
        MtlsMode::Strict,
    )
    .await;

    let web = caller(&control, "open", ListenerProtocol::Auto, false).await;
    let response = get(&web, Version::HTTP_11, "open").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("x-echo-h-malla-client-id"), None);
    assert!(security(&web, "outbound", "plaintext-no-identity") >= 1.0);
    assert!(security(&open, "inbound", "plaintext") >= 1.0);

    let web = caller(&control, "closed", ListenerProtocol::Auto, false).await;
    let response = get(&web, Version::HTTP_11, "closed").await;
    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(strict_app.requests(), 0);
    assert!(security(&strict, "inbound", "plaintext-refused") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_proves_another_service_is_refused_by_the_caller() {
    let control = TestControl::start_without_dns().await;
    let app = HttpPeer::http1("payments-app");
    let payments = server(
        &control,
        "payments",
        app.addr(),
        ListenerProtocol::Auto,
        MtlsMode::Strict,
    )
    .await;
    // Someone registers the payments sidecar as an instance of checkout: its traffic must
    // not reach payments, whose certificate says payments.
    control
        .registry()
        .register(
            &ServiceName::new("checkout").unwrap(),
            "impostor",
            Registration {
                address: payments.inbound().ip(),
                port: payments.inbound().port(),
                protocol: Default::default(),
                labels: Default::default(),
                ttl_seconds: Some(60),
                is_static: false,
                annotations: Default::default(),
                mtls: true,
            },
        )
        .await
        .unwrap();
    let web = caller(&control, "checkout", ListenerProtocol::Auto, true).await;

    let response = get(&web, Version::HTTP_11, "checkout").await;
    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(response.cause(), Some("tls-handshake-error"));
    assert!(
        response
            .text()
            .contains("does not prove spiffe://malla.local/svc/checkout"),
        "{}",
        response.text()
    );
    assert_eq!(app.requests(), 0);
    let failed = admin::metric(
        &web.metrics_text(),
        "malla_proxy_outbound_connections_by_security_total",
        &[
            ("security", "handshake-failed"),
            ("reason", "wrong-identity"),
        ],
    );
    assert!(failed >= Some(1.0), "{}", web.metrics_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_under_continuous_traffic_without_a_failed_request() {
    // 5 s certificates, renewed every ~3.5 s on both sides while requests flow, each on a
    // new mTLS connection (the caller keeps no idle connection), so handshakes keep
    // happening with the old certificates and then the new ones.
    let control = TestControl::start_with_identity(IdentitySettings {
        cert_ttl: Duration::from_secs(5),
        ..IdentitySettings::default()
    })
    .await;
    let app = HttpPeer::http1("checkout-app");
    let checkout = server(
        &control,
        "checkout",
        app.addr(),
        ListenerProtocol::Auto,
        MtlsMode::Strict,
    )
    .await;
    let web = web("checkout", ListenerProtocol::Auto, true)
        .start_with(&control, |u| u.max_idle_per_endpoint = 0)
        .await;
    let renewals = |proxy: &TestProxy| {
        malla_tests::proxy::admin::metric(
            &proxy.metrics_text(),
            "malla_proxy_identity_certificate_requests_total",
            &[("kind", "renewal"), ("result", "ok")],
        )
        .unwrap_or(0.0)
    };
    let (mut ok, mut failed) = (0u64, Vec::new());
    // Bounded: 30 s of traffic at most; two renewals on each side take ~7 s.
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while (renewals(&web) < 2.0 || renewals(&checkout) < 2.0) && tokio::time::Instant::now() < until
    {
        let response = get(&web, Version::HTTP_11, "checkout").await;
        match response.status {
            200 => ok += 1,
            _ => failed.push(format!("{}: {}", response.status, response.text())),
        }
    }
    assert!(
        renewals(&web) >= 2.0 && renewals(&checkout) >= 2.0,
        "both sides renewed twice"
    );
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok
    );
    assert!(ok >= 20, "{ok} requests");
    assert!(
        security(&web, "outbound", "mtls") >= ok as f64,
        "a handshake per request"
    );
}
