//! The policy API (`malla.policy.v1.Policies`, `proto/malla/policy/v1/policy.proto`) as
//! domain values.
//!
//! A policy crosses the wire as the JSON of a [`Policy`] (the proto says why). Both ends
//! read it with the same code and the same checks: the control plane when a policy is
//! written ([`parse_json`], strict: an unknown field is an operator's typo), the sidecar
//! when one arrives ([`parse_json_lenient`]). So a policy the control plane accepted is
//! one every sidecar of the same version accepts. A sidecar older than its control plane
//! ignores the fields it does not know (and reports them: [`PolicyState::unknown_fields`])
//! and applies the rest, so that a newer control plane does not cut it off from policy
//! updates; a policy that is invalid for any other reason (a bound it checks differently,
//! a value of the wrong type) is refused with the field named, never applied in part.

use malla_core::{
    policy::{
        unknown::{self, FieldPath},
        FieldError,
    },
    Policy,
};

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

/// Reads a policy from JSON and validates it ([`Policy::validate`]), strictly: a field
/// the schema does not know is an error, as are a syntax error and a value of the wrong
/// type, each naming the field it is in (`retries.max_attempts: invalid type: string "2",
/// expected u32`; `retries.max_attemps: unknown field `max_attemps``). For what an
/// operator writes (the control plane's HTTP API).
pub fn parse_json(json: &[u8]) -> Result<Policy, InvalidPolicy> {
    let (policy, unknown) = read_json(json)?;
    let mut errors: Vec<FieldError> = unknown
        .iter()
        .map(|path| FieldError {
            field: path.to_string(),
            message: unknown::message(path),
        })
        .collect();
    errors.extend(policy.validate());
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(InvalidPolicy(errors))
    }
}

/// A policy read leniently, and the fields it had that this version does not know.
#[derive(Clone, Debug, PartialEq)]
pub struct LenientPolicy {
    pub policy: Policy,
    /// Dotted paths (`retries.hedging`, `rate_limit[0].window`), in the order met.
    pub unknown_fields: Vec<String>,
}

/// Reads a policy from JSON as a sidecar reads what its control plane sends: a field this
/// version does not know (written through a newer control plane) is ignored and reported,
/// not refused; everything else is checked as [`parse_json`] checks it, and a policy
/// invalid for any other reason is refused whole.
pub fn parse_json_lenient(json: &[u8]) -> Result<LenientPolicy, InvalidPolicy> {
    let (policy, unknown) = read_json(json)?;
    let errors = policy.validate();
    if errors.is_empty() {
        Ok(LenientPolicy {
            policy,
            unknown_fields: unknown.iter().map(ToString::to_string).collect(),
        })
    } else {
        Err(InvalidPolicy(errors))
    }
}

/// Deserializes, noting the unknown fields; syntax and type errors name their field.
fn read_json(json: &[u8]) -> Result<(Policy, Vec<FieldPath>), InvalidPolicy> {
    let mut track = serde_path_to_error::Track::new();
    let de = &mut serde_json::Deserializer::from_slice(json);
    let read = unknown::deserialize(serde_path_to_error::Deserializer::new(&mut *de, &mut track))
        .and_then(|read| de.end().map(|()| read));
    read.map_err(|e| {
        // serde_path_to_error writes the root as "." and an unknown place as "?".
        let field = track.path().to_string();
        let field = if field == "." || field.contains('?') {
            String::new()
        } else {
            field
        };
        InvalidPolicy(vec![FieldError {
            field,
            message: e.to_string(),
        }])
    })
}

/// What one `PolicyUpdate` says: the policy in force for a service's callers, or none.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyState {
    /// The store revision of the policy's last write; 0 without a policy.
    pub version: u64,
    pub policy: Option<Policy>,
    /// Fields of the policy this version does not know and ignored (dotted paths).
    pub unknown_fields: Vec<String>,
}

