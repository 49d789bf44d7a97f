//! Request smuggling, proven against an independent HTTP/1 implementation.
//!
//! Every input goes to a malla proxy whose upstream is a [`RecordingPeer`]: a raw TCP peer
//! that records every byte it receives and answers each request. Three readings are then
//! compared:
//!
//! - malla's own reading of the client bytes ([`read_requests`]: the proxy's head parser
//!   and chunked decoder, in process);
//! - h11's reading of the same client bytes (`tests/reference/h11_reference.py`, one
//!   Python process per test);
//! - h11's reading of what actually reached the upstream.
//!
//! What must hold: the upstream reads exactly the requests malla accepted, each with the
//! method, target (origin form), `Host` and body malla read, with one canonical framing
//! field; the client gets one response per accepted request (each with a `Date`) and,
//! for a refused one, a 400/501 and a closed connection; and whatever h11 refuses as
//! ambiguous framing (conflicting or malformed `Content-Length`, a `Transfer-Encoding`
//! other than `chunked`, bad chunking) malla refuses too, forwarding no complete request
//! for it. `desync_corpus` also checks each published vector's expected outcome;
//! `differential_mutations` runs the same comparison on inputs mutated from the corpus.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use malla_proxy::{
    config::ListenerProtocol,
    http1::invariants::{mutate, origin_form, read_requests, show, ModelEnd, ModelRequest, Rng},
};
use malla_tests::{
    peers::{misbehaving::RawPeer, recording::RecordingPeer},
    proxy::TestProxy,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// How long a case waits for the proxy (a response, a close) or the upstream to settle.
const WAIT: Duration = Duration::from_secs(3);

/// Mutated inputs `differential_mutations` runs (`MALLA_SMUGGLING_MUTATIONS` changes it).
const MUTATIONS: usize = 2_000;

// ---------------------------------------------------------------------------------------
// h11, the reference

/// The reference parser: one Python process running `h11_reference.py`.
struct H11 {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
    calls: usize,
}

#[derive(Debug, Clone)]
struct H11Request {
    method: Vec<u8>,
    target: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
}

impl H11Request {
    fn header(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

#[derive(Debug, Clone)]
struct H11Reading {
    requests: Vec<H11Request>,
    /// `(kind, message)`: "protocol" (refused) or "eof" (ended inside a message).
    error: Option<(String, String)>,
    trailing: usize,
}

fn latin1(v: &Value) -> Vec<u8> {
    v.as_str()
        .unwrap_or_default()
        .chars()
        .map(|c| c as u32 as u8)
        .collect()
}

impl H11 {
    fn start() -> H11 {
        let python = std::env::var("MALLA_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/reference/h11_reference.py");
        let mut child = Command::new(&python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {python} (MALLA_PYTHON): {e}; the smuggling tests need Python 3 \
                     with h11 (scripts/test installs them)"
                )
            });
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut hello = String::new();
        let _ = stdout.read_line(&mut hello);
        assert!(
            hello.contains("\"ready\": true"),
            "{python} {script} did not start (h11 missing? see its message above): the \
             smuggling tests need h11: run scripts/test, or `apt-get install python3-h11` and \
             MALLA_PYTHON=/usr/bin/python3, or `python3 -m pip install h11`"
        );
        eprintln!("reference: {}", hello.trim());
        H11 {
            child,
            stdin,
            stdout,
            next_id: 0,
            calls: 0,
        }
    }

    /// h11's reading of `data` as everything a server receives on one connection.
    fn read(&mut self, data: &[u8]) -> H11Reading {
        self.next_id += 1;
        self.calls += 1;
        let line = serde_json::json!({"id": self.next_id, "role": "server", "data": base64(data)});
        writeln!(self.stdin, "{line}").expect("write to the h11 process");
        self.stdin.flush().expect("write to the h11 process");
        let mut reply = String::new();
        self.stdout
            .read_line(&mut reply)
            .expect("read from the h11 process");
        let v: Value = serde_json::from_str(&reply)
            .unwrap_or_else(|e| panic!("h11 process answered {reply:?}: {e}"));
        assert_eq!(v["id"], self.next_id, "h11 process out of step");
        let requests = v["requests"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|r| H11Request {
                method: latin1(&r["method"]),
                target: latin1(&r["target"]),
                headers: r["headers"]
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|h| (latin1(&h[0]), latin1(&h[1])))
                    .collect(),
                body: unbase64(r["body"].as_str().unwrap_or_default()),
            })
            .collect();
        let error = v["error"].as_object().map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        });
        H11Reading {
            requests,
            error,
            trailing: v["trailing"].as_u64().unwrap_or(0) as usize,
        }
    }
}

impl Drop for H11 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let Some(v) = B64.iter().position(|&b| b == c) else {
            continue;
        };
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// One case through the proxy

/// A response as the client read it.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
}

