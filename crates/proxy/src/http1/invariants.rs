//! The invariants of the HTTP/1 framing, written once and checked by three drivers:
//!
//! - the cargo-fuzz targets in `fuzz/` (`http1_request_head`, `http1_response_head`,
//!   `http1_chunked`), coverage-guided, for as long as one cares to run them;
//! - the always-on bounded mutation test at the bottom of this file (fixed seed, a fixed
//!   number of executions, a few seconds in a debug build);
//! - the integration suite's differential test against h11 (`tests/tests/it/smuggling.rs`),
//!   which also uses [`read_requests`] as "malla's own reading" of a client byte stream and
//!   [`Rng`] / [`mutate`] to derive its inputs.
//!
//! Every `check_*` function takes arbitrary bytes and panics, with a message naming the
//! invariant and the input, when one is violated. They never panic on input the parser
//! rejects: rejecting is always allowed; accepting and then framing differently is not.
//!
//! The invariants:
//!
//! 1. Parsing never panics, and a request head that is refused gets 400, 431 or 501.
//! 2. An accepted head is accepted the same way whatever the TCP segmentation: a strict
//!    prefix of it is `Partial` (never complete, never an error), and the head alone
//!    parses exactly as it did with bytes after it.
//! 3. The rewritten head is canonical: CRLF line endings only, no NUL, no obs-fold, one
//!    `name: value` per line.
//! 4. The rewritten head re-parses, in malla's parser and in plain `httparse`, to the same
//!    method, target (absolute form turned into origin form), version, body framing,
//!    host and upgrade; its persistence is the protocol default of its version, since
//!    `Connection` options are hop-by-hop (the proxy owns the upstream connection).
//! 5. A request with several `Host` fields is refused, whatever its version.
//!    The rewritten head carries exactly the framing field its body kind calls for (`transfer-encoding:
//!    chunked`, or one `content-length` with the length read, or none / `content-length:
//!    0` for an empty body) and, for HTTP/1.1, exactly one `Host`.
//! 6. Responses: the same re-parse and framing rules, at least one `Date`, one `Via`.
//! 7. Chunked bodies: the decoder finds the same end (or the same refusal) however the
//!    bytes are split, consumes every byte of a piece that does not end the body, and never
//!    accepts a body that the RFC 9112 §7.1 grammar (a strict reference decoder below)
//!    rejects, nor ends it anywhere else.

use std::{net::IpAddr, sync::OnceLock};

use super::{
    body::ChunkedDecoder,
    head::{self, BodyKind, ClientAddr, Parsed},
};

const MAX_HEADERS: usize = head::MAX_HEADERS;

/// Header fields as `(name, value)` bytes.
type FieldList = Vec<(Vec<u8>, Vec<u8>)>;
/// A way to cut a byte stream into pieces: named, and yielding piece lengths.
type Split<'a> = (&'static str, Box<dyn FnMut() -> usize + 'a>);

fn client() -> &'static ClientAddr {
    static CLIENT: OnceLock<ClientAddr> = OnceLock::new();
    CLIENT.get_or_init(|| ClientAddr::new(IpAddr::from([10, 0, 0, 1]), None))
}

/// `bytes` for a failure message: escaped, cut at 600 characters.
pub fn show(bytes: &[u8]) -> String {
    let text: String = bytes.escape_ascii().to_string();
    if text.len() <= 600 {
        format!("b\"{text}\"")
    } else {
        format!("b\"{}\"... ({} bytes)", &text[..600], bytes.len())
    }
}

/// A request line and fields as plain `httparse` reads them (no malla rule applied).
struct Plain {
    method: Vec<u8>,
    target: Vec<u8>,
    minor: u8,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Plain {
    fn request(buf: &[u8]) -> Option<(usize, Plain)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = req.parse(buf) else {
            return None;
        };
        Some((
            n,
            Plain {
                method: req.method?.as_bytes().to_vec(),
                target: req.path?.as_bytes().to_vec(),
                minor: req.version?,
                fields: collect(req.headers),
            },
        ))
    }

