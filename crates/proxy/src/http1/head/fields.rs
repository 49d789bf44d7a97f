//! The header fields that decide framing, routing and forwarding, read in one pass, and
//! the strict rules that turn them into one unambiguous reading of a message.
//!
//! Every rule here answers one question a request smuggler asks: "can two HTTP/1 parsers
//! on this path disagree about where this message ends, or whom it is for?". Whatever is
//! ambiguous is refused; whatever is accepted is re-emitted by the proxy in one canonical
//! form (see the parent module), so the next hop never sees the sender's spelling.

use malla_core::policy::{RELAYED_FAILURE_HEADER, TIMEOUT_HEADER};

use crate::forwarding::has_token;

/// What `Transfer-Encoding` says, all of its field lines taken as one list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TransferEncoding {
    /// Exactly one coding, `chunked`: the only one the proxy relays.
    Chunked,
    /// A valid list that ends in `chunked` after other codings (`gzip, chunked`): legal,
    /// but the proxy does not apply or relay other transfer codings.
    Unsupported,
    /// `chunked` not last or more than once, no coding at all, or a malformed element:
    /// the body length cannot be determined (RFC 9112 §6.3).
    Invalid,
}

/// The fields that govern framing and forwarding, gathered in one pass.
#[derive(Default)]
pub(super) struct Fields<'a> {
    /// The one value of every `Content-Length` element (they must all agree).
    pub content_length: Option<u64>,
    pub transfer_encoding: Option<TransferEncoding>,
    pub conn_close: bool,
    pub conn_keep_alive: bool,
    pub conn_upgrade: bool,
    /// Other field names listed in `Connection` (hop-by-hop by declaration).
    connection_named: Vec<&'a [u8]>,
    pub upgrade: Option<&'a [u8]>,
    pub host: Option<&'a [u8]>,
    pub host_count: usize,
    pub expect_continue: bool,
    pub x_forwarded_proto: bool,
    pub x_forwarded_for: Option<Vec<u8>>,
    pub via: Option<Vec<u8>>,
    pub forwarded: Option<Vec<u8>>,
    pub date: bool,
    /// `malla-timeout-ms`: the caller's remaining budget.
    pub timeout_ms: Option<&'a [u8]>,
    /// `malla-relayed-failure`: the response is an upstream's failure, relayed.
    pub relayed: Option<&'a [u8]>,
}

/// Fields the proxy always writes itself, whatever the sender wrote: framing and `Host`.
/// They are never copied, so a `Connection` that names them cannot remove them either.
pub(super) fn is_regenerated(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"transfer-encoding")
        || name.eq_ignore_ascii_case(b"host")
}

