//! Per-service resources ([`crate::resources`]) over HTTP, one set of routes per kind:
//!
//! ```text
//! GET    /v1/policies                   {revision, policies: [{service, version, policy}]}
//! GET    /v1/policies/{service}         {service, version, policy}
//! PUT    /v1/policies/{service}         Policy (JSON) -> {service, version, created, unchanged}
//! DELETE /v1/policies/{service}         {service, revision}
//!
//! GET    /v1/authorizations             {revision, authorizations: [{service, version, authorization}]}
//! GET    /v1/authorizations/{service}   {service, version, authorization}
//! PUT    /v1/authorizations/{service}   AuthorizationPolicy (JSON) -> {service, version, created, unchanged}
//! DELETE /v1/authorizations/{service}   {service, revision}
//! ```
//!
//! An invalid resource is refused with 400 `invalid_argument`, every problem in the
//! message and in `error.fields` (`[{field, message}]`, paths such as
//! `retries.max_attempts` or `rule[2].paths[0]`); nothing is written, so the version in
//! force stays.

#[cfg(test)]
pub(super) mod tests;

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use malla_api::InvalidPolicy;
use malla_core::ServiceName;
use serde_json::json;

use super::{service_name, ApiError, ApiResult};
use crate::{
    api::Backend,
    authorizations::AuthorizationKind,
    policies::PolicyKind,
    resources::{Kind, ResourceError, Resources, Stored},
    store::{Store, StoreError},
};

/// How a kind of resource shows over HTTP.
pub(super) trait HttpKind: Kind {
    /// The collection's path (`/v1/policies`); a resource is at `{PATH}/{service}`.
    const PATH: &'static str;
    /// The list's field in `GET {PATH}` (`policies`).
    const LIST_FIELD: &'static str;
    /// The document's field in a resource's JSON (`policy`).
    const ITEM_FIELD: &'static str;
    /// Where an operator reads about the document, named when the body is missing.
    const DOC: &'static str;

    fn resources<S>(backend: &Backend<S>) -> &Arc<Resources<S, Self>>;

    /// Reads a body strictly, as an operator wrote it: every problem named by its field.
    fn parse(body: &[u8], service: &ServiceName) -> Result<Self::Value, InvalidPolicy>;
}

impl HttpKind for PolicyKind {
    const PATH: &'static str = "/v1/policies";
    const LIST_FIELD: &'static str = "policies";
    const ITEM_FIELD: &'static str = "policy";
    const DOC: &'static str = "docs/resilience.md";

    fn resources<S>(backend: &Backend<S>) -> &Arc<Resources<S, Self>> {
        &backend.policies
    }

    /// The sidecars read what they receive with this same function (leniently).
    fn parse(body: &[u8], _: &ServiceName) -> Result<Self::Value, InvalidPolicy> {
        malla_api::policy::parse_json(body)
    }
}

impl HttpKind for AuthorizationKind {
    const PATH: &'static str = "/v1/authorizations";
    const LIST_FIELD: &'static str = "authorizations";
    const ITEM_FIELD: &'static str = "authorization";
    const DOC: &'static str = "docs/authorization.md";

    fn resources<S>(backend: &Backend<S>) -> &Arc<Resources<S, Self>> {
        &backend.authorizations
    }

    fn parse(body: &[u8], service: &ServiceName) -> Result<Self::Value, InvalidPolicy> {
        malla_api::authz::parse_json(body, service.as_str())
    }
}

/// The routes of one kind, to merge into the API's router.
pub(super) fn routes<S: Store + Clone, K: HttpKind>() -> Router<Backend<S>> {
    Router::new().route(K::PATH, get(list::<S, K>)).route(
        &format!("{}/{{service}}", K::PATH),
        get(get_one::<S, K>).put(put::<S, K>).delete(delete::<S, K>),
    )
}

/// The answer for a resource's error; `kind` names it where the error does not.
fn api_error(kind: &str, e: ResourceError) -> ApiError {
    match e {
        ResourceError::Invalid {
            service, errors, ..
        } => invalid(kind, &service, &errors),
        ResourceError::NotFound { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
        }
        ResourceError::Store(StoreError::Conflict { .. }) => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("{e}; another write to this {kind} won, apply again"),
        ),
        ResourceError::Store(StoreError::Invalid(m)) => ApiError::invalid(m),
        ResourceError::Store(_) | ResourceError::Closed => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

fn invalid(kind: &str, service: &str, errors: &InvalidPolicy) -> ApiError {
    let fields: Vec<_> = errors
        .0
        .iter()
        .map(|e| json!({"field": e.field, "message": e.message}))
        .collect();
    ApiError {
        fields: Some(fields.into()),
        ..ApiError::invalid(format!("invalid {kind} for {service}: {errors}"))
    }
}

/// A resource as every answer shows it.
pub(super) fn item_json<K: HttpKind>(stored: &Stored<K>) -> serde_json::Value {
    json!({
        "service": stored.service,
        "version": stored.version,
        K::ITEM_FIELD: *stored.policy,
    })
}

async fn list<S: Store + Clone, K: HttpKind>(State(backend): State<Backend<S>>) -> ApiResult {
    let view = K::resources(&backend).view();
    let items: Vec<_> = view.by_service.values().map(item_json).collect();
    Ok(Json(json!({"revision": view.revision, K::LIST_FIELD: items})).into_response())
}

async fn get_one<S: Store + Clone, K: HttpKind>(
    State(backend): State<Backend<S>>,
    Path(service): Path<String>,
) -> ApiResult {
    let name = service_name(&service)?;
    let stored = K::resources(&backend)
        .get(&name)
        .ok_or_else(|| api_error(K::NAME, ResourceError::not_found::<K>(name)))?;
    Ok(Json(item_json(&stored)).into_response())
}

async fn put<S: Store + Clone, K: HttpKind>(
    State(backend): State<Backend<S>>,
    Path(service): Path<String>,
    body: Bytes,
) -> ApiResult {
    let name = service_name(&service)?;
    if body.is_empty() {
        return Err(ApiError::invalid(format!(
            "the request needs a JSON body: the {} (see {})",
            K::NAME,
            K::DOC
        )));
    }
    let value = K::parse(&body, &name).map_err(|errors| invalid(K::NAME, &service, &errors))?;
    let applied = K::resources(&backend)
        .put(&name, value)
        .await
        .map_err(|e| api_error(K::NAME, e))?;
    Ok(Json(json!({
        "service": name,
        "version": applied.version,
        "created": applied.created,
        "unchanged": applied.unchanged,
    }))
    .into_response())
}

async fn delete<S: Store + Clone, K: HttpKind>(
    State(backend): State<Backend<S>>,
    Path(service): Path<String>,
) -> ApiResult {
    let name = service_name(&service)?;
    let revision = K::resources(&backend)
        .delete(&name)
        .await
        .map_err(|e| api_error(K::NAME, e))?;
    Ok(Json(json!({"service": name, "revision": revision})).into_response())
}
