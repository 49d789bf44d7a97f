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
    CLIENT.get_or_init(|| ClientAddr::new(IpAddr::from([10, 0, 0, 1])))
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

/// A strict, independent reading of RFC 9112 §7.1 (written for this check, sharing nothing
/// with [`ChunkedDecoder`]):
///
/// ```text
/// chunked-body = *chunk last-chunk trailer-section CRLF
/// chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
/// chunk-size   = 1*HEXDIG
/// last-chunk   = 1*("0") [ chunk-ext ] CRLF
/// chunk-ext    = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
/// chunk-ext-val = token / quoted-string
/// trailer-section = *( field-line CRLF )
/// field-line   = field-name ":" OWS field-value OWS
/// ```
///
/// BWS and OWS are spaces and tabs only. Sizes beyond 16 hex digits are refused.
pub fn reference_chunked_end(data: &[u8]) -> ChunkedEnd {
    let mut p = Cursor { data, at: 0 };
    match p.chunked_body() {
        Ok(()) => ChunkedEnd::Done(p.at),
        Err(Stop::Short) => ChunkedEnd::NeedMore,
        Err(Stop::Invalid) => ChunkedEnd::Invalid,
    }
}

enum Stop {
    Short,
    Invalid,
}

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Cursor<'_> {
    fn peek(&self) -> Result<u8, Stop> {
        self.data.get(self.at).copied().ok_or(Stop::Short)
    }

    fn expect(&mut self, b: u8) -> Result<(), Stop> {
        if self.peek()? != b {
            return Err(Stop::Invalid);
        }
        self.at += 1;
        Ok(())
    }

    fn crlf(&mut self) -> Result<(), Stop> {
        self.expect(b'\r')?;
        self.expect(b'\n')
    }

    fn ws(&mut self) -> Result<(), Stop> {
        while matches!(self.peek()?, b' ' | b'\t') {
            self.at += 1;
        }
        Ok(())
    }

    fn token(&mut self) -> Result<(), Stop> {
        let start = self.at;
        while is_tchar(self.peek()?) {
            self.at += 1;
        }
        if self.at == start {
            return Err(Stop::Invalid);
        }
        Ok(())
    }

    fn quoted_string(&mut self) -> Result<(), Stop> {
        self.expect(b'"')?;
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Ok(());
                }
                b'\\' => {
                    self.at += 1;
                    match self.peek()? {
                        b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => self.at += 1,
                        _ => return Err(Stop::Invalid),
                    }
                }
                b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => self.at += 1,
                _ => return Err(Stop::Invalid),
            }
        }
    }

    fn chunk_ext(&mut self) -> Result<(), Stop> {
        loop {
            let before = self.at;
            self.ws()?;
            match self.peek()? {
                b';' => {}
                // Whitespace before the line end is not in the grammar, but is tolerated by
                // h11 and others, and harmless relayed as is: allowed.
                b'\r' => return Ok(()),
                _ => {
                    self.at = before;
                    return Ok(());
                }
            }
            self.at += 1;
            self.ws()?;
            self.token()?;
            let before_eq = self.at;
            self.ws()?;
            if self.peek()? == b'=' {
                self.at += 1;
                self.ws()?;
                if self.peek()? == b'"' {
                    self.quoted_string()?;
                } else {
                    self.token()?;
                }
            } else {
                self.at = before_eq;
            }
        }
    }

    /// The size; `None` past 16 hex digits.
    fn chunk_size(&mut self) -> Result<u64, Stop> {
        let mut size = 0u64;
        let mut digits = 0;
        while let Some(d) = (self.peek()? as char).to_digit(16) {
            digits += 1;
            if digits > 16 {
                return Err(Stop::Invalid);
            }
            size = size << 4 | u64::from(d);
            self.at += 1;
        }
        if digits == 0 {
            return Err(Stop::Invalid);
        }
        Ok(size)
    }

    fn chunked_body(&mut self) -> Result<(), Stop> {
        loop {
            let size = self.chunk_size()?;
            self.chunk_ext()?;
            self.crlf()?;
            if size == 0 {
                break;
            }
            let left = (self.data.len() - self.at) as u64;
            if left < size {
                return Err(Stop::Short);
            }
            self.at += size as usize;
            self.crlf()?;
        }
        // trailer-section CRLF
        loop {
            if self.peek()? == b'\r' {
                return self.crlf();
            }
            self.token()?;
            self.expect(b':')?;
            loop {
                match self.peek()? {
                    b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => self.at += 1,
                    b'\r' => break,
                    _ => return Err(Stop::Invalid),
                }
            }
            self.crlf()?;
        }
    }
}