impl Response {
    fn header(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// What happened to one input.
#[derive(Debug)]
struct Run {
    responses: Vec<Response>,
    /// The proxy closed the connection (without the client half-closing first, after an
    /// error response).
    closed_after_error: Option<bool>,
    /// The bytes each upstream connection received.
    upstream: Vec<Vec<u8>>,
    settled: bool,
}

struct Bench {
    peer: RecordingPeer,
    proxy: TestProxy,
    h11: H11,
    cases: usize,
}

impl Bench {
    fn start() -> Bench {
        let peer = RecordingPeer::start();
        let proxy = TestProxy::builder()
            .upstream("up", &[peer.addr()])
            // No idle pool: an upstream connection closes with its client connection, so
            // "every upstream connection closed" marks the end of a case.
            .upstream_config(|u| {
                u.max_idle_per_endpoint = 0;
                u.response_timeout = WAIT;
            })
            .outbound_with("up", ListenerProtocol::Http)
            .start();
        Bench {
            peer,
            proxy,
            h11: H11::start(),
            cases: 0,
        }
    }

    /// Sends `input` on a new connection; reads responses until one per request of `model`
    /// came, or an error response (then waits for the proxy to close; `refusal`: one is
    /// expected), or the proxy goes quiet; then half-closes and reads to the end; then
    /// collects what the upstream received.
    async fn run(&mut self, input: &[u8], model: &[ModelRequest], refusal: bool) -> Run {
        self.cases += 1;
        let mut conn = TcpStream::connect(self.proxy.outbound())
            .await
            .expect("connect to the proxy");
        let _ = conn.set_nodelay(true);
        let _ = conn.write_all(input).await;
        let mut buf = Vec::new();
        let mut responses = Vec::new();
        let mut eof = false;
        let mut half_closed = false;
        let mut closed_after_error = None;
        loop {
            // Parse what is buffered.
            if let Some((len, response)) =
                parse_response(&buf, is_head(model, responses.len()), eof)
            {
                buf.drain(..len);
                if response.status >= 200 || response.status == 101 {
                    let error = !response.header("malla-error").is_empty();
                    responses.push(response);
                    if error && !half_closed {
                        // The proxy must close by itself after refusing a request.
                        let closed = read_to_end(&mut conn, &mut buf).await;
                        closed_after_error = Some(closed);
                        eof = true;
                    }
                }
                continue;
            }
            if eof {
                break;
            }
            // A refusal closes the connection by itself: the client must not half-close first.
            if !refusal && responses.len() >= model.len() && !half_closed {
                let _ = conn.shutdown().await;
                half_closed = true;
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout(WAIT, conn.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => eof = true,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Err(_) if !half_closed => {
                    let _ = conn.shutdown().await;
                    half_closed = true;
                }
                Err(_) => eof = true,
            }
        }
        drop(conn);
        let (logs, settled) = self.peer.settle(WAIT).await;
        Run {
            responses,
            closed_after_error,
            upstream: logs.into_iter().map(|l| l.bytes).collect(),
            settled,
        }
    }
}

fn is_head(model: &[ModelRequest], i: usize) -> bool {
    model.get(i).is_some_and(|r| r.method == b"HEAD")
}

/// Reads until EOF (`true`) or [`WAIT`] passes (`false`).
async fn read_to_end(conn: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.is_ok()
}

/// One response from the start of `buf` (`content-length` or close-delimited bodies).
fn parse_response(buf: &[u8], head_request: bool, eof: bool) -> Option<(usize, Response)> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let status = resp.code.unwrap_or(0);
    let fields: Vec<(String, Vec<u8>)> = resp
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let length = fields
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok());
    let body = if head_request || status < 200 || status == 204 || status == 304 {
        0
    } else if let Some(n) = length {
        n
    } else if eof {
        buf.len() - head
    } else {
        return None;
    };
    if buf.len() < head + body {
        return None;
    }
    Some((
        head + body,
        Response {
            status,
            headers: fields,
        },
    ))
}

// ---------------------------------------------------------------------------------------
// The comparison

/// Is h11's refusal about framing: where a message ends?
fn framing_error(message: &str) -> bool {
    ["Content-Length", "Transfer-Encoding", "chunk"]
        .iter()
        .any(|w| message.contains(w))
}

/// Field values of `name` in a raw request head.
fn raw_values(head: &[u8], name: &str) -> Vec<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let _ = req.parse(head);
    req.headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.to_vec())
        .collect()
}

