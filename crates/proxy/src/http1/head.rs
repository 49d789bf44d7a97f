//! Parsing, validating and rewriting HTTP/1 message heads.
//!
//! Heads are parsed with `httparse` straight from the connection's read buffer and
//! re-serialised into a reused output buffer, one `name: value\r\n` line per kept field.
//! Because the head the next hop sees is always regenerated (never copied as raw bytes),
//! line-ending tricks (bare LF, obs-fold) cannot reach it. The framing rules are
//! RFC 9112 §6 with the strict choices a proxy must make against request smuggling
//! ([`fields`]):
//!
//! - The fields that frame a message (`Content-Length`, `Transfer-Encoding`) and `Host`
//!   are never copied: the proxy writes them itself from how *it* reads the message, one
//!   canonical line each (`content-length: 5` for `Content-Length: 5, 5`). So no header
//!   rule (a `Connection` that names them, say) can drop or duplicate them.
//! - `Transfer-Encoding` together with `Content-Length` → 400 (not "TE wins").
//! - `Transfer-Encoding` other than exactly `chunked`: `chunked` not last, twice, or a
//!   malformed list → 400; other codings before `chunked` (`gzip, chunked`) → 501.
//! - `Transfer-Encoding` on an HTTP/1.0 message → 400 (a response: 502).
//! - `Content-Length` that is not digits, or several differing values → 400.
//! - HTTP/1.1 without exactly one `Host`, or a `Host` that is not an authority → 400.
//! - An absolute-form target (`GET http://other/x`) is sent on in origin form, with
//!   `Host` taken from its authority, which routing reads too (RFC 9112 §3.2.2).
//!
//! Responses follow the same rules (ambiguous framing is the upstream's protocol error,
//! a 502) and get a `Date` when the origin sent none (RFC 9110 §6.6.1).

mod date;
mod fields;

use std::{mem::MaybeUninit, net::IpAddr, time::Duration};

use malla_core::policy::{RELAYED_FAILURE_HEADER, TIMEOUT_HEADER};

use self::fields::{is_regenerated, trim_ows, valid_host, Fields, Target, TransferEncoding};
use crate::{
    error::ProxyError,
    forwarding::{self, is_hop_by_hop},
    resilience::deadline,
};

/// Hard cap on header fields per head; `limits.max_headers` may only lower it.
pub const MAX_HEADERS: usize = 128;

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    /// HTTP/1.0-style: the body ends when the sender closes (responses only).
    UntilClose,
}

pub enum Parsed<T> {
    Complete(T),
    Partial,
}

/// What the connection loop needs to know about a request, the head itself having been
/// rewritten into the output buffer.
#[derive(Debug)]
pub struct RequestInfo {
    pub head_len: usize,
    pub minor: u8,
    pub is_head: bool,
    /// Safe to send again if a reused upstream connection turns out to be dead.
    pub idempotent: bool,
    pub body: BodyKind,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    pub upgrade: bool,
    pub expect_continue: bool,
    /// Where the authority the request is for sits in the input buffer: the `Host`
    /// value, or an absolute-form target's authority.
    pub host: Option<(usize, usize)>,
    /// Where the request target's path (and query) sits in the input buffer; empty for an
    /// absolute-form target without one (the path is then `/`).
    pub path: (usize, usize),
    /// The caller's remaining time budget (`malla-timeout-ms`), removed from the head:
    /// the proxy sends what is left of it when it forwards the request.
    pub timeout: Option<Duration>,
}

impl RequestInfo {
    /// The request's path and query as forwarded, read from the buffer it was parsed
    /// from (an absolute-form target without a path gets `/`).
    pub fn path<'a>(&self, buf: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        match &buf[self.path.0..self.path.1] {
            b"" => std::borrow::Cow::Borrowed(b"/"),
            query if query.starts_with(b"?") => [&b"/"[..], query].concat().into(),
            path => path.into(),
        }
    }
}

