//! A file of resources, as `malla apply -f` reads it: resilience policies (`[[policy]]`)
//! and authorization policies (`[[authorization]]`, [`crate::authz`]), in any order:
//!
//! ```toml
//! [[policy]]
//! service = "shipping-quote"
//! [policy.retries]
//! max_attempts = 2
//!
//! [[authorization]]
//! service = "payments"
//! default = "deny"
//! [[authorization.rule]]
//! action = "allow"
//! from = ["checkout"]
//! ```
//!
//! Every problem is located: file, line, column and field, the way a compiler reports.

use std::{fmt, ops::Range};

use serde::Deserialize;

use toml::de::{DeTable, DeValue};

use super::{
    unknown::{self, FieldPath, Segment},
    Mode, Policy,
};
use crate::authz::{Action, AuthorizationPolicy, PeerMtls, Rule};
use unknown::line_col;

mod recover;

/// The top-level arrays of tables a document may hold.
const KINDS: [&str; 2] = ["policy", "authorization"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    policy: Vec<toml::Spanned<Policy>>,
    #[serde(default)]
    authorization: Vec<toml::Spanned<AuthorizationDocument>>,
}

/// An [`AuthorizationPolicy`] as written in a document: its `service` may be missing (a
/// problem reported with its place, not a reader's error that would take the whole table
/// out), and each rule keeps its place, so that a rule taken out for a bad value does not
/// shift the others' indices in the problems reported.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizationDocument {
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    default: Action,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    mtls: Option<PeerMtls>,
    #[serde(default, rename = "rule")]
    rules: Vec<toml::Spanned<Rule>>,
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

/// Every resource of a document, each kind in the order of the text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub policies: Vec<Policy>,
    pub authorizations: Vec<AuthorizationPolicy>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.authorizations.is_empty()
    }
}

/// Parses and validates the resilience policies in `text`; `source_name` (the file) names
/// it in errors. Every problem is reported, not only the first: a value the reader refuses
/// is recorded and read past (see [`recover`]). `[[authorization]]` tables are read and
/// checked too (their problems are reported) but not returned: [`parse_resources`] gives
/// both kinds.
pub fn parse(text: &str, source_name: &str) -> Result<Vec<Policy>, DocumentError> {
    let resources = parse_resources(text, source_name)?;
    if resources.policies.is_empty() {
        return Err(DocumentError {
            source_name: source_name.to_string(),
            problems: vec![Problem {
                line: 0,
                column: 0,
                field: None,
                message: "no [[policy]] in this document".into(),
            }],
        });
    }
    Ok(resources.policies)
}