impl<'a> Fields<'a> {
    pub fn scan(headers: &[httparse::Header<'a>]) -> Result<Self, &'static str> {
        let mut f = Fields::default();
        let mut codings = Codings::default();
        for h in headers {
            let name = h.name.as_bytes();
            let value = h.value;
            if name.eq_ignore_ascii_case(b"content-length") {
                for part in value.split(|&b| b == b',') {
                    let n = parse_content_length(trim_ows(part))
                        .ok_or("Content-Length must be a decimal number")?;
                    if f.content_length.is_some_and(|prev| prev != n) {
                        return Err("several different Content-Length values");
                    }
                    f.content_length = Some(n);
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                codings.add(value);
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|&b| b == b',').map(trim_ows) {
                    if token.eq_ignore_ascii_case(b"close") {
                        f.conn_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        f.conn_keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        f.conn_upgrade = true;
                    } else if !token.is_empty() {
                        f.connection_named.push(token);
                    }
                }
            } else if name.eq_ignore_ascii_case(b"host") {
                f.host = Some(value);
                f.host_count += 1;
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                f.upgrade = Some(value);
            } else if name.eq_ignore_ascii_case(b"expect") {
                f.expect_continue = has_token(value, "100-continue");
            } else if name.eq_ignore_ascii_case(b"x-forwarded-proto") {
                f.x_forwarded_proto = true;
            } else if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                join_into(&mut f.x_forwarded_for, value);
            } else if name.eq_ignore_ascii_case(b"via") {
                join_into(&mut f.via, value);
            } else if name.eq_ignore_ascii_case(b"forwarded") {
                join_into(&mut f.forwarded, value);
            } else if name.eq_ignore_ascii_case(b"date") {
                f.date = true;
            } else if name.eq_ignore_ascii_case(TIMEOUT_HEADER.as_bytes()) {
                f.timeout_ms = Some(value);
            } else if name.eq_ignore_ascii_case(RELAYED_FAILURE_HEADER.as_bytes()) {
                f.relayed = Some(value);
            }
        }
        f.transfer_encoding = codings.verdict();
        Ok(f)
    }

    /// Whether a field is hop-by-hop by the message's own `Connection` field.
    pub fn named_by_connection(&self, name: &[u8]) -> bool {
        self.connection_named
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// The transfer codings of a message, every `Transfer-Encoding` line in order.
#[derive(Default)]
struct Codings {
    seen: bool,
    count: usize,
    chunked_at: Option<usize>,
    chunked_twice: bool,
    malformed: bool,
}

impl Codings {
    fn add(&mut self, value: &[u8]) {
        self.seen = true;
        for coding in value.split(|&b| b == b',').map(trim_ows) {
            if coding.is_empty() {
                continue; // empty list elements are allowed (RFC 9110 §5.6.1)
            }
            // A coding is a token, optionally with parameters (`;q=...` is TE's, not
            // Transfer-Encoding's, but a parameter is still well-formed).
            let name = coding.split(|&b| b == b';').next().map_or(coding, trim_ows);
            if name.is_empty() || !name.iter().all(|&b| crate::detect::is_tchar(b)) {
                self.malformed = true;
            }
            if name.eq_ignore_ascii_case(b"chunked") {
                if self.chunked_at.is_some() {
                    self.chunked_twice = true;
                }
                if name.len() != coding.len() {
                    self.malformed = true; // `chunked` takes no parameters
                }
                self.chunked_at = Some(self.count);
            }
            self.count += 1;
        }
    }

    fn verdict(&self) -> Option<TransferEncoding> {
        if !self.seen {
            return None;
        }
        Some(match self.chunked_at {
            _ if self.malformed || self.chunked_twice || self.count == 0 => {
                TransferEncoding::Invalid
            }
            Some(i) if i + 1 != self.count => TransferEncoding::Invalid,
            Some(_) if self.count == 1 => TransferEncoding::Chunked,
            Some(_) => TransferEncoding::Unsupported,
            None => TransferEncoding::Invalid,
        })
    }
}

/// The request target, in the form the next hop gets.
pub(super) enum Target<'a> {
    /// `/path?query`, or `*` for `OPTIONS`: sent as is.
    Origin(&'a str),
    /// `http://authority/path?query` (RFC 9112 §3.2.2): the authority replaces `Host`, and
    /// the next hop gets the origin form (`path` may be empty or start with `?`).
    Absolute { authority: &'a str, path: &'a str },
}

impl<'a> Target<'a> {
    pub fn parse(method: &str, target: &'a str) -> Result<Self, &'static str> {
        if target.starts_with('/') {
            return Ok(Target::Origin(target));
        }
        if target == "*" {
            return if method == "OPTIONS" {
                Ok(Target::Origin(target))
            } else {
                Err("the asterisk target is only for OPTIONS")
            };
        }
        let rest = strip_prefix_ignore_case(target, "http://")
            .or_else(|| strip_prefix_ignore_case(target, "https://"))
            .ok_or("invalid request target")?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if path.starts_with('#') {
            return Err("invalid request target");
        }
        if !valid_host(authority.as_bytes()) || authority.is_empty() {
            return Err("invalid authority in the request target");
        }
        Ok(Target::Absolute { authority, path })
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `Host` (and an absolute target's authority): `host [":" port]`, where host is a
/// registered name, an IPv4 address or a bracketed IP literal (RFC 3986 §3.2.2). No
/// userinfo, no path, no whitespace: routing reads this value, so nothing in it may be
/// read two ways.
pub(super) fn valid_host(host: &[u8]) -> bool {
    host.iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b))
}

/// Removes optional whitespace (SP / HTAB only: RFC 9110 §5.6.3). Not `trim_ascii`, which
/// also strips form feeds a strict parser on the next hop would not.
pub(super) fn trim_ows(s: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !is_ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

/// Repeated list fields are one list (RFC 9110 §5.3).
fn join_into(acc: &mut Option<Vec<u8>>, value: &[u8]) {
    match acc {
        Some(v) => {
            v.extend_from_slice(b", ");
            v.extend_from_slice(value);
        }
        None => *acc = Some(value.to_vec()),
    }
}

/// 1*DIGIT, at most 19 digits so it fits a u64.
fn parse_content_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn te(values: &[&str]) -> Option<TransferEncoding> {
        let mut c = Codings::default();
        for v in values {
            c.add(v.as_bytes());
        }
        c.verdict()
    }

    #[test]
    fn transfer_codings() {
        use TransferEncoding::*;
        assert_eq!(te(&[]), None);
        assert_eq!(te(&["chunked"]), Some(Chunked));
        assert_eq!(te(&["Chunked "]), Some(Chunked));
        assert_eq!(te(&["chunked,"]), Some(Chunked));
        assert_eq!(te(&["gzip, chunked"]), Some(Unsupported));
        assert_eq!(te(&["gzip", "chunked"]), Some(Unsupported));
        for bad in [
            &["chunked, gzip, chunked"][..],
            &["chunked", "chunked"],
            &["chunked, chunked"],
            &["chunked, gzip"],
            &["gzip"],
            &["xchunked"],
            &[""],
            &[","],
            &["\x0bchunked"],
            &["\x0cchunked"],
            &["chunked;x=1"],
            &["\"chunked\""],
        ] {
            assert_eq!(te(bad), Some(Invalid), "{bad:?}");
        }
    }

    #[test]
    fn targets() {
        assert!(matches!(
            Target::parse("GET", "/a?b"),
            Ok(Target::Origin("/a?b"))
        ));
        assert!(matches!(
            Target::parse("OPTIONS", "*"),
            Ok(Target::Origin("*"))
        ));
        assert!(Target::parse("GET", "*").is_err());
        assert!(matches!(
            Target::parse("GET", "HTTP://Other:8080/x?y"),
            Ok(Target::Absolute {
                authority: "Other:8080",
                path: "/x?y"
            })
        ));
        assert!(matches!(
            Target::parse("GET", "http://other?q"),
            Ok(Target::Absolute {
                authority: "other",
                path: "?q"
            })
        ));
        for bad in [
            "other/x",
            "http://",
            "http://u@h/",
            "ftp://h/",
            "http://h#f",
            "http://h\\x/",
        ] {
            assert!(Target::parse("GET", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_and_whitespace() {
        assert!(valid_host(b"shipping-quote.svc:8080"));
        assert!(valid_host(b"[fd00::5]:80"));
        assert!(!valid_host(b"a b"));
        assert!(!valid_host(b"user@host"));
        assert!(!valid_host(b"host/path"));
        assert_eq!(trim_ows(b" \t5\t "), b"5");
        assert_eq!(trim_ows(b"\x0c5"), b"\x0c5");
        assert_eq!(parse_content_length(b"005"), Some(5));
        assert_eq!(parse_content_length(b"+5"), None);
        assert_eq!(parse_content_length(b"0x5"), None);
    }
}
