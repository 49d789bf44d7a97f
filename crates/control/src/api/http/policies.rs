//! Policy resources and the events sidecars report, over HTTP:
//!
//! ```text
//! GET    /v1/policies                    {revision, policies: [{service, version, policy}]}
//! GET    /v1/policies/{service}          {service, version, policy}
//! PUT    /v1/policies/{service}          Policy (JSON) -> {service, version, created, unchanged}
//! DELETE /v1/policies/{service}          {service, revision}
//! GET    /v1/events?service=&kind=&limit=   {events: [...] (newest last), kept, capacity}
//! ```
//!
//! An invalid policy is refused with 400 `invalid_argument`, every problem in the message
//! and in `error.fields` (`[{field, message}]`, dotted paths such as
//! `retries.max_attempts`); nothing is written, so the version in force stays.

#[cfg(test)]
mod tests;

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::IntoResponse,
    Json,
};
use malla_api::InvalidPolicy;
use serde::Deserialize;
use serde_json::json;

use super::{service_name, ApiError, ApiResult};
use crate::{
    api::Backend,
    events::{EventFilter, CAPACITY},
    policies::{PolicyError, StoredPolicy},
    store::{Store, StoreError},
};

/// Events answered when the query names no limit.
const DEFAULT_EVENT_LIMIT: usize = 100;

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Invalid { service, errors } => invalid_policy(&service, &errors),
            PolicyError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            PolicyError::Store(StoreError::Conflict { .. }) => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{e}; another write to this policy won, apply again"),
            ),
            PolicyError::Store(StoreError::Invalid(m)) => ApiError::invalid(m),
            PolicyError::Store(_) | PolicyError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
        }
    }
}

fn invalid_policy(service: &str, errors: &InvalidPolicy) -> ApiError {
    let fields: Vec<_> = errors
        .0
        .iter()
        .map(|e| json!({"field": e.field, "message": e.message}))
        .collect();
    ApiError {
        fields: Some(fields.into()),
        ..ApiError::invalid(format!("invalid policy for {service}: {errors}"))
    }
}

pub(super) fn policy_json(stored: &StoredPolicy) -> serde_json::Value {
    json!({
        "service": stored.service,
        "version": stored.version,
        "policy": *stored.policy,
    })
}

pub(super) async fn list<S: Store + Clone>(State(backend): State<Backend<S>>) -> ApiResult {
    let view = backend.policies.view();
    let policies: Vec<_> = view.policies.values().map(policy_json).collect();
    Ok(Json(json!({"revision": view.revision, "policies": policies})).into_response())
}

pub(super) async fn get<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    Path(service): Path<String>,
) -> ApiResult {
    let name = service_name(&service)?;
    let stored = backend
        .policies
        .get(&name)
        .ok_or(PolicyError::NotFound(name))?;
    Ok(Json(policy_json(&stored)).into_response())
}

pub(super) async fn put<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    Path(service): Path<String>,
    body: Bytes,
) -> ApiResult {
    let name = service_name(&service)?;
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request needs a JSON body: the policy (see docs/resilience.md)",
        ));
    }
    // The sidecars read what they receive with this same function.
    let policy =
        malla_api::policy::parse_json(&body).map_err(|errors| invalid_policy(&service, &errors))?;
    let applied = backend.policies.put(&name, policy).await?;
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
    let revision = backend.policies.delete(&name).await?;
    Ok(Json(json!({"service": name, "revision": revision})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventQuery {
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

pub(super) async fn events<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(query) =
        query.map_err(|e| ApiError::invalid(format!("invalid query: {}", e.body_text())))?;
    let limit = query.limit.unwrap_or(DEFAULT_EVENT_LIMIT);
    if !(1..=CAPACITY).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit {limit} is out of range: use 1-{CAPACITY}"
        )));
    }
    if let Some(service) = query.service.as_deref().filter(|s| !s.is_empty()) {
        service_name(service)?;
    }
    let filter = EventFilter {
        service: query.service.filter(|s| !s.is_empty()),
        kind: query.kind.filter(|k| !k.is_empty()),
    };
    let events = backend.events.query(&filter, limit);
    Ok(Json(json!({
        "events": events,
        "kept": backend.events.len(),
        "capacity": CAPACITY,
    }))
    .into_response())
}