/// Parses and validates every resource in `text`: `[[policy]]` and `[[authorization]]`
/// tables. Every problem of either kind is reported, located, in the order of the text;
/// two resources of one kind for the same service are a problem.
pub fn parse_resources(text: &str, source_name: &str) -> Result<Resources, DocumentError> {
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
    // Where each `[[policy]]` (each `[[authorization]]`, and each rule of it) starts, before
    // any is taken out: a resource's index is its place in the file.
    let starts_of = |items: Option<&DeValue<'_>>| -> Vec<usize> {
        match items {
            Some(DeValue::Array(items)) => items.iter().map(|p| p.span().start).collect(),
            _ => Vec::new(),
        }
    };
    let starts = starts_of(root.get_ref().get("policy").map(|v| v.get_ref()));
    let authz_starts = starts_of(root.get_ref().get("authorization").map(|v| v.get_ref()));
    let rule_starts: Vec<Vec<usize>> =
        match root.get_ref().get("authorization").map(|v| v.get_ref()) {
            Some(DeValue::Array(items)) => items
                .iter()
                .map(|a| match a.get_ref() {
                    DeValue::Table(t) => starts_of(t.get("rule").map(|v| v.get_ref())),
                    _ => Vec::new(),
                })
                .collect(),
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
    if document.policy.is_empty() && document.authorization.is_empty() && problems.is_empty() {
        return Err(fail(vec![Problem {
            line: 0,
            column: 0,
            field: None,
            message: "no [[policy]] or [[authorization]] in this document".into(),
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
    // Whether a problem of `field` (full path) follows from a value taken out.
    let follows_removal = |full: &str, prefix: &str, message: &str| {
        removed.iter().any(|r| {
            full.starts_with(r.as_str())
                || r.strip_prefix(prefix)
                    .is_some_and(|rel| message.contains(rel))
        })
    };
    let mut seen: Vec<&str> = Vec::new();
    for spanned in &document.policy {
        let start = spanned.span().start;
        let i = starts.iter().position(|&s| s == start).unwrap_or(0);
        // A policy's text runs from its `[[policy]]` to the next one (the reader's span of
        // an array-of-tables element covers only its header).
        let span = start..starts.get(i + 1).copied().unwrap_or(text.len());
        let policy = spanned.get_ref();
        let prefix = format!("policy[{i}].");
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
            None if follows_removal(&format!("{prefix}service"), &prefix, "") => {}
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
            if !follows_removal(&format!("{prefix}{}", e.field), &prefix, &e.message) {
                problems.push(at(&e.field, e.message));
            }
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    let mut authorizations = Vec::new();
    for spanned in &document.authorization {
        let start = spanned.span().start;
        let i = authz_starts.iter().position(|&s| s == start).unwrap_or(0);
        let doc = spanned.get_ref();
        let prefix = format!("authorization[{i}].");
        // Each rule's index in the text, whatever was taken out before it.
        let rule_index: Vec<usize> = doc
            .rules
            .iter()
            .enumerate()
            .map(|(k, r)| {
                rule_starts
                    .get(i)
                    .and_then(|s| s.iter().position(|&s| s == r.span().start))
                    .unwrap_or(k)
            })
            .collect();
        let at = |field: &str, message: String| {
            let field = text_field(field, &rule_index);
            let (line, column) = locate_path(text, "authorization", i, &field)
                .unwrap_or_else(|| line_col(text, start));
            Problem {
                line,
                column,
                field: Some(format!("{prefix}{field}")),
                message,
            }
        };
        let policy = AuthorizationPolicy {
            service: doc.service.clone().unwrap_or_default(),
            default: doc.default,
            mode: doc.mode,
            mtls: doc.mtls,
            rules: doc.rules.iter().map(|r| r.get_ref().clone()).collect(),
        };
        match doc.service.as_deref() {
            None if follows_removal(&format!("{prefix}service"), &prefix, "") => {}
            None => problems.push(at(
                "service",
                "missing: name the service whose inbound calls this policy decides".into(),
            )),
            Some(service) if seen.contains(&service) => problems.push(at(
                "service",
                format!(
                    "{service:?} has an authorization policy earlier in this document; one per service"
                ),
            )),
            Some(service) => seen.push(service),
        }
        for e in policy.validate() {
            if doc.service.is_none() && e.field == "service" {
                continue;
            }
            let full = format!("{prefix}{}", text_field(&e.field, &rule_index));
            if !follows_removal(&full, &prefix, &e.message) {
                problems.push(at(&e.field, e.message));
            }
        }
        authorizations.push(policy);
    }
    if problems.is_empty() {
        Ok(Resources {
            policies: document
                .policy
                .into_iter()
                .map(|p| p.into_inner())
                .collect(),
            authorizations,
        })
    } else {
        // In the order of the text, as a compiler lists them.
        problems.sort_by_key(|p| (p.line, p.column));
        Err(fail(problems))
    }
}

/// A field of an authorization policy as read (`rule[1].paths[0]`) with its rule's index
/// in the text (`rule[2].paths[0]` when a rule before it was taken out).
fn text_field(field: &str, rule_index: &[usize]) -> String {
    let Some(rest) = field.strip_prefix("rule[") else {
        return field.to_string();
    };
    let Some((k, tail)) = rest.split_once(']') else {
        return field.to_string();
    };
    match k.parse::<usize>().ok().and_then(|k| rule_index.get(k)) {
        Some(n) => format!("rule[{n}]{tail}"),
        None => field.to_string(),
    }
}

/// Where `field` (`rule[2].paths[0]`) of the `index`-th `[[kind]]` is written: its key or
/// list element, else the closest enclosing one that is written (`rule[2]`, `rule`).
fn locate_path(text: &str, kind: &str, index: usize, field: &str) -> Option<(usize, usize)> {
    let mut segments = vec![Segment::Key(kind.into()), Segment::Index(index)];
    for part in field.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        let key = pieces.next().unwrap_or(part);
        segments.push(Segment::Key(key.into()));
        for piece in pieces {
            segments.push(Segment::Index(piece.trim_end_matches(']').parse().ok()?));
        }
    }
    while segments.len() > 2 {
        if let Some(at) = unknown::toml_line_col(text, &FieldPath(segments.clone())) {
            return Some(at);
        }
        segments.pop();
    }
    None
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

/// The dotted field path (`policy[1].outlier.max_ejection_percent`,
/// `authorization[0].rule[2].paths`) of the key or value at `offset`, read from the text
/// around it: the `[[policy]]` or `[[authorization]]` it is in, the table header
/// above it, the key on its line. The TOML reader's errors (a value of the wrong type or
/// out of range, an unknown field) carry a place but no path. `None` when the place is not
/// a plain `key = value` or header inside a `[[policy]]` (deeper inline tables, say):
/// no path is better than a wrong one.
fn field_at(text: &str, offset: usize) -> Option<String> {
    // The resource the line is in (`policy[1]`, `authorization[0]`) and how many of each
    // kind came before.
    let mut resource: Option<String> = None;
    let mut counts = [0usize; KINDS.len()];
    // The current table, relative to its resource (`outlier`, `rate_limit[1]`).
    let mut table: Option<String> = None;
    let mut arrays: Vec<(String, usize)> = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        let here = (start..end).contains(&offset) || (end == text.len() && offset == end);
        let trimmed = line.trim();
        // The part of a header's name below the current resource's kind.
        let below = |name: &str, resource: &Option<String>| -> Option<String> {
            let kind = resource.as_deref()?.split('[').next()?;
            name.strip_prefix(kind)?
                .strip_prefix('.')
                .map(str::to_string)
        };
        if let Some(name) = trimmed
            .strip_prefix("[[")
            .and_then(|t| t.split_once("]]"))
            .map(|(name, _)| name.trim())
        {
            if let Some(k) = KINDS.iter().position(|&k| k == name) {
                resource = Some(format!("{name}[{}]", counts[k]));
                counts[k] += 1;
                table = None;
                arrays.clear();
                if here {
                    return resource;
                }
            } else {
                table = below(name, &resource).map(|rest| {
                    let n = match arrays.iter_mut().find(|(a, _)| *a == rest) {
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
                if here {
                    // An error on a header: the table it names.
                    let resource = resource?;
                    return table.map(|t| format!("{resource}.{t}"));
                }
            }
        } else if let Some(name) = trimmed
            .strip_prefix('[')
            .and_then(|t| t.split_once(']'))
            .map(|(name, _)| name.trim())
        {
            table = below(name, &resource);
            if here {
                // An error on a header: the table it names.
                let resource = resource?;
                return table.map(|t| format!("{resource}.{t}"));
            }
        } else if here {
            let key = key_at(&line[..offset - start], line)?;
            let mut path = resource?;
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

    #[test]
    fn authorization_documents_beside_policies() {
        let text = r#"[[policy]]
service = "shipping-quote"
[policy.retries]
max_attempts = 2

[[authorization]]
service = "payments"
default = "deny"
mode = "audit"
mtls = "strict"

[[authorization.rule]]
action = "allow"
from = ["checkout", "spiffe://other.example/svc/x"]
methods = ["POST"]
paths = ["/v1/charges", "/v1/refunds/*"]

[[authorization.rule]]
action = "deny"
grpc = ["payments.v1.Admin/*"]

[[authorization]]
service = "shipping-quote"
"#;
        let resources = parse_resources(text, "mesh.toml").unwrap();
        assert_eq!(resources.policies.len(), 1);
        assert_eq!(resources.authorizations.len(), 2);
        let payments = &resources.authorizations[0];
        assert_eq!(payments.service, "payments");
        assert_eq!(payments.default, Action::Deny);
        assert_eq!(payments.mode, Mode::Audit);
        assert_eq!(payments.mtls, Some(PeerMtls::Strict));
        assert_eq!(payments.rules.len(), 2);
        assert_eq!(payments.rules[0].paths.as_ref().unwrap().len(), 2);
        assert_eq!(payments.rules[1].action, Action::Deny);
        let shipping = &resources.authorizations[1];
        assert_eq!(shipping.default, Action::Allow);
        assert_eq!(shipping.mtls, None, "the mesh's mode");
        assert!(shipping.rules.is_empty());
        // The policies alone, for the callers that read only them.
        assert_eq!(parse(text, "mesh.toml").unwrap(), resources.policies);
        // A document of authorizations alone.
        let only = "[[authorization]]\nservice = \"a\"\n";
        assert_eq!(
            parse_resources(only, "a.toml")
                .unwrap()
                .authorizations
                .len(),
            1
        );
        assert!(parse(only, "a.toml")
            .unwrap_err()
            .to_string()
            .contains("no [[policy]]"));
        assert!(parse_resources("", "e.toml")
            .unwrap_err()
            .to_string()
            .contains("no [[policy]] or [[authorization]]"));
    }

    #[test]
    fn authorization_problems_are_located() {
        let cases = [
            // Validation: the list element itself.
            (
                "[[authorization]]\nservice = \"a\"\n[[authorization.rule]]\naction = \"allow\"\npaths = [\"/ok\", \"v1\"]\n",
                "mesh.toml:5:17: authorization[0].rule[0].paths[1]: ",
                "must start with '/'",
            ),
            // A wrong type.
            (
                "[[authorization]]\nservice = \"a\"\n[[authorization.rule]]\naction = \"allow\"\nports = [\"80\"]\n",
                "mesh.toml:5:10: authorization[0].rule[0].ports: ",
                "expected u16",
            ),
            // A bad value of an enum.
            (
                "[[authorization]]\nservice = \"a\"\ndefault = \"maybe\"\n",
                "mesh.toml:3:11: authorization[0].default: ",
                "unknown variant",
            ),
            // A bad mTLS mode, with the values allowed.
            (
                "[[authorization]]\nservice = \"a\"\nmtls = \"STRICT\"\n",
                "mesh.toml:3:8: authorization[0].mtls: ",
                "unknown variant `STRICT`, expected `permissive` or `strict`",
            ),
            // An unknown field in a rule.
            (
                "[[authorization]]\nservice = \"a\"\n[[authorization.rule]]\naction = \"allow\"\nmethod = [\"GET\"]\n",
                "mesh.toml:5:1: authorization[0].rule[0].method: ",
                "unknown field `method`",
            ),
            // A rule without its action: the rule's header.
            (
                "[[authorization]]\nservice = \"a\"\n[[authorization.rule]]\nfrom = [\"b\"]\n",
                "mesh.toml:3:1: authorization[0].rule[0]: ",
                "missing field `action`",
            ),
            // A missing service, at the resource.
            (
                "[[authorization]]\ndefault = \"deny\"\n",
                "mesh.toml:1:1: authorization[0].service: ",
                "missing",
            ),
            (
                "[[authorization]]\nservice = \"Pay Ments\"\n",
                "mesh.toml:2:1: authorization[0].service: ",
                "invalid service name",
            ),
            // An empty list, at its key.
            (
                "[[authorization]]\nservice = \"a\"\n[[authorization.rule]]\naction = \"deny\"\nfrom = []\n",
                "mesh.toml:5:1: authorization[0].rule[0].from: ",
                "an empty list matches nothing",
            ),
            // Two for one service.
            (
                "[[authorization]]\nservice = \"a\"\n[[authorization]]\nservice = \"a\"\n",
                "mesh.toml:4:1: authorization[1].service: ",
                "earlier in this document",
            ),
        ];
        for (text, prefix, says) in cases {
            let err = parse_resources(text, "mesh.toml").unwrap_err().to_string();
            assert!(err.starts_with(prefix), "{text:?}: {err}");
            assert!(err.contains(says), "{text:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{text:?}: {err}");
        }
    }

    /// Every problem of a mixed document, of both kinds, in the order of the text; a rule
    /// taken out for a missing action does not shift the next rule's index.
    #[test]
    fn every_problem_of_a_mixed_document_is_reported() {
        let text = r#"[[authorization]]
service = "payments"
mode = "sometimes"

[[authorization.rule]]
from = ["checkout"]

[[authorization.rule]]
action = "allow"
from = ["Check Out"]
grpc = ["payments.v1.Payments"]

[[policy]]
service = "payments"
[policy.retries]
max_attempts = 0

[[authorization]]
service = "payments"
[[authorization.rule]]
action = "deny"
ports = [0]
"#;
        let err = parse_resources(text, "mesh.toml").unwrap_err();
        let lines: Vec<String> = err.to_string().lines().map(str::to_string).collect();
        let expected = [
            "mesh.toml:3:8: authorization[0].mode: ",
            "mesh.toml:5:1: authorization[0].rule[0]: missing field `action`",
            "mesh.toml:10:9: authorization[0].rule[1].from[0]: ",
            "mesh.toml:11:9: authorization[0].rule[1].grpc[0]: ",
            "mesh.toml:16:1: policy[0].retries.max_attempts: ",
            "mesh.toml:19:1: authorization[1].service: \"payments\" has an authorization policy earlier",
            "mesh.toml:22:10: authorization[1].rule[0].ports[0]: port 0",
        ];
        assert_eq!(lines.len(), expected.len(), "{err}");
        for (line, expected) in lines.iter().zip(expected) {
            assert!(
                line.starts_with(expected),
                "{line:?} vs {expected:?}\n{err}"
            );
        }
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
    /// `count` variants of `base`, each with one to four random edits (a byte replaced,
    /// removed, or a TOML token inserted), from a fixed seed so that a failure reproduces.
    fn mutations(base: &[u8], mut seed: u64, count: usize) -> Vec<String> {
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        (0..count)
            .map(|_| {
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
                String::from_utf8_lossy(&doc).into_owned()
            })
            .collect()
    }

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
        for text in mutations(base, 0x9e37_79b9_7f4a_7c15, 3000) {
            match parse(&text, "fuzz.toml") {
                Ok(policies) => assert!(!policies.is_empty()),
                Err(e) => assert!(!e.problems.is_empty()),
            }
        }
    }

    /// The same with authorization policies beside resilience policies: every mutation
    /// parses to resources or to located problems, never a panic.
    #[test]
    fn mutated_mixed_documents_never_panic() {
        let base = br#"[[authorization]]
service = "payments"
default = "deny"
mode = "audit"
[[authorization.rule]]
action = "allow"
from = ["checkout", "spiffe://other.example/svc/x", "*"]
ports = [8080, 9090]
methods = ["POST"]
paths = ["/v1/charges", "/v1/refunds/*"]
[[authorization.rule]]
action = "deny"
grpc = ["payments.v1.Admin/*", "*"]
[[policy]]
service = "payments"
[policy.retries]
max_attempts = 3
[[authorization]]
service = "billing"
rule = [{ action = "allow", from = ["a"] }]
"#;
        for text in mutations(base, 0x2545_f491_4f6c_dd1d, 3000) {
            match parse_resources(&text, "fuzz.toml") {
                Ok(resources) => {
                    assert!(!resources.is_empty());
                    for a in &resources.authorizations {
                        assert!(a.validate().is_empty(), "{text}");
                    }
                }
                Err(e) => assert!(!e.problems.is_empty()),
            }
        }
    }
}