impl PolicyState {
    /// Reads an update of the policy of `service`: `Err` when its policy cannot be used
    /// (then the caller keeps the one it has).
    pub fn from_update(update: &pb::PolicyUpdate, service: &str) -> Result<Self, InvalidPolicy> {
        if update.policy_json.is_empty() {
            return Ok(PolicyState {
                version: update.version,
                policy: None,
                unknown_fields: Vec::new(),
            });
        }
        let LenientPolicy {
            policy,
            unknown_fields,
        } = parse_json_lenient(update.policy_json.as_bytes())?;
        if let Some(named) = policy.service.as_deref().filter(|s| *s != service) {
            return Err(InvalidPolicy(vec![FieldError {
                field: "service".into(),
                message: format!("{named:?} is not the service watched ({service:?})"),
            }]));
        }
        Ok(PolicyState {
            version: update.version,
            policy: Some(policy),
            unknown_fields,
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
        assert_eq!(fields(r#"{} {"#), [""]);
        // Strict: an unknown field at any depth is an error, with the checks of the rest.
        assert_eq!(
            fields(
                r#"{"rate_limit": [{"requests_per_second": 1, "window": 2}], "retries": {"max_attempts": 0}}"#
            ),
            ["rate_limit[0].window", "retries.max_attempts"]
        );
        let err = parse_json(br#"{"retries": {"max_attempts": 0}}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "retries.max_attempts: 0 is not between 1 and 10"
        );
    }

    #[test]
    fn lenient_reading_ignores_unknown_fields_and_checks_the_rest() {
        let json = br#"{"service": "quote", "hedging": {"delay": "10ms"},
                        "retries": {"max_attempts": 2, "jitter": "decorrelated"},
                        "fault": [{"abort_percent": 5, "abort_grpc": 14}]}"#;
        let read = parse_json_lenient(json).unwrap();
        assert_eq!(read.policy.retries.max_attempts, 2);
        assert_eq!(read.policy.faults[0].abort_percent.value(), 5.0);
        assert_eq!(
            read.unknown_fields,
            ["hedging", "retries.jitter", "fault[0].abort_grpc"]
        );
        let strict = parse_json(json).unwrap_err();
        assert_eq!(
            strict.to_string(),
            "hedging: unknown field `hedging`; retries.jitter: unknown field `jitter`; fault[0].abort_grpc: unknown field `abort_grpc`"
        );
        // Invalid for another reason: refused as before, unknown fields or not.
        for bad in [
            r#"{"future": 1, "retries": {"max_attempts": 0}}"#,
            r#"{"future": 1, "retries": {"max_attempts": "2"}}"#,
            r#"{"future": 1, "outlier": {"max_ejection_percent": 120}}"#,
            r#"{"future": 1"#,
        ] {
            assert!(parse_json_lenient(bad.as_bytes()).is_err(), "{bad}");
        }
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
                policy: None,
                unknown_fields: vec![]
            }
        );
        let some = pb::PolicyUpdate {
            version: 7,
            policy_json: r#"{"service": "quote", "retries": {"max_attempts": 2}}"#.into(),
        };
        let state = PolicyState::from_update(&some, "quote").unwrap();
        assert_eq!(state.version, 7);
        assert_eq!(state.policy.unwrap().retries.max_attempts, 2);
        assert!(state.unknown_fields.is_empty());
        let newer = pb::PolicyUpdate {
            version: 9,
            policy_json: r#"{"service": "quote", "retries": {"max_attempts": 2, "hedge": true}}"#
                .into(),
        };
        let state = PolicyState::from_update(&newer, "quote").unwrap();
        assert_eq!(state.policy.unwrap().retries.max_attempts, 2);
        assert_eq!(state.unknown_fields, ["retries.hedge"]);
        // Another service's policy is refused, as is an invalid one.
        assert!(PolicyState::from_update(&some, "billing").is_err());
        let bad = pb::PolicyUpdate {
            version: 8,
            policy_json: r#"{"retries": {"max_attempts": 99}}"#.into(),
        };
        assert!(PolicyState::from_update(&bad, "quote").is_err());
    }
}
