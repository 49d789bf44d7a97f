//! `malla.identity.v1.Identity`: certificates for sidecars ([`crate::identity`]).

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use malla_api::identity_pb as pb;
use malla_core::ServiceName;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    identity::{CertifyError, Credential, Identity, Issued, TokenError},
    store::Store,
};

pub struct IdentityGrpc<S> {
    identity: Arc<Identity<S>>,
}

impl<S> IdentityGrpc<S> {
    pub fn new(identity: Arc<Identity<S>>) -> Self {
        IdentityGrpc { identity }
    }
}

#[tonic::async_trait]
impl<S: Store + Clone> malla_api::IdentityService for IdentityGrpc<S> {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let service = ServiceName::new(&request.service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let credential = match request.credential {
            Some(pb::certify_request::Credential::JoinToken(token)) => Credential::JoinToken(token),
            Some(pb::certify_request::Credential::Certificate(der)) => {
                Credential::Certificate(der)
            }
            None => {
                return Err(Status::unauthenticated(
                    "no credential: send a join token (malla token create --service SERVICE) or the current certificate",
                ))
            }
        };
        match self
            .identity
            .certify(&service, &request.csr, &credential)
            .await
        {
            Ok(issued) => {
                info!(id = %issued.spiffe_id, peer = ?peer, renewal = matches!(credential, Credential::Certificate(_)), "certificate issued");
                Ok(Response::new(response(issued)))
            }
            Err(e) => {
                warn!(%service, peer = ?peer, reason = e.reason(), error = %e, "certificate refused");
                Err(status(e))
            }
        }
    }
}

/// Maps a refusal to a status: a proof refused is PERMISSION_DENIED, a bad request
/// INVALID_ARGUMENT, a store failure UNAVAILABLE.
pub fn status(e: CertifyError) -> Status {
    match e.reason() {
        "csr" | "invalid" => Status::invalid_argument(e.to_string()),
        "unavailable" | "signing" => Status::unavailable(e.to_string()),
        _ if matches!(e, CertifyError::Token(TokenError::Race)) => Status::aborted(e.to_string()),
        _ => Status::permission_denied(e.to_string()),
    }
}

/// The certificate with the trust bundle of the instant it was signed (during a root
/// rotation the bundle changes; the two always belong together).
fn response(issued: Issued) -> pb::CertifyResponse {
    pb::CertifyResponse {
        spiffe_id: issued.spiffe_id.to_string(),
        certificate_chain: issued.chain,
        trust_bundle: issued.trust_bundle,
        not_before_unix_ms: unix_ms(issued.not_before),
        not_after_unix_ms: unix_ms(issued.not_after),
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