/// One request as malla reads it from a client's byte stream (see [`read_requests`]).
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub method: Vec<u8>,
    /// The target as forwarded (origin form).
    pub target: Vec<u8>,
    /// The authority the request is for (`Host`, or an absolute target's).
    pub host: Option<Vec<u8>>,
    /// The body's content (chunked framing removed).
    pub body: Vec<u8>,
    pub kind: BodyKind,
    pub minor: u8,
    pub keep_alive: bool,
    /// Where the request (head and body) sits in the input.
    pub span: (usize, usize),
}

/// How malla's reading of a client's byte stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelEnd {
    /// Every byte belongs to a complete request.
    Clean,
    /// The stream ends inside a request (head or body); `head_forwarded`: its head was
    /// complete and may have gone upstream before the body's end was awaited.
    Incomplete { head_forwarded: bool },
    /// Refused with `status`; `head_forwarded`: the head went upstream before the body
    /// turned out to be invalid (a streamed chunked body).
    Rejected {
        status: u16,
        reason: String,
        head_forwarded: bool,
    },
    /// A request asked for the connection to close: the bytes after it are never read.
    Closed { unread: usize },
}

/// malla's reading of a client's byte stream: the requests it accepts, in order, and how
/// the stream ends. Uses the proxy's own head parser and chunked decoder, so the
/// integration suite can compare it with what reached the upstream and with h11's reading.
pub fn read_requests(data: &[u8]) -> (Vec<ModelRequest>, ModelEnd) {
    let mut requests = Vec::new();
    let mut pos = 0;
    let mut out = Vec::new();
    loop {
        if pos == data.len() {
            return (requests, ModelEnd::Clean);
        }
        let buf = &data[pos..];
        let info = match head::parse_request(buf, MAX_HEADERS, client(), &mut out) {
            Ok(Parsed::Complete(info)) => info,
            Ok(Parsed::Partial) => {
                return (
                    requests,
                    ModelEnd::Incomplete {
                        head_forwarded: false,
                    },
                )
            }
            Err(e) => {
                let end = ModelEnd::Rejected {
                    status: e.status().as_u16(),
                    reason: e.to_string(),
                    head_forwarded: false,
                };
                return (requests, end);
            }
        };
        let rest = &buf[info.head_len..];
        let (body, used) = match info.body {
            BodyKind::Empty | BodyKind::UntilClose => (Vec::new(), 0),
            BodyKind::Length(n) => match usize::try_from(n) {
                Ok(n) if n <= rest.len() => (rest[..n].to_vec(), n),
                _ => {
                    let end = ModelEnd::Incomplete {
                        head_forwarded: true,
                    };
                    return (requests, end);
                }
            },
            BodyKind::Chunked => match chunked_end(rest) {
                ChunkedEnd::Done(n) => (dechunk(&rest[..n]), n),
                ChunkedEnd::NeedMore => {
                    let end = ModelEnd::Incomplete {
                        head_forwarded: true,
                    };
                    return (requests, end);
                }
                ChunkedEnd::Invalid => {
                    let end = ModelEnd::Rejected {
                        status: 400,
                        reason: "invalid chunked request body".into(),
                        head_forwarded: true,
                    };
                    return (requests, end);
                }
            },
        };
        let line_end = out.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
        let mut line = out[..line_end].split(|&b| b == b' ');
        let method = line.next().unwrap_or_default().to_vec();
        let target = line.next().unwrap_or_default().to_vec();
        let end = pos + info.head_len + used;
        requests.push(ModelRequest {
            method,
            target,
            host: info.host.map(|(a, b)| buf[a..b].to_vec()),
            body,
            kind: info.body,
            minor: info.minor,
            keep_alive: info.keep_alive,
            span: (pos, end),
        });
        pos = end;
        if !info.keep_alive {
            let unread = data.len() - pos;
            let end = if unread == 0 {
                ModelEnd::Clean
            } else {
                ModelEnd::Closed { unread }
            };
            return (requests, end);
        }
    }
}