    fn response(buf: &[u8]) -> Option<(usize, u16, FieldList)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = resp.parse(buf) else {
            return None;
        };
        Some((n, resp.code?, collect(resp.headers)))
    }

    fn values(&self, name: &str) -> Vec<&[u8]> {
        values(&self.fields, name)
    }
}

fn collect(headers: &[httparse::Header<'_>]) -> Vec<(Vec<u8>, Vec<u8>)> {
    headers
        .iter()
        .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
        .collect()
}

fn values<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Vec<&'a [u8]> {
    fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_slice())
        .collect()
}

/// The request target the next hop must get for `target`: origin form unchanged, an
/// absolute form's path and query (with `/` when it has no path) and its authority.
pub fn origin_form(target: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    if target.starts_with(b"/") || target == b"*" {
        return (target.to_vec(), None);
    }
    let lower = target.to_ascii_lowercase();
    let skip = if lower.starts_with(b"http://") {
        7
    } else if lower.starts_with(b"https://") {
        8
    } else {
        return (target.to_vec(), None);
    };
    let rest = &target[skip..];
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let mut origin = Vec::with_capacity(path.len() + 1);
    if !path.starts_with(b"/") {
        origin.push(b'/');
    }
    origin.extend_from_slice(path);
    (origin, Some(authority.to_vec()))
}

/// Invariant 3: CRLF only, no NUL, no obs-fold, ends with an empty line.
fn assert_canonical(what: &str, input: &[u8], out: &[u8]) {
    let ctx = || format!("{what} of {}: {}", show(input), show(out));
    assert!(
        out.ends_with(b"\r\n\r\n"),
        "does not end with CRLF CRLF: {}",
        ctx()
    );
    for (i, &b) in out.iter().enumerate() {
        assert!(b != 0, "NUL in the rewritten head: {}", ctx());
        if b == b'\n' {
            assert!(
                i > 0 && out[i - 1] == b'\r',
                "bare LF in the rewritten head: {}",
                ctx()
            );
            if let Some(&next) = out.get(i + 1) {
                assert!(
                    next != b' ' && next != b'\t',
                    "obs-fold in the rewritten head: {}",
                    ctx()
                );
            }
        }
        if b == b'\r' {
            assert!(
                out.get(i + 1) == Some(&b'\n'),
                "bare CR in the rewritten head: {}",
                ctx()
            );
        }
    }
}

/// Invariant 5 for one message: the framing fields of `fields` are exactly what `body`
/// calls for. `empty_may_declare`: an empty body may carry `content-length` (a request
/// that declared 0, a response to HEAD or a 304, which describe the representation).
fn assert_framing(
    ctx: &dyn Fn() -> String,
    fields: &[(Vec<u8>, Vec<u8>)],
    body: BodyKind,
    empty_may_declare: bool,
) {
    let cl = values(fields, "content-length");
    let te = values(fields, "transfer-encoding");
    assert!(
        cl.len() + te.len() <= 1,
        "more than one framing field (content-length {}, transfer-encoding {}): {}",
        cl.len(),
        te.len(),
        ctx()
    );
    match body {
        BodyKind::Chunked => assert!(
            te == [b"chunked"],
            "chunked body without exactly `transfer-encoding: chunked`: {}",
            ctx()
        ),
        BodyKind::Length(n) => assert!(
            cl == [n.to_string().as_bytes()],
            "body of {n} bytes without exactly `content-length: {n}`: {}",
            ctx()
        ),
        BodyKind::UntilClose => assert!(
            cl.is_empty() && te.is_empty(),
            "close-delimited body with a framing field: {}",
            ctx()
        ),
        BodyKind::Empty => {
            assert!(te.is_empty(), "empty body announced as chunked: {}", ctx());
            if !empty_may_declare {
                assert!(
                    cl.is_empty() || cl == [b"0"],
                    "empty body announced with a non-zero length: {}",
                    ctx()
                );
            }
        }
    }
}

