//! A file of policy resources, as `malla apply -f` reads it:
//!
//! ```toml
//! [[policy]]
//! service = "shipping-quote"
//! [policy.retries]
//! max_attempts = 2
//! ```
//!
//! Every problem is located: file, line, column and field, the way a compiler reports.

use std::{fmt, ops::Range};

use serde::Deserialize;

use super::Policy;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    policy: Vec<toml::Spanned<Policy>>,
}

/// One located problem in a document.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// 1-based; 0 when the problem has no place (an empty document).
    pub line: usize,
    pub column: usize,
    /// The dotted field path, when known (`policy[1].retries.max_attempts`).
    pub field: Option<String>,
    pub message: String,
}

/// Every problem found in one document.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct DocumentError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: ", self.source_name, p.line, p.column)?;
            if let Some(field) = &p.field {
                write!(f, "{field}: ")?;
            }
            write!(f, "{}", p.message)?;
        }
        Ok(())
    }
}

/// Parses and validates the policies in `text`; `source_name` (the file) names it in errors.
pub fn parse(text: &str, source_name: &str) -> Result<Vec<Policy>, DocumentError> {
    let fail = |problems| DocumentError {
        source_name: source_name.to_string(),
        problems,
    };
    let document: Document = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
        fail(vec![Problem {
            line,
            column,
            field: None,
            message: e.message().trim_end().to_string(),
        }])
    })?;
    if document.policy.is_empty() {
        return Err(fail(vec![Problem {
            line: 0,
            column: 0,
            field: None,
            message: "no [[policy]] in this document".into(),
        }]));
    }
    let mut problems = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    // A policy's text runs from its `[[policy]]` to the next one (the reader's span of an
    // array-of-tables element covers only its header).
    let starts: Vec<usize> = document.policy.iter().map(|p| p.span().start).collect();
    for (i, spanned) in document.policy.iter().enumerate() {
        let span = starts[i]..starts.get(i + 1).copied().unwrap_or(text.len());
        let policy = spanned.get_ref();
        let at = |field: &str, message: String| {
            let (line, column) = locate(text, span.clone(), field);
            Problem {
                line,
                column,
                field: Some(format!("policy[{i}].{field}")),
                message,
            }
        };
        match policy.service.as_deref() {
            None => problems.push(at(
                "service",
                "missing: name the service whose callers follow this policy".into(),
            )),
            Some(service) if seen.contains(&service) => problems.push(at(
                "service",
                format!("{service:?} has a policy earlier in this document; one per service"),
            )),
            Some(service) => seen.push(service),
        }
        for e in policy.validate() {
            problems.push(at(&e.field, e.message));
        }
    }
    if problems.is_empty() {
        Ok(document
            .policy
            .into_iter()
            .map(|p| p.into_inner())
            .collect())
    } else {
        Err(fail(problems))
    }
}

/// Where `field` (a dotted path inside one policy) is written within the policy's span:
/// the line that assigns its last key, else the policy's own first line.
fn locate(text: &str, span: Range<usize>, field: &str) -> (usize, usize) {
    let key = field
        .rsplit('.')
        .next()
        .unwrap_or(field)
        .split('[')
        .next()
        .unwrap_or(field);
    let body = text.get(span.clone()).unwrap_or("");
    let mut offset = span.start;
    let mut found = None;
    for line in body.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                found = Some(offset + (line.len() - trimmed.len()));
            }
        }
        offset += line.len();
    }
    line_col(text, found.unwrap_or(span.start))
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
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

    #[test]
    fn a_valid_document_gives_its_policies() {
        let policies = parse(
            r#"
[[policy]]
service = "shipping-quote"
[policy.retries]
max_attempts = 2

[[policy]]
service = "billing"
"#,
            "mesh.toml",
        )
        .unwrap();
        assert_eq!(policies.len(), 2);
        assert_eq!(policies[0].retries.max_attempts, 2);
        assert_eq!(policies[1].service.as_deref(), Some("billing"));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            // A bad value: the TOML reader points at it.
            (
                "[[policy]]\nservice = \"a\"\n[policy.outlier]\nmax_ejection_percent = 120\n",
                "mesh.toml:4:24: ",
                "not a percentage",
            ),
            // An unknown field.
            (
                "[[policy]]\nservice = \"a\"\n[policy.retries]\nmax_attemps = 2\n",
                "mesh.toml:4:1: ",
                "unknown field `max_attemps`",
            ),
            // A cross-field check, located on the field's own line.
            (
                "[[policy]]\nservice = \"a\"\n[policy.retries]\nbackoff_base = \"2s\"\nbackoff_max = \"1s\"\n",
                "mesh.toml:4:1: policy[0].retries.backoff_base: ",
                "above retries.backoff_max",
            ),
            // A missing service, located at the policy.
            (
                "[[policy]]\n[policy.retries]\nmax_attempts = 2\n",
                "mesh.toml:1:1: policy[0].service: ",
                "missing",
            ),
            (
                "[[policy]]\nservice = \"a\"\n\n[[policy]]\nservice = \"a\"\n",
                "mesh.toml:5:1: policy[1].service: ",
                "earlier in this document",
            ),
            ("", "mesh.toml:0:0: ", "no [[policy]]"),
            (
                "[[policy]]\nservice = \"a\"\n[[policy.fault]]\nabort_percent = 10\nabort_status = 99\n",
                "mesh.toml:5:1: policy[0].fault[0].abort_status: ",
                "not between 200 and 599",
            ),
            ("[[policy]\n", "mesh.toml:1:", "expected"),
        ];
        for (text, prefix, says) in cases {
            let err = parse(text, "mesh.toml").unwrap_err().to_string();
            assert!(err.starts_with(prefix), "{text:?}: {err}");
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