/// h11 refuses framing that malla accepts *and rewrites canonically*, so that no hop
/// after malla can read it differently. Two such divergences are tolerated, each named:
/// `Content-Length` values that differ in spelling only (`010` and `10`: malla sends
/// `content-length: 10`), and a `Transfer-Encoding` list whose only non-empty element is
/// `chunked` (`chunked,`: malla sends `transfer-encoding: chunked`; RFC 9110 §5.6.1 says
/// empty list elements are to be ignored).
fn tolerated(message: &str, raw: &[u8]) -> Option<&'static str> {
    if message.contains("conflicting Content-Length") {
        let numbers: Vec<Option<u64>> = raw_values(raw, "content-length")
            .iter()
            .flat_map(|v| {
                v.split(|&b| b == b',')
                    .map(|p| p.trim_ascii().to_vec())
                    .collect::<Vec<_>>()
            })
            .map(|p| std::str::from_utf8(&p).ok()?.parse().ok())
            .collect();
        if numbers.iter().all(|n| n.is_some() && *n == numbers[0]) {
            return Some("Content-Length spelled differently, same value");
        }
    }
    if message.contains("Only Transfer-Encoding: chunked") {
        let te = raw_values(raw, "transfer-encoding");
        let codings: Vec<Vec<u8>> = te
            .iter()
            .flat_map(|v| {
                v.split(|&b| b == b',')
                    .map(|p| p.trim_ascii().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .filter(|c| !c.is_empty())
            .collect();
        if codings == [b"chunked".to_vec()] {
            return Some("empty elements in the Transfer-Encoding list");
        }
    }
    None
}

#[derive(Default)]
struct Tally {
    cases: usize,
    failures: Vec<String>,
    tolerated: std::collections::BTreeMap<&'static str, usize>,
    h11_stricter: usize,
    malla_stricter: usize,
}

impl Tally {
    fn fail(&mut self, name: &str, input: &[u8], what: String) {
        self.failures
            .push(format!("[{name}] {what}\n      input: {}", show(input)));
    }
}

/// Runs `input` and checks every differential property; returns the run for further
/// checks (the corpus's expected outcomes).
async fn compare(bench: &mut Bench, tally: &mut Tally, name: &str, input: &[u8]) -> Run {
    tally.cases += 1;
    let (model, end) = read_requests(input);
    let client_h11 = bench.h11.read(input);
    let run = bench
        .run(input, &model, matches!(end, ModelEnd::Rejected { .. }))
        .await;
    let mut fail = |what: String| tally.fail(name, input, what);

    if !run.settled {
        fail("an upstream connection stayed open after the client connection ended".into());
    }
    // What reached the upstream, read by h11.
    let mut upstream: Vec<H11Request> = Vec::new();
    let conns = run.upstream.len();
    for (i, bytes) in run.upstream.iter().enumerate() {
        let r = bench.h11.read(bytes);
        upstream.extend(r.requests.iter().cloned());
        if r.trailing > 0 {
            fail(format!(
                "{} bytes were sent upstream after a message that ends the connection: {}",
                r.trailing,
                show(bytes)
            ));
        }
        match &r.error {
            None => {}
            Some((kind, _))
                if kind == "eof"
                    && i + 1 == conns
                    && matches!(
                        end,
                        ModelEnd::Incomplete {
                            head_forwarded: true
                        } | ModelEnd::Rejected {
                            head_forwarded: true,
                            ..
                        }
                    ) => {}
            Some((kind, message)) => fail(format!(
                "h11 reads the upstream bytes with an error ({kind}: {message}): {}",
                show(bytes)
            )),
        }
    }
    if upstream.len() != model.len() {
        fail(format!(
            "malla read {} request(s) ({:?}), the upstream received {} ({:?}); malla ended with {end:?}",
            model.len(),
            model.iter().map(|m| String::from_utf8_lossy(&m.target).into_owned()).collect::<Vec<_>>(),
            upstream.len(),
            upstream.iter().map(|u| String::from_utf8_lossy(&u.target).into_owned()).collect::<Vec<_>>(),
        ));
    }
    for (i, (m, u)) in model.iter().zip(&upstream).enumerate() {
        if (&m.method, &m.target, &m.body) != (&u.method, &u.target, &u.body) {
            fail(format!(
                "request {i}: malla read {} {} with a body of {} bytes {}, the upstream got {} {} with {} bytes {}",
                show(&m.method), show(&m.target), m.body.len(), show(&m.body),
                show(&u.method), show(&u.target), u.body.len(), show(&u.body)
            ));
        }
        let hosts = u.header("host");
        if m.minor == 1 && hosts.len() != 1 {
            fail(format!("request {i}: {} Host fields upstream", hosts.len()));
        }
        if let (Some(h), Some(expected)) = (hosts.first(), &m.host) {
            if h != expected {
                fail(format!(
                    "request {i}: Host {} upstream, malla routed by {}",
                    show(h),
                    show(expected)
                ));
            }
        }
        let (cl, te) = (u.header("content-length"), u.header("transfer-encoding"));
        let canonical = cl.len() + te.len() <= 1
            && cl.iter().all(|v| {
                !v.is_empty() && v.iter().all(u8::is_ascii_digit) && (v.len() == 1 || v[0] != b'0')
            })
            && te.iter().all(|v| *v == b"chunked");
        if !canonical {
            fail(format!("request {i}: framing fields upstream are not canonical: content-length {cl:?}, transfer-encoding {te:?}"));
        }
    }

    // What the client saw.
    let rejected = matches!(end, ModelEnd::Rejected { .. });
    let expected = model.len() + usize::from(rejected);
    if run.responses.len() != expected {
        fail(format!(
            "{} response(s) ({:?}) for {} accepted request(s){}",
            run.responses.len(),
            run.responses.iter().map(|r| r.status).collect::<Vec<_>>(),
            model.len(),
            if rejected { " and a refusal" } else { "" }
        ));
    }
    for (i, r) in run.responses.iter().enumerate().take(model.len()) {
        if r.status != 200 || r.header("x-recorded").is_empty() {
            fail(format!(
                "response {i} is {} {:?}, not the upstream's 200",
                r.status,
                r.header("malla-error")
            ));
        }
        if r.header("date").len() != 1 {
            fail(format!(
                "response {i} has {} Date fields (the upstream sent none)",
                r.header("date").len()
            ));
        }
    }
    if let ModelEnd::Rejected { status, reason, .. } = &end {
        match run.responses.get(model.len()) {
            Some(r) if r.status == *status && run.closed_after_error != Some(true) => fail(
                format!("the connection stayed open after {status} ({reason})"),
            ),
            Some(r) if r.status == *status => {}
            Some(r) => fail(format!(
                "refused with {}, malla's parser says {status} ({reason})",
                r.status
            )),
            None => {}
        }
    }

    // h11's reading of the client bytes.
    let k = client_h11.requests.len();
    for (i, (m, h)) in model.iter().zip(&client_h11.requests).enumerate() {
        let target = origin_form(&h.target).0;
        if (&m.method, &m.target, &m.body) != (&h.method, &target, &h.body) {
            fail(format!(
                "request {i}: malla reads {} {} + {} body bytes, h11 reads {} {} + {} body bytes",
                show(&m.method),
                show(&m.target),
                m.body.len(),
                show(&h.method),
                show(&h.target),
                h.body.len()
            ));
        }
    }
    match &client_h11.error {
        Some((kind, message)) if kind == "protocol" && model.len() > k => {
            let raw = &input[model[k].span.0..model[k].span.1];
            if !framing_error(message) {
                tally.h11_stricter += 1;
            } else if let Some(why) = tolerated(message, raw) {
                *tally.tolerated.entry(why).or_default() += 1;
            } else {
                tally.fail(
                    name,
                    input,
                    format!("h11 refuses request {k} as ambiguous framing ({message}) but malla accepted and forwarded it"),
                );
            }
        }
        _ if model.len() < k => tally.malla_stricter += 1,
        _ => {}
    }
    run
}

// ---------------------------------------------------------------------------------------
// The corpus

/// A request the upstream must receive: method, target, `Host`, body.
#[derive(Debug)]
struct Up(&'static str, &'static str, &'static str, &'static [u8]);

/// One published vector and what must happen to it.
struct Vector {
    name: &'static str,
    bytes: &'static [u8],
    /// The requests that reach the upstream, in order.
    forwarded: &'static [Up],
    /// `Some(statuses)`: after those, the next request is refused with one of these
    /// statuses and the connection closed.
    refused: Option<&'static [u16]>,
}

const R400: Option<&[u16]> = Some(&[400]);
const R400_501: Option<&[u16]> = Some(&[400, 501]);

const fn refused(name: &'static str, bytes: &'static [u8]) -> Vector {
    Vector {
        name,
        bytes,
        forwarded: &[],
        refused: R400,
    }
}

const fn refused_any(name: &'static str, bytes: &'static [u8]) -> Vector {
    Vector {
        name,
        bytes,
        forwarded: &[],
        refused: R400_501,
    }
}

const fn forwarded(name: &'static str, bytes: &'static [u8], up: &'static [Up]) -> Vector {
    Vector {
        name,
        bytes,
        forwarded: up,
        refused: None,
    }
}

/// James Kettle's "HTTP Desync Attacks: Request Smuggling Reborn" (PortSwigger, 2019), the
/// HTTP Garden's documented server and transducer findings (narfindustries/http-garden,
/// TROPHIES.md: `garden-sN` / `garden-tN` name the entry), and the RFC 9112 rules malla
/// enforces. Bodies that would smuggle carry `GET /smuggled`.
const CORPUS: &[Vector] = &[
    // CL.TE and TE.CL (Kettle).
    refused("kettle-cl-te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG"),
    refused("kettle-te-cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"),
    refused("kettle-te-then-cl", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGET /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n"),
    refused("garden-t23-cl-and-te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    // TE.TE obfuscations (Kettle), each beside a Content-Length as in the attack.
    refused_any("kettle-te-xchunked", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    refused_any("te-xchunked-alone", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("kettle-te-space-before-colon", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
    refused("kettle-te-tab-value-with-cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n"),
    refused("kettle-te-leading-space-line", b"POST / HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: a\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"),
    refused("kettle-te-after-bare-lf", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nX: X\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    refused("kettle-te-name-lf-colon", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding\n: chunked\r\n\r\n0\r\n\r\n"),
    refused("kettle-te-name-vtab", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding\x0b: chunked\r\n\r\n0\r\n\r\n"),
    refused("te-value-vtab", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n"),
    refused("te-value-formfeed", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0cchunked\r\n\r\n0\r\n\r\n"),
    refused_any("kettle-te-chunked-then-cow", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-encoding: cow\r\n\r\n0\r\n\r\n"),
    refused("garden-s11-te-twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nZ\r\n0\r\n\r\n"),
    refused("te-chunked-chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
    refused("te-chunked-identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    refused_any("te-identity-chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n"),
    refused_any("te-gzip-chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    refused_any("te-chunked-gzip-chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip, chunked\r\n\r\n0\r\n\r\n"),
    refused_any("te-two-lines-gzip-chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    refused_any("garden-s44-te-unknown", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: blegh\r\n\r\n1\r\nZ\r\n0\r\n\r\n"),
    refused("te-quoted", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n"),
    refused("te-parameter", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n"),
    refused("te-empty", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\nContent-Length: 5\r\n\r\nhello"),
    refused("garden-s12-te-nbsp", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \xa0chunked\xa0\r\n\r\n0\r\n\r\n"),
    refused("garden-s46-te-high-bytes", b"POST / HTTP/1.1\r\nHost: \xffa\xff\r\nTransfer-Encoding: \xffchunked\xff\r\n\r\n1\r\nZ\r\n0\r\n\r\n"),
    refused("garden-t9-comma-chunked-with-cl", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    refused("garden-s37-te-name-split", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-\r\nEncoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    refused("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    forwarded("te-case-insensitive", b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ChUnKeD\r\n\r\n5\r\nhello\r\n0\r\n\r\n", &[Up("POST", "/c", "a", b"hello")]),
    forwarded("te-tab-ows-alone", b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n", &[Up("POST", "/c", "a", b"hello")]),
    forwarded("garden-t9-comma-chunked-alone", b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", &[Up("POST", "/c", "a", b"hello")]),
    // Content-Length.
    refused("cl-plus", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello"),
    refused("garden-t1-cl-hex", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\nZ"),
    refused("garden-s26-cl-negative", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -48\r\n\r\n"),
    refused("garden-s10-cl-underscore", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1_0\r\n\r\n0123456789"),
    refused("garden-s29-cl-suffix", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1Z\r\n\r\nZ"),
    refused("cl-inner-space", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 0\r\n\r\n0123456789"),
    refused("cl-overflow", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n"),
    refused("garden-s16-cl-empty", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n"),
    refused("garden-t11-cl-empty-then-value", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\nContent-Length: 59\r\n\r\nPOST /evil HTTP/1.1\r\nHost: a\r\nContent-Length: 34\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("cl-5-6", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\nhello!"),
    refused("garden-t22-cl-twice", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 37\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("garden-s23-cl-1-then-0", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 0\r\n\r\nZ"),
    refused("garden-s3-cl-space-before-colon", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 37\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("garden-s4-cl-leading-tab-line", b"GET / HTTP/1.1\r\n\tContent-Length: 1\r\nHost: a\r\n\r\nX"),
    refused("garden-s20-cl-name-high-byte", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length\x85: 10\r\n\r\n0123456789"),
    refused("garden-s28-cl-no-colon", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length 10\r\n\r\n0123456789"),
    forwarded("cl-5-5", b"POST /d HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", &[Up("POST", "/d", "a", b"hello")]),
    forwarded("cl-5-5-two-lines", b"POST /d HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", &[Up("POST", "/d", "a", b"hello")]),
    forwarded("cl-leading-spaces", b"POST /d HTTP/1.1\r\nHost: a\r\nContent-Length:    5\r\n\r\nhello", &[Up("POST", "/d", "a", b"hello")]),
    forwarded("garden-s32-cl-leading-zero", b"POST /d HTTP/1.1\r\nHost: a\r\nContent-Length: 010\r\n\r\n0123456789", &[Up("POST", "/d", "a", b"0123456789")]),
    forwarded("garden-t21-get-with-body", b"GET /g HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n1234567890", &[Up("GET", "/g", "a", b"1234567890")]),
    // Connection naming the framing fields or Host.
    forwarded("connection-content-length", b"POST /e HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello", &[Up("POST", "/e", "a", b"hello")]),
    forwarded("connection-content-length-hides-request", b"POST /e HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", &[Up("POST", "/e", "a", b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")]),
    forwarded("connection-close-content-length", b"POST /e HTTP/1.1\r\nHost: a\r\nConnection: close, Content-Length\r\nContent-Length: 5\r\n\r\nhello", &[Up("POST", "/e", "a", b"hello")]),
    forwarded("connection-transfer-encoding", b"POST /e HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n23\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n\r\n0\r\n\r\n", &[Up("POST", "/e", "a", b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")]),
    forwarded("connection-host", b"GET /e HTTP/1.1\r\nHost: a\r\nConnection: host, keep-alive\r\n\r\n", &[Up("GET", "/e", "a", b"")]),
    // Chunked framing.
    refused("garden-s22-chunk-size-0x", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
    refused("garden-s1-chunk-size-underscore", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0_2e\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    refused("garden-t7-chunk-size-junk", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n"),
    refused("chunk-size-space-junk", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 x\r\nhello\r\n0\r\n\r\n"),
    refused("garden-t19-chunk-size-signed-hex", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-0x0\r\n\r\n"),
    refused("chunk-size-plus", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n"),
    refused("chunk-size-negative", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nhello\r\n0\r\n\r\n"),
    refused("chunk-size-oversized", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1FFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"),
    refused("garden-t24-chunk-size-leading-space", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n           0\r\n\r\n"),
    refused("garden-s17-chunk-size-empty", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\r\n\r\n"),
    refused("garden-t2-chunk-size-letters", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\nZZ\r\nZZZ\r\n\r\n"),
    refused("garden-s47-chunk-invalid", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nINVALID!!!\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("garden-s31-chunk-line-bare-cr", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    refused("garden-t3-chunk-ext-bare-cr", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\r;a\r\n02\r\n41\r\n0\r\n\r\n"),
    refused("garden-s36-chunk-ext-cr", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n41;a=b\r\rXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\r\n0\r\n\r\n"),
    refused("chunk-ext-bare-lf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\nhello\r\n0\r\n\r\n"),
    refused("chunk-size-bare-lf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
    refused("garden-t13-chunk-data-bare-lf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\n0\r\n\r\n"),
    refused("garden-t4-chunk-cr-lf-split", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r0\n"),
    refused("chunk-data-too-long", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n"),
    refused("garden-t17-extra-crlf-before-last", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n17\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\n\r\n0\r\n\r\n"),
    refused("chunk-ext-not-token", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a/b\r\nhello\r\n0\r\n\r\n"),
    refused("trailer-without-colon", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nGET /smuggled HTTP/1.1\r\n\r\n"),
    refused("trailer-nul", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\x00b\r\n\r\n"),
    refused("trailer-bare-lf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\n\r\n"),
    forwarded("chunk-ext-quoted", b"POST /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\"b c\";d\r\nhello\r\n0\r\n\r\n", &[Up("POST", "/f", "a", b"hello")]),
    forwarded("chunk-size-trailing-space", b"POST /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", &[Up("POST", "/f", "a", b"hello")]),
    forwarded("chunk-size-leading-zeros-last", b"POST /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n005\r\nhello\r\n000\r\n\r\n", &[Up("POST", "/f", "a", b"hello")]),
    forwarded("garden-s39-trailer-field", b"POST /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX:POST / HTTP/1.1\r\n\r\n", &[Up("POST", "/f", "a", b"")]),
    forwarded("chunked-hides-request", b"POST /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n23\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n\r\n0\r\n\r\n", &[Up("POST", "/f", "a", b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")]),
    // Line endings and field syntax.
    forwarded("bare-lf-head", b"GET /g HTTP/1.1\nHost: a\n\n", &[Up("GET", "/g", "a", b"")]),
    refused("garden-s13-bare-cr-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nVisible: :/\rSmuggled: :)\r\n\r\n"),
    refused("garden-t10-bare-cr-value", b"GET / HTTP/1.1\r\nHost: a\r\nInvalid-Header: this\rvalue\ris\rinvalid\r\n\r\n"),
    refused("garden-s2-nul-cr-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nHeader: v\x00\ralue\r\n\r\n"),
    refused("garden-t12-nul-in-host", b"GET / HTTP/1.1\r\nHost: google.com\x00.kallus.org\r\n\r\n"),
    refused("garden-s35-nul-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nTest: test\x00THESE BYTES GET DROPPED\r\n\r\n"),
    refused("garden-t20-nul-line", b"GET / HTTP/1.1\r\nHost: a\r\na:b\r\nc\x00\r\n\r\n"),
    refused("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"),
    refused("obs-fold-te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
    refused("garden-s30-cr-after-head", b"GET / HTTP/1.1\r\nHost: a\r\n\rZGET /evil: HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("garden-s18-empty-name", b"GET / HTTP/1.1\r\n: ignored\r\nHost: a\r\n\r\n"),
    refused("garden-s27-colon-line", b"GET / HTTP/1.1\r\n:\r\nI: am chopped off\r\nHost: a\r\n\r\n"),
    refused("garden-t14-name-bare-lf", b"GET / HTTP/1.1\r\nHost: a\r\nTe\nst: test\r\n\r\n"),
    refused("garden-s8-high-byte-name", b"GET / HTTP/1.1\r\nHost: a\r\n\xefoo: bar\r\n\r\n"),
    refused("garden-s9-lf-in-request-line", b"GET /\nHTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("garden-s5-version-suffix", b"GET /test HTTP/1.32\r\nHost: a\r\n\r\n"),
    refused("garden-s15-version-cr", b"GET / HTTP/\r\r1.1\r\nHost: a\r\n\r\n"),
    refused("garden-s6-method-junk", b"G=\":<>(e),[T];?\" /get HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("garden-s7-target-junk", b"GET ! HTTP/1.1\r\nHost: a\r\n\r\n"),
    // Host and the request target.
    forwarded("absolute-form-other-host", b"GET http://other/x HTTP/1.1\r\nHost: ignored\r\n\r\n", &[Up("GET", "/x", "other", b"")]),
    forwarded("absolute-form-port-query", b"GET http://other:8080/x?y=1 HTTP/1.1\r\nHost: ignored\r\n\r\n", &[Up("GET", "/x?y=1", "other:8080", b"")]),
    forwarded("absolute-form-no-path", b"GET http://other HTTP/1.1\r\nHost: other\r\n\r\n", &[Up("GET", "/", "other", b"")]),
    refused("absolute-form-userinfo", b"GET http://u@other/ HTTP/1.1\r\nHost: other\r\n\r\n"),
    refused("host-twice", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    refused(
        "http10-host-twice",
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: evil\r\n\r\n",
    ),
    refused("host-missing", b"GET / HTTP/1.1\r\n\r\n"),
    refused("host-with-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
    forwarded("http10-without-host", b"GET /h HTTP/1.0\r\n\r\n", &[Up("GET", "/h", "", b"")]),
    // Expect: 100-continue.
    forwarded("expect-with-body", b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello", &[Up("POST", "/x", "a", b"hello")]),
    forwarded("expect-chunked", b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", &[Up("POST", "/x", "a", b"hello")]),
    forwarded("expect-get-no-body", b"GET /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\n\r\n", &[Up("GET", "/x", "a", b""), Up("GET", "/y", "a", b"")]),
    refused("expect-cl-te", b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    // Pipelines.
    forwarded("pipeline-two-gets", b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n", &[Up("GET", "/1", "a", b""), Up("GET", "/2", "a", b"")]),
    forwarded("pipeline-head-then-get", b"HEAD /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n", &[Up("HEAD", "/1", "a", b""), Up("GET", "/2", "a", b"")]),
    forwarded("garden-s48-cl0-then-body", b"POST /1 HTTP/1.1\r\nContent-Length: 0\r\nConnection:keep-alive\r\nHost: a\r\nid: 0\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nid: 1\r\nContent-Length: 34\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nid: 2\r\n\r\n", &[Up("POST", "/1", "a", b""), Up("POST", "/2", "a", b"GET / HTTP/1.1\r\nHost: a\r\nid: 2\r\n\r\n")]),
    forwarded("garden-s45-close-then-invalid", b"GET /1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nInvalid\r\n\r\n", &[Up("GET", "/1", "a", b"")]),
    forwarded("pipeline-http10-closes", b"GET /1 HTTP/1.0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", &[Up("GET", "/1", "", b"")]),
    forwarded("pipeline-chunked-then-get", b"POST /1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n", &[Up("POST", "/1", "a", b"abc"), Up("GET", "/2", "a", b"")]),
    Vector {
        name: "pipeline-valid-then-cl-te",
        bytes: b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        forwarded: &[Up("GET", "/1", "a", b"")],
        refused: R400,
    },
    Vector {
        name: "pipeline-valid-then-bad-chunk",
        bytes: b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        forwarded: &[Up("GET", "/1", "a", b"")],
        refused: R400,
    },
];

fn print_tally(what: &str, tally: &Tally, h11_calls: usize, elapsed: Duration) {
    eprintln!(
        "{what}: {} cases ({} h11 readings) in {elapsed:.1?}; {} failure(s); tolerated divergences {:?}; \
         h11 stricter (not about framing) {}, malla stricter {}",
        tally.cases,
        h11_calls,
        tally.failures.len(),
        tally.tolerated,
        tally.h11_stricter,
        tally.malla_stricter
    );
}

fn assert_no_failures(tally: &Tally) {
    assert!(
        tally.failures.is_empty(),
        "{} failure(s):\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
}

/// Each published vector gets its expected outcome, and the differential checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_corpus() {
    let mut bench = Bench::start();
    let mut tally = Tally::default();
    let started = tokio::time::Instant::now();
    let mut names = std::collections::HashSet::new();
    for v in CORPUS {
        assert!(names.insert(v.name), "two vectors named {}", v.name);
        let run = compare(&mut bench, &mut tally, v.name, v.bytes).await;
        // The expected outcome, read from the upstream by h11.
        let upstream: Vec<H11Request> = run
            .upstream
            .iter()
            .flat_map(|bytes| bench.h11.read(bytes).requests)
            .collect();
        let got: Vec<String> = upstream
            .iter()
            .map(|u| {
                format!(
                    "{} {} host={} body={}",
                    String::from_utf8_lossy(&u.method),
                    String::from_utf8_lossy(&u.target),
                    u.header("host")
                        .first()
                        .map(|h| String::from_utf8_lossy(h).into_owned())
                        .unwrap_or_default(),
                    show(&u.body)
                )
            })
            .collect();
        let want: Vec<String> = v
            .forwarded
            .iter()
            .map(|Up(m, t, h, b)| format!("{m} {t} host={h} body={}", show(b)))
            .collect();
        if got != want {
            tally.fail(
                v.name,
                v.bytes,
                format!("the upstream received {got:?}, expected {want:?}"),
            );
        }
        let statuses: Vec<u16> = run.responses.iter().map(|r| r.status).collect();
        match v.refused {
            Some(allowed) => {
                let last = statuses.get(v.forwarded.len()).copied();
                if statuses.len() != v.forwarded.len() + 1
                    || !last.is_some_and(|s| allowed.contains(&s))
                {
                    tally.fail(
                        v.name,
                        v.bytes,
                        format!(
                            "responses {statuses:?}: expected {} × 200 then one of {allowed:?}",
                            v.forwarded.len()
                        ),
                    );
                } else if run.closed_after_error != Some(true) {
                    tally.fail(
                        v.name,
                        v.bytes,
                        "the connection stayed open after the refusal".into(),
                    );
                }
            }
            None => {
                if statuses != vec![200; v.forwarded.len()] {
                    tally.fail(
                        v.name,
                        v.bytes,
                        format!(
                            "responses {statuses:?}: expected {} × 200",
                            v.forwarded.len()
                        ),
                    );
                }
            }
        }
    }
    print_tally("desync corpus", &tally, bench.h11.calls, started.elapsed());
    assert_no_failures(&tally);
}

/// Inputs mutated from the corpus (fixed seed), each through the differential checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_mutations() {
    let mutations = std::env::var("MALLA_SMUGGLING_MUTATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(MUTATIONS);
    let mut bench = Bench::start();
    let mut tally = Tally::default();
    let mut rng = Rng::new(0x0073_6d75_6767_6c65);
    let started = tokio::time::Instant::now();
    for i in 0..mutations {
        let seed = &CORPUS[rng.below(CORPUS.len())];
        let mut input = mutate(&mut rng, seed.bytes);
        if rng.below(3) == 0 {
            input = mutate(&mut rng, &input);
        }
        compare(
            &mut bench,
            &mut tally,
            &format!("mutation {i} of {}", seed.name),
            &input,
        )
        .await;
    }
    print_tally(
        "differential mutations",
        &tally,
        bench.h11.calls,
        started.elapsed(),
    );
    assert_no_failures(&tally);
}

/// Responses whose framing is ambiguous are the upstream's protocol error: 502 to the
/// client, nothing of them relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_responses_get_502() {
    const AMBIGUOUS: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\nab",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: a\r\n b\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nab",
    ];
    let first = RawPeer::canned(AMBIGUOUS[0]);
    let proxy = TestProxy::builder()
        .upstream("up", &[first.addr()])
        .upstream_config(|u| u.max_idle_per_endpoint = 0)
        .outbound_with("up", ListenerProtocol::Http)
        .start();
    let mut failures = Vec::new();
    for response in AMBIGUOUS {
        let peer = RawPeer::canned(response);
        proxy.set_endpoints("up", &[peer.addr()]);
        let mut conn = TcpStream::connect(proxy.outbound()).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = read_until_response(&mut conn, &mut buf).await;
        match parse_response(&buf, false, true) {
            Some((_, r))
                if r.status == 502 && r.header("malla-error") == [b"upstream-protocol-error"] => {}
            Some((_, r)) => failures.push(format!(
                "{} -> {} {:?}",
                show(response),
                r.status,
                r.header("malla-error")
            )),
            None => failures.push(format!("{} -> no response: {}", show(response), show(&buf))),
        }
        // (An idempotent request may be retried after a protocol error: at least once.)
        if peer.requests() == 0 {
            failures.push(format!("{}: the upstream saw no request", show(response)));
        }
    }
    eprintln!(
        "ambiguous responses: {} cases, {} failure(s)",
        AMBIGUOUS.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Reads until a complete response head and its `content-length` body are in `buf`, or
/// the connection closes, or [`WAIT`] passes.
async fn read_until_response(conn: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let read = async {
        let mut chunk = [0u8; 4096];
        while parse_response(buf, false, false).is_none() {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.is_ok()
}
