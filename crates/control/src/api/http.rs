//! The HTTP/JSON API, for the CLI, the dashboard and clients outside the mesh.
//!
//! Every answer is JSON. Errors are `{"error": {"code": "...", "message": "..."}}` with a
//! 4xx/5xx status; the message names the bad value and says what to do. Request bodies are
//! limited to [`MAX_BODY`] and must not carry unknown fields. The routes are listed in
//! `docs/control.md`; the routes of per-service resources (resilience and authorization
//! policies) are in [`resources`], the event routes in [`events`].

mod events;
mod identity;
mod operator;
mod resources;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    body::Bytes,
    extract::{ConnectInfo, DefaultBodyLimit, FromRef, MatchedPath, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Extension, Json, Router,
};
use malla_core::{Selector, ServiceName};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::json;

use crate::{
    api::{
        auth::{self, Caller},
        Backend,
    },
    authorizations::AuthorizationKind,
    events::EventFilter,
    policies::PolicyKind,
    registry::{record::instance_json, Registration, Registry, RegistryError, ServiceSpec},
    serving::tls::PeerIdentity,
    store::{Store, StoreError},
};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// The registry routes take only the registry.
impl<S> FromRef<Backend<S>> for Arc<Registry<S>> {
    fn from_ref(backend: &Backend<S>) -> Self {
        backend.registry.clone()
    }
}

pub fn router<S: Store + Clone>(backend: Backend<S>) -> Router {
    let routes = Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics::<S>))
        .route("/v1/operator-token/rotate", post(operator::rotate::<S>))
        .route("/v1/status", get(status::<S>))
        .route("/v1/services", get(list_services::<S>))
        .route(
            "/v1/services/{service}",
            get(get_service::<S>)
                .put(put_service::<S>)
                .delete(delete_service::<S>),
        )
        .route("/v1/services/{service}/instances", get(list_instances::<S>))
        .route(
            "/v1/services/{service}/instances/{id}",
            put(register::<S>).delete(deregister::<S>),
        )
        .route("/v1/leases/{lease}/keepalive", put(keep_alive::<S>))
        .merge(resources::routes::<S, PolicyKind>())
        .merge(resources::routes::<S, AuthorizationKind>())
        .route("/v1/events", get(events::events::<S>))
        .route("/v1/proxies", get(proxies::<S>))
        .route("/v1/tokens", post(identity::create_token::<S>))
        .route("/v1/identity", get(identity::identity::<S>))
        .route("/v1/identity/rotate", post(identity::rotate::<S>))
        .route("/v1/certificates", post(identity::certify::<S>))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see docs/control.md",
            )
        })
        // After routing, so a refusal is counted under its route template (`note_route`,
        // the outer layer, sees it).
        .route_layer(axum::middleware::from_fn_with_state(
            backend.clone(),
            operator::require::<S>,
        ))
        .route_layer(axum::middleware::from_fn(note_route))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(backend);
    // `json_errors` wraps the whole router rather than each route (`Router::layer`): axum
    // adds a 405's `Allow` header outside a route's own layers, where a per-route
    // middleware would not see it and could not list the methods.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn(json_errors))
}

/// The route template a request matched (`/v1/services/{service}`), on its answer: the
/// metrics label requests by it (`crate::serving` reads it), never by the raw path.
#[derive(Clone, Debug)]
pub struct RouteTemplate(pub MatchedPath);

async fn note_route(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(req).await;
    if let Some(matched) = matched {
        response.extensions_mut().insert(RouteTemplate(matched));
    }
    response
}

/// `GET /metrics`: the control plane's own metrics, Prometheus text format.
async fn metrics<S: Store + Clone>(State(backend): State<Backend<S>>) -> Response {
    // The CA's gauges follow a root rotation's clock even when no certificate is asked for.
    backend.identity.ca.refresh();
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        backend.metrics.encode(),
    )
        .into_response()
}

/// `GET /v1/proxies`: the sidecars (gRPC clients) connected now.
async fn proxies<S: Store + Clone>(State(backend): State<Backend<S>>) -> Response {
    Json(json!({ "proxies": backend.proxies.list() })).into_response()
}

