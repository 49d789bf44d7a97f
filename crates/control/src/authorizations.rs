//! Authorization policies as resources: at most one [`AuthorizationPolicy`] per service,
//! deciding who may call that service and what, written by `malla apply` (HTTP API) and
//! streamed to the sidecars of that service (gRPC `WatchAuthorization`): the destination
//! decides, on its inbound side.
//!
//! Keys:
//!
//! ```text
//! /malla/authorizations/{service}     AuthorizationPolicy (JSON), its `service` set
//! ```
//!
//! Versions, validation on every write, compare-and-set, the view and its change
//! broadcast are those of every per-service resource ([`crate::resources`]).

use malla_core::{authz::AuthorizationPolicy, policy::FieldError, ServiceName};

use crate::resources::{self, Kind};

/// The kind of resource an authorization policy is.
pub struct AuthorizationKind;

impl Kind for AuthorizationKind {
    type Value = AuthorizationPolicy;
    const PREFIX: &'static str = "/malla/authorizations/";
    const NAME: &'static str = "authorization policy";
    const PLURAL: &'static str = "authorization policies";

    /// An empty `service` names none (the field is not optional in the document).
    fn named_service(value: &AuthorizationPolicy) -> Option<&str> {
        Some(value.service.as_str()).filter(|s| !s.is_empty())
    }

    fn set_service(value: &mut AuthorizationPolicy, service: &ServiceName) {
        value.service = service.to_string();
    }

    fn validate(value: &AuthorizationPolicy) -> Vec<FieldError> {
        value.validate()
    }
}

pub type Authorizations<S> = resources::Resources<S, AuthorizationKind>;
pub type StoredAuthorization = resources::Stored<AuthorizationKind>;