/// The content of a chunked body that [`ChunkedDecoder`] accepted, read the way it reads
/// the framing: the size is the leading hex digits of a chunk line.
fn dechunk(mut framed: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let digits = framed.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let size = framed[..digits].iter().fold(0usize, |n, &d| {
            n.wrapping_mul(16) + (d as char).to_digit(16).unwrap_or(0) as usize
        });
        let Some(line_end) = framed.windows(2).position(|w| w == b"\r\n") else {
            return body;
        };
        framed = &framed[line_end + 2..];
        if size == 0 || size > framed.len() {
            return body;
        }
        body.extend_from_slice(&framed[..size]);
        framed = &framed[(size + 2).min(framed.len())..];
    }
}

/// A small deterministic generator (xorshift64*), so that mutation runs repeat exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Fragments that matter to framing, spliced in by [`mutate`].
pub const DICTIONARY: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b"\x0b",
    b"\x0c",
    b"\0",
    b",",
    b";",
    b":",
    b"0x",
    b"+",
    b"-",
    b"chunked",
    b"identity",
    b"gzip, ",
    b", chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Connection: content-length\r\n",
    b"Connection: close\r\n",
    b"Host: other\r\n",
    b"Expect: 100-continue\r\n",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n",
    b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HTTP/1.0",
    b"http://other",
    b"\xff",
];

/// One to five random edits of `seed`: byte replacements, deletions, insertions, copies of
/// a range, dictionary fragments, case flips.
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    const INTERESTING: &[u8] = b"\r\n :,;0\0\xff\t\x0b\"=x";
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(5) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below(4).min(v.len() - i - 1);
                v.drain(i..i + n);
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next_u64() as u8);
            }
            3 => {
                let (i, j) = (rng.below(v.len() + 1), rng.below(v.len() + 1));
                let (a, b) = (i.min(j), i.max(j));
                let piece = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, piece);
            }
            4 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = if v[i].is_ascii_lowercase() {
                    v[i].to_ascii_uppercase()
                } else {
                    v[i].to_ascii_lowercase()
                };
            }
            _ => {
                let piece = DICTIONARY[rng.below(DICTIONARY.len())];
                // Prefer line starts, where fields go.
                let starts: Vec<usize> = v
                    .windows(2)
                    .enumerate()
                    .filter(|(_, w)| w == b"\r\n")
                    .map(|(i, _)| i + 2)
                    .collect();
                let at = if !starts.is_empty() && rng.below(2) == 0 {
                    starts[rng.below(starts.len())]
                } else {
                    rng.below(v.len() + 1)
                };
                v.splice(at..at, piece.iter().copied());
            }
        }
    }
    v
}

/// Seeds of the mutation runs: requests (first), responses, chunked bodies.
pub const REQUEST_SEEDS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
    b"GET http://other/x?y HTTP/1.1\r\nHost: ignored\r\n\r\n",
    b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nVia: 1.0 b\r\nForwarded: for=x\r\nmalla-timeout-ms: 100\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
];

pub const RESPONSE_SEEDS: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nVia: 1.1 x\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nbody",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
];

