//! Label selectors: which instances a caller wants.
//!
//! The syntax is Kubernetes' set-based selector, comma-separated requirements that must all
//! hold:
//!
//! | requirement | holds when |
//! |---|---|
//! | `env=prod` or `env==prod` | the label `env` is `prod` |
//! | `env!=prod` | `env` is absent or not `prod` |
//! | `zone in (eu-1,eu-2)` | `zone` is one of the values |
//! | `zone notin (eu-3)` | `zone` is absent or none of the values |
//! | `canary` | the label `canary` exists |
//! | `!canary` | the label `canary` does not exist |
//!
//! The empty selector matches everything. Errors name the position and what was expected.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::labels::{validate_key, validate_value, Labels};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector(Vec<Requirement>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid selector {input:?} at position {pos}: {message}")]
pub struct SelectorError {
    pub input: String,
    pub pos: usize,
    pub message: String,
}

impl Selector {
    /// Everything.
    pub fn all() -> Self {
        Selector::default()
    }

    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        Parser { input, pos: 0 }.selector()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| {
            let value = labels.get(&r.key);
            match &r.op {
                Op::Eq(v) => value == Some(v.as_str()),
                Op::NotEq(v) => value != Some(v.as_str()),
                Op::In(set) => value.is_some_and(|x| set.iter().any(|v| v == x)),
                Op::NotIn(set) => !value.is_some_and(|x| set.iter().any(|v| v == x)),
                Op::Exists => value.is_some(),
                Op::NotExists => value.is_none(),
            }
        })
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;

    fn try_from(s: String) -> Result<Self, SelectorError> {
        Selector::parse(&s)
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> Self {
        s.to_string()
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, SelectorError> {
        Selector::parse(s)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let k = &r.key;
            match &r.op {
                Op::Eq(v) => write!(f, "{k}={v}")?,
                Op::NotEq(v) => write!(f, "{k}!={v}")?,
                Op::In(set) => write!(f, "{k} in ({})", set.join(","))?,
                Op::NotIn(set) => write!(f, "{k} notin ({})", set.join(","))?,
                Op::Exists => write!(f, "{k}")?,
                Op::NotExists => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: impl Into<String>) -> SelectorError {
        SelectorError {
            input: self.input.to_string(),
            pos: self.pos,
            message: message.into(),
        }
    }

    fn rest(&self) -> &str {
        &self.input[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.input.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    /// A key or value: everything up to a delimiter.
    fn word(&mut self) -> &str {
        let end = self
            .rest()
            .find(|c: char| c.is_whitespace() || "=!(),".contains(c))
            .unwrap_or(self.rest().len());
        let start = self.pos;
        self.pos += end;
        &self.input[start..self.pos]
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let at = self.pos;
        let key = self.word().to_string();
        if key.is_empty() {
            return Err(self.error("expected a label key"));
        }
        validate_key(&key).map_err(|e| SelectorError {
            pos: at,
            ..self.error(e.to_string())
        })?;
        Ok(key)
    }

    fn value(&mut self, key: &str) -> Result<String, SelectorError> {
        self.skip_ws();
        let at = self.pos;
        let value = self.word().to_string();
        validate_value(key, &value).map_err(|e| SelectorError {
            pos: at,
            ..self.error(e.to_string())
        })?;
        Ok(value)
    }

    fn set(&mut self, key: &str) -> Result<Vec<String>, SelectorError> {
        self.skip_ws();
        if !self.eat("(") {
            return Err(self.error("expected '(' to open the set of values"));
        }
        let mut values = Vec::new();
        loop {
            self.skip_ws();
            let at = self.pos;
            let value = self.value(key)?;
            if value.is_empty() {
                // `zone in ()` and `zone in (a,,b)` are mistakes, not sets with "".
                return Err(SelectorError {
                    pos: at,
                    ..self.error("expected a value in the set (sets cannot be empty)")
                });
            }
            values.push(value);
            self.skip_ws();
            if self.eat(")") {
                return Ok(values);
            }
            if !self.eat(",") {
                return Err(self.error("expected ',' or ')' in the set of values"));
            }
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        self.skip_ws();
        if self.eat("!") {
            let key = self.key()?;
            return Ok(Requirement {
                key,
                op: Op::NotExists,
            });
        }
        let key = self.key()?;
        self.skip_ws();
        let op = if self.eat("==") || self.eat("=") {
            Op::Eq(self.value(&key)?)
        } else if self.eat("!=") {
            Op::NotEq(self.value(&key)?)
        } else if self.rest().starts_with("notin")
            && !self.rest()[5..].starts_with(|c: char| c.is_alphanumeric())
        {
            self.pos += 5;
            Op::NotIn(self.set(&key)?)
        } else if self.rest().starts_with("in")
            && !self.rest()[2..].starts_with(|c: char| c.is_alphanumeric())
        {
            self.pos += 2;
            Op::In(self.set(&key)?)
        } else if self.rest().is_empty() || self.rest().starts_with(',') {
            Op::Exists
        } else {
            return Err(self.error("expected '=', '!=', 'in', 'notin', ',' or the end"));
        };
        Ok(Requirement { key, op })
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        let mut reqs = Vec::new();
        self.skip_ws();
        if self.rest().is_empty() {
            return Ok(Selector(reqs));
        }
        loop {
            reqs.push(self.requirement()?);
            self.skip_ws();
            if self.rest().is_empty() {
                return Ok(Selector(reqs));
            }
            if !self.eat(",") {
                return Err(self.error("expected ',' between requirements"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        let mut l = Labels::new();
        for (k, v) in pairs {
            l.insert(k, v).unwrap();
        }
        l
    }

    #[test]
    fn parses_and_matches_every_kind() {
        let prod_eu1 = labels(&[("env", "prod"), ("zone", "eu-1"), ("canary", "")]);
        let staging = labels(&[("env", "staging"), ("zone", "eu-3")]);
        let cases = [
            ("", true, true),
            ("env=prod", true, false),
            ("env==prod", true, false),
            ("env!=prod", false, true),
            ("zone in (eu-1, eu-2)", true, false),
            ("zone notin (eu-1)", false, true),
            ("canary", true, false),
            ("!canary", false, true),
            ("env=prod,zone in (eu-1),canary", true, false),
            ("missing!=x", true, true),
            ("missing notin (x)", true, true),
        ];
        for (text, a, b) in cases {
            let s = Selector::parse(text).unwrap();
            assert_eq!(s.matches(&prod_eu1), a, "{text}");
            assert_eq!(s.matches(&staging), b, "{text}");
            // Display round-trips.
            assert_eq!(Selector::parse(&s.to_string()).unwrap(), s, "{text}");
        }
    }

    #[test]
    fn errors_say_where_and_what() {
        let e = Selector::parse("env=prod,,zone=a").unwrap_err();
        assert_eq!(e.pos, 9);
        assert!(e.message.contains("label key"), "{e}");
        let e = Selector::parse("zone in eu-1").unwrap_err();
        assert!(e.message.contains("'('"), "{e}");
        let e = Selector::parse("zone in (a b)").unwrap_err();
        assert!(e.message.contains("',' or ')'"), "{e}");
        let e = Selector::parse("env=prod zone=a").unwrap_err();
        assert!(e.message.contains("between requirements"), "{e}");
        let e = Selector::parse("zone in ()").unwrap_err();
        assert!(e.message.contains("cannot be empty"), "{e}");
        assert!(Selector::parse("zone in (a,,b)").is_err());
        let e = Selector::parse("env=not ok!").unwrap_err();
        assert!(e.to_string().contains("position"), "{e}");
        assert!(Selector::parse("-bad=x").is_err());
        assert!(Selector::parse("inside").unwrap().requirements()[0].op == Op::Exists);
    }
}
