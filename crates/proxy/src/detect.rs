//! Protocol detection: what does a new client connection speak?
//!
//! The first bytes decide: the HTTP/2 connection preface means HTTP/2 with prior
//! knowledge; an HTTP/1 request line (`METHOD SP target SP HTTP/1.x`) means HTTP/1;
//! anything else is opaque TCP (on a listener that allows it). The whole request line is
//! read, not just a method-like word: text protocols look like HTTP for a few bytes (a
//! Redis inline `GET key`, memcached's `get k`) and must reach their upstream as TCP. The bytes read are kept and handed to the protocol's
//! handler, so nothing the client sent is lost. A client that sends nothing within the
//! detection timeout is treated as TCP: server-speaks-first protocols (SMTP, MySQL) work.

use std::{io, time::Duration};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use crate::config::ListenerProtocol;

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token we look at before deciding the bytes are not HTTP/1.
const MAX_METHOD: usize = 24;

#[derive(Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tcp,
    /// The client closed before sending anything.
    Closed,
}

/// Reads from `stream` into `buf` until the protocol is known.
pub async fn detect(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut BytesMut,
    timeout: Duration,
    protocol: ListenerProtocol,
) -> io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = classify(buf, protocol) {
            return Ok(d);
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(0)) if buf.is_empty() => return Ok(Detected::Closed),
            // Closed mid-way: what arrived is all there will be.
            Ok(Ok(0)) => return Ok(classify_final(buf, protocol)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) if buf.is_empty() && protocol == ListenerProtocol::Auto => {
                return Ok(Detected::Tcp)
            }
            Err(_) if buf.is_empty() => return Ok(Detected::Closed),
            Err(_) => return Ok(classify_final(buf, protocol)),
        }
    }
}

/// Longest request line looked at before deciding (a longer line on an HTTP/1-looking
/// start is left to the HTTP/1 parser, which answers it).
const MAX_LINE: usize = 8 * 1024;

/// `Some` once the bytes so far decide; `None` when more are needed.
fn classify(buf: &[u8], protocol: ListenerProtocol) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    match request_line(buf) {
        Line::Http => Some(Detected::Http1),
        Line::NotHttp => Some(not_http(protocol)),
        Line::Partial { .. } => None,
    }
}

/// What the bytes so far make of an HTTP/1 request line.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Http,
    NotHttp,
    /// Consistent with a request line so far; `origin`: its target is in origin form.
    Partial {
        origin: bool,
    },
}

fn request_line(buf: &[u8]) -> Line {
    // METHOD: 1 to MAX_METHOD token characters, then one space.
    let Some(sp) = buf.iter().take(MAX_METHOD + 1).position(|&b| !is_tchar(b)) else {
        return if buf.len() > MAX_METHOD {
            Line::NotHttp
        } else {
            Line::Partial { origin: false }
        };
    };
    if sp == 0 || buf[sp] != b' ' {
        return Line::NotHttp;
    }
    // Target: origin form (`/`), `*`, or absolute form (a scheme's letter), up to a space.
    let target = &buf[sp + 1..];
    let Some(&first) = target.first() else {
        return Line::Partial { origin: false };
    };
    if first != b'/' && first != b'*' && !first.is_ascii_alphabetic() {
        return Line::NotHttp;
    }
    let origin = first == b'/';
    let Some(end) = target
        .iter()
        .take(MAX_LINE)
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
    else {
        return if target.len() >= MAX_LINE {
            Line::Http
        } else {
            Line::Partial { origin }
        };
    };
    if target[end] != b' ' {
        return Line::NotHttp; // a line with one word after the command: not HTTP/1
    }
    // Version.
    const VERSION: &[u8] = b"HTTP/1.";
    let version = &target[end + 1..];
    let n = version.len().min(VERSION.len());
    if version[..n] != VERSION[..n] {
        Line::NotHttp
    } else if n == VERSION.len() {
        Line::Http
    } else {
        Line::Partial { origin }
    }
}

/// The decision once no more bytes will come (the client closed, or paused past the
/// detection timeout): a request line cut after an origin-form target is HTTP/1 (the
/// parser answers it); anything else goes on as TCP.
fn classify_final(buf: &[u8], protocol: ListenerProtocol) -> Detected {
    classify(buf, protocol).unwrap_or(match request_line(buf) {
        Line::Partial { origin: true } => Detected::Http1,
        _ => not_http(protocol),
    })
}

/// On an HTTP-only listener, non-HTTP bytes go to the HTTP/1 parser, which answers 400.
fn not_http(protocol: ListenerProtocol) -> Detected {
    match protocol {
        ListenerProtocol::Http => Detected::Http1,
        _ => Detected::Tcp,
    }
}

/// RFC 9110 `tchar`: the characters of a method token.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ListenerProtocol::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n", Auto), Some(Detected::Http1));
        assert_eq!(classify(b"GE", Auto), None);
        assert_eq!(classify(H2_PREFACE, Auto), Some(Detected::Http2));
        assert_eq!(classify(&H2_PREFACE[..10], Auto), None);
        assert_eq!(classify(b"\x16\x03\x01", Auto), Some(Detected::Tcp));
        assert_eq!(classify(b"\x16\x03\x01", Http), Some(Detected::Http1));
        assert_eq!(classify(b"hello world", Auto), None);
        assert_eq!(classify(b"hello world\r\n", Auto), Some(Detected::Tcp));
        assert_eq!(classify(&[b'A'; 40], Auto), Some(Detected::Tcp));
        assert_eq!(classify_final(b"GE", Auto), Detected::Tcp);
        assert_eq!(classify(b"GET / HTTP/1.", Auto), Some(Detected::Http1));
        assert_eq!(
            classify(b"GET http://a/ HTTP/1.1\r\n", Auto),
            Some(Detected::Http1)
        );
        assert_eq!(
            classify(b"OPTIONS * HTTP/1.1\r\n", Auto),
            Some(Detected::Http1)
        );
        assert_eq!(classify(b"GET /a HTTP", Auto), None);
        assert_eq!(classify_final(b"GET /a HTT", Auto), Detected::Http1);
    }

    /// Text protocols whose commands start like an HTTP method are TCP on an auto
    /// listener (and still HTTP/1, to be answered 400, on an HTTP listener).
    #[test]
    fn text_protocols_are_not_http() {
        for line in [
            &b"GET key\r\n"[..],
            b"SET key value\r\n",
            b"PING\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"get k\r\n",
            b"set k 0 0 5\r\nhello\r\n",
            b"gets a b c\r\n",
            b"stats\r\n",
            b"EHLO example.com\r\n",
            b"GET key\n",
            b"GET /path\r\n",
        ] {
            let what = String::from_utf8_lossy(line);
            assert_eq!(classify(line, Auto), Some(Detected::Tcp), "{what:?}");
            assert_eq!(classify_final(line, Auto), Detected::Tcp, "{what:?}");
            assert_eq!(classify(line, Http), Some(Detected::Http1), "{what:?}");
        }
        assert_eq!(classify_final(b"get k", Auto), Detected::Tcp);
    }
}
