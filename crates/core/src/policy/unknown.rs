//! Fields of a policy that its reader does not know.
//!
//! The policy types accept fields they do not know (they do not `deny_unknown_fields`);
//! each reader decides what an unknown field means, with [`deserialize`] telling it which
//! ones it met:
//!
//! - an operator's document (`malla apply`, the control plane's HTTP API, a sidecar's own
//!   `[upstream.policy]`) is read strictly: an unknown field is a typo, an error located
//!   at its field (and its `FILE:LINE:COL` where there is a text);
//! - a sidecar reading what its control plane sends is lenient: a control plane newer than
//!   the sidecar may send fields it does not know yet, and refusing the whole policy for
//!   them would keep an older sidecar on an older policy for good. It applies the rest,
//!   and logs, counts and shows the fields it ignored.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// One step of a [`FieldPath`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// Where a field is: `retries.hedging`, `rate_limit[1].window`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    fn from_ignored(path: &serde_ignored::Path<'_>) -> Self {
        let mut segments = Vec::new();
        push(path, &mut segments);
        FieldPath(segments)
    }

    /// The last key: the name of the field itself.
    pub fn name(&self) -> &str {
        self.0
            .iter()
            .rev()
            .find_map(|s| match s {
                Segment::Key(key) => Some(key.as_str()),
                Segment::Index(_) => None,
            })
            .unwrap_or("")
    }
}

fn push(path: &serde_ignored::Path<'_>, out: &mut Vec<Segment>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            push(parent, out);
            out.push(Segment::Index(*index));
        }
        Path::Map { parent, key } => {
            push(parent, out);
            // The TOML reader's `Spanned` wrapper shows up as a map of private keys.
            if !key.starts_with("$__serde_spanned_private") {
                out.push(Segment::Key(key.clone()));
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => push(parent, out),
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// Reads a `T` with `de`, and every field it ignored because its type does not know it,
/// in the order met.
pub fn deserialize<'de, D, T>(de: D) -> Result<(T, Vec<FieldPath>), D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let mut unknown = Vec::new();
    let value = serde_ignored::deserialize(de, |path| {
        unknown.push(FieldPath::from_ignored(&path));
    })?;
    Ok((value, unknown))
}

/// The message of an unknown field in a strictly read document.
pub fn message(path: &FieldPath) -> String {
    format!("unknown field `{}`", path.name())
}

/// Where the key at `path` is written in the TOML document `text`: its 1-based line and
/// column. `None` when the text does not parse or has no such key.
pub fn toml_line_col(text: &str, path: &FieldPath) -> Option<(usize, usize)> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?.into_inner();
    let mut table = &root;
    let mut value: Option<&DeValue<'_>> = None;
    for (i, segment) in path.0.iter().enumerate() {
        let last = i + 1 == path.0.len();
        if let Some(v) = value {
            match v {
                DeValue::Table(t) => table = t,
                DeValue::Array(items) => {
                    let Segment::Index(n) = segment else {
                        return None;
                    };
                    let item = items.get(*n)?;
                    if last {
                        return Some(line_col(text, item.span().start));
                    }
                    value = Some(item.get_ref());
                    continue;
                }
                _ => return None,
            }
        }
        let Segment::Key(name) = segment else {
            return None;
        };
        let (key, v) = table.iter().find(|(k, _)| k.get_ref() == name)?;
        if last {
            return Some(line_col(text, key.span().start));
        }
        value = Some(v.get_ref());
    }
    None
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    // A span that falls inside a character (it should not) counts from the line start.
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |n| before.len() - n - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Policy;

    #[test]
    fn unknown_fields_at_any_depth_are_named() {
        let json = r#"{"retries": {"max_attempts": 2, "hedging": {"delay": "1s"}},
                       "rate_limit": [{"requests_per_second": 1}, {"requests_per_second": 2, "window": "1s"}],
                       "outlier": {"latency": {"enabled": true, "percentile": 99}},
                       "mirror": "shadow"}"#;
        let (policy, unknown): (Policy, _) =
            deserialize(&mut serde_json::Deserializer::from_str(json)).unwrap();
        assert_eq!(policy.retries.max_attempts, 2);
        assert!(policy.outlier.latency.enabled);
        assert_eq!(policy.rate_limits.len(), 2);
        let names: Vec<String> = unknown.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "retries.hedging",
                "rate_limit[1].window",
                "outlier.latency.percentile",
                "mirror"
            ]
        );
        assert_eq!(message(&unknown[1]), "unknown field `window`");
    }

    #[test]
    fn toml_keys_are_located() {
        let text = "[[policy]]\nservice = \"a\"\n[policy.retries]\nmax_attemps = 2\n[[policy.rate_limit]]\nrequests_per_second = 1\nwindow = 3\n";
        let path = |segments: &[Segment]| FieldPath(segments.to_vec());
        let key = |k: &str| Segment::Key(k.into());
        assert_eq!(
            toml_line_col(
                text,
                &path(&[
                    key("policy"),
                    Segment::Index(0),
                    key("retries"),
                    key("max_attemps")
                ])
            ),
            Some((4, 1))
        );
        assert_eq!(
            toml_line_col(
                text,
                &path(&[
                    key("policy"),
                    Segment::Index(0),
                    key("rate_limit"),
                    Segment::Index(0),
                    key("window")
                ])
            ),
            Some((7, 1))
        );
        assert_eq!(toml_line_col(text, &path(&[key("nope")])), None);
        assert_eq!(toml_line_col("[[x", &path(&[key("x")])), None);
    }
}
