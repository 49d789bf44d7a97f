//! Reading a whole document past its bad values, so that `malla apply` reports every
//! problem in one run, not the first one.
//!
//! serde stops at the first error it meets (a string where a number goes, a bad duration,
//! an unknown top-level key). The document is parsed once into the TOML reader's tree
//! (`DeTable`, every key and value with its place in the text); then, in a bounded loop,
//! the tree is read into the target type, and each error is recorded and its value taken
//! out of the tree before the next try. A field taken out falls back to its default, so
//! the next try goes further.
//!
//! Taking a value out can make its table lack a field that has no default
//! (`requests_per_second` of a rate limit): that "missing field" is a consequence, not a
//! problem of the document, so it is not reported, and the whole table is taken out
//! instead. A field the document never had is reported as missing, as before.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::{
    de::{DeArray, DeTable, DeValue, Deserializer},
    Spanned,
};

use crate::policy::unknown::{self, FieldPath, Segment};

/// The most values taken out before giving up: a document with more problems than this
/// is reported up to here.
const MAX_PROBLEMS: usize = 100;

/// One error the reader met: where (`None`: nowhere in particular), and what.
pub(super) struct ReadError {
    pub span: Option<Range<usize>>,
    pub message: String,
}

/// What [`read`] found.
pub(super) struct Read<T> {
    /// The value, read from the tree without its bad values; `None` when one could not be
    /// taken out (an error with no place).
    pub value: Option<T>,
    /// Unknown fields of the value read, each with the place of its key in the text.
    pub unknown: Vec<(FieldPath, Option<usize>)>,
    pub errors: Vec<ReadError>,
    /// The places (key starts) of the values taken out: fields that now hold their
    /// default, so that checks across fields must not read them.
    pub removed: Vec<usize>,
}

/// Reads a `T` from `root`, taking out and recording each value that fails.
pub(super) fn read<T: DeserializeOwned>(mut root: Spanned<DeTable<'_>>) -> Read<T> {
    let mut errors = Vec::new();
    let mut removed: Vec<usize> = Vec::new();
    // (the place of a table, a key taken out of it)
    let mut taken: Vec<(usize, String)> = Vec::new();
    for _ in 0..=MAX_PROBLEMS {
        let error = match unknown::deserialize::<_, T>(Deserializer::from(root.clone())) {
            Ok((value, fields)) => {
                let unknown = fields
                    .into_iter()
                    .map(|path| {
                        let at = key_offset(root.get_ref(), &path);
                        (path, at)
                    })
                    .collect();
                return Read {
                    value: Some(value),
                    unknown,
                    errors,
                    removed,
                };
            }
            Err(e) => e,
        };
        let message = error.message().trim_end().to_string();
        let Some(span) = error.span() else {
            errors.push(ReadError {
                span: None,
                message,
            });
            break;
        };
        let hit = match missing_field(&message) {
            Some(field) => {
                let Some(hit) = deepest(&root, span.start, true) else {
                    errors.push(ReadError {
                        span: Some(span),
                        message,
                    });
                    break;
                };
                if !taken.contains(&(hit.table_start, field.to_string())) {
                    errors.push(ReadError {
                        span: Some(span),
                        message,
                    });
                }
                hit
            }
            None => {
                errors.push(ReadError {
                    span: Some(span.clone()),
                    message,
                });
                let Some(hit) = deepest(&root, span.start, false) else {
                    break;
                };
                hit
            }
        };
        removed.push(hit.key_start);
        if let (Some(Segment::Key(key)), Some(parent)) = (hit.path.last(), hit.parent_start) {
            taken.push((parent, key.clone()));
        }
        if !remove(root.get_mut(), &hit.path) {
            break;
        }
    }
    Read {
        value: None,
        unknown: Vec::new(),
        errors,
        removed,
    }
}