/// The method and the `content-type` value of a request head that parsed (`head`: its
/// bytes), as authorization reads them; only asked when a policy is in force, so the
/// parse of every request does not carry them.
pub fn method_and_content_type(head: &[u8]) -> (&str, Option<&[u8]>) {
    let mut lines = head.split(|&b| b == b'\n');
    let request_line = lines.next().unwrap_or_default();
    let method = request_line
        .split(|&b| b == b' ')
        .next()
        .unwrap_or_default();
    // The parser accepted the method as a token: ASCII.
    let method = std::str::from_utf8(method).unwrap_or_default();
    let content_type = lines.find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = line.split_at(colon);
        name.eq_ignore_ascii_case(b"content-type")
            .then(|| trim_ows(value[1..].strip_suffix(b"\r").unwrap_or(&value[1..])))
    });
    (method, content_type)
}

/// Parses one request head from `buf`. When complete, the head to send upstream has been
/// written to `out` (which is cleared first).
pub fn parse_request(
    buf: &[u8],
    max_headers: usize,
    client: &ClientAddr,
    out: &mut Vec<u8>,
) -> Result<Parsed<RequestInfo>, ProxyError> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(ProxyError::TooManyHeaders),
        Err(e) => return Err(ProxyError::BadRequest(request_error(e))),
    };
    if req.headers.len() > max_headers {
        return Err(ProxyError::TooManyHeaders);
    }
    let method = req.method.unwrap_or_default();
    let minor = req.version.unwrap_or(1);
    if method == "CONNECT" {
        return Err(ProxyError::BadRequest("CONNECT is not supported"));
    }
    let target =
        Target::parse(method, req.path.unwrap_or_default()).map_err(ProxyError::BadRequest)?;
    let mut f = Fields::scan(req.headers).map_err(ProxyError::BadRequest)?;
    if minor == 0 && f.transfer_encoding.is_some() {
        return Err(ProxyError::BadRequest(
            "Transfer-Encoding is not allowed in HTTP/1.0",
        ));
    }
    let body = match (f.content_length, f.transfer_encoding) {
        (Some(_), Some(_)) => {
            return Err(ProxyError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        (_, Some(TransferEncoding::Chunked)) => BodyKind::Chunked,
        (_, Some(TransferEncoding::Unsupported)) => {
            return Err(ProxyError::NotImplemented(
                "transfer codings other than chunked",
            ))
        }
        (_, Some(TransferEncoding::Invalid)) => {
            return Err(ProxyError::BadRequest(
                "Transfer-Encoding must be exactly chunked",
            ))
        }
        (Some(0), None) | (None, None) => BodyKind::Empty,
        (Some(n), None) => BodyKind::Length(n),
    };
    if f.host_count > 1 || (minor == 1 && f.host_count == 0) {
        return Err(ProxyError::BadRequest(
            "a request needs exactly one Host header (HTTP/1.0: at most one)",
        ));
    }
    if f.host.is_some_and(|h| !valid_host(h)) {
        return Err(ProxyError::BadRequest("invalid Host"));
    }
    let keep_alive = if minor == 1 {
        !f.conn_close
    } else {
        f.conn_keep_alive && !f.conn_close
    };
    let upgrade = f.conn_upgrade && f.upgrade.is_some() && minor == 1;
    let offset = |s: &[u8]| s.as_ptr() as usize - buf.as_ptr() as usize;
    let span = |s: &[u8]| (offset(s), offset(s) + s.len());
    let (host, path) = match target {
        Target::Origin(path) => (f.host, path),
        Target::Absolute { authority, path } => (Some(authority.as_bytes()), path),
    };

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    if !path.starts_with('/') && path != "*" {
        out.push(b'/'); // an absolute-form target without a path
    }
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(if minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    if let Some(host) = host {
        push_field(out, b"host", host);
    }
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if is_regenerated(name)
            || is_hop_by_hop(name)
            || f.named_by_connection(name)
            || name.eq_ignore_ascii_case(b"x-forwarded-for")
            || name.eq_ignore_ascii_case(b"via")
            || name.eq_ignore_ascii_case(b"forwarded")
            || name.eq_ignore_ascii_case(TIMEOUT_HEADER.as_bytes())
            || name.eq_ignore_ascii_case(forwarding::CLIENT_ID_HEADER.as_bytes())
        {
            continue;
        }
        push_field(out, name, h.value);
    }
    push_framing(out, body, f.content_length);
    if let Some(id) = &client.identity {
        push_field(out, forwarding::CLIENT_ID_HEADER.as_bytes(), id.as_bytes());
    }
    push_list_field(
        out,
        b"x-forwarded-for",
        f.x_forwarded_for.as_deref(),
        client.text.as_bytes(),
    );
    if !f.x_forwarded_proto {
        push_field(out, b"x-forwarded-proto", b"http");
    }
    if let Some(prev) = f.forwarded.take() {
        push_list_field(out, b"forwarded", Some(&prev), client.forwarded.as_bytes());
    }
    push_list_field(
        out,
        b"via",
        f.via.as_deref(),
        forwarding::VIA_HTTP1.as_bytes(),
    );
    if upgrade {
        push_field(out, b"connection", b"upgrade");
        push_field(out, b"upgrade", f.upgrade.unwrap_or_default());
    }
    out.extend_from_slice(b"\r\n");

    Ok(Parsed::Complete(RequestInfo {
        head_len,
        minor,
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        body,
        keep_alive,
        upgrade,
        expect_continue: f.expect_continue,
        host: host.map(span),
        path: span(path.as_bytes()),
        timeout: f.timeout_ms.and_then(deadline::parse_timeout_ms),
    }))
}

/// What the connection loop needs to know about a response.
#[derive(Debug)]
pub struct ResponseInfo {
    pub head_len: usize,
    pub status: u16,
    pub body: BodyKind,
    /// The upstream connection may carry another request after this response.
    pub reusable: bool,
    /// Marked `malla-relayed-failure`: not the answering endpoint's own failure.
    pub relayed: bool,
    /// Where the `malla-relayed-failure` line sits in the rewritten head, for the inbound
    /// edge to check ([`Self::drop_relayed`]).
    relayed_line: Option<(usize, usize)>,
}

impl ResponseInfo {
    /// The value of the response's `malla-relayed-failure` field, in the rewritten head.
    pub fn relayed_value<'a>(&self, out: &'a [u8]) -> Option<&'a [u8]> {
        let (start, end) = self.relayed_line?;
        let line = out.get(start..end)?;
        let value = line.get(RELAYED_FAILURE_HEADER.len() + 2..line.len().saturating_sub(2))?;
        Some(value)
    }

    /// Removes the `malla-relayed-failure` field from the rewritten head `out`.
    pub fn drop_relayed(&mut self, out: &mut Vec<u8>) {
        if let Some((start, end)) = self.relayed_line.take() {
            out.drain(start..end);
            self.relayed = false;
        }
    }
}

