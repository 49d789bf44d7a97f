//! Writing to stdout and stderr without panicking.
//!
//! `println!` panics when its write fails, and a write to a pipe whose reader has gone
//! (`malla services | head -2`) fails with `EPIPE` (Rust ignores `SIGPIPE`, so the
//! process is not killed by it as a C program is). Every line the CLI prints goes through
//! [`outln!`] instead, which returns the write's error: the verb stops there, and `main`
//! turns a broken pipe into a quiet exit 0, as `ls | head` does. Diagnostics go through
//! [`errln!`], which ignores a failed write: there is nowhere left to report it.

use std::io::{self, Write as _};

use serde_json::Value;

/// Writes one line to stdout: `outln!("{x}")?`.
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes to stdout without a newline: `out!("{x}")?`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!($($arg)*))
    };
}

/// Writes one line to stderr, ignoring a failure.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {errln, out, outln};

pub fn write_out(args: std::fmt::Arguments<'_>) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_fmt(args)?;
    // Line by line, so that a reader that stops early is noticed at once.
    stdout.flush()
}

pub fn write_err(args: std::fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// Whether `error` is, somewhere in its chain, a write to a closed pipe.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

pub fn print_json(v: &Value) -> io::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
}

pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

pub fn rows(list: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    list.as_array()
        .map(|a| a.iter().map(row).collect())
        .unwrap_or_default()
}

/// Columns aligned with two spaces between them, as kubectl prints, the headers first.
pub fn print_table(headers: &[&str], rows: Vec<Vec<String>>) -> io::Result<()> {
    let mut all = Vec::with_capacity(rows.len() + 1);
    all.push(headers.iter().map(|h| h.to_string()).collect());
    all.extend(rows);
    for line in align(&all) {
        outln!("{line}")?;
    }
    Ok(())
}

/// Rows aligned into columns two spaces apart. Widths count characters, not bytes, so
/// that UTF-8 annotations line up.
pub fn align(rows: &[Vec<String>]) -> Vec<String> {
    let width = |s: &str| s.chars().count();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| width(s))
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                line.push_str(cell);
                if c + 1 < r.len() {
                    line.extend(std::iter::repeat_n(' ', widths[c] - width(cell) + 2));
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}
