//! What the inbound data path hands the [`super::Authorizer`]: a call as each protocol
//! module sees it ([`Inbound`]), and the reading of it a policy decides on.
//!
//! # Paths are normalised before they are matched
//!
//! A policy names paths as the application routes them, and an application (or its
//! framework) reads `/v1/../admin/x`, `//admin/x` or `/%61dmin/x` as `/admin/x`. Matched raw,
//! each would slip past a deny rule on `/admin/*`, and an allow rule on `/public/*` would
//! let `/public/../admin` through. So a path is read the way applications read it, and the
//! way Istio's `DECODE_AND_MERGE_SLASHES` normalisation does before its rules: the query
//! and fragment dropped; percent-encoded unreserved characters and `/` decoded (`%2F`
//! included: an application that decodes it would otherwise see a different path), other
//! escapes kept, their hex uppercased; `.` and `..` segments resolved (RFC 3986, 5.2.4);
//! repeated slashes merged. The request itself goes on unchanged: only the decision reads
//! the normalised path.

use std::borrow::Cow;

use malla_core::SpiffeId;

/// The HTTP version a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// How a call reached this sidecar, as the decision metric labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// An HTTP request with a gRPC content type (over HTTP/2, or HTTP/1 for gRPC-Web).
    Grpc,
    Tcp,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [
        Protocol::Http1,
        Protocol::Http2,
        Protocol::Grpc,
        Protocol::Tcp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

/// One call at the inbound listener, as the data path knows it when it asks.
#[derive(Clone, Copy, Debug)]
pub struct Inbound<'a> {
    /// The caller's SPIFFE ID, proved by its mTLS handshake; `None` when it proved none
    /// (plaintext, in permissive mode).
    pub source: Option<&'a SpiffeId>,
    /// The port the caller connected to: the inbound listener's.
    pub port: u16,
    pub call: Call<'a>,
}

/// What was called: an HTTP request (gRPC included), or a TCP connection.
#[derive(Clone, Copy, Debug)]
pub enum Call<'a> {
    Http {
        version: HttpVersion,
        method: &'a str,
        /// The request target as received: a path, with its query if any (an
        /// absolute-form target is read for its path).
        target: &'a [u8],
        /// A gRPC call: its path names `/package.Service/Method`.
        grpc: bool,
    },
    Tcp,
}

impl<'a> Inbound<'a> {
    /// A TCP connection (checked once, when it opens).
    pub fn tcp(source: Option<&'a SpiffeId>, port: u16) -> Self {
        Inbound {
            source,
            port,
            call: Call::Tcp,
        }
    }

    /// An HTTP request head: `target` as received (path and query), `content_type` the
    /// value of its `content-type` header, which tells a gRPC call.
    pub fn http(
        source: Option<&'a SpiffeId>,
        port: u16,
        version: HttpVersion,
        method: &'a str,
        target: &'a [u8],
        content_type: Option<&[u8]>,
    ) -> Self {
        Inbound {
            source,
            port,
            call: Call::Http {
                version,
                method,
                target,
                grpc: content_type.is_some_and(is_grpc),
            },
        }
    }

    /// An `http` request head (hyper's, on the HTTP/2 path): version, method, path and
    /// content type read from it.
    pub fn from_request<B>(
        source: Option<&'a SpiffeId>,
        port: u16,
        request: &'a http::Request<B>,
    ) -> Self {
        let version = if request.version() == http::Version::HTTP_2 {
            HttpVersion::Http2
        } else {
            HttpVersion::Http1
        };
        Self::http(
            source,
            port,
            version,
            request.method().as_str(),
            request.uri().path().as_bytes(),
            request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
        )
    }

    pub fn protocol(&self) -> Protocol {
        match self.call {
            Call::Http { grpc: true, .. } => Protocol::Grpc,
            Call::Http {
                version: HttpVersion::Http1,
                ..
            } => Protocol::Http1,
            Call::Http {
                version: HttpVersion::Http2,
                ..
            } => Protocol::Http2,
            Call::Tcp => Protocol::Tcp,
        }
    }
}

/// `application/grpc`, with or without a `+format` or parameters (`application/grpc+proto`,
/// `application/grpc-web`...), in any case.
pub fn is_grpc(content_type: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    content_type.len() >= GRPC.len()
        && content_type[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(
            content_type.get(GRPC.len()),
            None | Some(b'+' | b';' | b'-' | b' ')
        )
}

/// The path of `target` as a policy matches it (see the module's notes).
pub fn normalize_path(target: &[u8]) -> Cow<'_, str> {
    if target == b"*" {
        return Cow::Borrowed("*");
    }
    let mut path = target;
    // An absolute-form target (`http://host/p`): its path, `/` when it has none.
    if !path.starts_with(b"/") && path != b"*" {
        if let Some(i) = path.windows(3).position(|w| w == b"://") {
            let rest = &path[i + 3..];
            path = rest
                .iter()
                .position(|&b| matches!(b, b'/' | b'?' | b'#'))
                .map_or(&b""[..], |j| &rest[j..]);
        }
    }
    if let Some(end) = path.iter().position(|&b| b == b'?' || b == b'#') {
        path = &path[..end];
    }
    if path.is_empty() || path.starts_with(b"?") {
        return Cow::Borrowed("/");
    }
    // A path that is not rooted (an authority-form target, or one an application might
    // read relative to `/`) is rooted by the resolution below, so a rule on `/admin/*`
    // also meets `admin/x`.
    let plain = path.starts_with(b"/")
        && !path.contains(&b'%')
        && !path.windows(2).any(|w| w == b"//" || w == b"/.");
    if plain {
        return String::from_utf8_lossy(path);
    }
    let decoded = percent_decode_safe(path);
    Cow::Owned(resolve_segments(&String::from_utf8_lossy(&decoded)))
}

/// Decodes `%XX` where it stands for an unreserved character or `/`; uppercases the hex
/// of the others (so `%2f` and `%2F` read alike). A `%` not followed by two hex digits is a
/// literal percent sign and is written `%25`: left bare, it could join what a decoding
/// produced into an escape that was never sent (`%%61d` would read `%ad`).
fn percent_decode_safe(path: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%' && i + 2 < path.len() {
            if let (Some(hi), Some(lo)) = (hex(path[i + 1]), hex(path[i + 2])) {
                let byte = hi << 4 | lo;
                if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
                    out.push(byte);
                } else {
                    out.push(b'%');
                    out.push(path[i + 1].to_ascii_uppercase());
                    out.push(path[i + 2].to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        if path[i] == b'%' {
            out.extend_from_slice(b"%25");
            i += 1;
            continue;
        }
        out.push(path[i]);
        i += 1;
    }
    out
}

/// Resolves `.` and `..` segments and merges repeated slashes; the result starts with `/`
/// (`..` above the root stays at the root) and keeps a trailing slash.
fn resolve_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').collect();
    let last = parts.len() - 1;
    let mut trailing = false;
    for (i, segment) in parts.iter().enumerate() {
        match *segment {
            "" => trailing = i == last && i != 0,
            "." => trailing = i == last,
            ".." => {
                segments.pop();
                trailing = i == last;
            }
            s => {
                segments.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    out
}