/// Parses one response head from `buf`. When complete, the head to send to the client has
/// been written to `out`, without its connection field and final CRLF (see
/// [`finish_response`]).
pub fn parse_response(
    buf: &[u8],
    max_headers: usize,
    request_is_head: bool,
    out: &mut Vec<u8>,
) -> Result<Parsed<ResponseInfo>, &'static str> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err("too many header fields"),
        Err(e) => return Err(response_error(e)),
    };
    if resp.headers.len() > max_headers {
        return Err("too many header fields");
    }
    let status = resp.code.unwrap_or_default();
    if !(100..=999).contains(&status) {
        return Err("invalid status code");
    }
    let minor = resp.version.unwrap_or(1);
    let f = Fields::scan(resp.headers)?;
    let chunked = match f.transfer_encoding {
        None => false,
        Some(_) if minor == 0 => return Err("Transfer-Encoding in an HTTP/1.0 response"),
        Some(_) if f.content_length.is_some() => {
            return Err("both Content-Length and Transfer-Encoding")
        }
        Some(TransferEncoding::Chunked) => true,
        Some(_) => return Err("Transfer-Encoding other than chunked"),
    };
    // 1xx and 204 have no body and no framing fields; 304 and a response to HEAD have no
    // body but keep their framing fields, which describe the representation.
    let bodiless = status < 200 || status == 204;
    let body = match f.content_length {
        _ if bodiless || request_is_head || status == 304 => BodyKind::Empty,
        _ if chunked => BodyKind::Chunked,
        Some(0) => BodyKind::Empty,
        Some(n) => BodyKind::Length(n),
        None => BodyKind::UntilClose,
    };
    let persistent = if minor == 1 {
        !f.conn_close
    } else {
        f.conn_keep_alive && !f.conn_close
    };

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let keep = status == 101 && name.eq_ignore_ascii_case(b"upgrade");
        if !keep
            && (is_regenerated(name)
                || is_hop_by_hop(name)
                || f.named_by_connection(name)
                || name.eq_ignore_ascii_case(b"via")
                || name.eq_ignore_ascii_case(RELAYED_FAILURE_HEADER.as_bytes()))
        {
            continue;
        }
        push_field(out, name, h.value);
    }
    // The mark, one line in canonical form, where the inbound edge can check it.
    let relayed_line = f.relayed.map(|value| {
        let start = out.len();
        push_field(out, RELAYED_FAILURE_HEADER.as_bytes(), value);
        (start, out.len())
    });
    if !bodiless {
        let framing = if chunked {
            BodyKind::Chunked
        } else {
            f.content_length.map_or(BodyKind::Empty, BodyKind::Length)
        };
        push_framing(out, framing, f.content_length);
    }
    if !f.date {
        push_field(out, b"date", &date::now());
    }
    if status == 101 {
        push_field(out, b"connection", b"upgrade");
    }
    push_list_field(
        out,
        b"via",
        f.via.as_deref(),
        forwarding::VIA_HTTP1.as_bytes(),
    );
    // The caller appends the connection field and the final CRLF (see `finish_response`).

    Ok(Parsed::Complete(ResponseInfo {
        head_len,
        status,
        body,
        reusable: persistent && body != BodyKind::UntilClose,
        relayed: f.relayed.is_some(),
        relayed_line,
    }))
}