/// `missing field `x``: `x`.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// A place in the tree: the path to a key or array element.
struct Hit {
    path: Vec<Segment>,
    /// Where its key (or element) starts in the text.
    key_start: usize,
    /// Where the value starts, when it is a table (which may lack a field).
    table_start: usize,
    /// Where the table holding it starts.
    parent_start: Option<usize>,
}

/// The deepest key or element whose key or value covers `offset` (with `tables`, only
/// those whose value is a table). Every branch is searched: the value of a `[table]`
/// header covers only the header, not the keys below it.
fn deepest(root: &Spanned<DeTable<'_>>, offset: usize, tables: bool) -> Option<Hit> {
    fn table(
        t: &DeTable<'_>,
        t_start: usize,
        offset: usize,
        tables: bool,
        path: &mut Vec<Segment>,
        best: &mut Option<Hit>,
    ) {
        for (k, v) in t.iter() {
            path.push(Segment::Key(k.get_ref().to_string()));
            let covers = k.span().contains(&offset) || v.span().contains(&offset);
            consider(v, k.span().start, Some(t_start), covers, tables, path, best);
            value(v, offset, tables, path, best);
            path.pop();
        }
    }
    fn value(
        v: &Spanned<DeValue<'_>>,
        offset: usize,
        tables: bool,
        path: &mut Vec<Segment>,
        best: &mut Option<Hit>,
    ) {
        match v.get_ref() {
            DeValue::Table(t) => table(t, v.span().start, offset, tables, path, best),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(Segment::Index(i));
                    let covers = item.span().contains(&offset);
                    consider(item, item.span().start, None, covers, tables, path, best);
                    value(item, offset, tables, path, best);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    fn consider(
        v: &Spanned<DeValue<'_>>,
        key_start: usize,
        parent_start: Option<usize>,
        covers: bool,
        tables: bool,
        path: &[Segment],
        best: &mut Option<Hit>,
    ) {
        let deeper = best.as_ref().is_none_or(|b| path.len() > b.path.len());
        if covers && deeper && (!tables || matches!(v.get_ref(), DeValue::Table(_))) {
            *best = Some(Hit {
                path: path.to_vec(),
                key_start,
                table_start: v.span().start,
                parent_start,
            });
        }
    }
    let mut best = None;
    table(
        root.get_ref(),
        root.span().start,
        offset,
        tables,
        &mut Vec::new(),
        &mut best,
    );
    best
}

/// Takes the value at `path` out of the tree; false when there is no such place.
fn remove<'i>(root: &mut DeTable<'i>, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut value: Option<&mut DeValue<'i>> = None;
    let mut table = Some(root);
    for segment in parents {
        let next = match (segment, table.take(), value.take()) {
            (Segment::Key(k), Some(t), _) => t.get_mut(k.as_str()).map(|v| v.get_mut()),
            (Segment::Index(i), None, Some(DeValue::Array(items))) => {
                items.get_mut(*i).map(|v| v.get_mut())
            }
            _ => None,
        };
        match next {
            Some(DeValue::Table(t)) => table = Some(t),
            Some(v @ DeValue::Array(_)) => value = Some(v),
            _ => return false,
        }
    }
    match (last, table, value) {
        (Segment::Key(k), Some(t), _) => t.remove(k.as_str()).is_some(),
        (Segment::Index(i), None, Some(DeValue::Array(items))) if *i < items.len() => {
            // DeArray has no `remove`: rebuild it without the element.
            let mut kept = DeArray::new();
            for (n, item) in items.iter().enumerate() {
                if n != *i {
                    kept.push(item.clone());
                }
            }
            *items = kept;
            true
        }
        _ => false,
    }
}

/// Where the key at `path` starts in the text, found in the tree read (its indices are
/// the tree's, after any element was taken out).
fn key_offset(root: &DeTable<'_>, path: &FieldPath) -> Option<usize> {
    let mut table = root;
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
                        return Some(item.span().start);
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
            return Some(key.span().start);
        }
        value = Some(v.get_ref());
    }
    None
}
