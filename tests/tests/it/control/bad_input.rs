//! Bad input on every API: a precise 4xx in the JSON error shape
//! (`{"error": {"code", "message"}}`), a message that names the bad value, no panic, and a
//! control plane that keeps serving afterwards.
//!
//! Every case runs even when an earlier one fails; the test then lists all that did.

use http::Method;
use malla_core::Selector;
use malla_tests::control::{api::encode, TestControl};
use serde_json::json;

/// One request and what it must get: status, error code, and text the message contains.
struct Case {
    method: Method,
    path: String,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    contains: Vec<String>,
}

fn case(
    method: Method,
    path: &str,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        method,
        path: path.to_string(),
        body: body.into(),
        status,
        code,
        contains: Vec::new(),
    }
}

impl Case {
    fn says(mut self, text: &str) -> Case {
        self.contains.push(text.to_string());
        self
    }
}

const INSTANCE: &str = "/v1/services/orders/instances/o-1";

fn register(body: serde_json::Value) -> Case {
    case(
        Method::PUT,
        INSTANCE,
        body.to_string(),
        400,
        "invalid_argument",
    )
}

fn spec(check: serde_json::Value) -> Case {
    case(
        Method::PUT,
        "/v1/services/orders",
        json!({ "health_check": check }).to_string(),
        400,
        "invalid_argument",
    )
}

