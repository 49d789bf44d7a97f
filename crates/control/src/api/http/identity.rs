//! The HTTP side of identity ([`crate::identity`]):
//!
//! - `POST /v1/tokens` `{service, ttl?}`: a join token for a service (`malla token create`).
//! - `GET /v1/identity`: the trust domain, the certificate TTL, the mesh's mTLS mode, the
//!   trust bundle (PEM), the roots and the root rotation under way (`malla identity`).
//! - `POST /v1/identity/rotate` `{overlap?}`: starts rotating the root the CA made
//!   (`malla identity rotate`); answers as `GET /v1/identity`.
//! - `POST /v1/certificates` `{service, csr, join_token | certificate}` (PEM): a certificate
//!   for a tool that is not a sidecar (curl and openssl, a Python gRPC client), as the gRPC
//!   `Certify` issues it to sidecars.

use std::time::Duration;

use axum::{body::Bytes, extract::State, http::StatusCode, response::IntoResponse, Json};
use malla_core::{authz::PeerMtls, SpiffeId};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::{parse_body, service_name, ApiError, ApiResult};
use crate::{
    api::Backend,
    identity::{
        ca::{self, RotateError},
        Ca, CertifyError, Credential, TokenError,
    },
    store::Store,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    service: String,
    /// A duration (`1h`, `30m`); default 1 h.
    #[serde(default)]
    ttl: Option<String>,
}

pub(super) async fn create_token<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    body: Bytes,
) -> ApiResult {
    let request: TokenRequest = parse_body(&body)?;
    let service = service_name(&request.service)?;
    let ttl = match request.ttl.as_deref() {
        Some(text) => Some(parse_ttl(text)?),
        None => None,
    };
    let created = backend
        .identity
        .tokens
        .create(&service, ttl)
        .await
        .map_err(|e| refusal(e.into()))?;
    let id = SpiffeId::for_service(backend.identity.ca.trust_domain(), &service);
    info!(%service, expires_at = %created.expires_at, "join token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": created.token,
            "service": created.service,
            "spiffe_id": id.to_string(),
            "ttl_seconds": created.ttl_seconds,
            "expires_at": created.expires_at,
        })),
    )
        .into_response())
}

fn parse_ttl(text: &str) -> Result<Duration, ApiError> {
    humantime::parse_duration(text)
        .map_err(|e| ApiError::invalid(format!("ttl {text:?}: {e} (write for example 1h or 30m)")))
}

pub(super) async fn identity<S: Store + Clone>(State(backend): State<Backend<S>>) -> ApiResult {
    Ok(Json(identity_json(&backend.identity.ca, backend.mesh_mtls)).into_response())
}

