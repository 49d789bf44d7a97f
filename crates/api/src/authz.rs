//! Authorization policies ([`malla_core::authz`]) as JSON: how the control plane reads
//! what an operator writes (`PUT /v1/authorizations/{service}`), and how a sidecar reads
//! what the control plane sends (`malla.authz.v1.Authorizations`, [`AuthorizationState`]);
//! both strictly, with every problem named by its field.
//!
//! Strictly on the sidecar too, unlike resilience policies ([`crate::policy`]): a field
//! this version does not know may be a condition, and a rule read without one of its
//! conditions matches more than it says; an allow rule would let in callers the operator
//! meant to keep out. So a policy from a newer control plane that this sidecar cannot read
//! whole is refused, and the one in force stays.

use malla_core::{
    authz::{AuthorizationPolicy, CompiledPolicy, PeerMtls},
    identity::TrustDomain,
    policy::FieldError,
};
use serde_json::Value;

use crate::{authz_pb as pb, InvalidPolicy};

fn one(field: &str, message: String) -> InvalidPolicy {
    InvalidPolicy(vec![FieldError {
        field: field.to_string(),
        message,
    }])
}

/// Reads the authorization policy of `service` from JSON and validates it
/// ([`AuthorizationPolicy::validate`]). `service` may be left out (it is then `service`);
/// if given it must be `service`. A field the schema does not know, a syntax error and a
/// value of the wrong type are refused, naming the field (`rule[0].ports[0]: invalid
/// type: string "80", expected u16`).
pub fn parse_json(json: &[u8], service: &str) -> Result<AuthorizationPolicy, InvalidPolicy> {
    let mut value: Value =
        serde_json::from_slice(json).map_err(|e| one("", format!("invalid JSON: {e}")))?;
    let Some(object) = value.as_object_mut() else {
        return Err(one(
            "",
            "expected an object: the authorization policy (see docs/authorization.md)".into(),
        ));
    };
    match object.get("service") {
        None => {
            object.insert("service".into(), Value::String(service.to_string()));
        }
        Some(Value::String(named)) if named != service => {
            return Err(one(
                "service",
                format!("{named:?} does not match the service in the path ({service:?})"),
            ));
        }
        Some(_) => {}
    }
    let policy = deserialize(&value)?;
    let errors = policy.validate();
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(InvalidPolicy(errors))
    }
}

/// Reads a policy from a JSON value; a type error or an unknown field names its field.
fn deserialize(value: &Value) -> Result<AuthorizationPolicy, InvalidPolicy> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        // serde_path_to_error writes the root as "." and an unknown place as "?".
        let field = e.path().to_string();
        let field = if field == "." || field.contains('?') {
            String::new()
        } else {
            field
        };
        one(&field, e.into_inner().to_string())
    })
}

/// What one `AuthorizationUpdate` says: the policy in force for a service, ready to
/// decide, or none (every caller allowed), and the mesh's mTLS mode.
#[derive(Clone, Debug)]
pub struct AuthorizationState {
    /// The store revision of the policy's last write; 0 without a policy.
    pub version: u64,
    /// The policy compiled for the mesh's trust domain.
    pub policy: Option<CompiledPolicy>,
    /// The mesh's mTLS mode, for a service whose policy sets none.
    pub mesh_mtls: PeerMtls,
}

impl AuthorizationState {
    /// Reads an update of the policy of `service`: `Err` when its policy cannot be used
    /// (then the caller keeps the one it has).
    pub fn from_update(
        update: &pb::AuthorizationUpdate,
        service: &str,
    ) -> Result<Self, InvalidPolicy> {
        let mesh_mtls = Self::mesh_mtls(update)?;
        if update.policy_json.is_empty() {
            return Ok(AuthorizationState {
                version: update.version,
                policy: None,
                mesh_mtls,
            });
        }
        let domain = TrustDomain::new(&update.trust_domain)
            .map_err(|e| one("trust_domain", e.to_string()))?;
        let value: Value = serde_json::from_str(&update.policy_json)
            .map_err(|e| one("", format!("invalid JSON: {e}")))?;
        let policy = deserialize(&value)?;
        if policy.service != service {
            return Err(one(
                "service",
                format!(
                    "{:?} is not the service watched ({service:?})",
                    policy.service
                ),
            ));
        }
        let compiled = policy.compile(&domain).map_err(InvalidPolicy)?;
        Ok(AuthorizationState {
            version: update.version,
            policy: Some(compiled),
            mesh_mtls,
        })
    }