/// Ends a response head written by [`parse_response`].
pub fn finish_response(out: &mut Vec<u8>, close: bool, keep_alive_1_0: bool) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep_alive_1_0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The client's address, formatted once per connection for the forwarding fields, and the
/// identity it proved with mTLS (for `malla-client-id`).
#[derive(Debug)]
pub struct ClientAddr {
    /// For `X-Forwarded-For`.
    pub text: String,
    /// For `Forwarded` (RFC 7239 quotes IPv6 addresses).
    pub forwarded: String,
    /// The caller's SPIFFE ID, when it proved one.
    pub identity: Option<String>,
}

impl ClientAddr {
    pub fn new(ip: IpAddr, identity: Option<&malla_core::SpiffeId>) -> Self {
        ClientAddr {
            text: ip.to_string(),
            forwarded: forwarding::forwarded_element(ip, "http"),
            identity: identity.map(ToString::to_string),
        }
    }
}

/// The one framing field of a message the proxy frames as `body`: `transfer-encoding:
/// chunked`, or `content-length` with the length it read (`declared`, kept at 0 for a
/// request that declared an empty body, and for a response to HEAD or a 304).
fn push_framing(out: &mut Vec<u8>, body: BodyKind, declared: Option<u64>) {
    match (body, declared) {
        (BodyKind::Chunked, _) => push_field(out, b"transfer-encoding", b"chunked"),
        (BodyKind::Length(n), _) | (BodyKind::Empty, Some(n)) => {
            let mut digits = [0u8; 20];
            push_field(out, b"content-length", decimal(n, &mut digits));
        }
        (BodyKind::Empty, None) | (BodyKind::UntilClose, _) => {}
    }
}

