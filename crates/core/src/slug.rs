//! Suggesting a valid service name for the name people use: `"Cotización de Envío"` →
//! `cotizacion-de-envio`. A service is addressed by a DNS label (see
//! [`crate::service::is_dns_label`]); an error that refuses a name says which one would do.
//!
//! Transliteration is [`deunicode`]'s: it has no dependencies of its own and turns every
//! script into ASCII (`ß` → `ss`, `Москва` → `Moskva`, `東京` → `Dong Jing`), where dropping
//! combining accents after a Unicode decomposition (`unicode-normalization`) would handle
//! only accented Latin letters and leave `ß`, `ø` or any non-Latin name empty.

use crate::service::is_dns_label;

/// A DNS-label slug of `name`: transliterated to ASCII, lowercased, every run of other
/// characters turned into one `-`, trimmed, at most 63 characters, starting with a letter
/// (`svc-` is put before one that would start with a digit). `None` when nothing is left.
pub fn slug(name: &str) -> Option<String> {
    let ascii = deunicode::deunicode(name);
    let mut out = String::with_capacity(ascii.len());
    for c in ascii.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        return None;
    }
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert_str(0, "svc-");
    }
    out.truncate(63);
    let out = out.trim_end_matches('-').to_string();
    is_dns_label(&out).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_people_use() {
        for (name, expected) in [
            ("Cotización de Envío", "cotizacion-de-envio"),
            ("Straße  & Söhne!", "strasse-sohne"),
            ("Москва Orders", "moskva-orders"),
            ("  --Payments API v2--  ", "payments-api-v2"),
            ("2fa", "svc-2fa"),
            ("already-fine", "already-fine"),
        ] {
            assert_eq!(slug(name).as_deref(), Some(expected), "{name}");
        }
        assert_eq!(slug("!!!"), None);
        assert_eq!(slug(""), None);
        let long = slug(&"Envío ".repeat(20)).unwrap();
        assert!(long.len() <= 63 && is_dns_label(&long), "{long}");
    }
}