/// What `GET /v1/identity` answers: the CA's settings and state, read once, and the mesh's
/// mTLS mode.
fn identity_json(ca: &Ca, mtls_mode: PeerMtls) -> serde_json::Value {
    let status = ca.status();
    let time = |t| humantime::format_rfc3339_seconds(t).to_string();
    let roots: Vec<_> = status
        .roots
        .iter()
        .map(|(root, role)| {
            json!({
                "role": role.as_str(),
                "sha256": root.sha256,
                "subject": root.subject,
                "not_before": time(root.not_before),
                "not_after": time(root.not_after),
            })
        })
        .collect();
    let rotation = status.rotation.as_ref().map(|(plan, phase)| {
        json!({
            "phase": phase.as_str(),
            "started_at": time(plan.started_at),
            "switch_at": time(plan.switch_at),
            "ends_at": time(plan.ends_at),
            "overlap_seconds": plan.overlap().as_secs(),
        })
    });
    json!({
        "trust_domain": ca.trust_domain().as_str(),
        "cert_ttl_seconds": ca.cert_ttl().as_secs(),
        "mtls_mode": mtls_mode.as_str(),
        "ca": if status.operator { "operator" } else { "malla" },
        "trust_bundle_pem": ca::bundle_pem(&status.trust_bundle),
        "roots": roots,
        "rotation": rotation,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    /// A duration (`26h`, `10s`): how long each phase lasts; default the certificate TTL
    /// and a margin.
    #[serde(default)]
    overlap: Option<String>,
}

pub(super) async fn rotate<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    body: Bytes,
) -> ApiResult {
    // No body at all is the same as `{}`.
    let request: RotateRequest = if body.is_empty() {
        RotateRequest { overlap: None }
    } else {
        parse_body(&body)?
    };
    let overlap = match request.overlap.as_deref() {
        Some(text) => Some(humantime::parse_duration(text).map_err(|e| {
            ApiError::invalid(format!(
                "overlap {text:?}: {e} (write for example 26h or 90m)"
            ))
        })?),
        None => None,
    };
    let ca = &backend.identity.ca;
    // Key generation and a few small files: off the async workers.
    let identity = backend.identity.clone();
    let started = tokio::task::spawn_blocking(move || identity.ca.rotate(overlap))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match started {
        Ok(_) => Ok(Json(identity_json(ca, backend.mesh_mtls)).into_response()),
        Err(e) => {
            warn!(error = %e, "root rotation refused");
            Err(match e {
                RotateError::TooShort { .. } | RotateError::TooLong(_) => {
                    ApiError::invalid(e.to_string())
                }
                RotateError::OperatorCa | RotateError::InProgress { .. } => {
                    ApiError::new(StatusCode::CONFLICT, "failed_precondition", e.to_string())
                }
                RotateError::Ca(_) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                ),
            })
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateRequest {
    service: String,
    /// PEM (`-----BEGIN CERTIFICATE REQUEST-----`).
    csr: String,
    #[serde(default)]
    join_token: Option<String>,
    /// PEM: the current certificate, to renew it.
    #[serde(default)]
    certificate: Option<String>,
}

pub(super) async fn certify<S: Store + Clone>(
    State(backend): State<Backend<S>>,
    body: Bytes,
) -> ApiResult {
    let request: CertificateRequest = parse_body(&body)?;
    let service = service_name(&request.service)?;
    let csr = one_pem(&request.csr, "CERTIFICATE REQUEST", "csr")?;
    let credential = match (request.join_token, request.certificate) {
        (Some(token), None) => Credential::JoinToken(token),
        // The leaf first, as `certificate_chain_pem` hands it out (a chain may follow).
        (None, Some(pem)) => Credential::Certificate(first_pem(&pem, "CERTIFICATE", "certificate")?),
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "no credential: send join_token (malla token create --service SERVICE) or the current certificate",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "send join_token or certificate, not both",
            ))
        }
    };
    let issued = match backend.identity.certify(&service, &csr, &credential).await {
        Ok(issued) => issued,
        Err(e) => {
            warn!(%service, reason = e.reason(), error = %e, "certificate refused");
            return Err(refusal(e));
        }
    };
    info!(id = %issued.spiffe_id, "certificate issued over HTTP");
    let chain: String = issued
        .chain
        .iter()
        .map(|der| ca::pem("CERTIFICATE", der))
        .collect();
    Ok(Json(json!({
        "spiffe_id": issued.spiffe_id.to_string(),
        "certificate_chain_pem": chain,
        // The bundle of the instant it was signed: during a root rotation the two belong
        // together.
        "trust_bundle_pem": ca::bundle_pem(&issued.trust_bundle),
        "not_before": humantime::format_rfc3339_seconds(issued.not_before).to_string(),
        "not_after": humantime::format_rfc3339_seconds(issued.not_after).to_string(),
    }))
    .into_response())
}

/// The one PEM block labelled `label` in `text`.
fn one_pem(text: &str, label: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    let blocks = ca::pem_blocks(text.as_bytes(), label)
        .map_err(|e| ApiError::invalid(format!("{field}: {e}")))?;
    match <[Vec<u8>; 1]>::try_from(blocks) {
        Ok([der]) => Ok(der),
        Err(blocks) => Err(ApiError::invalid(format!(
            "{field}: expected one PEM block '-----BEGIN {label}-----', found {}",
            blocks.len()
        ))),
    }
}

/// The first PEM block labelled `label` in `text`.
fn first_pem(text: &str, label: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    ca::pem_blocks(text.as_bytes(), label)
        .map_err(|e| ApiError::invalid(format!("{field}: {e}")))?
        .into_iter()
        .next()
        .ok_or_else(|| {
            ApiError::invalid(format!("{field}: no PEM block '-----BEGIN {label}-----'"))
        })
}

fn refusal(e: CertifyError) -> ApiError {
    let (status, code) = match e.reason() {
        "csr" | "invalid" => (StatusCode::BAD_REQUEST, "invalid_argument"),
        "unavailable" | "signing" => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        _ if matches!(e, CertifyError::Token(TokenError::Race)) => {
            (StatusCode::CONFLICT, "conflict")
        }
        _ => (StatusCode::FORBIDDEN, "permission_denied"),
    };
    ApiError::new(status, code, e.to_string())
}
