//! Resilience policies as resources: at most one [`Policy`] per service, for the callers
//! of that service, written by `malla apply` (HTTP API) and streamed to every sidecar that
//! calls the service (gRPC `WatchPolicy`).
//!
//! Keys:
//!
//! ```text
//! /malla/policies/{service}     Policy (JSON), its `service` set
//! ```
//!
//! Versions, validation on every write, compare-and-set, the view and its change
//! broadcast are those of every per-service resource ([`crate::resources`]). A write is
//! validated with `Policy::validate`, the very checks the sidecars apply to what they
//! receive (`malla_api::policy::parse_json_lenient`).

use malla_core::{policy::FieldError, Policy, ServiceName};

use crate::resources::{self, Kind};

/// The kind of resource a resilience policy is.
pub struct PolicyKind;

impl Kind for PolicyKind {
    type Value = Policy;
    const PREFIX: &'static str = "/malla/policies/";
    const NAME: &'static str = "policy";
    const PLURAL: &'static str = "policies";

    fn named_service(value: &Policy) -> Option<&str> {
        value.service.as_deref()
    }

    fn set_service(value: &mut Policy, service: &ServiceName) {
        value.service = Some(service.to_string());
    }

    fn validate(value: &Policy) -> Vec<FieldError> {
        value.validate()
    }
}

pub type Policies<S> = resources::Resources<S, PolicyKind>;
pub type StoredPolicy = resources::Stored<PolicyKind>;
pub type PolicyView = resources::View<PolicyKind>;
pub type PolicyChange = resources::Change<PolicyKind>;

pub fn policy_key(service: &ServiceName) -> String {
    resources::key::<PolicyKind>(service)
}
