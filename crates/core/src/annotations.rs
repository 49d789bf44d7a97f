//! Annotations: free-form UTF-8 metadata on services and instances, for people and tools
//! (`display-name: "Cotización de Envío"`, `owner: team-pricing`, `runbook: https://...`).
//!
//! Unlike labels they select nothing, so their values are any text; they are bounded so
//! that a registry of thousands of instances stays small: at most [`MAX_ENTRIES`] entries,
//! values of at most [`MAX_VALUE_BYTES`]. Keys follow kubectl's syntax, the same as label
//! keys (an optional DNS-subdomain prefix and `/`, then 1-63 letters, digits, `-`, `_`, `.`,
//! starting and ending with a letter or digit), so `example.com/owner` works as people
//! expect.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most annotations on one service or instance.
pub const MAX_ENTRIES: usize = 32;
/// Longest annotation value, in bytes of UTF-8.
pub const MAX_VALUE_BYTES: usize = 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Annotations(BTreeMap<String, String>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("{count} annotations; at most {MAX_ENTRIES} are allowed: keep the rest elsewhere (a runbook link, say)")]
    TooMany { count: usize },
    #[error("invalid annotation key {0:?}: use up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, optionally after a DNS prefix and '/' (like kubectl's annotation keys)")]
    Key(String),
    #[error("the value of annotation {key:?} is {bytes} bytes; at most {MAX_VALUE_BYTES} (1 KiB) are allowed")]
    Value { key: String, bytes: usize },
}

impl Annotations {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<BTreeMap<String, String>> for Annotations {
    type Error = AnnotationError;

    fn try_from(map: BTreeMap<String, String>) -> Result<Self, AnnotationError> {
        if map.len() > MAX_ENTRIES {
            return Err(AnnotationError::TooMany { count: map.len() });
        }
        for (key, value) in &map {
            if crate::labels::validate_key(key).is_err() {
                return Err(AnnotationError::Key(key.clone()));
            }
            if value.len() > MAX_VALUE_BYTES {
                return Err(AnnotationError::Value {
                    key: key.clone(),
                    bytes: value.len(),
                });
            }
        }
        Ok(Annotations(map))
    }
}

impl From<Annotations> for BTreeMap<String, String> {
    fn from(a: Annotations) -> Self {
        a.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Annotations, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn utf8_values_and_kubectl_keys() {
        let a = parse(
            r#"{"display-name": "Cotización de Envío", "example.com/owner": "équipe prix",
                "runbook": "https://wiki.example/envío", "note": ""}"#,
        )
        .unwrap();
        assert_eq!(a.get("display-name"), Some("Cotización de Envío"));
        assert_eq!(a.len(), 4);
        let back: Annotations = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn bounds_with_clear_errors() {
        for (json, says) in [
            (
                r#"{"Display Name": "x"}"#,
                "invalid annotation key \"Display Name\"",
            ),
            (r#"{"-owner": "x"}"#, "invalid annotation key"),
            (r#"{"": "x"}"#, "invalid annotation key"),
        ] {
            let e = parse(json).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
        let long = format!(r#"{{"notes": "{}"}}"#, "é".repeat(513));
        let e = parse(&long).unwrap_err();
        assert!(e.contains("is 1026 bytes; at most 1024"), "{e}");
        let many: BTreeMap<String, String> =
            (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        let e = Annotations::try_from(many).unwrap_err().to_string();
        assert!(e.contains("33 annotations; at most 32"), "{e}");
    }
}
