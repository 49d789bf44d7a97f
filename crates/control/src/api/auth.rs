//! Who may write an instance: the operator, or a workload of the instance's own service.
//!
//! A caller is the operator when it sends the operator token (`Authorization: Bearer`, a
//! header over HTTP, metadata over gRPC), a workload when the certificate it presented in
//! the TLS handshake names `spiffe://DOMAIN/svc/SERVICE` in this mesh's trust domain
//! ([`PeerIdentity`]), anonymous otherwise. Registering, heartbeating and deregistering
//! an instance of SERVICE is the operator's or SERVICE's own workloads': a sidecar of
//! `checkout` cannot register itself as `payments` and take its traffic, nor deregister
//! `payments`' instances. Reads need no credential (the registry is as public as its DNS);
//! every other write is the operator's ([`super::http::operator`]).

use http::HeaderMap;
use malla_core::{ServiceName, SpiffeId, TrustDomain};

use crate::{
    operator::OperatorToken,
    registry::{view::View, Registry},
    serving::tls::PeerIdentity,
    store::{LeaseId, Store},
};

/// How to pass the operator token: every refusal for want of it says so.
pub const WHAT_TO_DO: &str = "pass the operator token with --token or MALLA_TOKEN (or a file holding it with --token-file or MALLA_TOKEN_FILE), or as `Authorization: Bearer TOKEN`; the control plane keeps it in DATA_DIR/operator.token on its machine (mode 600), and `malla control` printed it at its first start";

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Operator,
    /// A workload of this service (its certificate's SPIFFE ID).
    Workload(ServiceName, SpiffeId),
    Anonymous,
}

/// Why a write was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("writing an instance of {service} needs a certificate of {service} (a sidecar gets one with a join token: `malla token create --service {service}`) or the operator token: {WHAT_TO_DO}")]
    Missing { service: String },
    #[error("the operator token is not the one in force (it may have been rotated): {WHAT_TO_DO}")]
    WrongToken,
    #[error("{id} may register, heartbeat and deregister only instances of {own}, not of {asked}")]
    OtherService {
        id: String,
        own: String,
        asked: String,
    },
    #[error("{id} holds no instance under lease {lease}: register again")]
    ForeignLease { id: String, lease: LeaseId },
    #[error("reporting resilience events needs the reporting sidecar's certificate (give it a join token: `malla token create --service SERVICE`) or the operator token: {WHAT_TO_DO}")]
    AnonymousEvents,
    #[error("{id} may report events only as a sidecar of {own}, not of {asked}")]
    OtherReporter {
        id: String,
        own: String,
        asked: String,
    },
}

impl Refusal {
    /// The metric's reason (`malla_control_api_unauthenticated_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing { .. } | Refusal::AnonymousEvents => "missing",
            Refusal::WrongToken => "wrong",
            Refusal::OtherService { .. }
            | Refusal::ForeignLease { .. }
            | Refusal::OtherReporter { .. } => "other-service",
        }
    }

    /// Whether the caller proved nothing (401/`UNAUTHENTICATED`) rather than an identity
    /// that may not do this (403/`PERMISSION_DENIED`).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Refusal::Missing { .. } | Refusal::WrongToken | Refusal::AnonymousEvents
        )
    }

    pub fn to_status(&self) -> tonic::Status {
        if self.is_unauthenticated() {
            tonic::Status::unauthenticated(self.to_string())
        } else {
            tonic::Status::permission_denied(self.to_string())
        }
    }
}

/// The bearer token in an `Authorization` header, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
}

/// Who sent a request with these headers on a connection whose client proved `peer`. A
/// token that is not the one in force is refused even when a certificate came too: a
/// caller that sends a credential means it.
pub fn caller(
    headers: &HeaderMap,
    peer: Option<&PeerIdentity>,
    operator: &OperatorToken,
    domain: &TrustDomain,
) -> Result<Caller, Refusal> {
    if let Some(token) = bearer(headers) {
        return if operator.check(token) {
            Ok(Caller::Operator)
        } else {
            Err(Refusal::WrongToken)
        };
    }
    let workload = peer
        .and_then(|p| p.0.as_deref())
        .filter(|id| id.trust_domain() == domain)
        .and_then(|id| Some((id.service()?, id.clone())));
    Ok(match workload {
        Some((service, id)) => Caller::Workload(service, id),
        None => Caller::Anonymous,
    })
}

