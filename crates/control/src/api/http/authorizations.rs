//! Authorization policy resources over HTTP:
//!
//! ```text
//! GET    /v1/authorizations             {revision, authorizations: [{service, version, authorization}]}
//! GET    /v1/authorizations/{service}   {service, version, authorization}
//! PUT    /v1/authorizations/{service}   AuthorizationPolicy (JSON) -> {service, version, created, unchanged}
//! DELETE /v1/authorizations/{service}   {service, revision}
//! ```
//!
//! An invalid policy is refused with 400 `invalid_argument`, every problem in the message
//! and in `error.fields` (`[{field, message}]`, paths such as `rule[2].paths[0]`); nothing
//! is written, so the version in force stays.

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
    Json,
};
use malla_api::InvalidPolicy;
use serde_json::json;

use super::{service_name, ApiError, ApiResult};
use crate::{
    api::Backend,
    authorizations::{AuthorizationError, StoredAuthorization},
    store::{Store, StoreError},
};

impl From<AuthorizationError> for ApiError {
    fn from(e: AuthorizationError) -> Self {
        match e {
            AuthorizationError::Invalid { service, errors } => invalid(&service, &errors),
            AuthorizationError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            AuthorizationError::Store(StoreError::Conflict { .. }) => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{e}; another write to this authorization policy won, apply again"),
            ),
            AuthorizationError::Store(StoreError::Invalid(m)) => ApiError::invalid(m),
            AuthorizationError::Store(_) | AuthorizationError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
        }
    }
}

fn invalid(service: &str, errors: &InvalidPolicy) -> ApiError {
    let fields: Vec<_> = errors
        .0
        .iter()
        .map(|e| json!({"field": e.field, "message": e.message}))
        .collect();
    ApiError {
        fields: Some(fields.into()),
        ..ApiError::invalid(format!(
            "invalid authorization policy for {service}: {errors}"
        ))
    }
}

pub(super) fn authorization_json(stored: &StoredAuthorization) -> serde_json::Value {
    json!({
        "service": stored.service,
        "version": stored.version,
        "authorization": *stored.policy,
    })
}

pub(super) async fn list<S: Store + Clone>(State(backend): State<Backend<S>>) -> ApiResult {
    let view = backend.authorizations.view();
    let list: Vec<_> = view
        .authorizations
        .values()
        .map(authorization_json)
        .collect();
    Ok(Json(json!({"revision": view.revision, "authorizations": list})).into_response())
}

pub(super) async fn get<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    Path(service): Path<String>,
) -> ApiResult {
    let name = service_name(&service)?;
    let stored = backend
        .authorizations
        .get(&name)
        .ok_or(AuthorizationError::NotFound(name))?;
    Ok(Json(authorization_json(&stored)).into_response())
}

pub(super) async fn put<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    Path(service): Path<String>,
    body: Bytes,
) -> ApiResult {
    let name = service_name(&service)?;
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request needs a JSON body: the authorization policy (see docs/authorization.md)",
        ));
    }
    let policy = malla_api::authz::parse_json(&body, name.as_str())
        .map_err(|errors| invalid(&service, &errors))?;
    let applied = backend.authorizations.put(&name, policy).await?;
    Ok(Json(json!({
        "service": name,
        "version": applied.version,
        "created": applied.created,
        "unchanged": applied.unchanged,
    }))
    .into_response())
}

pub(super) async fn delete<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    Path(service): Path<String>,
) -> ApiResult {
    let name = service_name(&service)?;
    let revision = backend.authorizations.delete(&name).await?;
    Ok(Json(json!({"service": name, "revision": revision})).into_response())
}
