//! Authorization enforced at the called sidecar, end to end: a policy applied through the
//! control plane reaches the sidecars of its service, which decide every inbound call on
//! the identity the caller proved with mTLS. The matrix: HTTP/1.1, HTTP/2, gRPC and TCP;
//! an allowed caller, an allowed caller on a denied path or method, a caller of another
//! service, and a caller without a certificate (plaintext, which permissive mode lets
//! reach the policy); in enforce mode (403 `forbidden`, gRPC `PERMISSION_DENIED`, TCP
//! closed, nothing reaching the app) and in audit mode (everything through, the denials
//! counted as `audit_deny`). Every decision is counted with the caller's identity.

use std::time::Duration;

use http::Version;
use malla_proxy::config::{ListenerProtocol, MtlsMode};
use malla_tests::{
    assert_eventually,
    client::{self, collect},
    control::TestControl,
    echo_pb::EchoRequest,
    mesh::{server, Caller},
    peers::{GrpcPeer, HttpPeer, TcpPeer},
    proxy::{admin, TestProxy},
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The services called, each behind its own sidecar, and how its callers reach it.
const SERVICES: [(&str, ListenerProtocol); 4] = [
    ("pay-h1", ListenerProtocol::Auto),
    ("pay-h2", ListenerProtocol::Auto),
    ("pay-grpc", ListenerProtocol::Auto),
    ("pay-tcp", ListenerProtocol::Tcp),
];

/// Only `checkout` may call, and not the admin pages nor the gRPC method `Fail`. The TCP
/// service's policy has no HTTP rule: a deny rule with HTTP conditions would close every
/// TCP connection (the fail-closed reading of docs/authorization.md).
fn policy(service: &str, mode: &str) -> Value {
    let mut rules = vec![json!({"action": "allow", "from": ["checkout"]})];
    if service != "pay-tcp" {
        rules.push(json!({"action": "deny", "paths": ["/admin/*"]}));
        rules.push(json!({"action": "deny", "grpc": ["malla.test.echo.Echo/Fail"]}));
    }
    json!({"default": "deny", "mode": mode, "rule": rules})
}

/// Applies `mode`'s policies and waits until every server holds its version.
async fn apply(control: &TestControl, servers: &[TestProxy], mode: &str) {
    let api = control.api();
    for ((service, _), proxy) in SERVICES.iter().zip(servers) {
        let version = api
            .put(
                &format!("/v1/authorizations/{service}"),
                &policy(service, mode),
            )
            .await
            .ok()["version"]
            .as_u64()
            .unwrap();
        let authorizer = proxy
            .handle()
            .discovery()
            .and_then(|d| d.authorizer())
            .expect("a server sidecar has an authorizer")
            .clone();
        assert_eventually!(
            authorizer.version() == Some(version),
            "{service}: version {version} never reached its sidecar"
        );
    }
}

/// What one caller got from one call: `Ok` when it went through to the app, `Err` with
/// what was refused otherwise.
async fn call(caller: &TestProxy, i: usize, path: &str) -> Result<(), String> {
    let (service, _) = SERVICES[i];
    let addr = caller.outbound_at(i);
    match service {
        "pay-h1" | "pay-h2" => {
            let version = match service {
                "pay-h1" => Version::HTTP_11,
                _ => Version::HTTP_2,
            };
            let request = client::get(version, service, path);
            let response = match version {
                Version::HTTP_2 => client::Http2::connect(addr)
                    .await
                    .unwrap()
                    .send(request)
                    .await
                    .unwrap(),
                _ => client::Http1::connect(addr)
                    .await
                    .unwrap()
                    .send(request)
                    .await
                    .unwrap(),
            };
            let response = collect(response).await.unwrap();
            match response.status {
                200 => Ok(()),
                403 => {
                    assert_eq!(response.cause(), Some("forbidden"), "{}", response.text());
                    Err(response.text())
                }
                other => panic!("{service}: {other} {}", response.text()),
            }
        }
        "pay-grpc" => {
            let mut grpc = client::grpc(addr, service).await.unwrap();
            let message = EchoRequest {
                message: "hi".into(),
            };
            let result = match path {
                "Fail" => grpc
                    .fail(malla_tests::echo_pb::FailRequest {
                        code: tonic::Code::FailedPrecondition as i32,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                _ => grpc.unary(message).await.map(drop),
            };
            match result {
                Ok(()) => Ok(()),
                // `Fail` answers FAILED_PRECONDITION when it is reached.
                Err(status) if status.code() != tonic::Code::PermissionDenied => Ok(()),
                Err(status) => Err(status.message().to_string()),
            }
        }
        _ => {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = stream.write_all(b"ping").await;
            let _ = stream.shutdown().await;
            let mut echoed = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut echoed))
                .await
                .expect("the connection ends in time");
            match echoed.as_slice() {
                b"ping" => Ok(()),
                b"" => Err("closed".into()),
                other => panic!("pay-tcp: {other:?}"),
            }
        }
    }
}

fn decisions(server: &TestProxy, decision: &str, source: &str) -> f64 {
    admin::metric(
        &server.metrics_text(),
        "malla_proxy_inbound_authz_decisions_total",
        &[("decision", decision), ("source", source)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorization_matrix_over_http1_http2_grpc_and_tcp_enforced_then_audited() {
    let control = TestControl::start_without_dns().await;
    let (h1, h2, grpc, tcp) = (
        HttpPeer::http1("h1-app"),
        HttpPeer::http2("h2-app"),
        GrpcPeer::start("grpc-app"),
        TcpPeer::echo(),
    );
    let apps = [h1.addr(), h2.addr(), grpc.addr(), tcp.addr()];
    let mut servers = Vec::new();
    for ((service, protocol), app) in SERVICES.iter().zip(apps) {
        let protocol = match protocol {
            ListenerProtocol::Tcp => ListenerProtocol::Tcp,
            _ => ListenerProtocol::Auto,
        };
        // Permissive: a plaintext caller reaches the policy, which must refuse it.
        servers.push(server(&control, service, app, protocol, MtlsMode::Permissive).await);
    }
    let upstreams: Vec<_> = SERVICES.to_vec();
    let checkout = Caller {
        service: "checkout",
        joins: true,
        upstreams: upstreams.clone(),
    }
    .start(&control)
    .await;
    let batch = Caller {
        service: "batch",
        joins: true,
        upstreams: upstreams.clone(),
    }
    .start(&control)
    .await;
    let anonymous = Caller {
        service: "anonymous",
        joins: false,
        upstreams,
    }
    .start(&control)
    .await;

    apply(&control, &servers, "enforce").await;
    let served_before = h1.requests() + h2.requests() + grpc.requests();
    for (i, &(service, _)) in SERVICES.iter().enumerate() {
        assert_eq!(call(&checkout, i, "/hello").await, Ok(()), "{service}");
        let forbidden = call(&batch, i, "/hello").await.unwrap_err();
        if service != "pay-tcp" {
            assert!(
                forbidden.contains("spiffe://malla.local/svc/batch may not call")
                    && forbidden.contains("by the default of authorization policy"),
                "{service}: {forbidden}"
            );
        }
        let forbidden = call(&anonymous, i, "/hello").await.unwrap_err();
        if service != "pay-tcp" {
            assert!(
                forbidden.contains("unauthenticated caller"),
                "{service}: {forbidden}"
            );
        }
        let denied = match service {
            "pay-h1" | "pay-h2" => Some("/admin/users"),
            "pay-grpc" => Some("Fail"),
            _ => None,
        };
        if let Some(path) = denied {
            let forbidden = call(&checkout, i, path).await.unwrap_err();
            assert!(
                forbidden.contains("checkout may not call") && forbidden.contains("rule["),
                "{service}: {forbidden}"
            );
        }
    }
    // Only the three allowed HTTP and gRPC calls reached an app.
    assert_eq!(
        h1.requests() + h2.requests() + grpc.requests(),
        served_before + 3
    );
    for ((service, _), server) in SERVICES.iter().zip(&servers) {
        let checkout_id = "spiffe://malla.local/svc/checkout";
        assert_eq!(decisions(server, "allow", checkout_id), 1.0, "{service}");
        assert_eq!(
            decisions(server, "deny", "spiffe://malla.local/svc/batch"),
            1.0,
            "{service}"
        );
        assert_eq!(
            decisions(server, "deny", "unauthenticated"),
            1.0,
            "{service}"
        );
        let expected = if *service == "pay-tcp" { 0.0 } else { 1.0 };
        assert_eq!(
            decisions(server, "deny", checkout_id),
            expected,
            "{service}"
        );
    }

    // Audit mode: the same calls all go through, the would-be denials counted.
    apply(&control, &servers, "audit").await;
    for (i, ((service, _), server)) in SERVICES.iter().zip(&servers).enumerate() {
        for caller in [&checkout, &batch, &anonymous] {
            assert_eq!(call(caller, i, "/hello").await, Ok(()), "{service}");
        }
        assert!(
            decisions(server, "audit_deny", "spiffe://malla.local/svc/batch") >= 1.0,
            "{service}"
        );
        assert!(
            decisions(server, "audit_deny", "unauthenticated") >= 1.0,
            "{service}"
        );
    }
}
