//! `-o yaml`: the API's JSON answer written as YAML.
//!
//! A small emitter rather than a dependency (serde_yaml is unmaintained): JSON's data model
//! maps onto YAML's block style directly. The one care is strings: a plain scalar that YAML
//! would read as something else (`true`, `no`, `1e3`, `null`, `2024-01-01`, `a: b`, `#x`,
//! leading spaces...) must be quoted. Rather than enumerate what a plain scalar may not be,
//! a string is written plain only when it plainly is a word (a letter first, then letters,
//! digits and `_ - . /`) and not one of YAML 1.1's booleans or nulls; everything else is
//! written double-quoted with JSON's escapes, which YAML's double-quoted style reads the
//! same way.

use std::io;

use serde_json::{Map, Value};

use crate::output::out;

/// Prints `v` as a YAML document.
pub fn print(v: &Value) -> io::Result<()> {
    out!("{}", to_string(v))
}

pub fn to_string(v: &Value) -> String {
    let mut s = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => map(m, 0, &mut s),
        Value::Array(a) if !a.is_empty() => seq(a, 0, &mut s),
        scalar => {
            s.push_str(&self::scalar(scalar));
            s.push('\n');
        }
    }
    s
}

fn pad(indent: usize, out: &mut String) {
    out.extend(std::iter::repeat_n(' ', indent));
}

fn map(m: &Map<String, Value>, indent: usize, out: &mut String) {
    for (k, v) in m {
        pad(indent, out);
        out.push_str(&string(k));
        out.push(':');
        after_key(v, indent, out);
    }
}

/// What follows `key:` (or `-`): a scalar on the same line, a collection below it.
fn after_key(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            map(m, indent + 2, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            seq(a, indent + 2, out);
        }
        scalar => {
            out.push(' ');
            out.push_str(&self::scalar(scalar));
            out.push('\n');
        }
    }
}

fn seq(a: &[Value], indent: usize, out: &mut String) {
    for item in a {
        match item {
            Value::Object(m) if !m.is_empty() => {
                // The map's first line goes after the dash: `- key: value`.
                let mut block = String::new();
                map(m, indent + 2, &mut block);
                pad(indent, out);
                out.push_str("- ");
                out.push_str(&block[indent + 2..]);
            }
            Value::Array(inner) if !inner.is_empty() => {
                pad(indent, out);
                out.push_str("-\n");
                seq(inner, indent + 2, out);
            }
            scalar => {
                pad(indent, out);
                out.push('-');
                after_key(scalar, indent, out);
            }
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string(s),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
    }
}

/// A string as a plain scalar when that reads back as the same string, else quoted.
fn string(s: &str) -> String {
    const RESERVED: [&str; 11] = [
        "true", "false", "yes", "no", "on", "off", "y", "n", "null", "nan", "inf",
    ];
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && !RESERVED.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        s.to_string()
    } else {
        // JSON's string escapes are a subset of YAML's double-quoted ones.
        Value::String(s.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn block_style_with_strings_quoted_when_needed() {
        let v = json!({
            "name": "orders",
            "count": 3,
            "ok": true,
            "none": null,
            "tricky": ["yes", "No", "1.5", "", " lead", "a: b", "#x", "2024-01-01", "-x", "é"],
            "empty": {}, "nothing": [],
            "nested": {"list": [{"id": "o-1", "labels": {"env": "prod"}}, [1, 2]]},
        });
        assert_eq!(
            to_string(&v),
            "count: 3\nempty: {}\nname: orders\nnested:\n  list:\n    - id: o-1\n      labels:\n        env: prod\n    -\n      - 1\n      - 2\nnone: null\nnothing: []\nok: true\ntricky:\n  - \"yes\"\n  - \"No\"\n  - \"1.5\"\n  - \"\"\n  - \" lead\"\n  - \"a: b\"\n  - \"#x\"\n  - \"2024-01-01\"\n  - \"-x\"\n  - \"é\"\n"
        );
        assert_eq!(to_string(&json!("x")), "x\n");
        assert_eq!(to_string(&json!([])), "[]\n");
    }
}