/// `n` in decimal, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// `name: previous, ours` (or `name: ours`), the list-append of the forwarding fields.
fn push_list_field(out: &mut Vec<u8>, name: &[u8], previous: Option<&[u8]>, ours: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    forwarding::append_list(out, previous, ours);
    out.extend_from_slice(b"\r\n");
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn request_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header field name",
        httparse::Error::HeaderValue => "invalid header field value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::Token => "invalid method or request target",
        httparse::Error::Status => "invalid request line",
        httparse::Error::TooManyHeaders => "too many header fields",
    }
}

fn response_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::Status => "invalid status line",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::HeaderName => "invalid header field name",
        httparse::Error::HeaderValue => "invalid header field value",
        _ => "malformed response head",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ClientAddr {
        ClientAddr::new("10.0.0.7".parse().unwrap(), None)
    }

    fn req(raw: &str) -> Result<(RequestInfo, String), ProxyError> {
        let mut out = Vec::new();
        match parse_request(raw.as_bytes(), 100, &client(), &mut out)? {
            Parsed::Complete(info) => Ok((info, String::from_utf8(out).unwrap())),
            Parsed::Partial => panic!("partial"),
        }
    }

    fn bad(raw: &str) -> String {
        match req(raw) {
            Err(ProxyError::BadRequest(why)) => why.to_string(),
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted: {raw:?}"),
        }
    }

    #[test]
    fn simple_get_is_rewritten_with_forwarding_fields() {
        let (info, out) = req(
            "GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        assert_eq!(info.body, BodyKind::Empty);
        assert!(info.keep_alive && info.idempotent && !info.upgrade);
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nhost: svc\r\nAccept: */*\r\nx-forwarded-for: 1.2.3.4, 10.0.0.7\r\nx-forwarded-proto: http\r\nvia: 1.1 malla\r\n\r\n"
        );
    }

    #[test]
    fn partial_heads_ask_for_more() {
        let mut out = Vec::new();
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n", 100, &client(), &mut out),
            Ok(Parsed::Partial)
        ));
    }

    #[test]
    fn framing_fields_are_written_by_the_proxy() {
        let (info, out) =
            req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n")
                .unwrap();
        assert_eq!(info.body, BodyKind::Length(5));
        assert_eq!(out.matches("content-length: 5\r\n").count(), 1, "{out}");
        assert!(!out.contains("Content-Length"), "{out}");
        let (info, out) =
            req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(info.body, BodyKind::Chunked);
        assert!(
            out.contains("transfer-encoding: chunked\r\n") && !out.contains("Chunked"),
            "{out}"
        );
        let (info, out) = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(info.body, BodyKind::Empty);
        assert!(out.contains("content-length: 0\r\n"), "{out}");
        let (_, out) = req("GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert!(!out.contains("content-length") && !out.contains("transfer-encoding"));
    }

    /// `Connection` may name any field as hop-by-hop, but never the ones that frame the
    /// message or say whom it is for: those are the proxy's to write.
    #[test]
    fn connection_cannot_remove_framing_or_host() {
        for connection in [
            "content-length",
            "close, Content-Length",
            "host, keep-alive",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nConnection: {connection}\r\nContent-Length: 5\r\nX-Other: 1\r\n\r\n");
            let (info, out) = req(&raw).unwrap();
            assert_eq!(info.body, BodyKind::Length(5), "{connection}");
            assert!(out.contains("content-length: 5\r\n"), "{connection}: {out}");
            assert!(out.contains("host: a\r\n"), "{connection}: {out}");
        }
        let (info, out) = req("POST / HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(info.body, BodyKind::Chunked);
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        let (_, out) =
            req("GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n")
                .unwrap();
        assert!(!out.to_ascii_lowercase().contains("x-secret"), "{out}");
    }

    #[test]
    fn absolute_form_goes_on_in_origin_form_with_its_authority() {
        let raw = "GET http://Other:8080/x?y=1 HTTP/1.1\r\nHost: ignored\r\n\r\n";
        let (info, out) = req(raw).unwrap();
        assert!(
            out.starts_with("GET /x?y=1 HTTP/1.1\r\nhost: Other:8080\r\n"),
            "{out}"
        );
        assert!(!out.contains("ignored"), "{out}");
        let (a, b) = info.host.unwrap();
        assert_eq!(&raw.as_bytes()[a..b], b"Other:8080");
        assert_eq!(&*info.path(raw.as_bytes()), b"/x?y=1");
        let raw = "GET http://other?q HTTP/1.1\r\nHost: other\r\n\r\n";
        let (info, out) = req(raw).unwrap();
        assert!(out.starts_with("GET /?q HTTP/1.1\r\n"), "{out}");
        assert_eq!(&*info.path(raw.as_bytes()), b"/?q");
        let (_, out) = req("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert!(out.starts_with("OPTIONS * HTTP/1.1\r\n"), "{out}");
        assert!(bad("GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n").contains("authority"));
        assert!(bad("GET other/x HTTP/1.1\r\nHost: h\r\n\r\n").contains("target"));
        assert!(bad("GET / HTTP/1.1\r\nHost: a b\r\n\r\n").contains("Host"));
    }

    #[test]
    fn bare_lf_heads_are_normalised_to_crlf() {
        let (_, out) = req("GET / HTTP/1.1\nHost: a\n\n").unwrap();
        assert!(out.starts_with("GET / HTTP/1.1\r\nhost: a\r\n"), "{out:?}");
    }

    #[test]
    fn keep_alive_rules() {
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().0.keep_alive);
        assert!(
            req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .0
                .keep_alive
        );
        assert!(
            !req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .unwrap()
                .0
                .keep_alive
        );
    }

    #[test]
    fn upgrade_is_forwarded() {
        let (info, out) = req("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n").unwrap();
        assert!(info.upgrade);
        assert!(
            out.contains("connection: upgrade\r\nupgrade: websocket\r\n"),
            "{out}"
        );
    }

    fn resp(raw: &str, head: bool) -> (ResponseInfo, String) {
        let mut out = Vec::new();
        match parse_response(raw.as_bytes(), 100, head, &mut out).unwrap() {
            Parsed::Complete(info) => {
                finish_response(&mut out, false, false);
                (info, String::from_utf8(out).unwrap())
            }
            Parsed::Partial => panic!("partial"),
        }
    }

    #[test]
    fn response_framing_and_rewrite() {
        let (info, out) = resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nVia: 1.1 other\r\n\r\nabc", false);
        assert_eq!(info.body, BodyKind::Length(3));
        assert!(info.reusable);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-length: 3\r\nvia: 1.1 other, 1.1 malla\r\n\r\n"
        );
        // The mirror of the request case: `Connection` cannot remove the framing.
        let (info, out) = resp(
            "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!(info.body, BodyKind::Length(3));
        assert!(out.contains("content-length: 3\r\n"), "{out}");
        // A missing Date is added; 1xx and 204 carry no framing; HEAD and 304 keep theirs.
        assert!(out.contains("\r\ndate: "), "{out}");
        let (_, out) = resp(
            "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(!out.contains("content-length"), "{out}");
        let (info, out) = resp("HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n", true);
        assert_eq!(info.body, BodyKind::Empty);
        assert!(out.contains("content-length: 30\r\n"), "{out}");
        assert_eq!(
            resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true)
                .0
                .body,
            BodyKind::Empty
        );
        assert_eq!(
            resp("HTTP/1.1 204 No Content\r\n\r\n", false).0.body,
            BodyKind::Empty
        );
        let (info, _) = resp("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(info.body, BodyKind::UntilClose);
        assert!(!info.reusable);
        let (info, out) = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(info.body, BodyKind::Chunked);
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(
            !resp("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
                .0
                .reusable
        );
        let mut out = Vec::new();
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            100,
            false,
            &mut out
        )
        .is_err());
        assert!(parse_response(b"HTTP/1.1 abc OK\r\n\r\n", 100, false, &mut out).is_err());
        for ambiguous in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                parse_response(ambiguous.as_bytes(), 100, false, &mut out).is_err(),
                "{ambiguous:?}"
            );
        }
    }
}
