//! Authorization policies as resources, through the HTTP API: put, get, list, delete;
//! every problem of an invalid policy named by its field, nothing written; versions that
//! only grow, an identical write that writes nothing; all of it across a restart.

use http::Method;
use malla_tests::control::TestControl;
use serde_json::json;

const PAYMENTS: &str = "/v1/authorizations/payments";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_list_delete() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();

    let empty = api.get("/v1/authorizations").await.ok();
    assert_eq!(empty["authorizations"], json!([]));
    let missing = api.get(PAYMENTS).await;
    assert!(
        missing
            .error(404, "not_found")
            .contains("no authorization policy for service payments"),
        "{missing}"
    );

    // The service may be left out: the path names it.
    let body = json!({
        "default": "deny",
        "rule": [
            {"action": "allow", "from": ["checkout"], "methods": ["POST"],
             "paths": ["/v1/charges", "/v1/refunds/*"]},
            {"action": "deny", "grpc": ["payments.v1.Admin/*"]}
        ]
    });
    let created = api.put(PAYMENTS, &body).await.ok();
    assert_eq!(created["service"], "payments");
    assert_eq!(created["created"], true);
    assert_eq!(created["unchanged"], false);
    let v1 = created["version"].as_u64().unwrap();

    let got = api.get(PAYMENTS).await.ok();
    assert_eq!(got["service"], "payments");
    assert_eq!(got["version"], v1);
    let policy = &got["authorization"];
    assert_eq!(policy["service"], "payments");
    assert_eq!(policy["default"], "deny");
    assert_eq!(policy["mode"], "enforce", "the default spelled out");
    assert_eq!(policy["rule"][0]["from"], json!(["checkout"]));
    assert_eq!(policy["rule"][1]["action"], "deny");

    // In-process, the view has it, ready for the sidecars' watch.
    let stored = control
        .authorizations()
        .get(&malla_core::ServiceName::new("payments").unwrap())
        .unwrap();
    assert_eq!(stored.version, v1);
    assert_eq!(stored.policy.rules.len(), 2);

    // A second service; the list is sorted by service.
    api.put(
        "/v1/authorizations/billing",
        &json!({"service": "billing", "mode": "audit"}),
    )
    .await
    .ok();
    let list = api.get("/v1/authorizations").await.ok();
    let services: Vec<&str> = list["authorizations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["billing", "payments"]);
    assert!(list["revision"].as_u64().unwrap() > v1);
    assert_eq!(list["authorizations"][1], got);

    // `describe service` reads it with the service.
    api.register(
        "payments",
        "p-1",
        &json!({"address": "127.0.0.1", "port": 8080}),
    )
    .await;
    let service = api.get("/v1/services/payments").await.ok();
    assert_eq!(service["authorization"], got);

    // Delete: gone, then not found.
    let deleted = api.delete(PAYMENTS).await.ok();
    assert_eq!(deleted["service"], "payments");
    assert!(deleted["revision"].as_u64().unwrap() > v1);
    api.get(PAYMENTS).await.error(404, "not_found");
    api.delete(PAYMENTS).await.error(404, "not_found");
    let service = api.get("/v1/services/payments").await.ok();
    assert_eq!(service["authorization"], json!(null));
    assert_eq!(
        api.get("/v1/authorizations").await.ok()["authorizations"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_grow_and_an_identical_put_writes_nothing() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let body = json!({"service": "payments", "rule": [{"action": "deny", "ports": [9000]}]});
    let v1 = api.put(PAYMENTS, &body).await.ok()["version"]
        .as_u64()
        .unwrap();

    // The same again (with or without its service, defaults written or not): unchanged.
    for same in [
        body.clone(),
        json!({"rule": [{"action": "deny", "ports": [9000]}]}),
        json!({"default": "allow", "mode": "enforce", "rule": [{"action": "deny", "ports": [9000]}]}),
    ] {
        let again = api.put(PAYMENTS, &same).await.ok();
        assert_eq!(again["unchanged"], true, "{same}: {again}");
        assert_eq!(again["created"], false);
        assert_eq!(again["version"], v1);
    }
    let status = api.get("/v1/status").await.ok();

    // Changed: a higher version, not created.
    let changed = api.put(PAYMENTS, &json!({"default": "deny"})).await.ok();
    assert_eq!(changed["created"], false);
    assert_eq!(changed["unchanged"], false);
    let v2 = changed["version"].as_u64().unwrap();
    assert!(v2 > v1, "{v2} > {v1}");
    assert!(v2 > status["revision"].as_u64().unwrap());
    assert_eq!(
        api.get(PAYMENTS).await.ok()["authorization"]["rule"],
        json!(null)
    );

    // Deleted and created again: created, a version higher still.
    api.delete(PAYMENTS).await.ok();
    let again = api.put(PAYMENTS, &body).await.ok();
    assert_eq!(again["created"], true);
    assert!(again["version"].as_u64().unwrap() > v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_refused_with_every_field_and_writes_nothing() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let good = json!({"default": "deny", "rule": [{"action": "allow", "from": ["checkout"]}]});
    let version = api.put(PAYMENTS, &good).await.ok()["version"].clone();

    let bad = json!({
        "rule": [
            {"action": "allow", "from": ["Check Out", "*"], "paths": ["v1", "/ok"]},
            {"action": "deny", "ports": [0], "methods": []},
            {"action": "allow", "grpc": ["payments.v1.Payments"]}
        ]
    });
    let reply = api.put(PAYMENTS, &bad).await;
    let message = reply.error(400, "invalid_argument");
    assert!(
        message.starts_with("invalid authorization policy for payments: "),
        "{message}"
    );
    let fields: Vec<&str> = reply.json["error"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "rule[0].from[0]",
            "rule[0].paths[0]",
            "rule[1].methods",
            "rule[1].ports[0]",
            "rule[2].grpc[0]"
        ],
        "{reply}"
    );
    for f in reply.json["error"]["fields"].as_array().unwrap() {
        assert!(!f["message"].as_str().unwrap().is_empty(), "{f}");
    }

    // Types, unknown fields, syntax, the service: each refused with its field.
    for (body, field, says) in [
        (
            r#"{"rule": [{"action": "allow", "ports": ["80"]}]}"#,
            "rule[0].ports[0]",
            "expected u16",
        ),
        (
            r#"{"rule": [{"action": "allow", "method": ["GET"]}]}"#,
            "rule[0]",
            "unknown field `method`",
        ),
        // Not ASCII, '*' not at the end: checked by character, not by byte.
        (
            r#"{"rule": [{"action": "allow", "paths": ["/caf*é"]}]}"#,
            "rule[0].paths[0]",
            "'*' may only end a path",
        ),
        (r#"{"default": "maybe"}"#, "default", "unknown variant"),
        (
            r#"{"rule": [{"from": ["a"]}]}"#,
            "rule[0]",
            "missing field `action`",
        ),
        (
            r#"{"service": "billing"}"#,
            "service",
            "does not match the service in the path",
        ),
        (r#"{"default": "deny""#, "", "invalid JSON"),
        ("[1]", "", "expected an object"),
    ] {
        let reply = api.request(Method::PUT, PAYMENTS, body.to_string()).await;
        let message = reply.error(400, "invalid_argument").to_string();
        assert!(message.contains(says), "{body}: {message}");
        let first = &reply.json["error"]["fields"][0];
        assert!(
            first["field"].as_str().unwrap().starts_with(field),
            "{body}: {reply}"
        );
    }
    // No body; a bad name in the path.
    let reply = api.request(Method::PUT, PAYMENTS, "").await;
    assert!(reply.error(400, "invalid_argument").contains("JSON body"));
    api.put("/v1/authorizations/Pay%20Ments", &good)
        .await
        .error(400, "invalid_argument");
    api.get("/v1/authorizations/Pay%20Ments")
        .await
        .error(400, "invalid_argument");
    // A method the routes do not take.
    api.request(Method::POST, "/v1/authorizations", "{}")
        .await
        .error(405, "method_not_allowed");

    // The version in force stayed.
    let got = api.get(PAYMENTS).await.ok();
    assert_eq!(got["version"], version);
    assert_eq!(got["authorization"]["rule"][0]["from"], json!(["checkout"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorizations_survive_a_restart() {
    let mut control = TestControl::start_without_dns().await;
    let api = control.api();
    api.put(
        PAYMENTS,
        &json!({"default": "deny", "mode": "audit",
                "rule": [{"action": "allow", "from": ["spiffe://other.example/svc/x", "checkout"]}]}),
    )
    .await
    .ok();
    api.put("/v1/authorizations/billing", &json!({})).await.ok();
    let before = api.get("/v1/authorizations").await.ok();

    control.restart().await;
    let api = control.api();

    let after = api.get("/v1/authorizations").await.ok();
    assert_eq!(after["authorizations"], before["authorizations"]);
    let version = after["authorizations"][1]["version"].as_u64().unwrap();
    // The same policy again: unchanged at its version; a change: a higher one.
    let same = api
        .put(
            PAYMENTS,
            &before["authorizations"][1]["authorization"].clone(),
        )
        .await
        .ok();
    assert_eq!(same["unchanged"], true, "{same}");
    assert_eq!(same["version"], version);
    let changed = api.put(PAYMENTS, &json!({})).await.ok();
    assert!(changed["version"].as_u64().unwrap() > before["revision"].as_u64().unwrap());
    // A delete after the restart is seen by the view.
    api.delete("/v1/authorizations/billing").await.ok();
    assert_eq!(
        api.get("/v1/authorizations").await.ok()["authorizations"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
