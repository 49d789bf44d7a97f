//! Labels: free-form `key=value` metadata on instances (`env=prod`, `zone=eu-1`).
//!
//! Syntax follows Kubernetes' so that people need not learn another: a key is an optional
//! DNS-subdomain prefix and `/`, then a name of 1-63 characters (alphanumerics, `-`, `_`,
//! `.`, starting and ending alphanumeric); a value is empty or such a name.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(BTreeMap<String, String>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("invalid label key {0:?}: use up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, optionally after a DNS prefix and '/'")]
    Key(String),
    #[error("invalid value {value:?} for label {key:?}: use up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit")]
    Value { key: String, value: String },
}

impl Labels {
    pub fn new() -> Self {
        Labels::default()
    }

    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), LabelError> {
        validate_key(key)?;
        validate_value(key, value)?;
        self.0.insert(key.to_string(), value.to_string());
        Ok(())
    }

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

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = LabelError;

    fn try_from(map: BTreeMap<String, String>) -> Result<Self, LabelError> {
        for (k, v) in &map {
            validate_key(k)?;
            validate_value(k, v)?;
        }
        Ok(Labels(map))
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.0
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// `name` part of a key, or a value: 1-63, `[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?`.
pub(crate) fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

pub fn validate_key(key: &str) -> Result<(), LabelError> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    };
    if ok {
        Ok(())
    } else {
        Err(LabelError::Key(key.to_string()))
    }
}

pub(crate) fn validate_value(key: &str, value: &str) -> Result<(), LabelError> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(LabelError::Value {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values() {
        let mut l = Labels::new();
        l.insert("env", "prod").unwrap();
        l.insert("malla.dev/zone", "eu-1").unwrap();
        l.insert("canary", "").unwrap();
        assert_eq!(l.to_string(), "canary=,env=prod,malla.dev/zone=eu-1");
        assert!(l.insert("-env", "x").is_err());
        assert!(l.insert("env", "a b").is_err());
        assert!(l.insert("Bad_Prefix/x", "y").is_err());
        assert!(l.insert(&"k".repeat(64), "y").is_err());
    }

    #[test]
    fn json_round_trip_validates() {
        let l: Labels = serde_json::from_str(r#"{"env":"prod"}"#).unwrap();
        assert_eq!(l.get("env"), Some("prod"));
        let err = serde_json::from_str::<Labels>(r#"{"env":"no way"}"#).unwrap_err();
        assert!(err.to_string().contains("invalid value"), "{err}");
    }
}
