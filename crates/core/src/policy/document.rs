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

use toml::de::{DeTable, DeValue};

use super::{unknown, Policy};
use unknown::line_col;

mod recover;

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
/// Every problem is reported, not only the first: a value the reader refuses is recorded
/// and read past (see [`recover`]).
pub fn parse(text: &str, source_name: &str) -> Result<Vec<Policy>, DocumentError> {
    let fail = |problems| DocumentError {
        source_name: source_name.to_string(),
        problems,
    };
    let located = |span: Option<Range<usize>>, message: String| {
        let (line, column) = span.as_ref().map_or((0, 0), |s| line_col(text, s.start));
        Problem {
            line,
            column,
            field: span.and_then(|s| field_at(text, s.start)),
            message,
        }
    };
    let root = DeTable::parse(text)
        .map_err(|e| fail(vec![located(e.span(), e.message().trim_end().to_string())]))?;
    // Where each `[[policy]]` starts, before any is taken out: a policy's index is its
    // place in the file.
    let starts: Vec<usize> = match root.get_ref().get("policy").map(|v| v.get_ref()) {
        Some(DeValue::Array(items)) => items.iter().map(|p| p.span().start).collect(),
        _ => Vec::new(),
    };
    // The policy types accept unknown fields (a sidecar must, from a newer control
    // plane); in an operator's document each one is a typo, located at its key.
    let read = recover::read::<Document>(root);
    let mut problems: Vec<Problem> = read
        .errors
        .into_iter()
        .map(|e| located(e.span, e.message))
        .collect();
    let Some(document) = read.value else {
        return Err(fail(problems));
    };
    // The fields taken out (now at their defaults): checks must not complain about them.
    let removed: Vec<String> = read
        .removed
        .iter()
        .filter_map(|&at| field_at(text, at))
        .collect();
    if document.policy.is_empty() && problems.is_empty() {
        return Err(fail(vec![Problem {
            line: 0,
            column: 0,
            field: None,
            message: "no [[policy]] in this document".into(),
        }]));
    }
    for (path, at) in &read.unknown {
        let (line, column) = at.map_or((0, 0), |at| line_col(text, at));
        problems.push(Problem {
            line,
            column,
            // Read from the text: the path's indices are the tree's, which may have lost
            // an element.
            field: Some(
                at.and_then(|at| field_at(text, at))
                    .unwrap_or_else(|| path.to_string()),
            ),
            message: unknown::message(path),
        });
    }
    let mut seen: Vec<&str> = Vec::new();
    for spanned in &document.policy {
        let start = spanned.span().start;
        let i = starts.iter().position(|&s| s == start).unwrap_or(0);
        // A policy's text runs from its `[[policy]]` to the next one (the reader's span of
        // an array-of-tables element covers only its header).
        let span = start..starts.get(i + 1).copied().unwrap_or(text.len());
        let policy = spanned.get_ref();
        let follows_removal = |field: &str, message: &str| {
            let full = format!("policy[{i}].{field}");
            removed.iter().any(|r| {
                full.starts_with(r.as_str())
                    || r.strip_prefix(&format!("policy[{i}]."))
                        .is_some_and(|rel| message.contains(rel))
            })
        };
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
            None if follows_removal("service", "") => {}
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
            if !follows_removal(&e.field, &e.message) {
                problems.push(at(&e.field, e.message));
            }
        }
    }
    if problems.is_empty() {
        Ok(document
            .policy
            .into_iter()
            .map(|p| p.into_inner())
            .collect())
    } else {
        // In the order of the text, as a compiler lists them.
        problems.sort_by_key(|p| (p.line, p.column));
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

/// The dotted field path (`policy[1].outlier.max_ejection_percent`) of the key or value
/// at `offset`, read from the text around it: the `[[policy]]` it is in, the table header
/// above it, the key on its line. The TOML reader's errors (a value of the wrong type or
/// out of range, an unknown field) carry a place but no path. `None` when the place is not
/// a plain `key = value` or header inside a `[[policy]]` (deeper inline tables, say):
/// no path is better than a wrong one.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let mut policy: Option<usize> = None;
    // The current table, relative to its policy (`outlier`, `rate_limit[1]`).
    let mut table: Option<String> = None;
    let mut arrays: Vec<(String, usize)> = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        let here = (start..end).contains(&offset) || (end == text.len() && offset == end);
        let trimmed = line.trim();
        if let Some(name) = trimmed
            .strip_prefix("[[")
            .and_then(|t| t.split_once("]]"))
            .map(|(name, _)| name.trim())
        {
            if name == "policy" {
                policy = Some(policy.map_or(0, |i| i + 1));
                table = None;
                arrays.clear();
            } else {
                table = name.strip_prefix("policy.").map(|rest| {
                    let n = match arrays.iter_mut().find(|(a, _)| a == rest) {
                        Some((_, n)) => {
                            *n += 1;
                            *n
                        }
                        None => {
                            arrays.push((rest.to_string(), 0));
                            0
                        }
                    };
                    format!("{rest}[{n}]")
                });
            }
        } else if let Some(name) = trimmed
            .strip_prefix('[')
            .and_then(|t| t.split_once(']'))
            .map(|(name, _)| name.trim())
        {
            table = name.strip_prefix("policy.").map(str::to_string);
            if here {
                // An error on a header: the table it names.
                let policy = policy?;
                return table.map(|t| format!("policy[{policy}].{t}"));
            }
        } else if here {
            let key = key_at(&line[..offset - start], line)?;
            let mut path = format!("policy[{}]", policy?);
            if let Some(t) = &table {
                path = format!("{path}.{t}");
            }
            return Some(format!("{path}.{key}"));
        }
        if here {
            return None;
        }
        start = end;
    }
    None
}

