//! The policy API (`malla.policy.v1.Policies`, `proto/malla/policy/v1/policy.proto`) as
//! domain values.
//!
//! A policy crosses the wire as the JSON of a [`Policy`] (the proto says why). Both ends
//! read it with [`parse_json`]: the control plane when a policy is written, the sidecar
//! when one arrives. So a policy the control plane accepted is one every sidecar of the
//! same version accepts, and a sidecar that is older than its control plane (a field it
//! does not know, a bound it checks differently) refuses the policy with the field named
//! instead of applying part of it.

use malla_core::{policy::FieldError, Policy};

use crate::policy_pb as pb;

/// A policy that cannot be used, with every problem found (dotted field paths).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}", describe(.0))]
pub struct InvalidPolicy(pub Vec<FieldError>);

fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| {
            if e.field.is_empty() {
                e.message.clone()
            } else {
                format!("{}: {}", e.field, e.message)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads a policy from JSON and validates it ([`Policy::validate`]). A syntax error, an
/// unknown field or a value of the wrong type names the field it is in
/// (`retries.max_attempts: invalid type: string "2", expected u32`).
pub fn parse_json(json: &[u8]) -> Result<Policy, InvalidPolicy> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    let policy: Policy = serde_path_to_error::deserialize(de).map_err(|e| {
        // serde_path_to_error writes the root as "." and an unknown place as "?".
        let field = e.path().to_string();
        let field = if field == "." || field.contains('?') {
            String::new()
        } else {
            field
        };
        InvalidPolicy(vec![FieldError {
            field,
            message: e.into_inner().to_string(),
        }])
    })?;
    let errors = policy.validate();
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(InvalidPolicy(errors))
    }
}

/// What one `PolicyUpdate` says: the policy in force for a service's callers, or none.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyState {
    /// The store revision of the policy's last write; 0 without a policy.
    pub version: u64,
    pub policy: Option<Policy>,
}

impl PolicyState {
    /// Reads an update of the policy of `service`: `Err` when its policy cannot be used
    /// (then the caller keeps the one it has).
    pub fn from_update(update: &pb::PolicyUpdate, service: &str) -> Result<Self, InvalidPolicy> {
        if update.policy_json.is_empty() {
            return Ok(PolicyState {
                version: update.version,
                policy: None,
            });
        }
        let policy = parse_json(update.policy_json.as_bytes())?;
        if let Some(named) = policy.service.as_deref().filter(|s| *s != service) {
            return Err(InvalidPolicy(vec![FieldError {
                field: "service".into(),
                message: format!("{named:?} is not the service watched ({service:?})"),
            }]));
        }
        Ok(PolicyState {
            version: update.version,
            policy: Some(policy),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn fields(json: &str) -> Vec<String> {
        parse_json(json.as_bytes())
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            fields(r#"{"retries": {"max_attemps": 2}}"#),
            ["retries.max_attemps"]
        );
        assert_eq!(
            fields(r#"{"retries": {"max_attempts": "2"}}"#),
            ["retries.max_attempts"]
        );
        assert_eq!(
            fields(r#"{"retries": {"max_attempts": 0}}"#),
            ["retries.max_attempts"]
        );
        assert_eq!(
            fields(r#"{"fault": [{"abort_status": 99}]}"#),
            ["fault[0].abort_status"]
        );
        assert_eq!(fields("{"), [""]);
        let err = parse_json(br#"{"retries": {"max_attempts": 0}}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "retries.max_attempts: 0 is not between 1 and 10"
        );
    }

    #[test]
    fn updates_become_states() {
        let none = pb::PolicyUpdate {
            version: 0,
            policy_json: String::new(),
        };
        assert_eq!(
            PolicyState::from_update(&none, "quote").unwrap(),
            PolicyState {
                version: 0,
                policy: None
            }
        );
        let some = pb::PolicyUpdate {
            version: 7,
            policy_json: r#"{"service": "quote", "retries": {"max_attempts": 2}}"#.into(),
        };
        let state = PolicyState::from_update(&some, "quote").unwrap();
        assert_eq!(state.version, 7);
        assert_eq!(state.policy.unwrap().retries.max_attempts, 2);
        // Another service's policy is refused, as is an invalid one.
        assert!(PolicyState::from_update(&some, "billing").is_err());
        let bad = pb::PolicyUpdate {
            version: 8,
            policy_json: r#"{"retries": {"max_attempts": 99}}"#.into(),
        };
        assert!(PolicyState::from_update(&bad, "quote").is_err());
    }
}