/// Checks invariants 1-5 on `data` as the start of a client's byte stream.
pub fn check_request(data: &[u8]) {
    let mut out = Vec::new();
    let info = match head::parse_request(data, MAX_HEADERS, client(), &mut out) {
        Ok(Parsed::Complete(info)) => info,
        Ok(Parsed::Partial) => return,
        Err(e) => {
            let status = e.status().as_u16();
            assert!(
                matches!(status, 400 | 431 | 501),
                "a refused request gets {status} ({e}): {}",
                show(data)
            );
            return;
        }
    };
    let head_len = info.head_len;
    assert!(
        head_len > 0 && head_len <= data.len(),
        "head length {head_len} out of 1..={}: {}",
        data.len(),
        show(data)
    );
    let ctx = || format!("{} rewritten as {}", show(data), show(&out));

    // Invariant 2: segmentation does not change the verdict.
    let mut scratch = Vec::new();
    match head::parse_request(&data[..head_len], MAX_HEADERS, client(), &mut scratch) {
        Ok(Parsed::Complete(alone)) => {
            assert_eq!(alone.head_len, head_len, "head alone: {}", ctx());
            assert_eq!(alone.body, info.body, "head alone: {}", ctx());
            assert_eq!(
                scratch,
                out,
                "the head alone is rewritten differently: {}",
                ctx()
            );
        }
        other => panic!(
            "the head alone is not accepted ({:?}) although it is with what follows: {}",
            other.err(),
            ctx()
        ),
    }
    for cut in [head_len - 1, head_len / 2, head_len.saturating_sub(3)] {
        if cut == 0 || cut >= head_len {
            continue;
        }
        match head::parse_request(&data[..cut], MAX_HEADERS, client(), &mut scratch) {
            Ok(Parsed::Partial) => {}
            Ok(Parsed::Complete(_)) => panic!(
                "a strict prefix ({cut} of {head_len} bytes) is already a complete head: {}",
                ctx()
            ),
            Err(e) => panic!(
                "a strict prefix ({cut} of {head_len} bytes) is refused ({e}) while the whole \
                 head is accepted: the verdict depends on TCP segmentation: {}",
                ctx()
            ),
        }
    }

    // Invariant 3.
    assert_canonical("request head", data, &out);

    // Invariants 4 and 5, first with plain httparse.
    let Some((_, original)) = Plain::request(data) else {
        panic!("malla accepted a head plain httparse refuses: {}", ctx());
    };
    let Some((re_len, rewritten)) = Plain::request(&out) else {
        panic!("the rewritten head does not parse: {}", ctx());
    };
    assert_eq!(
        re_len,
        out.len(),
        "the rewritten head parses shorter: {}",
        ctx()
    );
    assert_eq!(
        rewritten.method,
        original.method,
        "method changed: {}",
        ctx()
    );
    assert_eq!(
        rewritten.minor,
        original.minor,
        "version changed: {}",
        ctx()
    );
    let (target, authority) = origin_form(&original.target);
    assert_eq!(
        rewritten.target,
        target,
        "target {} forwarded as {}: {}",
        show(&original.target),
        show(&rewritten.target),
        ctx()
    );
    // Several Host fields are ambiguous in any version: whichever one a hop picks, another
    // may pick the other ("Host of troubles").
    assert!(
        original.values("host").len() <= 1,
        "accepted a request with several Host fields: {}",
        ctx()
    );
    let hosts = rewritten.values("host");
    if original.minor == 1 {
        assert_eq!(
            hosts.len(),
            1,
            "HTTP/1.1 without exactly one Host: {}",
            ctx()
        );
    } else {
        assert!(hosts.len() <= 1, "several Host fields: {}", ctx());
    }
    let expected_host = authority.or_else(|| original.values("host").first().map(|h| h.to_vec()));
    assert_eq!(
        hosts.first().map(|h| h.to_vec()),
        expected_host,
        "Host is not the target's authority or the request's Host: {}",
        ctx()
    );
    assert_framing(&ctx, &rewritten.fields, info.body, false);
    let connection = rewritten.values("connection");
    if info.upgrade {
        assert!(
            connection == [b"upgrade"],
            "upgrade without `connection: upgrade`: {}",
            ctx()
        );
    } else {
        assert!(
            connection.is_empty(),
            "a Connection field was forwarded: {}",
            ctx()
        );
    }
    for hop in ["keep-alive", "proxy-connection", "te"] {
        assert!(
            rewritten.values(hop).is_empty(),
            "hop-by-hop {hop} forwarded: {}",
            ctx()
        );
    }

    // Invariant 4 in malla's own parser: the next malla on the path reads it the same way.
    let again = match head::parse_request(&out, MAX_HEADERS, client(), &mut scratch) {
        Ok(Parsed::Complete(again)) => again,
        Ok(Parsed::Partial) => panic!("the rewritten head is partial: {}", ctx()),
        Err(e) => panic!("the rewritten head is refused ({e}): {}", ctx()),
    };
    assert_eq!(again.head_len, out.len(), "re-parse length: {}", ctx());
    assert_eq!(again.body, info.body, "body framing changed: {}", ctx());
    assert_eq!(again.minor, info.minor, "version changed: {}", ctx());
    assert_eq!(again.is_head, info.is_head, "method changed: {}", ctx());
    assert_eq!(
        again.idempotent,
        info.idempotent,
        "method changed: {}",
        ctx()
    );
    assert_eq!(again.upgrade, info.upgrade, "upgrade changed: {}", ctx());
    assert_eq!(
        again.expect_continue,
        info.expect_continue,
        "Expect changed: {}",
        ctx()
    );
    assert_eq!(
        again.keep_alive,
        info.minor == 1,
        "the rewritten head's persistence is not its version's default: {}",
        ctx()
    );
    assert_eq!(again.path(&out), info.path(data), "path changed: {}", ctx());
    let host = |i: &head::RequestInfo, buf: &[u8]| i.host.map(|(a, b)| buf[a..b].to_vec());
    assert_eq!(
        host(&again, &out),
        host(&info, data),
        "host changed: {}",
        ctx()
    );
}