pub const CHUNKED_SEEDS: &[&[u8]] = &[
    b"5\r\nhello\r\n0\r\n\r\n",
    b"1a;ext=\"v\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ngrpc-status: 0\r\n\r\n",
    b"3;a=b;c\r\nabc\r\n000\r\n\r\nGET / HTTP/1.1\r\n",
    b"0\r\n\r\n",
    b"f\r\n0123456789abcde\r\n1\r\nx\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n",
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Executions of the bounded run: every one feeds a mutated input to all three checks.
    const EXECUTIONS: usize = 50_000;

    #[test]
    fn seeds_satisfy_every_invariant() {
        for seed in REQUEST_SEEDS
            .iter()
            .chain(RESPONSE_SEEDS)
            .chain(CHUNKED_SEEDS)
        {
            check_request(seed);
            check_response(seed);
            check_chunked(seed);
        }
        for seed in CHUNKED_SEEDS {
            assert!(
                matches!(chunked_end(seed), ChunkedEnd::Done(_)),
                "{}",
                show(seed)
            );
        }
    }

    #[test]
    fn the_reference_decoder_reads_the_grammar() {
        for (input, end) in [
            (&b"5\r\nhello\r\n0\r\n\r\nX"[..], ChunkedEnd::Done(15)),
            (
                b"5;a=\"b c\"\r\nhello\r\n0\r\nT: v\r\n\r\n",
                ChunkedEnd::Done(29),
            ),
            (b"5 ;a\r\nhello\r\n0\r\n\r\n", ChunkedEnd::Done(18)),
            (b"5 \r\nhello\r\n0\r\n\r\n", ChunkedEnd::Done(16)),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkedEnd::Invalid),
            (b"5 junk\r\nhello\r\n0\r\n\r\n", ChunkedEnd::Invalid),
            (b"5\r\nhello\n0\r\n\r\n", ChunkedEnd::Invalid),
            (b"0\r\nno colon\r\n\r\n", ChunkedEnd::Invalid),
            (b"5\r\nhel", ChunkedEnd::NeedMore),
        ] {
            assert_eq!(reference_chunked_end(input), end, "{}", show(input));
        }
    }

    #[test]
    fn model_reads_pipelines_and_stops_where_malla_stops() {
        let (reqs, end) = read_requests(
            b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET http://o/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /c HTTP/1.1\r\n",
        );
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].body, b"abc");
        assert_eq!(reqs[1].target, b"/b");
        assert_eq!(reqs[1].host.as_deref(), Some(&b"o"[..]));
        assert_eq!(end, ModelEnd::Closed { unread: 17 });
    }

    /// The bounded, always-on stand-in for the fuzz targets: a fixed seed, a fixed number
    /// of mutated inputs through one check (one test per fuzz target, so that one broken
    /// invariant does not hide the others). The fuzz targets run the same checks for longer
    /// (`fuzz/README.md`). All the seeds feed every check: a response or a chunked body is
    /// also a hostile request, and so on.
    fn mutation_run(what: &str, salt: u64, check: fn(&[u8])) {
        let mut rng = Rng::new(0x6d61_6c6c_6121 ^ salt);
        let seeds: Vec<&[u8]> = REQUEST_SEEDS
            .iter()
            .chain(RESPONSE_SEEDS)
            .chain(CHUNKED_SEEDS)
            .copied()
            .collect();
        let started = tokio::time::Instant::now();
        for i in 0..EXECUTIONS {
            let mut input = mutate(&mut rng, seeds[i % seeds.len()]);
            if rng.below(4) == 0 {
                input = mutate(&mut rng, &input);
            }
            check(&input);
        }
        eprintln!(
            "http1 invariants, {what}: {EXECUTIONS} mutated inputs in {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn mutated_request_heads_satisfy_the_invariants() {
        mutation_run("request heads", 1, check_request);
    }

    #[test]
    fn mutated_response_heads_satisfy_the_invariants() {
        mutation_run("response heads", 2, check_response);
    }

    #[test]
    fn mutated_chunked_bodies_satisfy_the_invariants() {
        mutation_run("chunked bodies", 3, check_chunked);
    }
}