fn cases() -> Vec<Case> {
    use Method as M;
    let ok = |port: u64| json!({"address": "127.0.0.1", "port": port});
    let mut cases = vec![
        // Bodies.
        case(M::PUT, INSTANCE, "{\"address\": ", 400, "invalid_argument").says("invalid JSON body"),
        case(M::PUT, INSTANCE, "not json", 400, "invalid_argument").says("invalid JSON body"),
        case(M::PUT, INSTANCE, "", 400, "invalid_argument").says("needs a JSON body"),
        case(M::PUT, INSTANCE, "[1,2]", 400, "invalid_argument").says("invalid JSON body"),
        case(M::PUT, "/v1/services/orders", "{", 400, "invalid_argument").says("invalid JSON body"),
        register(json!({"address": "127.0.0.1", "port": 1, "colour": "red"}))
            .says("unknown field `colour`"),
        register(json!({"port": 8080})).says("missing field `address`"),
        register(json!({"address": "localhost", "port": 8080})).says("invalid IP address"),
        register(json!({"address": "127.0.0.1", "port": "8080"})).says("invalid type"),
        register(json!({"address": "127.0.0.1", "port": 8080, "protocol": "smtp"})).says("smtp"),
        case(
            M::PUT,
            "/v1/services/orders",
            r#"{"healthcheck": {}}"#,
            400,
            "invalid_argument",
        )
        .says("unknown field `healthcheck`"),
        // Ports and TTLs.
        register(ok(0)).says("port must be from 1 to 65535"),
        register(ok(65536)).says("invalid value"),
        register(json!({"address": "127.0.0.1", "port": -1})).says("invalid value"),
        register(json!({"address": "127.0.0.1", "port": 80, "ttl_seconds": 0}))
            .says("ttl_seconds must be from 1 to 3600"),
        register(json!({"address": "127.0.0.1", "port": 80, "ttl_seconds": 3601}))
            .says("ttl_seconds must be from 1 to 3600"),
        register(json!({"address": "127.0.0.1", "port": 80, "ttl_seconds": -5}))
            .says("invalid value"),
        register(json!({"address": "127.0.0.1", "port": 80, "ttl_seconds": 1.5}))
            .says("invalid type"),
        // Labels: keys and values.
        register(json!({"address": "127.0.0.1", "port": 80, "labels": {"-env": "prod"}}))
            .says("invalid label key \"-env\""),
        register(json!({"address": "127.0.0.1", "port": 80, "labels": {"Bad_Prefix/x": "y"}}))
            .says("invalid label key"),
        register(json!({"address": "127.0.0.1", "port": 80, "labels": {"k".repeat(64): "y"}}))
            .says("invalid label key"),
        register(json!({"address": "127.0.0.1", "port": 80, "labels": {"": "y"}}))
            .says("invalid label key"),
        register(json!({"address": "127.0.0.1", "port": 80, "labels": {"env": "no way"}}))
            .says("invalid value \"no way\" for label \"env\""),
        register(json!({"address": "127.0.0.1", "port": 80, "labels": {"env": "-prod"}}))
            .says("invalid value"),
        register(json!({"address": "127.0.0.1", "port": 80, "labels": {"env": 1}}))
            .says("invalid type"),
        // Health checks.
        spec(json!({"kind": "icmp"})).says("icmp"),
        spec(json!({"kind": "http"})).says("missing field `path`"),
        spec(json!({"kind": "http", "path": "healthz"})).says("health_check.path"),
        spec(json!({"kind": "http", "path": "/a b"})).says("health_check.path"),
        spec(json!({"kind": "http", "path": "/", "expect_status": 99})).says("expect_status"),
        spec(json!({"kind": "tcp", "interval": 0.01})).says("health_check.interval"),
        spec(json!({"kind": "tcp", "interval": -1})).says("invalid duration"),
        spec(json!({"kind": "tcp", "timeout": 0})).says("health_check.timeout"),
        spec(json!({"kind": "tcp", "unhealthy_threshold": 0})).says("thresholds"),
        spec(json!({"kind": "tcp", "colour": 1})).says("colour"),
        // Lease ids.
        case(
            M::PUT,
            "/v1/leases/abc/keepalive",
            "",
            400,
            "invalid_argument",
        )
        .says("lease id \"abc\" must be a number"),
        case(
            M::PUT,
            "/v1/leases/-1/keepalive",
            "",
            400,
            "invalid_argument",
        )
        .says("must be a number"),
        case(
            M::PUT,
            "/v1/leases/1.5/keepalive",
            "",
            400,
            "invalid_argument",
        )
        .says("must be a number"),
        case(
            M::PUT,
            "/v1/leases/99999999999999999999999/keepalive",
            "",
            400,
            "invalid_argument",
        )
        .says("must be a number"),
        case(
            M::PUT,
            "/v1/leases/987654321/keepalive",
            "",
            404,
            "lease_not_found",
        )
        .says("987654321"),
        // Unknown things.
        case(M::GET, "/v1/services/nope", "", 404, "not_found").says("service nope not found"),
        case(M::GET, "/v1/services/nope/instances", "", 404, "not_found").says("nope"),
        case(M::DELETE, "/v1/services/nope", "", 404, "not_found").says("nope"),
        case(
            M::DELETE,
            "/v1/services/nope/instances/x",
            "",
            404,
            "not_found",
        )
        .says("instance x"),
        // Routes and methods.
        case(M::GET, "/", "", 404, "not_found").says("no such route"),
        case(M::GET, "/v2/services", "", 404, "not_found").says("no such route"),
        case(
            M::GET,
            "/v1/services/orders/instances/o-1/extra",
            "",
            404,
            "not_found",
        ),
        case(M::GET, "/v1/leases/1", "", 404, "not_found"),
        // A 405 lists the methods the route takes.
        case(M::POST, "/v1/services", "{}", 405, "method_not_allowed").says("it takes GET,HEAD"),
        case(
            M::POST,
            "/v1/services/orders",
            "{}",
            405,
            "method_not_allowed",
        )
        .says("it takes GET,HEAD,PUT,DELETE"),
        case(M::PATCH, INSTANCE, "{}", 405, "method_not_allowed").says("it takes PUT,DELETE"),
        case(M::GET, INSTANCE, "", 405, "method_not_allowed").says("it takes PUT,DELETE"),
        case(
            M::GET,
            "/v1/leases/1/keepalive",
            "",
            405,
            "method_not_allowed",
        )
        .says("it takes PUT"),
        case(M::DELETE, "/v1/status", "", 405, "method_not_allowed").says("it takes GET,HEAD"),
        // Query strings.
        case(
            M::GET,
            "/v1/services/orders/instances?colour=red",
            "",
            400,
            "invalid_argument",
        )
        .says("colour"),
        case(
            M::GET,
            "/v1/services/orders/instances?serving=maybe",
            "",
            400,
            "invalid_argument",
        )
        .says("serving"),
        // A body over 64 KiB, valid JSON or not.
        case(
            M::PUT,
            INSTANCE,
            big_registration(),
            413,
            "payload_too_large",
        ),
        case(
            M::PUT,
            "/v1/services/orders",
            vec![b' '; 64 * 1024 + 1],
            413,
            "payload_too_large",
        ),
        // Bytes that are not UTF-8 in a path segment.
        case(M::GET, "/v1/services/%FF", "", 400, "invalid_argument"),
        case(
            M::PUT,
            "/v1/services/orders/instances/%C3%28",
            ok(80).to_string(),
            400,
            "invalid_argument",
        ),
    ];
    // Service names, on every route that takes one.
    for name in [
        "Orders",
        "1abc",
        "a_b",
        "a-",
        "a.b",
        &"a".repeat(64),
        "%20",
        "sh%C3%B6p",
    ] {
        let shown = percent_decoded(name);
        for (method, path, body) in [
            (M::GET, format!("/v1/services/{name}"), String::new()),
            (M::PUT, format!("/v1/services/{name}"), "{}".to_string()),
            (M::DELETE, format!("/v1/services/{name}"), String::new()),
            (
                M::GET,
                format!("/v1/services/{name}/instances"),
                String::new(),
            ),
            (
                M::PUT,
                format!("/v1/services/{name}/instances/i-1"),
                ok(80).to_string(),
            ),
            (
                M::DELETE,
                format!("/v1/services/{name}/instances/i-1"),
                String::new(),
            ),
        ] {
            cases.push(
                case(method, &path, body, 400, "invalid_argument")
                    .says(&format!("invalid service name {shown:?}")),
            );
        }
    }
    // Instance ids.
    for id in [
        "a%2Fb",
        "a%20b",
        "%C3%A9t%C3%A9",
        &"i".repeat(129),
        "a%3Fb",
        "%2E%2E%2F",
    ] {
        let shown = percent_decoded(id);
        cases.push(
            case(
                Method::PUT,
                &format!("/v1/services/orders/instances/{id}"),
                ok(80).to_string(),
                400,
                "invalid_argument",
            )
            .says(&format!("invalid instance id {shown:?}")),
        );
    }
    // Selectors: the message is the parser's, with the position.
    for selector in [
        "=prod",
        "env in (a",
        "env in a",
        "env in (a b)",
        "!",
        "env=prod,",
        ",env",
        "env=prod zone=a",
        "env=a b",
        "env=(x)",
        "-bad=x",
        "env>1",
        "env=caf\u{e9}",
    ] {
        let expected = Selector::parse(selector)
            .err()
            .unwrap_or_else(|| panic!("{selector:?} parses: fix the test"))
            .to_string();
        assert!(expected.contains("at position"), "{expected}");
        cases.push(
            case(
                Method::GET,
                &format!(
                    "/v1/services/orders/instances?selector={}",
                    encode(selector)
                ),
                "",
                400,
                "invalid_argument",
            )
            .says(&expected),
        );
    }
    cases
}

