//! The control plane's TLS port and who may write instances: a workload registers,
//! heartbeats and deregisters only its own service's instances, over both APIs; a caller
//! with no credential, a certificate from another CA or of another service is refused
//! with what to do; plaintext is answered with what to do when the control plane requires
//! TLS; and tools that are not malla (openssl, curl) verify the control plane with the
//! bundle file.

use http::Method;
use malla_api::{pb, RegistryClient};
use malla_control::{identity::Ca, serving::ServeSettings};
use malla_core::TrustDomain;
use malla_tests::{
    control::{tls, TestControl},
    identity::svid,
};
use serde_json::json;
use tonic::Code;

fn registration(service: &str, id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        mtls: true,
        service: service.into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        protocol: pb::Protocol::Http.into(),
        labels: Default::default(),
        ttl_seconds: 30,
    }
}

fn body() -> serde_json::Value {
    json!({"address": "127.0.0.1", "port": 8080, "ttl_seconds": 30})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_a_workload_writes_only_its_own_services_instances() {
    let control = TestControl::start_without_dns().await;
    let orders = svid(&control.identity().ca, "orders");
    let bundle = control.trust_bundle_path();
    let channel = tls::grpc_channel(control.http_addr(), &bundle, Some(&orders))
        .await
        .unwrap();
    let mut as_orders = RegistryClient::new(channel);

    let lease = as_orders
        .register(registration("orders", "o-1"))
        .await
        .expect("orders registers its own instance")
        .into_inner()
        .lease;
    as_orders
        .heartbeat(pb::HeartbeatRequest { lease })
        .await
        .expect("and keeps its lease alive");
    let view = control.registry().view();
    let by = view
        .services
        .get(&malla_core::ServiceName::new("orders").unwrap())
        .and_then(|s| s.meta.get("o-1"))
        .and_then(|m| m.registered_by.clone())
        .expect("o-1 is registered");
    assert!(by.ends_with("spiffe://malla.local/svc/orders"), "{by}");

    // Another service's instance: refused, saying whose certificate this is.
    let refused = as_orders
        .register(registration("payments", "p-1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("spiffe://malla.local/svc/orders may register, heartbeat and deregister only instances of orders, not of payments"),
        "{refused:?}"
    );
    // payments' own instance, its lease and its deregistration are out of orders' reach.
    let payments = svid(&control.identity().ca, "payments");
    let mut as_payments = RegistryClient::new(
        tls::grpc_channel(control.http_addr(), &bundle, Some(&payments))
            .await
            .unwrap(),
    );
    let payments_lease = as_payments
        .register(registration("payments", "p-1"))
        .await
        .unwrap()
        .into_inner()
        .lease;
    let refused = as_orders
        .heartbeat(pb::HeartbeatRequest {
            lease: payments_lease,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = as_orders
        .deregister(pb::DeregisterRequest {
            service: "payments".into(),
            id: "p-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        control.api().instance_ids("payments", "").await,
        ["p-1"],
        "payments' instance is still there"
    );

    // No certificate: UNAUTHENTICATED, saying how to get one.
    let mut anonymous = RegistryClient::new(control.grpc_channel().await);
    let refused = anonymous
        .register(registration("orders", "o-2"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("malla token create --service orders"),
        "{refused:?}"
    );
    // Reads take no credential.
    anonymous
        .watch(pb::WatchRequest {
            service: "orders".into(),
            selector: String::new(),
        })
        .await
        .expect("a watch needs no credential");

    as_orders
        .deregister(pb::DeregisterRequest {
            service: "orders".into(),
            id: "o-1".into(),
        })
        .await
        .expect("orders deregisters its own instance");

    // The connections are listed with what they proved.
    let proxies = control.api().get("/v1/proxies").await.ok();
    let identities: Vec<_> = proxies["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["identity"].as_str().unwrap_or("none").to_string())
        .collect();
    for want in [
        "spiffe://malla.local/svc/orders",
        "spiffe://malla.local/svc/payments",
        "none",
    ] {
        assert!(
            identities.iter().any(|i| i == want),
            "{want} not in {identities:?}"
        );
    }

    let metrics = String::from_utf8(control.api().get("/metrics").await.body.to_vec()).unwrap();
    for (reason, at_least) in [("other-service", 3.0), ("missing", 1.0)] {
        let series = format!("malla_control_api_unauthenticated_total{{reason=\"{reason}\"}} ");
        let count: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
            .trim()
            .parse()
            .unwrap();
        assert!(count >= at_least, "{reason}: {count}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_workload_writes_only_its_own_services_instances() {
    let control = TestControl::start_without_dns().await;
    let orders = control.api_as(&svid(&control.identity().ca, "orders"));
    let registered = orders
        .request(
            Method::PUT,
            "/v1/services/orders/instances/o-1",
            body().to_string(),
        )
        .await
        .ok();
    let lease = registered["lease"].as_u64().unwrap();
    orders
        .request(Method::PUT, &format!("/v1/leases/{lease}/keepalive"), "")
        .await
        .ok();

    let payments = control.api_as(&svid(&control.identity().ca, "payments"));
    let reply = payments
        .request(
            Method::PUT,
            "/v1/services/orders/instances/p-1",
            body().to_string(),
        )
        .await;
    let message = reply.error(403, "forbidden");
    assert!(
        message.contains("only instances of payments, not of orders"),
        "{message}"
    );
    let reply = payments
        .request(Method::DELETE, "/v1/services/orders/instances/o-1", "")
        .await;
    reply.error(403, "forbidden");
    let reply = payments
        .request(Method::PUT, &format!("/v1/leases/{lease}/keepalive"), "")
        .await;
    reply.error(403, "forbidden");
    // A certificate is no operator: the other routes still need the token.
    let reply = orders.request(Method::GET, "/v1/status", "").await;
    reply.error(401, "unauthenticated");

    orders
        .request(Method::DELETE, "/v1/services/orders/instances/o-1", "")
        .await
        .ok();
    assert!(control.api().instance_ids("orders", "").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_gets_no_connection() {
    let control = TestControl::start_without_dns().await;
    let other = Ca::ephemeral(
        TrustDomain::new("malla.local").unwrap(),
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    let impostor = svid(&other, "orders");
    // The control plane refuses its certificate in the handshake (TLS 1.3: the client
    // learns it at its first read), so no call goes through.
    let result = async {
        let channel = tls::grpc_channel(
            control.http_addr(),
            &control.trust_bundle_path(),
            Some(&impostor),
        )
        .await?;
        RegistryClient::new(channel)
            .register(registration("orders", "o-1"))
            .await?;
        Ok::<_, malla_tests::BoxError>(())
    }
    .await;
    assert!(result.is_err(), "a foreign certificate was accepted");
    assert!(control.registry().view().services.is_empty());
    let metrics = String::from_utf8(control.api().get("/metrics").await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("malla_control_api_tls_handshakes_total{result=\"failed\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_answered_with_what_to_do_when_tls_is_required() {
    let control = TestControl::start_serving(ServeSettings {
        allow_plaintext: false,
        ..ServeSettings::default()
    })
    .await;
    // HTTP/1.1 without TLS.
    let reply = malla_tests::control::api::Api::new(control.http_addr())
        .request(Method::GET, "/v1/identity", "")
        .await;
    let message = reply.error(400, "tls_required");
    for what in ["https://", "trust-bundle.pem", "--ca-file", "--control-ca"] {
        assert!(message.contains(what), "{what:?} not in {message:?}");
    }
    // gRPC without TLS.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", control.http_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = RegistryClient::new(channel)
        .watch(pb::WatchRequest {
            service: "orders".into(),
            selector: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("requires TLS"), "{refused:?}");
    // Over TLS all is well.
    control.api().get("/v1/status").await.ok();
}

/// openssl and curl, which check a host name, accept the control plane's certificate with
/// the bundle file; the certificate also names the control plane's SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_and_curl_verify_the_control_plane_with_the_bundle_file() {
    let control = TestControl::start_without_dns().await;
    let bundle = control.trust_bundle_path();
    let addr = control.http_addr();
    let run = |program: &str, args: Vec<String>| {
        let out = std::process::Command::new(program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program} cannot run ({e}): scripts/test installs it"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = tokio::task::spawn_blocking({
        let bundle = bundle.clone();
        move || {
            run(
                "openssl",
                vec![
                    "s_client".into(),
                    "-connect".into(),
                    addr.to_string(),
                    "-CAfile".into(),
                    bundle.display().to_string(),
                    "-verify_ip".into(),
                    "127.0.0.1".into(),
                    "-verify_return_error".into(),
                    "-brief".into(),
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "openssl s_client refused the control plane:\n{out}");
    assert!(out.contains("Verification: OK"), "{out}");
    assert!(out.contains("TLSv1.3"), "{out}");

    let (ok, out) = tokio::task::spawn_blocking(move || {
        run(
            "curl",
            vec![
                "--silent".into(),
                "--show-error".into(),
                "--fail".into(),
                "--cacert".into(),
                bundle.display().to_string(),
                format!("https://localhost:{}/v1/identity", addr.port()),
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "curl refused the control plane:\n{out}");
    assert!(out.contains("trust_bundle"), "{out}");
}
