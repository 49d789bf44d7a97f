//! malla's own reading of a client byte stream, for the differential test to compare with
//! what reached the upstream and with an independent parser's reading.

use super::*;

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
