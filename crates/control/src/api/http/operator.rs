//! The operator token at the HTTP API: every `/v1/` route requires
//! `Authorization: Bearer TOKEN` ([`crate::operator`]) except those a workload or a scraper
//! calls with credentials of its own or none:
//!
//! - `POST /v1/certificates`: a workload proves itself with a join token or its current
//!   certificate;
//! - `GET /v1/identity`: the trust bundle, public by nature;
//! - registering, deregistering and keeping alive an instance: the operator or a workload
//!   of the instance's service, which the routes check themselves ([`crate::api::auth`]);
//! - `/live`, `/ready` and `/metrics` (outside `/v1/`): probes and Prometheus scrape them.
//!
//! The check runs after routing (a route layer) so that a refusal is counted under its
//! route template like any answer; an unknown path gets its `404` either way.

use axum::{
    extract::{MatchedPath, Request, State},
    http::{Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use super::{ApiError, ApiResult};
use crate::{api::Backend, store::Store};

/// Routes (method, template) under `/v1/` that do not take the operator token.
const EXEMPT: [(Method, &str); 5] = [
    (Method::POST, "/v1/certificates"),
    (Method::GET, "/v1/identity"),
    (Method::PUT, "/v1/services/{service}/instances/{id}"),
    (Method::DELETE, "/v1/services/{service}/instances/{id}"),
    (Method::PUT, "/v1/leases/{lease}/keepalive"),
];

use crate::api::auth::{Refusal, WHAT_TO_DO};

/// Refuses a request to an operator route without the token in force.
pub(super) async fn require<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let exempt = match route {
        Some(route) => {
            !route.starts_with("/v1/")
                || EXEMPT
                    .iter()
                    .any(|(method, path)| method == req.method() && *path == route)
        }
        None => false,
    };
    if exempt {
        return next.run(req).await;
    }
    match crate::api::auth::bearer(req.headers()) {
        Some(token) if backend.operator.check(token) => next.run(req).await,
        Some(_) => refuse(&backend, true),
        None => refuse(&backend, false),
    }
}

/// A workload's write refused ([`crate::api::auth`]): 401 with the operator's challenge
/// when it proved nothing, 403 `forbidden` when it proved another service.
pub(super) fn refuse_write<S>(backend: &Backend<S>, refused: &Refusal) -> ApiError {
    backend.metrics.refused_for(refused.reason());
    if refused.is_unauthenticated() {
        ApiError::unauthenticated(refused.to_string(), matches!(refused, Refusal::WrongToken))
    } else {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", refused.to_string())
    }
}

fn refuse<S>(backend: &Backend<S>, wrong: bool) -> Response {
    backend.metrics.unauthenticated(wrong);
    let message = if wrong {
        Refusal::WrongToken.to_string()
    } else {
        format!("this route needs the operator token: {WHAT_TO_DO}")
    };
    ApiError::unauthenticated(message, wrong).into_response()
}

/// `POST /v1/operator-token/rotate`: a new operator token, written over the file and in
/// force at once (the token that called is refused from the next request on).
pub(super) async fn rotate<S: Store + Clone>(State(backend): State<Backend<S>>) -> ApiResult {
    let operator = backend.operator.clone();
    let rotated = tokio::task::spawn_blocking(move || {
        let token = operator.rotate()?;
        anyhow::Ok((token, operator.path().display().to_string()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
    .and_then(|r| r);
    match rotated {
        Ok((token, file)) => Ok(Json(json!({"token": token, "file": file})).into_response()),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{e:#}; the token in force is unchanged"),
        )),
    }
}