/// Checks invariants 1, 3, 5 and 6 on `data` as the start of an upstream's byte stream,
/// both as the answer to a GET and to a HEAD.
pub fn check_response(data: &[u8]) {
    for request_is_head in [false, true] {
        let mut out = Vec::new();
        let info = match head::parse_response(data, MAX_HEADERS, request_is_head, &mut out) {
            Ok(Parsed::Complete(info)) => info,
            Ok(Parsed::Partial) | Err(_) => return,
        };
        head::finish_response(&mut out, false, false);
        let ctx = || {
            format!(
                "{} (to a {}) rewritten as {}",
                show(data),
                if request_is_head { "HEAD" } else { "GET" },
                show(&out)
            )
        };
        assert!(info.head_len <= data.len(), "head length: {}", ctx());
        assert_canonical("response head", data, &out);
        let Some((_, _, original)) = Plain::response(data) else {
            panic!(
                "malla accepted a response head plain httparse refuses: {}",
                ctx()
            );
        };
        let Some((re_len, status, fields)) = Plain::response(&out) else {
            panic!("the rewritten response head does not parse: {}", ctx());
        };
        assert_eq!(
            re_len,
            out.len(),
            "the rewritten head parses shorter: {}",
            ctx()
        );
        assert_eq!(status, info.status, "status changed: {}", ctx());
        let bodiless = info.status < 200 || info.status == 204;
        let framing = match info.body {
            // The body a HEAD or 304 response does not have is described, not framed.
            BodyKind::Empty if !bodiless => {
                if values(&fields, "transfer-encoding").is_empty() {
                    BodyKind::Empty
                } else {
                    BodyKind::Chunked
                }
            }
            body => body,
        };
        assert_framing(&ctx, &fields, framing, !bodiless);
        if bodiless {
            assert!(
                values(&fields, "content-length").is_empty()
                    && values(&fields, "transfer-encoding").is_empty(),
                "a {} response with a framing field: {}",
                info.status,
                ctx()
            );
        }
        let dates = values(&fields, "date").len();
        assert!(dates >= 1, "no Date: {}", ctx());
        if values(&original, "date").is_empty() {
            assert_eq!(dates, 1, "Date added more than once: {}", ctx());
        }
        assert_eq!(
            values(&fields, "via").len(),
            1,
            "not exactly one Via: {}",
            ctx()
        );
        let mut again_out = Vec::new();
        match head::parse_response(&out, MAX_HEADERS, request_is_head, &mut again_out) {
            Ok(Parsed::Complete(again)) => {
                assert_eq!(again.head_len, out.len(), "re-parse length: {}", ctx());
                assert_eq!(again.status, info.status, "status changed: {}", ctx());
                assert_eq!(again.body, info.body, "body framing changed: {}", ctx());
            }
            Ok(Parsed::Partial) => panic!("the rewritten response head is partial: {}", ctx()),
            Err(e) => panic!("the rewritten response head is refused ({e}): {}", ctx()),
        }
    }
}

