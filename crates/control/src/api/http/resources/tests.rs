//! The routes of resilience policies over a real socket, against a real control plane
//! (those of authorization policies: `tests/tests/it/control/authorizations.rs`).

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::{
    api::grpc::tests::{control, TempDir},
    server::Control,
};

/// One request on a new connection, with the operator token: the status and the JSON body.
pub(in crate::api::http) async fn call(
    control: &Control,
    method: Method,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let stream = tokio::net::TcpStream::connect(control.http_addr)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "control")
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", operator_token(control)),
        )
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The operator token in force, from its file.
fn operator_token(control: &Control) -> String {
    std::fs::read_to_string(control.operator.path())
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_list_delete() {
    let dir = TempDir::new("http-policies");
    let control = control(&dir).await;
    let put = |body: Value| {
        let control = &control;
        async move {
            call(
                control,
                Method::PUT,
                "/v1/policies/shipping-quote",
                &body.to_string(),
            )
            .await
        }
    };

    let (status, created) = put(json!({"retries": {"max_attempts": 2}})).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["service"], "shipping-quote");
    assert_eq!(created["created"], true);
    assert_eq!(created["unchanged"], false);
    let v1 = created["version"].as_u64().unwrap();

    let (status, got) = call(&control, Method::GET, "/v1/policies/shipping-quote", "").await;
    assert_eq!(status, 200);
    assert_eq!(got["version"], v1);
    assert_eq!(got["policy"]["service"], "shipping-quote");
    assert_eq!(got["policy"]["retries"]["max_attempts"], 2);
    assert_eq!(
        got["policy"]["outlier"]["consecutive_failures"], 5,
        "defaults are spelled out"
    );

    // Changed: a new, higher version. The same again: unchanged, same version.
    let body = json!({"service": "shipping-quote", "retries": {"max_attempts": 3}});
    let (_, configured) = put(body.clone()).await;
    assert_eq!(configured["created"], false);
    assert_eq!(configured["unchanged"], false);
    let v2 = configured["version"].as_u64().unwrap();
    assert!(v2 > v1, "{v2} > {v1}");
    let (_, same) = put(body).await;
    assert_eq!(same["unchanged"], true);
    assert_eq!(same["version"], v2);

    call(&control, Method::PUT, "/v1/policies/billing", "{}").await;
    let (status, list) = call(&control, Method::GET, "/v1/policies", "").await;
    assert_eq!(status, 200);
    let services: Vec<&str> = list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["billing", "shipping-quote"]);
    assert_eq!(list["policies"][1]["version"], v2);

    let (status, deleted) = call(&control, Method::DELETE, "/v1/policies/shipping-quote", "").await;
    assert_eq!(status, 200);
    assert!(deleted["revision"].as_u64().unwrap() > v2);
    for method in [Method::GET, Method::DELETE] {
        let (status, missing) = call(&control, method, "/v1/policies/shipping-quote", "").await;
        assert_eq!(status, 404);
        assert_eq!(missing["error"]["code"], "not_found");
        assert_eq!(
            missing["error"]["message"],
            "no policy for service shipping-quote"
        );
    }
    // Created again: a new version above every earlier one.
    let (_, again) = put(json!({})).await;
    assert_eq!(again["created"], true);
    assert!(again["version"].as_u64().unwrap() > v2);
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policies_are_refused_naming_the_field_and_nothing_changes() {
    let dir = TempDir::new("http-policies-invalid");
    let control = control(&dir).await;
    let path = "/v1/policies/shipping-quote";
    let (_, kept) = call(
        &control,
        Method::PUT,
        path,
        r#"{"retries": {"max_attempts": 2}}"#,
    )
    .await;
    let version = kept["version"].clone();

    for (body, field, says) in [
        (
            r#"{"retries": {"max_attempts": 0}}"#,
            "retries.max_attempts",
            "0 is not between 1 and 10",
        ),
        (
            r#"{"retries": {"max_attemps": 2}}"#,
            "retries.max_attemps",
            "unknown field `max_attemps`",
        ),
        (
            r#"{"outlier": {"max_ejection_percent": 120}}"#,
            "outlier.max_ejection_percent",
            "not a percentage",
        ),
        (
            r#"{"service": "billing"}"#,
            "service",
            "does not match the service in the path",
        ),
        (r#"{"retries": "#, "retries", "EOF"),
    ] {
        let (status, error) = call(&control, Method::PUT, path, body).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["code"], "invalid_argument", "{body}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("invalid policy for shipping-quote: ") && message.contains(says),
            "{body}: {message}"
        );
        assert_eq!(
            error["error"]["fields"][0]["field"], field,
            "{body}: {error}"
        );
    }
    // Several problems at once: all of them.
    let (_, error) = call(
        &control,
        Method::PUT,
        path,
        r#"{"retries": {"max_attempts": 0, "backoff_base": "1s", "backoff_max": "10ms"}}"#,
    )
    .await;
    assert_eq!(
        error["error"]["fields"].as_array().unwrap().len(),
        2,
        "{error}"
    );

    let (status, error) = call(&control, Method::PUT, path, "").await;
    assert_eq!(status, 400);
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("needs a JSON body"));
    let (status, _) = call(&control, Method::PUT, "/v1/policies/Bad_Name", "{}").await;
    assert_eq!(status, 400);

    // The previous version is still in force.
    let (_, got) = call(&control, Method::GET, path, "").await;
    assert_eq!(got["version"], version);
    assert_eq!(got["policy"]["retries"]["max_attempts"], 2);
    control.stop().await;
}