    /// The mesh's mTLS mode an update carries: empty (a control plane of an earlier
    /// version, which knew no other) is `permissive`; a value this version does not know
    /// is refused, like a policy it cannot read whole.
    pub fn mesh_mtls(update: &pb::AuthorizationUpdate) -> Result<PeerMtls, InvalidPolicy> {
        if update.mesh_mtls.is_empty() {
            return Ok(PeerMtls::Permissive);
        }
        update
            .mesh_mtls
            .parse()
            .map_err(|e: malla_core::authz::UnknownPeerMtls| one("mesh_mtls", e.to_string()))
    }

    /// The mTLS mode this state puts in force: the policy's `mtls` if it sets one, else
    /// the mesh's; and whether it is the service's own.
    pub fn mtls(&self) -> (PeerMtls, bool) {
        match self.policy.as_ref().and_then(|p| p.policy().mtls) {
            Some(mode) => (mode, true),
            None => (self.mesh_mtls, false),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use malla_core::{
        authz::{Action, Request},
        SpiffeId,
    };

    use super::*;

    fn update(version: u64, json: &str, domain: &str) -> pb::AuthorizationUpdate {
        pb::AuthorizationUpdate {
            version,
            policy_json: json.into(),
            trust_domain: domain.into(),
            mesh_mtls: String::new(),
        }
    }

    #[test]
    fn the_mtls_mode_is_the_services_else_the_meshs() {
        let with_mesh = |json: &str, mesh: &str| {
            let mut u = update(3, json, "malla.local");
            u.mesh_mtls = mesh.into();
            AuthorizationState::from_update(&u, "payments")
        };
        let state = |json: &str, mesh: &str| with_mesh(json, mesh).unwrap().mtls();
        // No policy, or a policy without `mtls`: the mesh's; a control plane of an earlier
        // version says nothing: permissive.
        assert_eq!(state("", "strict"), (PeerMtls::Strict, false));
        assert_eq!(state("", ""), (PeerMtls::Permissive, false));
        let plain = r#"{"service": "payments"}"#;
        assert_eq!(state(plain, "strict"), (PeerMtls::Strict, false));
        assert_eq!(state(plain, "permissive"), (PeerMtls::Permissive, false));
        // The service's own wins, either way.
        let permissive = r#"{"service": "payments", "mtls": "permissive"}"#;
        assert_eq!(state(permissive, "strict"), (PeerMtls::Permissive, true));
        let strict = r#"{"service": "payments", "mtls": "strict"}"#;
        assert_eq!(state(strict, "permissive"), (PeerMtls::Strict, true));
        assert_eq!(state(strict, ""), (PeerMtls::Strict, true));
        // A mesh mode this version does not know refuses the update whole; so does a
        // policy's.
        let err = with_mesh("", "audit").unwrap_err();
        assert_eq!(err.0[0].field, "mesh_mtls");
        assert!(
            err.0[0].message.contains("use `strict` or `permissive`"),
            "{err}"
        );
        let err = with_mesh(r#"{"service": "payments", "mtls": "off"}"#, "strict").unwrap_err();
        assert_eq!(err.0[0].field, "mtls", "{err}");
        assert!(
            err.0[0]
                .message
                .contains("expected `permissive` or `strict`"),
            "{err}"
        );
        // Written through the API: the same check, by its field.
        let err = parse_json(br#"{"mtls": "STRICT"}"#, "payments").unwrap_err();
        assert_eq!(err.0[0].field, "mtls");
        assert!(
            err.0[0]
                .message
                .contains("unknown variant `STRICT`, expected `permissive` or `strict`"),
            "{err}"
        );
    }

    #[test]
    fn updates_become_compiled_states_or_are_refused_whole() {
        let none = AuthorizationState::from_update(&update(0, "", ""), "payments").unwrap();
        assert_eq!(none.version, 0);
        assert!(none.policy.is_none());

        // A service named in `from` means the mesh's trust domain, as the update says.
        let json = r#"{"service": "payments", "default": "deny",
                       "rule": [{"action": "allow", "from": ["checkout"]}]}"#;
        let state =
            AuthorizationState::from_update(&update(7, json, "prod.example"), "payments").unwrap();
        assert_eq!(state.version, 7);
        let policy = state.policy.unwrap();
        let decide = |id: &str| {
            let id = SpiffeId::parse(id).unwrap();
            policy
                .decide(&Request {
                    source: Some(&id),
                    port: 8080,
                    l7: None,
                })
                .action
        };
        assert_eq!(decide("spiffe://prod.example/svc/checkout"), Action::Allow);
        assert_eq!(decide("spiffe://malla.local/svc/checkout"), Action::Deny);

        // Refused whole: another service's, a field this version does not know (it may be
        // a condition), an invalid value, a bad trust domain, broken JSON.
        for (bad, field) in [
            (r#"{"service": "billing"}"#, "service"),
            (
                r#"{"service": "payments", "rule": [{"action": "allow", "headers": ["x"]}]}"#,
                "rule[0].headers",
            ),
            (
                r#"{"service": "payments", "rule": [{"action": "allow", "ports": [0]}]}"#,
                "rule[0].ports[0]",
            ),
            (r#"{"service": "payments""#, ""),
        ] {
            let err = AuthorizationState::from_update(&update(8, bad, "malla.local"), "payments")
                .unwrap_err();
            assert_eq!(err.0[0].field, field, "{bad}: {err}");
        }
        let err = AuthorizationState::from_update(&update(8, json, "Not A Domain"), "payments")
            .unwrap_err();
        assert_eq!(err.0[0].field, "trust_domain");
    }

    #[test]
    fn the_service_comes_from_the_path_and_every_problem_is_named() {
        let policy = parse_json(
            br#"{"default": "deny", "rule": [{"action": "allow", "from": ["checkout"]}]}"#,
            "payments",
        )
        .unwrap();
        assert_eq!(policy.service, "payments");
        assert_eq!(policy.rules.len(), 1);
        assert!(parse_json(br#"{"service": "payments"}"#, "payments").is_ok());

        let fields = |json: &str| -> Vec<(String, String)> {
            parse_json(json.as_bytes(), "payments")
                .unwrap_err()
                .0
                .into_iter()
                .map(|e| (e.field, e.message))
                .collect()
        };
        let other = fields(r#"{"service": "billing"}"#);
        assert_eq!(other[0].0, "service");
        assert!(other[0].1.contains("does not match"), "{other:?}");
        let typed = fields(r#"{"rule": [{"action": "allow", "ports": ["80"]}]}"#);
        assert_eq!(typed[0].0, "rule[0].ports[0]", "{typed:?}");
        let unknown = fields(r#"{"rule": [{"action": "allow", "method": ["GET"]}]}"#);
        assert!(
            unknown[0].1.contains("unknown field `method`"),
            "{unknown:?}"
        );
        let invalid = fields(
            r#"{"rule": [{"action": "allow", "paths": ["v1"], "from": []}, {"action": "deny", "ports": [0]}]}"#,
        );
        let names: Vec<&str> = invalid.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            names,
            ["rule[0].from", "rule[0].paths[0]", "rule[1].ports[0]"]
        );
        assert_eq!(fields("[]")[0].0, "");
        assert_eq!(fields("{")[0].0, "");
    }
}