/// The key a line assigns, seen from a place in it (`before`: the line up to there):
/// `max_attempts` for `max_attempts = "x"`, `retries.max_attempts` inside
/// `retries = { max_attempts = "x" }`.
fn key_at(before: &str, line: &str) -> Option<String> {
    let is_key = |k: &str| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    let first = line.split_once('=')?.0.trim();
    if !is_key(first) {
        return None;
    }
    match (before.matches('{').count(), before.contains('}')) {
        (0, false) => Some(first.to_string()),
        (1, false) => {
            // The last `key =` before the place, inside the one inline table.
            let inner = before.rsplit_once('{')?.1;
            let segment = inner.rsplit(',').next()?;
            let last = segment.split_once('=')?.0.trim();
            is_key(last).then(|| format!("{first}.{last}"))
        }
        _ => None,
    }
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
            // A bad value: the TOML reader points at it; the path is read around it.
            (
                "[[policy]]\nservice = \"a\"\n[policy.outlier]\nmax_ejection_percent = 120\n",
                "mesh.toml:4:24: policy[0].outlier.max_ejection_percent: ",
                "not a percentage",
            ),
            // An unknown field.
            (
                "[[policy]]\nservice = \"a\"\n[policy.retries]\nmax_attemps = 2\n",
                "mesh.toml:4:1: policy[0].retries.max_attemps: ",
                "unknown field `max_attemps`",
            ),
            // An unknown table.
            (
                "[[policy]]\nservice = \"a\"\n[policy.retrie]\nmax_attempts = 2\n",
                "mesh.toml:3:9: policy[0].retrie: ",
                "unknown field `retrie`",
            ),
            // The second of an array of tables, in the second policy.
            (
                "[[policy]]\nservice = \"a\"\n[[policy]]\nservice = \"b\"\n[[policy.rate_limit]]\nrequests_per_second = 1\n[[policy.rate_limit]]\nrequests_per_second = \"x\"\n",
                "mesh.toml:8:23: policy[1].rate_limit[1].requests_per_second: ",
                "expected f64",
            ),
            // Dotted keys and an inline table.
            (
                "[[policy]]\nservice = \"a\"\nretries.max_attempts = \"x\"\n",
                "mesh.toml:3:24: policy[0].retries.max_attempts: ",
                "expected u32",
            ),
            (
                "[[policy]]\nservice = \"a\"\nretries = { enabled = true, max_attempts = \"x\" }\n",
                "mesh.toml:3:44: policy[0].retries.max_attempts: ",
                "expected u32",
            ),
            // Outside any policy: no path.
            ("polcy = 1\n", "mesh.toml:1:1: unknown field `polcy`", ""),
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
            // An unknown field deeper down, in the first of an array of tables.
            (
                "[[policy]]\nservice = \"a\"\n[[policy.rate_limit]]\nrequests_per_second = 1\nwindow = 2\n",
                "mesh.toml:5:1: policy[0].rate_limit[0].window: ",
                "unknown field `window`",
            ),
            // A replay buffer over the cap.
            (
                "[[policy]]\nservice = \"a\"\n[policy.retries]\nmax_replay_bytes = 2097152\n",
                "mesh.toml:4:1: policy[0].retries.max_replay_bytes: ",
                "2097152 is above 1048576 (1 MiB)",
            ),
        ];
        for (text, prefix, says) in cases {
            let err = parse(text, "mesh.toml").unwrap_err().to_string();
            assert!(err.starts_with(prefix), "{text:?}: {err}");
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    /// Every problem of a document, not the first: a wrong type, an unknown field and a
    /// bad duration in three policies give three problems, in the order of the text, and
    /// a value read past does not give follow-on problems (a "missing field" for the key
    /// taken out, a missing service, a cross-field check against its default).
    #[test]
    fn every_problem_of_a_document_is_reported() {
        let text = r#"[[policy]]
service = "a"
[policy.retries]
max_attempts = "three"
backoff_max = "1x"

[[policy]]
service = "b"
[policy.outlier]
consecutive_failurez = 3

[[policy]]
service = "c"
[policy.timeouts]
request = "soon"
[[policy.rate_limit]]
requests_per_second = "many"

[[policy]]
service = 7
polcy = 1
"#;
        let err = parse(text, "mesh.toml").unwrap_err();
        let lines: Vec<String> = err.to_string().lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 7, "{err}");
        assert!(
            lines[0].starts_with("mesh.toml:4:16: policy[0].retries.max_attempts: "),
            "{err}"
        );
        assert!(
            lines[1].starts_with("mesh.toml:5:15: policy[0].retries.backoff_max: "),
            "{err}"
        );
        assert_eq!(
            lines[2],
            "mesh.toml:10:1: policy[1].outlier.consecutive_failurez: unknown field `consecutive_failurez`"
        );
        assert!(
            lines[3].starts_with("mesh.toml:15:11: policy[2].timeouts.request: "),
            "{err}"
        );
        assert!(
            lines[4].starts_with("mesh.toml:17:23: policy[2].rate_limit[0].requests_per_second: "),
            "{err}"
        );
        assert!(
            lines[5].starts_with("mesh.toml:20:11: policy[3].service: "),
            "{err}"
        );
        // `polcy` sits inside the last [[policy]] table: an unknown field of that policy.
        assert_eq!(
            lines[6],
            "mesh.toml:21:1: policy[3].polcy: unknown field `polcy`"
        );
        assert!(!err.to_string().contains("missing"), "{err}");
    }

    /// A document with a great many bad values still ends, with a bounded report.
    #[test]
    fn a_document_full_of_problems_is_read_in_bounded_time() {
        let mut text = String::new();
        for i in 0..300 {
            text.push_str(&format!(
                "[[policy]]\nservice = \"s{i}\"\n[policy.retries]\nmax_attempts = \"x\"\n"
            ));
        }
        let err = parse(&text, "big.toml").unwrap_err();
        assert!(
            !err.problems.is_empty() && err.problems.len() <= 101,
            "{}",
            err.problems.len()
        );
    }

    /// Bad input never panics: thousands of byte-level mutations of a full document each
    /// parse to policies or to located problems.
    #[test]
    fn mutated_documents_never_panic() {
        let base = br#"[[policy]]
service = "shipping-quote"
[policy.timeouts]
per_try = "2s"
request = "5s"
[policy.retries]
max_attempts = 3
on = ["5xx", "grpc-unavailable", "503"]
budget_ratio = 0.2
[policy.outlier]
consecutive_failures = 5
max_ejection_percent = 50
[policy.outlier.latency]
enabled = true
[[policy.rate_limit]]
path_prefix = "/api"
requests_per_second = 100
[[policy.fault]]
abort_percent = 1
[policy.failover]
prefer = "env=prod"
"#;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut doc = base.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % doc.len() as u64) as usize;
                match next() % 3 {
                    0 => doc[at] = (next() % 256) as u8,
                    1 => {
                        doc.remove(at);
                    }
                    _ => doc.insert(at, b"=[]\"\n.-"[next() as usize % 7]),
                }
            }
            let text = String::from_utf8_lossy(&doc);
            match parse(&text, "fuzz.toml") {
                Ok(policies) => assert!(!policies.is_empty()),
                Err(e) => assert!(!e.problems.is_empty()),
            }
        }
    }
}
