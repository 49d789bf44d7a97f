//! Protocol detection: what does a new client connection speak?
//!
//! The first bytes decide: the HTTP/2 connection preface means HTTP/2 with prior
//! knowledge; a method token followed by a space means HTTP/1; anything else is opaque TCP
//! (on a listener that allows it). The bytes read are kept and handed to the protocol's
//! handler, so nothing the client sent is lost. A client that sends nothing within the
//! detection timeout is treated as TCP: server-speaks-first protocols (SMTP, MySQL) work.

use std::{io, time::Duration};

use bytes::BytesMut;
use tokio::{io::AsyncReadExt, net::TcpStream};

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
    stream: &mut TcpStream,
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

/// `Some` once the bytes so far decide; `None` when more are needed.
fn classify(buf: &[u8], protocol: ListenerProtocol) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        if b == b' ' && i > 0 {
            return Some(Detected::Http1);
        }
        if !is_tchar(b) {
            return Some(not_http(protocol));
        }
    }
    if buf.len() > MAX_METHOD {
        return Some(not_http(protocol));
    }
    None
}

fn classify_final(buf: &[u8], protocol: ListenerProtocol) -> Detected {
    classify(buf, protocol).unwrap_or(not_http(protocol))
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
        assert_eq!(classify(b"hello world", Auto), Some(Detected::Http1));
        assert_eq!(classify(&[b'A'; 40], Auto), Some(Detected::Tcp));
        assert_eq!(classify_final(b"GE", Auto), Detected::Tcp);
    }
}