/// A valid registration made larger than 64 KiB by many labels.
fn big_registration() -> Vec<u8> {
    let labels: serde_json::Map<String, serde_json::Value> = (0..3000)
        .map(|i| (format!("label-{i:05}"), json!("value-value-value")))
        .collect();
    let body = json!({"address": "127.0.0.1", "port": 80, "labels": labels}).to_string();
    assert!(body.len() > 64 * 1024);
    body.into_bytes()
}

fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_refuses_bad_input_precisely() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    // Something to find, so that "not found" is not why a case fails.
    api.register("orders", "o-1", &super::registration(8081, &[]))
        .await;

    let mut failures = Vec::new();
    let cases = cases();
    for c in &cases {
        let reply = api.request(c.method.clone(), &c.path, c.body.clone()).await;
        let mut wrong = Vec::new();
        if reply.status != c.status {
            wrong.push(format!("status {} (want {})", reply.status, c.status));
        }
        if reply.content_type.as_deref() != Some("application/json") {
            wrong.push(format!("content-type {:?}", reply.content_type));
        }
        if reply.code() != c.code {
            wrong.push(format!("code {:?} (want {:?})", reply.code(), c.code));
        }
        if reply.message().is_empty() {
            wrong.push("no error.message".to_string());
        }
        for text in &c.contains {
            if !reply.message().contains(text.as_str()) {
                wrong.push(format!("message lacks {text:?}"));
            }
        }
        if !wrong.is_empty() {
            let body = String::from_utf8_lossy(&reply.body);
            let body: String = body.chars().take(300).collect();
            failures.push(format!(
                "{} {} -> {}: {body}",
                c.method,
                c.path.chars().take(80).collect::<String>(),
                wrong.join(", ")
            ));
        }
    }

    // Still serving, with nothing changed by the refused requests.
    assert_eq!(api.get("/live").await.status, 200);
    let status = api.get("/v1/status").await.ok();
    assert_eq!(status["instances"], 1, "{status}");
    assert_eq!(status["services"], 1, "{status}");
    let instance = &api.instances("orders", "").await[0];
    assert_eq!(instance["port"], 8081);
    api.register("orders", "o-2", &super::registration(8082, &[]))
        .await;

    assert!(
        failures.is_empty(),
        "{} of {} cases answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
