//! Authorization policies ([`malla_core::authz`]) as JSON: how the control plane reads
//! what an operator writes (`PUT /v1/authorizations/{service}`), strictly, with every
//! problem named by its field.

use malla_core::{authz::AuthorizationPolicy, policy::FieldError};
use serde_json::Value;

use crate::InvalidPolicy;

/// Reads the authorization policy of `service` from JSON and validates it
/// ([`AuthorizationPolicy::validate`]). `service` may be left out (it is then `service`);
/// if given it must be `service`. A field the schema does not know, a syntax error and a
/// value of the wrong type are refused, naming the field (`rule[0].ports[0]: invalid
/// type: string "80", expected u16`).
pub fn parse_json(json: &[u8], service: &str) -> Result<AuthorizationPolicy, InvalidPolicy> {
    let one = |field: &str, message: String| {
        InvalidPolicy(vec![FieldError {
            field: field.to_string(),
            message,
        }])
    };
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
    let policy: AuthorizationPolicy = serde_path_to_error::deserialize(&value).map_err(|e| {
        // serde_path_to_error writes the root as "." and an unknown place as "?".
        let field = e.path().to_string();
        let field = if field == "." || field.contains('?') {
            String::new()
        } else {
            field
        };
        one(&field, e.into_inner().to_string())
    })?;
    let errors = policy.validate();
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(InvalidPolicy(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
