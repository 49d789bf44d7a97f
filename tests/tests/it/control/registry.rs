//! Register, list, get, deregister over the HTTP API; label selectors.

use malla_control::store::Revision;
use malla_tests::{
    client::within,
    control::{api::ids, TestControl},
};
use serde_json::json;

use super::registration;

fn revision(v: &serde_json::Value) -> Revision {
    v["revision"]
        .as_u64()
        .unwrap_or_else(|| panic!("no revision in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_list_get_deregister() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();

    assert_eq!(api.get("/live").await.status, 200);
    let empty = api.get("/v1/services").await.ok();
    assert_eq!(empty["services"], json!([]), "{empty}");

    let first = api
        .register(
            "orders",
            "o-1",
            &json!({"address": "127.0.0.1", "port": 8081, "protocol": "grpc",
                    "labels": {"env": "prod", "malla.dev/zone": "eu-1", "canary": ""}}),
        )
        .await;
    assert!(first["lease"].as_u64().is_some(), "{first}");
    assert_eq!(first["ttl_seconds"], 30, "the default lease: {first}");
    let second = api
        .register("orders", "o-2", &registration(8082, &[("env", "dev")]))
        .await;
    assert!(revision(&second) > revision(&first));
    assert_ne!(
        second["lease"], first["lease"],
        "one lease per registration"
    );

    // Read-your-writes: every list below sees both.
    let services = api.get("/v1/services").await.ok();
    assert_eq!(
        services["services"],
        json!([{"name": "orders", "instances": 2, "serving": 2, "health_check": null,
                 "annotations": {}}]),
        "{services}"
    );
    assert!(revision(&services) >= revision(&second));

    let service = api.get("/v1/services/orders").await.ok();
    assert_eq!(service["name"], "orders");
    assert_eq!(service["spec"], json!({}));
    // The instance, and what describes it (checked in `describe_data_for_a_service`).
    let mut described = service["instances"][0].clone();
    for field in ["annotations", "lease", "registered_at", "registered_by"] {
        assert!(described[field] != json!(null), "no {field}: {service}");
        described.as_object_mut().unwrap().remove(field);
    }
    assert_eq!(
        described,
        json!({"id": "o-1", "service": "orders", "address": "127.0.0.1", "port": 8081,
               "protocol": "grpc", "health": "unknown",
               "labels": {"canary": "", "env": "prod", "malla.dev/zone": "eu-1"}}),
        "{service}"
    );
    assert_eq!(service["instances"][1]["protocol"], "http", "the default");

    let status = api.get("/v1/status").await.ok();
    assert_eq!(status["services"], 1, "{status}");
    assert_eq!(status["instances"], 2, "{status}");

    // Registering again replaces the instance and frees its old lease.
    let again = api
        .register("orders", "o-1", &registration(9091, &[("env", "prod")]))
        .await;
    assert_ne!(again["lease"], first["lease"]);
    let listed = api.instances("orders", "").await;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["port"], 9091);
    assert_eq!(listed[0]["labels"], json!({"env": "prod"}));
    let old = first["lease"].as_u64().unwrap();
    api.keepalive(old).await.error(404, "lease_not_found");

    // Deregistering removes at once; the service stays, empty.
    let gone = api.deregister("orders", "o-1").await;
    assert!(revision(&gone) > revision(&again));
    assert_eq!(api.instance_ids("orders", "").await, ["o-2"]);
    api.delete("/v1/services/orders/instances/o-1")
        .await
        .error(404, "not_found");
    api.deregister("orders", "o-2").await;
    let service = api.get("/v1/services/orders").await.ok();
    assert_eq!(service["instances"], json!([]), "{service}");

    // Deleting the service removes it (and would remove its instances).
    api.register("orders", "o-3", &registration(8083, &[]))
        .await;
    api.delete("/v1/services/orders").await.ok();
    api.get("/v1/services/orders").await.error(404, "not_found");
    api.list("orders", "", "").await.error(404, "not_found");
    assert_eq!(api.get("/v1/status").await.ok()["instances"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_specs() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let spec = json!({"health_check": {"kind": "tcp", "interval": 30, "timeout": 2}});
    let put = api.put_service("billing", &spec).await;
    // Defaults are filled in and echoed.
    let expected = json!({"health_check": {"kind": "tcp", "interval": 30.0, "timeout": 2.0,
                                           "healthy_threshold": 2, "unhealthy_threshold": 2}});
    assert_eq!(put["spec"], expected, "{put}");
    let got = api.get("/v1/services/billing").await.ok();
    assert_eq!(got["spec"], expected);
    assert_eq!(got["instances"], json!([]));
    let listed = api.get("/v1/services").await.ok();
    assert_eq!(listed["services"][0]["health_check"]["kind"], "tcp");
    assert_eq!(listed["services"][0]["instances"], 0);

    // A spec without a check replaces the check.
    api.put_service("billing", &json!({})).await;
    let got = api.get("/v1/services/billing").await.ok();
    assert_eq!(got["spec"], json!({}), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let instances: [(&str, &[(&str, &str)]); 6] = [
        ("a", &[("env", "prod"), ("zone", "eu-1"), ("canary", "")]),
        ("b", &[("env", "prod"), ("zone", "eu-2")]),
        ("c", &[("env", "dev"), ("zone", "eu-1")]),
        ("d", &[("env", "staging")]),
        ("e", &[]),
        ("f", &[("malla.dev/tier", "gold"), ("zone", "us-1")]),
    ];
    for (port, (id, labels)) in (9001..).zip(instances) {
        api.register("shop", id, &registration(port, labels)).await;
    }

    let cases: &[(&str, &[&str], &str)] = &[
        ("", &["a", "b", "c", "d", "e", "f"], ""),
        ("env=prod", &["a", "b"], "env=prod"),
        ("env==prod", &["a", "b"], "env=prod"),
        ("env!=prod", &["c", "d", "e", "f"], "env!=prod"),
        (
            "zone in (eu-1,eu-2)",
            &["a", "b", "c"],
            "zone in (eu-1,eu-2)",
        ),
        ("zone in (eu-2)", &["b"], "zone in (eu-2)"),
        (
            "zone notin (eu-1)",
            &["b", "d", "e", "f"],
            "zone notin (eu-1)",
        ),
        (
            "zone notin (eu-1, us-1)",
            &["b", "d", "e"],
            "zone notin (eu-1,us-1)",
        ),
        ("canary", &["a"], "canary"),
        ("!canary", &["b", "c", "d", "e", "f"], "!canary"),
        ("zone", &["a", "b", "c", "f"], "zone"),
        ("!zone", &["d", "e"], "!zone"),
        ("env=prod,zone=eu-1", &["a"], "env=prod,zone=eu-1"),
        (
            "env in (dev, staging), !canary",
            &["c", "d"],
            "env in (dev,staging),!canary",
        ),
        ("malla.dev/tier=gold", &["f"], "malla.dev/tier=gold"),
        ("env=nope", &[], "env=nope"),
    ];
    for (selector, want, canonical) in cases {
        let reply = api.list("shop", selector, "").await;
        let answer = reply.clone().ok();
        assert_eq!(ids(&answer), *want, "selector {selector:?}: {reply}");
        assert_eq!(answer["selector"], *canonical, "selector {selector:?}");
    }

    // `serving=true` keeps instances that are not unhealthy: here all (no check).
    let serving = api.list("shop", "env=prod", "serving=true").await.ok();
    assert_eq!(ids(&serving), ["a", "b"]);
    let all = api.list("shop", "", "serving=false").await.ok();
    assert_eq!(ids(&all).len(), 6);
}

/// A watcher of the registry learns of every registration and deregistration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_changes() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let (view, mut changes) = control.registry().subscribe();
    assert_eq!(view.instance_count(), 0);
    api.register("orders", "o-1", &registration(8081, &[]))
        .await;
    api.deregister("orders", "o-1").await;
    let added = within("a registry change", changes.recv()).await.unwrap();
    assert_eq!(added.service.as_str(), "orders");
    assert!(added.before.is_none());
    assert_eq!(added.after.as_ref().map(|i| i.id.as_str()), Some("o-1"));
    let removed = within("a registry change", changes.recv()).await.unwrap();
    assert!(removed.after.is_none());
    assert!(removed.revision > added.revision);
}

/// Deleting a service removes its instances in one write: one revision whose events a
/// watcher receives together, the answer says how many went, and the instances' leases
/// are revoked (their heartbeats fail, so their agents learn the registration is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_service_with_10000_instances_is_one_write() {
    use malla_control::store::{Store, Txn, TxnOp};
    const INSTANCES: usize = 10_000;
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let leases = register_two(&api).await;
    // The rest written straight into the store, in one transaction: fast to set up.
    let store = control.registry().store().clone();
    let ops = (2..INSTANCES)
        .map(|i| TxnOp::Put {
            key: format!("/malla/instances/big/i-{i:05}"),
            value: json!({"id": format!("i-{i:05}"), "service": "big",
                          "address": "127.0.0.1", "port": 8080})
            .to_string()
            .into_bytes(),
            lease: None,
        })
        .collect();
    store
        .txn(Txn {
            compare: vec![],
            ops,
        })
        .await
        .unwrap();
    api.register("small", "s-1", &registration(9000, &[])).await;
    let mut listed = None;
    malla_tests::assert_eventually!(
        {
            listed = Some(api.instances("big", "").await.len());
            listed == Some(INSTANCES)
        },
        "listed {listed:?}"
    );
    let before = store.revision();
    let mut watch = store.watch("/malla/", before).unwrap();

    let deleted = api.delete("/v1/services/big").await.ok();
    assert_eq!(deleted["instances_removed"], INSTANCES, "{deleted}");
    let rev = revision(&deleted);
    assert_eq!(rev, before + 1, "one revision: {deleted}");
    let item = within("the deletion's events", watch.events.recv())
        .await
        .expect("the watch ended")
        .expect("the watch failed");
    assert_eq!(
        item.len(),
        INSTANCES + 1,
        "every removal, and the service key"
    );
    assert!(item.iter().all(|e| e.kv.mod_revision == rev));

    api.get("/v1/services/big").await.error(404, "not_found");
    assert_eq!(api.instance_ids("small", "").await, ["s-1"]);
    for lease in leases {
        api.keepalive(lease).await.error(404, "lease_not_found");
    }
    api.delete("/v1/services/big").await.error(404, "not_found");
}

/// Two instances of `big` registered over the API, with leases; their lease ids.
async fn register_two(api: &malla_tests::control::api::Api) -> Vec<u64> {
    let mut leases = Vec::new();
    for id in ["i-00000", "i-00001"] {
        let registered = api.register("big", id, &registration(8080, &[])).await;
        leases.push(registered["lease"].as_u64().unwrap());
    }
    leases
}

/// An address no one can connect to as one instance (unspecified, multicast, broadcast) is
/// refused by both APIs, with a message that says what to register instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_addresses_are_refused_by_both_apis() {
    use malla_api::{pb, RegistryClient};
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let mut grpc = RegistryClient::new(control.operator_channel_to(control.grpc_addr()).await);
    for (address, says) in [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::fb", "multicast"),
        ("255.255.255.255", "broadcast"),
    ] {
        let reply = api
            .put(
                "/v1/services/app/instances/a",
                &json!({"address": address, "port": 8080}),
            )
            .await;
        let message = reply.error(400, "invalid_argument");
        assert!(
            message.contains(says) && message.contains("register the address"),
            "{address}: {message}"
        );
        let status = grpc
            .register(pb::RegisterRequest {
                mtls: false,
                service: "app".into(),
                id: "a".into(),
                address: address.into(),
                port: 8080,
                protocol: pb::Protocol::Http.into(),
                labels: Default::default(),
                ttl_seconds: 30,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{address}");
        assert!(status.message().contains(says), "{address}: {status:?}");
    }
    api.get("/v1/services/app").await.error(404, "not_found");
    // An IPv6 unicast endpoint is fine.
    api.register("app", "v6", &json!({"address": "fd00::5", "port": 8080}))
        .await;
}

/// A static endpoint (something outside the mesh, with no agent to send heartbeats) has no
/// lease: no TTL, nothing to renew, it stays until deregistered. A TTL with it is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_endpoints_have_no_lease_and_stay_until_deregistered() {
    let mut control = TestControl::start_without_dns().await;
    let api = control.api();
    let body = json!({"address": "192.0.2.10", "port": 5432, "static": true});
    let registered = api.register("legacy-db", "primary", &body).await;
    assert_eq!(registered["static"], true, "{registered}");
    assert_eq!(registered["lease"], 0, "{registered}");
    assert_eq!(registered["ttl_seconds"], 0, "{registered}");
    let listed = api.instances("legacy-db", "").await;
    assert_eq!(listed[0]["lease"], serde_json::Value::Null, "{listed:?}");

    let both = json!({"address": "192.0.2.10", "port": 5432, "static": true, "ttl_seconds": 30});
    let message = api
        .put("/v1/services/legacy-db/instances/other", &both)
        .await
        .error(400, "invalid_argument")
        .to_string();
    assert!(
        message.contains("ttl_seconds cannot go with static"),
        "{message}"
    );

    // Nothing to expire, across a restart too.
    control.restart().await;
    let api = control.api();
    assert_eq!(api.instance_ids("legacy-db", "").await, ["primary"]);
    api.deregister("legacy-db", "primary").await;
    assert!(api.instance_ids("legacy-db", "").await.is_empty());
}

/// Services and instances carry UTF-8 annotations (bounded, with clear errors), and a name
/// people use instead of a service name gets a suggested one in its error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_and_names_people_use() {
    use malla_tests::control::api::encode;
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let spec = json!({"annotations": {"display-name": "Cotización de Envío",
                                      "owner": "équipe-prix",
                                      "example.com/runbook": "https://wiki.example/envío"}});
    api.put_service("cotizacion-de-envio", &spec).await;
    let mut body = registration(8080, &[]);
    body["annotations"] = json!({"display-name": "Réplica de São Paulo"});
    api.register("cotizacion-de-envio", "sp-1", &body).await;

    let services = api.get("/v1/services").await.ok();
    assert_eq!(
        services["services"][0]["annotations"]["display-name"], "Cotización de Envío",
        "{services}"
    );
    let listed = api.instances("cotizacion-de-envio", "").await;
    assert_eq!(
        listed[0]["annotations"]["display-name"],
        "Réplica de São Paulo"
    );
    let described = api.get("/v1/services/cotizacion-de-envio").await.ok();
    assert_eq!(
        described["spec"]["annotations"]["owner"], "équipe-prix",
        "{described}"
    );

    let path = format!("/v1/services/{}", encode("Cotización de Envío"));
    let message = api
        .put(&path, &json!({}))
        .await
        .error(400, "invalid_argument")
        .to_string();
    assert!(
        message.contains("invalid service name \"Cotización de Envío\"")
            && message.contains("try \"cotizacion-de-envio\""),
        "{message}"
    );

    let too_long = json!({"annotations": {"notes": "é".repeat(600)}});
    let message = api
        .put("/v1/services/cotizacion-de-envio", &too_long)
        .await
        .error(400, "invalid_argument")
        .to_string();
    assert!(message.contains("at most 1024"), "{message}");
    let many: serde_json::Map<String, serde_json::Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    let mut body = registration(8080, &[]);
    body["annotations"] = json!(many);
    let message = api
        .put("/v1/services/cotizacion-de-envio/instances/x", &body)
        .await
        .error(400, "invalid_argument")
        .to_string();
    assert!(message.contains("33 annotations; at most 32"), "{message}");
    let mut body = registration(8080, &[]);
    body["annotations"] = json!({"Display Name": "x"});
    let message = api
        .put("/v1/services/cotizacion-de-envio/instances/x", &body)
        .await
        .error(400, "invalid_argument")
        .to_string();
    assert!(
        message.contains("invalid annotation key \"Display Name\""),
        "{message}"
    );
}

/// `GET /v1/services/{s}` answers what `malla describe service` shows: the spec, each
/// instance with when, by whom (API and peer) and under which lease it was registered
/// (with the time left), the policy, and the service's latest events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_data_for_a_service() {
    use malla_api::{pb, RegistryClient};
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let mut body = registration(8080, &[("env", "prod")]);
    body["ttl_seconds"] = json!(120);
    let registered = api.register("orders", "o-1", &body).await;
    RegistryClient::new(control.operator_channel_to(control.grpc_addr()).await)
        .register(pb::RegisterRequest {
            mtls: false,
            service: "orders".into(),
            id: "o-2".into(),
            address: "fd00::5".into(),
            port: 8080,
            protocol: pb::Protocol::Http.into(),
            labels: Default::default(),
            ttl_seconds: 30,
        })
        .await
        .unwrap();

    let d = api.get("/v1/services/orders").await.ok();
    assert_eq!(d["name"], "orders", "{d}");
    assert!(d["revision"].as_u64().is_some(), "{d}");
    assert_eq!(d["spec"]["health_check"], serde_json::Value::Null, "{d}");
    assert_eq!(d["policy"], serde_json::Value::Null, "{d}");
    assert!(d["events"].as_array().is_some(), "{d}");
    let one = &d["instances"][0];
    assert_eq!(one["id"], "o-1");
    assert_eq!(one["labels"]["env"], "prod");
    assert_eq!(one["lease"]["id"], registered["lease"], "{one}");
    assert_eq!(one["lease"]["ttl_seconds"], 120, "{one}");
    let left = one["lease"]["remaining_seconds"].as_f64().unwrap();
    assert!(left > 0.0 && left <= 120.0, "{one}");
    let by = one["registered_by"].as_str().unwrap();
    assert!(by.starts_with("http 127.0.0.1:"), "{by}");
    let at = one["registered_at"].as_str().unwrap();
    assert!(
        at.len() == 20 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "RFC 3339 UTC: {at}"
    );
    let two = &d["instances"][1];
    assert_eq!(two["address"], "fd00::5");
    let by = two["registered_by"].as_str().unwrap();
    assert!(by.starts_with("grpc 127.0.0.1:"), "{by}");

    api.put(
        "/v1/policies/orders",
        &json!({"timeouts": {"request": "2s"}}),
    )
    .await
    .ok();
    let d = api.get("/v1/services/orders").await.ok();
    assert_eq!(d["policy"]["service"], "orders", "{d}");
    assert!(d["policy"]["version"].as_u64().is_some(), "{d}");
}
