//! Identity: the mesh's certificate authority and how workloads get certificates from it.
//!
//! ```text
//! operator: malla token create --service checkout   -> a join token (once, 1 h default)
//! sidecar:  key generated locally, CSR + join token  -> Certify -> X.509 SVID (24 h)
//!           spiffe://DOMAIN/svc/checkout, chain, trust bundle
//!           at ~70 % of its life: CSR (same key) + current certificate -> Certify -> renewed
//! ```
//!
//! The gRPC method (`malla.identity.v1.Identity/Certify`) and its HTTP/JSON twin
//! (`POST /v1/certificates`, for tools that are not sidecars: curl and openssl, Python)
//! both go through [`Identity::certify`].

pub mod ca;
pub mod invariants;
pub mod tokens;

use malla_core::ServiceName;

pub use self::{
    ca::{Ca, CaError, CaSettings, CaSource, IssueError, Issued},
    tokens::{JoinTokens, TokenError},
};
use crate::store::Store;

/// How a caller proves the identity it asks for.
#[derive(Clone, Debug)]
pub enum Credential {
    /// A join token for the service (first certificate).
    JoinToken(String),
    /// The current certificate (DER), whose key signed the CSR (renewal).
    Certificate(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Issue(#[from] IssueError),
}

impl CertifyError {
    /// Whether the caller's proof was refused (rather than its request malformed or the
    /// store unavailable): the metric's reason and the API's status follow it.
    pub fn reason(&self) -> &'static str {
        match self {
            CertifyError::Token(TokenError::Unknown) => "token-unknown",
            CertifyError::Token(TokenError::Used(_) | TokenError::Race) => "token-used",
            CertifyError::Token(TokenError::OtherService { .. })
            | CertifyError::Issue(IssueError::OtherService { .. }) => "other-service",
            CertifyError::Token(TokenError::Ttl) => "invalid",
            CertifyError::Token(TokenError::Store(_)) => "unavailable",
            CertifyError::Issue(IssueError::Certificate(_) | IssueError::KeyMismatch) => {
                "certificate"
            }
            CertifyError::Issue(IssueError::Signing(_)) => "signing",
            CertifyError::Issue(_) => "csr",
        }
    }
}

/// The CA and the join tokens, behind every API that issues certificates.
pub struct Identity<S> {
    pub ca: Ca,
    pub tokens: JoinTokens<S>,
}

impl<S: Store> Identity<S> {
    pub fn new(ca: Ca, store: S) -> Self {
        Identity {
            ca,
            tokens: JoinTokens::new(store),
        }
    }

    /// Issues `service`'s identity for the key of `csr` (DER) to a caller that proves it.
    /// The CSR is checked before a join token is spent, so a malformed request does not
    /// cost the operator a token.
    pub async fn certify(
        &self,
        service: &ServiceName,
        csr: &[u8],
        credential: &Credential,
    ) -> Result<Issued, CertifyError> {
        let renewal = matches!(credential, Credential::Certificate(_));
        let result = self.certify_inner(service, csr, credential).await;
        crate::metrics::process().certificate(
            renewal,
            match &result {
                Ok(_) => "issued",
                Err(e) => e.reason(),
            },
        );
        result
    }

    async fn certify_inner(
        &self,
        service: &ServiceName,
        csr: &[u8],
        credential: &Credential,
    ) -> Result<Issued, CertifyError> {
        match credential {
            Credential::JoinToken(token) => {
                ca::check_csr(csr)?;
                self.tokens.redeem(token, service).await?;
                Ok(self.ca.issue_for_service(csr, service)?)
            }
            Credential::Certificate(current) => Ok(self.ca.renew(csr, current, service)?),
        }
    }
}
