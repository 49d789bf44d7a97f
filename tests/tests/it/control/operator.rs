//! The operator token at the HTTP API: every `/v1/` route refuses a request without it or
//! with another token (401 `unauthenticated`, a challenge, a message that says what to
//! do, counted in `/metrics`), except the routes workloads and scrapers use; rotation puts
//! a new token in force at once and in the file; a restart keeps the token.

use std::os::unix::fs::PermissionsExt as _;

use http::Method;
use malla_control::operator::{FILE_NAME, TOKEN_PREFIX};
use malla_tests::control::{api::operator_token, TestControl};
use serde_json::json;

use super::registration;

#[track_caller]
fn assert_refused(reply: &malla_tests::control::api::Reply, says: &str) {
    let message = reply.error(401, "unauthenticated");
    for what in [
        says,
        "--token",
        "MALLA_TOKEN",
        "DATA_DIR/operator.token",
        "malla control",
    ] {
        assert!(message.contains(what), "{what:?} not in {message:?}");
    }
    let challenge = reply
        .headers
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "challenge {challenge:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_routes_refuse_a_missing_or_wrong_token_and_take_the_right_one() {
    let control = TestControl::start_without_dns().await;
    let token = operator_token(control.data_dir()).expect("a token in the data directory");
    assert!(token.starts_with(TOKEN_PREFIX), "{token}");
    let mode = std::fs::metadata(control.data_dir().join(FILE_NAME))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let bare = control.api_without_token();
    let wrong = bare.with_token(&format!("{TOKEN_PREFIX}{}", "0".repeat(64)));
    let right = bare.with_token(&token);
    let put = registration(8080, &[]);
    for (method, path) in [
        (Method::GET, "/v1/status"),
        (Method::GET, "/v1/services"),
        (Method::PUT, "/v1/services/orders/instances/o-1"),
        (Method::GET, "/v1/policies"),
        (Method::GET, "/v1/events"),
        (Method::GET, "/v1/proxies"),
        (Method::POST, "/v1/tokens"),
        (Method::POST, "/v1/operator-token/rotate"),
    ] {
        let body = if method == Method::PUT {
            put.to_string()
        } else {
            String::new()
        };
        let reply = bare.request(method.clone(), path, body.clone()).await;
        // A workload's certificate would do too for its own instances.
        let needs = if method == Method::PUT {
            "needs a certificate of orders"
        } else {
            "needs the operator token"
        };
        assert_refused(&reply, needs);
        let reply = wrong.request(method.clone(), path, body.clone()).await;
        assert_refused(&reply, "not the one in force");
    }
    // Another scheme, or an empty bearer, is no token.
    for header in ["Basic b3A6b3A=", "Bearer ", "bearer"] {
        let reply = raw_with_authorization(&control, header).await;
        assert_eq!(reply.0, 401, "{header:?}: {}", reply.1);
    }
    // Nothing was written by the refused calls.
    assert!(control.registry().view().services.is_empty());

    right.register("orders", "o-1", &put).await;
    assert_eq!(right.get("/v1/status").await.ok()["instances"], 1);
    // The scheme is case-insensitive (RFC 9110).
    let reply = raw_with_authorization(&control, &format!("bearer {token}")).await;
    assert_eq!(reply.0, 200, "{}", reply.1);

    let metrics = String::from_utf8(bare.get("/metrics").await.body.to_vec()).unwrap();
    for (reason, n) in [("missing", 11), ("wrong", 8)] {
        let series = format!("malla_control_api_unauthenticated_total{{reason=\"{reason}\"}} ");
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&series))
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"));
        let count: f64 = line[series.len()..].trim().parse().unwrap();
        assert_eq!(count, f64::from(n), "{line}");
    }
    assert!(
        metrics.contains(
            "malla_control_api_requests_total{api=\"http\",route=\"/v1/status\",method=\"GET\",code=\"401\"}"
        ),
        "refusals are counted under their route"
    );
}

/// `GET /v1/status` with this `Authorization` header, over a bare HTTP/1.1 connection.
async fn raw_with_authorization(control: &TestControl, value: &str) -> (u16, String) {
    use http_body_util::{BodyExt as _, Full};
    use malla_tests::control::tls;
    let config = tls::client_config(&control.trust_bundle_path(), None, b"http/1.1").unwrap();
    let stream = tls::connect(control.http_addr(), config).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/v1/status")
        .header(http::header::HOST, "control")
        .header(http::header::AUTHORIZATION, value)
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_and_probe_routes_need_no_token() {
    let control = TestControl::start_without_dns().await;
    let bare = control.api_without_token();
    for path in ["/live", "/ready", "/metrics", "/v1/identity"] {
        let reply = bare.get(path).await;
        assert_eq!(reply.status, 200, "{path}: {reply}");
    }
    assert!(bare.get("/v1/identity").await.ok()["trust_bundle_pem"].is_string());
    // A workload's own credential decides at POST /v1/certificates: an unknown join token
    // is refused by the CA, not for want of the operator token.
    let reply = bare
        .request(
            Method::POST,
            "/v1/certificates",
            json!({"service": "checkout", "csr": "not a CSR", "join_token": "malla_join_00"})
                .to_string(),
        )
        .await;
    assert_ne!(reply.code(), "unauthenticated", "{reply}");
    assert!(
        reply.headers.get(http::header::WWW_AUTHENTICATE).is_none(),
        "{reply}"
    );
    // An unknown route is a 404 either way.
    assert_eq!(bare.get("/v1/nothing").await.code(), "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_puts_a_new_token_in_force_and_in_the_file_and_a_restart_keeps_it() {
    let mut control = TestControl::start_without_dns().await;
    let file = control.data_dir().join(FILE_NAME);
    let old = operator_token(control.data_dir()).unwrap();
    let with_old = control.api_without_token().with_token(&old);

    let rotated = with_old
        .request(Method::POST, "/v1/operator-token/rotate", "")
        .await
        .ok();
    let new = rotated["token"]
        .as_str()
        .expect("the new token")
        .to_string();
    assert!(new.starts_with(TOKEN_PREFIX) && new != old, "{rotated}");
    assert_eq!(rotated["file"], file.display().to_string());
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), new);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let reply = with_old.get("/v1/status").await;
    assert_refused(&reply, "not the one in force");
    let with_new = control.api_without_token().with_token(&new);
    assert_eq!(with_new.get("/v1/status").await.status, 200);

    // A restart reads the token back: the new one still works, the old one still not.
    control.restart().await;
    assert_eq!(operator_token(control.data_dir()).as_deref(), Some(&*new));
    let with_new = control.api_without_token().with_token(&new);
    assert_eq!(with_new.get("/v1/status").await.status, 200);
    let with_old = control.api_without_token().with_token(&old);
    assert_eq!(with_old.get("/v1/status").await.status, 401);
}