/// Where a chunked body ends, as one decoder reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkedEnd {
    /// The body is the first `n` bytes.
    Done(usize),
    /// All the bytes belong to the body and it has not ended.
    NeedMore,
    Invalid,
}

/// Feeds `data` to malla's decoder in pieces of the lengths `split` yields (cycled),
/// asserting the piece-wise contract on the way.
fn decode_split(data: &[u8], split: &mut dyn FnMut() -> usize) -> ChunkedEnd {
    let mut decoder = ChunkedDecoder::default();
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + split().max(1)).min(data.len());
        let used = match decoder.advance(&data[pos..end]) {
            Ok(used) => used,
            Err(_) => return ChunkedEnd::Invalid,
        };
        assert!(
            used <= end - pos,
            "advance used more than it was given: {}",
            show(data)
        );
        pos += used;
        if decoder.is_done() {
            assert_eq!(
                decoder.advance(b"more").ok(),
                Some(0),
                "a finished decoder took more bytes: {}",
                show(data)
            );
            return ChunkedEnd::Done(pos);
        }
        assert_eq!(
            pos,
            end,
            "a piece that does not end the body was not consumed whole: {}",
            show(data)
        );
    }
    ChunkedEnd::NeedMore
}

/// malla's reading of `data` as a chunked body, fed in one piece.
pub fn chunked_end(data: &[u8]) -> ChunkedEnd {
    decode_split(data, &mut || usize::MAX)
}

/// Checks invariant 7 on `data` as the start of a chunked body.
pub fn check_chunked(data: &[u8]) {
    let whole = chunked_end(data);
    let mut irregular = data.iter().cycle().map(|&b| usize::from(b % 11) + 1);
    let mut splits: [Split<'_>; 6] = [
        ("1-byte pieces", Box::new(|| 1)),
        ("2-byte pieces", Box::new(|| 2)),
        ("3-byte pieces", Box::new(|| 3)),
        ("7-byte pieces", Box::new(|| 7)),
        ("halves", Box::new(move || data.len().div_ceil(2))),
        (
            "pieces sized by the data",
            Box::new(move || irregular.next().unwrap_or(1)),
        ),
    ];
    for (name, split) in splits.iter_mut() {
        let got = decode_split(data, split.as_mut());
        assert_eq!(
            got,
            whole,
            "fed in {name} the decoder reads {got:?}, in one piece {whole:?}: {}",
            show(data)
        );
    }
    if let ChunkedEnd::Done(end) = whole {
        let reference = reference_chunked_end(data);
        assert_eq!(
            reference,
            ChunkedEnd::Done(end),
            "malla ends a chunked body at {end} that RFC 9112 reads as {reference:?}: {}",
            show(&data[..end.min(data.len())])
        );
    }
}

mod reference;

pub use reference::reference_chunked_end;

mod model;
mod mutate;

pub use model::{read_requests, ModelEnd, ModelRequest};
pub use mutate::{mutate, Rng, CHUNKED_SEEDS, REQUEST_SEEDS, RESPONSE_SEEDS};

#[cfg(test)]
mod tests;
