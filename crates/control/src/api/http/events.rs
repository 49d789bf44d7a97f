//! The resilience events sidecars report, over HTTP:
//!
//! ```text
//! GET    /v1/events?service=&kind=&limit=   {events: [...] (newest last), kept, capacity}
//! ```

#[cfg(test)]
mod tests;

use axum::{
    extract::{Query, State},
    response::IntoResponse,
    Json,
};
use serde::Deserialize;
use serde_json::json;

use super::{service_name, ApiError, ApiResult};
use crate::{
    api::Backend,
    events::{EventFilter, CAPACITY},
    store::Store,
};

/// Events answered when the query names no limit.
const DEFAULT_EVENT_LIMIT: usize = 100;

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