impl Caller {
    /// Whether this caller may register or deregister an instance of `service`.
    pub fn may_write(&self, service: &ServiceName) -> Result<(), Refusal> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Workload(own, _) if own == service => Ok(()),
            Caller::Workload(own, id) => Err(Refusal::OtherService {
                id: id.to_string(),
                own: own.to_string(),
                asked: service.to_string(),
            }),
            Caller::Anonymous => Err(Refusal::Missing {
                service: service.to_string(),
            }),
        }
    }

    /// Whether this caller may keep `lease` alive: the operator, or a workload with an
    /// instance of its own service under it.
    pub fn may_heartbeat<S: Store + Clone>(
        &self,
        registry: &Registry<S>,
        lease: LeaseId,
    ) -> Result<(), Refusal> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Workload(own, id) => {
                if holds_lease(&registry.view(), own, lease) {
                    Ok(())
                } else {
                    Err(Refusal::ForeignLease {
                        id: id.to_string(),
                        lease,
                    })
                }
            }
            Caller::Anonymous => Err(Refusal::Missing {
                service: "a service".to_string(),
            }),
        }
    }

    /// The service resilience events are reported as: the caller's own for a workload
    /// (which may name no other), the one `reported` names for the operator.
    pub fn reporter(&self, reported: Option<&str>) -> Result<Option<String>, Refusal> {
        match self {
            Caller::Operator => Ok(reported.map(str::to_string)),
            Caller::Workload(own, id) => match reported {
                Some(asked) if asked != own.as_str() => Err(Refusal::OtherReporter {
                    id: id.to_string(),
                    own: own.to_string(),
                    asked: asked.to_string(),
                }),
                _ => Ok(Some(own.to_string())),
            },
            Caller::Anonymous => Err(Refusal::AnonymousEvents),
        }
    }

    /// How the registry records who registered (`registered_by`), after the transport.
    pub fn describe(&self) -> String {
        match self {
            Caller::Operator => "operator".to_string(),
            Caller::Workload(_, id) => id.to_string(),
            Caller::Anonymous => "anonymous".to_string(),
        }
    }
}

/// Whether an instance of `service` is registered under `lease`.
fn holds_lease(view: &View, service: &ServiceName, lease: LeaseId) -> bool {
    view.services
        .get(service)
        .is_some_and(|state| state.meta.values().any(|m| m.lease == Some(lease)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn domain() -> TrustDomain {
        TrustDomain::new("malla.local").unwrap()
    }

    fn workload(domain: &TrustDomain, service: &str) -> PeerIdentity {
        PeerIdentity(Some(Arc::new(SpiffeId::for_service(
            domain,
            &ServiceName::new(service).unwrap(),
        ))))
    }

    fn token_file() -> (std::path::PathBuf, OperatorToken, String) {
        let dir = std::env::temp_dir().join(format!("malla-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opened = OperatorToken::open(&dir.join("operator.token")).unwrap();
        let token = opened.created.unwrap();
        (dir, opened.token, token)
    }

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn who_may_write_an_instance() {
        let (dir, operator, token) = token_file();
        let d = domain();
        let payments = ServiceName::new("payments").unwrap();
        let as_caller = |h: &HeaderMap, p: Option<&PeerIdentity>| caller(h, p, &operator, &d);

        let op = as_caller(&headers(Some(&token)), None).unwrap();
        assert_eq!(op, Caller::Operator);
        assert!(op.may_write(&payments).is_ok());

        let own = as_caller(&headers(None), Some(&workload(&d, "payments"))).unwrap();
        assert!(own.may_write(&payments).is_ok());

        let other = as_caller(&headers(None), Some(&workload(&d, "checkout"))).unwrap();
        let refused = other.may_write(&payments).unwrap_err();
        assert_eq!(refused.reason(), "other-service");
        assert!(!refused.is_unauthenticated());
        assert!(refused
            .to_string()
            .contains("only instances of checkout, not of payments"));

        let anonymous = as_caller(&headers(None), None).unwrap();
        let refused = anonymous.may_write(&payments).unwrap_err();
        assert!(refused.is_unauthenticated());
        assert!(refused
            .to_string()
            .contains("malla token create --service payments"));

        // Another trust domain's certificate (an operator CA shared with another mesh)
        // proves nothing here.
        let foreign = TrustDomain::new("other.mesh").unwrap();
        let stranger = as_caller(&headers(None), Some(&workload(&foreign, "payments"))).unwrap();
        assert_eq!(stranger, Caller::Anonymous);

        // A wrong token is refused, even beside a good certificate.
        assert_eq!(
            as_caller(
                &headers(Some("malla_op_nope")),
                Some(&workload(&d, "payments"))
            ),
            Err(Refusal::WrongToken)
        );
        // Events: a workload reports as its own service only; the operator as any.
        assert_eq!(own.reporter(None), Ok(Some("payments".to_string())));
        assert_eq!(
            own.reporter(Some("payments")),
            Ok(Some("payments".to_string()))
        );
        assert_eq!(
            own.reporter(Some("orders")).unwrap_err().reason(),
            "other-service"
        );
        assert_eq!(op.reporter(Some("orders")), Ok(Some("orders".to_string())));
        assert_eq!(anonymous.reporter(None), Err(Refusal::AnonymousEvents));
        // The control plane's own identity is no workload.
        let control = PeerIdentity(Some(Arc::new(SpiffeId::control_plane(&d))));
        assert_eq!(
            as_caller(&headers(None), Some(&control)).unwrap(),
            Caller::Anonymous
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