/// Gives the error answers that axum makes itself (a method the route does not take, a body
/// over [`MAX_BODY`], a path segment that is not UTF-8) the JSON error shape every other
/// answer has, so clients parse one shape.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(http::header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            (
                "method_not_allowed",
                format!("{path} does not take {method}; it takes {allowed} (see docs/control.md)"),
            )
        }
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            format!("the request body is over the limit of {MAX_BODY} bytes (64 KiB)"),
        ),
        StatusCode::BAD_REQUEST => ("invalid_argument", format!("invalid request: {text}")),
        _ if text.is_empty() => ("error", status.to_string()),
        _ => ("error", text),
    };
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.remove(http::header::CONTENT_TYPE);
    let error = ApiError::new(status, code, message).into_response();
    let (error_parts, body) = error.into_parts();
    parts.headers.extend(error_parts.headers);
    Response::from_parts(parts, body)
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Every bad field, when there can be several (`[{field, message}]`).
    fields: Option<serde_json::Value>,
    /// `WWW-Authenticate`, on a 401.
    challenge: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: None,
            challenge: None,
        }
    }

    /// 401 `unauthenticated`, with the Bearer challenge (`invalid_token` when `wrong`: a
    /// token was sent).
    pub(crate) fn unauthenticated(message: impl Into<String>, wrong: bool) -> Self {
        ApiError {
            challenge: Some(if wrong {
                r#"Bearer realm="malla", error="invalid_token""#
            } else {
                r#"Bearer realm="malla""#
            }),
            ..ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(fields) = self.fields {
            error["fields"] = fields;
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => ApiError::invalid(m),
            RegistryError::NotFound(what) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            RegistryError::Store(StoreError::Invalid(m)) => ApiError::invalid(m),
            RegistryError::Store(StoreError::Conflict { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            RegistryError::Store(StoreError::LeaseNotFound(_)) => ApiError::new(
                StatusCode::NOT_FOUND,
                "lease_not_found",
                format!("{e}; register again"),
            ),
            RegistryError::Store(_) | RegistryError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn service_name(raw: &str) -> Result<ServiceName, ApiError> {
    ServiceName::new(raw).map_err(|e| ApiError::invalid(e.to_string()))
}

/// Parses a JSON body with a precise error (`unknown field "colour"... at line 1 column 9`).
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid("the request needs a JSON body"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

async fn status<S: Store + Clone>(State(reg): State<Arc<Registry<S>>>) -> ApiResult {
    let view = reg.view();
    Ok(Json(json!({
        "revision": view.revision,
        "services": view.services.len(),
        "instances": view.instance_count(),
    }))
    .into_response())
}

async fn list_services<S: Store + Clone>(State(reg): State<Arc<Registry<S>>>) -> ApiResult {
    let view = reg.view();
    let services: Vec<_> = view
        .services
        .iter()
        .map(|(name, state)| {
            let serving = state
                .instances
                .values()
                .filter(|i| i.health.serving())
                .count();
            json!({
                "name": name,
                "instances": state.instances.len(),
                "serving": serving,
                "health_check": state.spec.health_check,
                "annotations": state.spec.annotations,
            })
        })
        .collect();
    Ok(Json(json!({"revision": view.revision, "services": services})).into_response())
}

/// Events of a service shown by `GET /v1/services/{s}`, newest last.
const DESCRIBE_EVENTS: usize = 20;

/// `GET /v1/services/{s}`: everything `malla describe service` shows. The instances'
/// leases carry their remaining time (read from the store: the view holds no clocks), the
/// policy is as `GET /v1/policies/{s}` gives it, the authorization policy as
/// `GET /v1/authorizations/{s}` gives it, and the events are the service's latest,
/// health flips decided by the control plane's checks among them.
async fn get_service<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    Path(service): Path<String>,
) -> ApiResult {
    let name = service_name(&service)?;
    let view = backend.registry.view();
    let state = view.services.get(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("service {name} not found"),
        )
    })?;
    let mut instances = Vec::with_capacity(state.instances.len());
    for (id, instance) in &state.instances {
        let meta = state.meta.get(id);
        let mut value = instance_json(instance, meta);
        if let Some(lease) = meta.and_then(|m| m.lease) {
            // Gone meanwhile (expired between the view and this read): no time left.
            let remaining = backend
                .registry
                .store()
                .lease(lease)
                .await
                .map_or(0.0, |l| l.remaining.as_secs_f64());
            value["lease"]["remaining_seconds"] = json!(remaining);
        }
        instances.push(value);
    }
    let policy = backend
        .policies
        .get(&name)
        .map(|stored| resources::item_json(&stored));
    let authorization = backend
        .authorizations
        .get(&name)
        .map(|stored| resources::item_json(&stored));
    let events = backend.events.query(
        &EventFilter {
            service: Some(name.to_string()),
            kind: None,
        },
        DESCRIBE_EVENTS,
    );
    Ok(Json(json!({
        "revision": view.revision,
        "name": name,
        // As `PUT` echoes it: fields left out when empty.
        "spec": state.spec,
        "instances": instances,
        "policy": policy,
        "authorization": authorization,
        "events": events,
    }))
    .into_response())
}

async fn put_service<S: Store + Clone>(
    State(reg): State<Arc<Registry<S>>>,
    Path(service): Path<String>,
    body: Bytes,
) -> ApiResult {
    let name = service_name(&service)?;
    let spec: ServiceSpec = parse_body(&body)?;
    if let Some(check) = &spec.health_check {
        check.validate().map_err(ApiError::invalid)?;
    }
    let revision = reg.put_service(&name, &spec).await?;
    Ok(Json(json!({"revision": revision, "name": name, "spec": spec})).into_response())
}

async fn delete_service<S: Store + Clone>(
    State(reg): State<Arc<Registry<S>>>,
    Path(service): Path<String>,
) -> ApiResult {
    let name = service_name(&service)?;
    let deleted = reg.delete_service(&name).await?;
    Ok(Json(deleted).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceQuery {
    #[serde(default)]
    selector: Option<String>,
    /// Only instances that should receive traffic.
    #[serde(default)]
    serving: Option<bool>,
}

async fn list_instances<S: Store + Clone>(
    State(reg): State<Arc<Registry<S>>>,
    Path(service): Path<String>,
    query: Result<Query<InstanceQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let name = service_name(&service)?;
    let Query(query) =
        query.map_err(|e| ApiError::invalid(format!("invalid query: {}", e.body_text())))?;
    let selector = match &query.selector {
        Some(s) => Selector::parse(s).map_err(|e| ApiError::invalid(e.to_string()))?,
        None => Selector::all(),
    };
    let (revision, mut instances) = reg.instances(&name, &selector).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("service {name} not found"),
        )
    })?;
    if query.serving == Some(true) {
        instances.retain(|i| i.health.serving());
    }
    let view = reg.view();
    let meta = view.services.get(&name).map(|s| &s.meta);
    let instances: Vec<_> = instances
        .iter()
        .map(|i| instance_json(i, meta.and_then(|m| m.get(&i.id))))
        .collect();
    Ok(Json(
        json!({"revision": revision, "selector": selector.to_string(), "instances": instances}),
    )
    .into_response())
}

/// Who sent `headers` on a connection whose client proved `peer`; a wrong operator token
/// is refused here.
fn writer<S: Store + Clone>(
    backend: &Backend<S>,
    headers: &http::HeaderMap,
    peer: Option<&PeerIdentity>,
) -> Result<Caller, ApiError> {
    auth::caller(
        headers,
        peer,
        &backend.operator,
        backend.identity.ca.trust_domain(),
    )
    .map_err(|refused| operator::refuse_write(backend, &refused))
}

async fn register<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    Path((service, id)): Path<(String, String)>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    identity: Option<Extension<PeerIdentity>>,
    headers: http::HeaderMap,
    body: Bytes,
) -> ApiResult {
    let caller = writer(&backend, &headers, identity.as_deref())?;
    let name = service_name(&service)?;
    caller
        .may_write(&name)
        .map_err(|refused| operator::refuse_write(&backend, &refused))?;
    let registration: Registration = parse_body(&body)?;
    // `SocketAddr`'s display brackets IPv6: `http [fd00::5]:51234`.
    let by = match peer {
        Some(Extension(ConnectInfo(peer))) => format!("http {peer} {}", caller.describe()),
        None => format!("http {}", caller.describe()),
    };
    let registered = backend
        .registry
        .register_from(&name, &id, registration, &by)
        .await?;
    Ok((StatusCode::OK, Json(registered)).into_response())
}

async fn deregister<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    Path((service, id)): Path<(String, String)>,
    identity: Option<Extension<PeerIdentity>>,
    headers: http::HeaderMap,
) -> ApiResult {
    let caller = writer(&backend, &headers, identity.as_deref())?;
    let name = service_name(&service)?;
    caller
        .may_write(&name)
        .map_err(|refused| operator::refuse_write(&backend, &refused))?;
    let revision = backend.registry.deregister(&name, &id).await?;
    Ok(Json(json!({"revision": revision})).into_response())
}

async fn keep_alive<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    Path(lease): Path<String>,
    identity: Option<Extension<PeerIdentity>>,
    headers: http::HeaderMap,
) -> ApiResult {
    let caller = writer(&backend, &headers, identity.as_deref())?;
    let id: u64 = lease
        .parse()
        .map_err(|_| ApiError::invalid(format!("lease id {lease:?} must be a number")))?;
    caller
        .may_heartbeat(&backend.registry, id)
        .map_err(|refused| operator::refuse_write(&backend, &refused))?;
    let lease = backend.registry.heartbeat(id).await?;
    Ok(Json(json!({
        "lease": lease.id,
        "ttl_seconds": lease.ttl.as_secs(),
        "remaining_seconds": lease.remaining.as_secs_f64(),
    }))
    .into_response())
}
