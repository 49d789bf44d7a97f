//! Hostile and broken HTTP/1 input, from clients (raw bytes to an HTTP listener) and from
//! upstreams (servers that truncate, hang up or send garbage). Each case gets a clear
//! answer or a closed connection, never a hang, and the proxy keeps serving afterwards.

use malla_proxy::config::ListenerProtocol;
use malla_tests::{
    client::{
        self,
        raw::{exchange, RawConn},
        within, Http1,
    },
    peers::{misbehaving::RawPeer, HttpPeer},
    proxy::TestProxy,
};

/// A head limit small enough to exceed cheaply.
const MAX_HEAD: usize = 4096;

/// A proxy whose outbound listener (HTTP only) sends to an HTTP/1 echo peer.
fn setup() -> (HttpPeer, TestProxy) {
    let peer = HttpPeer::http1("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound_with("echo", ListenerProtocol::Http)
        .limits(|l| l.max_head_bytes = MAX_HEAD)
        .start();
    (peer, proxy)
}

/// A well-formed request on a new connection is answered by the upstream.
async fn still_serves(proxy: &TestProxy) {
    let (_, r) = exchange(
        proxy.outbound(),
        b"GET /still-there HTTP/1.1\r\nHost: echo\r\n\r\n",
    )
    .await;
    let r = r.expect("the proxy stopped answering");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-echo-path"), Some("/still-there"));
}

/// At most 160 characters of `text`, for failure messages.
fn short(text: &str) -> String {
    if text.len() <= 160 {
        return format!("{text:?}");
    }
    let cut: String = text.chars().take(160).collect();
    format!("{cut:?}... ({} bytes)", text.len())
}

/// `bytes` gets `status` with `cause`, then the connection is closed.
async fn rejected(proxy: &TestProxy, bytes: &[u8], status: u16, cause: &str) {
    let what = short(&String::from_utf8_lossy(bytes));
    let (mut conn, r) = exchange(proxy.outbound(), bytes).await;
    let r = r.unwrap_or_else(|| panic!("closed without a response to {what}"));
    let got = format!("status {}, malla-error {:?}", r.status, r.cause());
    assert_eq!(r.status, status, "{what} -> {got}");
    assert_eq!(r.cause(), Some(cause), "{what} -> {got}");
    assert!(
        conn.closed().await,
        "the connection stayed open after rejecting {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_lines_get_400() {
    let (peer, proxy) = setup();
    let cases: [&[u8]; 5] = [
        b"GET / HTTP/1.1 trailing-junk\r\nHost: echo\r\n\r\n",
        b"GET /a\x01b HTTP/1.1\r\nHost: echo\r\n\r\n",
        b"GET / HTTX/1.1\r\nHost: echo\r\n\r\n",
        b"GET\r\nHost: echo\r\n\r\n",
        b"\x00\x01\x02 binary garbage\r\n\r\n",
    ];
    for case in cases {
        rejected(&proxy, case, 400, "bad-request").await;
    }
    assert_eq!(
        peer.requests(),
        0,
        "a malformed request reached the upstream: {:?}",
        peer.seen()
    );
    still_serves(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_header_fields_get_400() {
    let (peer, proxy) = setup();
    let cases: [&[u8]; 6] = [
        // Invalid field names.
        b"GET / HTTP/1.1\r\nHost: echo\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: echo\r\nX(A): x\r\n\r\n",
        // Whitespace between name and colon (RFC 9112 §5.1: MUST reject).
        b"GET / HTTP/1.1\r\nHost: echo\r\nX-A : x\r\n\r\n",
        // Obsolete line folding (RFC 9112 §5.2).
        b"GET / HTTP/1.1\r\nHost: echo\r\nX-A: one\r\n two\r\n\r\n",
        // A bare CR and a NUL inside a value.
        b"GET / HTTP/1.1\r\nHost: echo\r\nX-A: one\rtwo\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: echo\r\nX-A: one\x00two\r\n\r\n",
    ];
    for case in cases {
        rejected(&proxy, case, 400, "bad-request").await;
    }
    assert_eq!(
        peer.requests(),
        0,
        "an invalid request reached the upstream: {:?}",
        peer.seen()
    );
    still_serves(&proxy).await;
}

/// A bare LF inside the head: RFC 9112 §2.2 lets a recipient take a lone LF as a line end,
/// so the proxy may reject it (400) or accept it, but if it forwards the request the
/// upstream must get well-formed, separate fields, never a value with an LF inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_is_rejected_or_normalised() {
    let (_peer, proxy) = setup();
    let (_, r) = exchange(
        proxy.outbound(),
        b"GET /lf HTTP/1.1\r\nHost: echo\r\nX-A: one\nX-B: two\r\n\r\n",
    )
    .await;
    let r = r.expect("closed without a response");
    match r.status {
        400 => assert_eq!(r.cause(), Some("bad-request"), "{r:?}"),
        200 => {
            assert_eq!(r.header("x-echo-h-x-a"), Some("one"), "{r:?}");
            assert_eq!(r.header("x-echo-h-x-b"), Some("two"), "{r:?}");
        }
        other => panic!("unexpected status {other}: {r:?}"),
    }
    still_serves(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_gets_431() {
    let (peer, proxy) = setup();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: echo\r\nX-Big: {}\r\n\r\n",
        "b".repeat(2 * MAX_HEAD)
    );
    rejected(&proxy, big.as_bytes(), 431, "request-header-too-large").await;
    // Fewer fields than `max_headers`, adding up past the byte limit.
    let mut many = String::from("GET / HTTP/1.1\r\nHost: echo\r\n");
    for i in 0..60 {
        many.push_str(&format!("X-F{i}: {}\r\n", "v".repeat(100)));
    }
    many.push_str("\r\n");
    rejected(&proxy, many.as_bytes(), 431, "request-header-too-large").await;
    assert_eq!(peer.requests(), 0);
    still_serves(&proxy).await;
}

/// Request smuggling (RFC 9112 §6.3, §11.2): a request whose length is ambiguous is
/// rejected with 400 and the connection is closed, so the bytes after it (a second,
/// smuggled request) are never read as a request, by the proxy or by the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_length_is_rejected_and_nothing_is_smuggled() {
    let (peer, proxy) = setup();
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: echo\r\n\r\n";
    let cases = [
        // Content-Length and Transfer-Encoding together.
        format!(
            "POST /a HTTP/1.1\r\nHost: echo\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        format!(
            "POST /a HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        // Two different Content-Length values, as two fields and as a list.
        format!("POST /a HTTP/1.1\r\nHost: echo\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()),
        format!("POST /a HTTP/1.1\r\nHost: echo\r\nContent-Length: 0, {}\r\n\r\n{smuggled}", smuggled.len()),
        // Invalid Content-Length values.
        format!("POST /a HTTP/1.1\r\nHost: echo\r\nContent-Length: +0\r\n\r\n{smuggled}"),
        format!("POST /a HTTP/1.1\r\nHost: echo\r\nContent-Length: 0x10\r\n\r\n{smuggled}"),
        // A transfer coding other than chunked last (RFC 9112 §6.3 item 4).
        format!("POST /a HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n{smuggled}"),
        format!("POST /a HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"),
    ];
    for case in &cases {
        rejected(&proxy, case.as_bytes(), 400, "bad-request").await;
    }
    // Whatever reached the upstream did so before this normal request's answer.
    still_serves(&proxy).await;
    let seen = peer.seen();
    assert!(
        !seen.iter().any(|s| s.contains("/smuggled")),
        "a smuggled request reached the upstream: {seen:?}"
    );
    assert_eq!(seen, ["GET /still-there"], "requests the upstream saw");
}

/// A chunked body with an invalid chunk size: 400, or the connection closed; never a
/// success and never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_chunk_size_is_refused() {
    let (peer, proxy) = setup();
    for body in [
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        b"5\r\nhelloXX0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
    ] {
        let mut bytes =
            b"POST /count HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        bytes.extend_from_slice(body);
        let (mut conn, r) = exchange(proxy.outbound(), &bytes).await;
        if let Some(r) = &r {
            assert_eq!(
                r.status,
                400,
                "{:?} -> {r:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(
            conn.closed().await,
            "the connection stayed open after a bad chunk"
        );
    }
    // The upstream may have seen request heads, but no complete request was answered.
    let _ = peer;
    still_serves(&proxy).await;
}

/// An upstream that closes in the middle of a response: the client sees a truncated
/// response (the connection closes before the announced length), or a 502 if the proxy
/// had not started the response yet; never a complete response, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_mid_response_truncates() {
    let bad = RawPeer::truncating();
    let good = HttpPeer::http1("good");
    let proxy = TestProxy::builder()
        .upstream("echo", &[bad.addr()])
        .outbound("echo")
        .start();
    let mut conn = RawConn::connect(proxy.outbound()).await;
    conn.send(b"GET /truncated HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    match conn.response().await {
        None => {}
        Some(r) if r.status == 200 => {
            assert!(!r.complete, "a truncated response arrived complete: {r:?}");
            assert_eq!(r.body, b"0123456789", "{r:?}");
        }
        Some(r) => assert_eq!(r.status, 502, "{r:?}"),
    }
    assert!(conn.closed().await, "the client connection stayed open");
    // Through hyper: the body ends with an error instead of a short success.
    let mut client = Http1::connect(proxy.outbound()).await.unwrap();
    let response = within(
        "request",
        client.send(client::get(http::Version::HTTP_11, "echo", "/t")),
    )
    .await
    .unwrap();
    if response.status() == 200 {
        assert!(within("body", client::collect(response)).await.is_err());
    }
    proxy.set_endpoints("echo", &[good.addr()]);
    still_serves_http1(&proxy).await;
}

async fn still_serves_http1(proxy: &TestProxy) {
    let mut client = Http1::connect(proxy.outbound()).await.unwrap();
    let response = within(
        "request",
        client.send(client::get(http::Version::HTTP_11, "echo", "/ok")),
    )
    .await
    .unwrap();
    let got = client::collect(response).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-peer"), Some("good"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_after_the_request_gets_502_upstream_reset() {
    let bad = RawPeer::close_after_request();
    let good = HttpPeer::http1("good");
    let proxy = TestProxy::builder()
        .upstream("echo", &[bad.addr()])
        .outbound("echo")
        .start();
    let (_, r) = exchange(
        proxy.outbound(),
        b"GET /reset HTTP/1.1\r\nHost: echo\r\n\r\n",
    )
    .await;
    let r = r.expect("closed without a response");
    assert_eq!(
        (r.status, r.cause()),
        (502, Some("upstream-reset")),
        "{r:?}"
    );
    assert!(bad.requests() >= 1);
    proxy.set_endpoints("echo", &[good.addr()]);
    still_serves_http1(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_response_gets_502_protocol_error() {
    let bad = RawPeer::malformed();
    let good = HttpPeer::http1("good");
    let proxy = TestProxy::builder()
        .upstream("echo", &[bad.addr()])
        .outbound("echo")
        .start();
    let (_, r) = exchange(
        proxy.outbound(),
        b"GET /garbage HTTP/1.1\r\nHost: echo\r\n\r\n",
    )
    .await;
    let r = r.expect("closed without a response");
    assert_eq!(
        (r.status, r.cause()),
        (502, Some("upstream-protocol-error")),
        "{r:?}"
    );
    proxy.set_endpoints("echo", &[good.addr()]);
    still_serves_http1(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_answers_gets_504_response_timeout() {
    let silent = RawPeer::silent();
    let good = HttpPeer::http1("good");
    let proxy = TestProxy::builder()
        .upstream("echo", &[silent.addr()])
        .response_timeout(std::time::Duration::from_millis(300))
        .outbound("echo")
        .start();
    let (_, r) = exchange(
        proxy.outbound(),
        b"GET /stall HTTP/1.1\r\nHost: echo\r\n\r\n",
    )
    .await;
    let r = r.expect("closed without a response");
    assert_eq!(
        (r.status, r.cause()),
        (504, Some("response-timeout")),
        "{r:?}"
    );
    proxy.set_endpoints("echo", &[good.addr()]);
    still_serves_http1(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_just_under_the_limit_passes() {
    let (peer, proxy) = setup();
    let request = format!(
        "GET /fits HTTP/1.1\r\nHost: echo\r\nX-Big: {}\r\n\r\n",
        "b".repeat(MAX_HEAD - 200)
    );
    let (_, r) = exchange(proxy.outbound(), request.as_bytes()).await;
    assert_eq!(r.expect("a response").status, 200);
    assert_eq!(peer.requests(), 1);
}

/// A client that starts a head and never finishes it: 408 `request-timeout`, then close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_head_gets_408() {
    let peer = HttpPeer::http1("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .limits(|l| l.head_timeout = std::time::Duration::from_millis(300))
        .start();
    let (mut conn, r) = exchange(proxy.outbound(), b"GET /slow HTTP/1.1\r\nHost: echo\r\n").await;
    let r = r.expect("closed without a response");
    assert_eq!(
        (r.status, r.cause()),
        (408, Some("request-timeout")),
        "{r:?}"
    );
    assert!(conn.closed().await);
    assert_eq!(peer.requests(), 0);
    still_serves(&proxy).await;
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or with more than one, gets 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_repeated_host_gets_400() {
    let (peer, proxy) = setup();
    let cases: [&[u8]; 2] = [
        b"GET /no-host HTTP/1.1\r\nX-A: a\r\n\r\n",
        b"GET /two-hosts HTTP/1.1\r\nHost: echo\r\nHost: other\r\n\r\n",
    ];
    for case in cases {
        rejected(&proxy, case, 400, "bad-request").await;
    }
    assert_eq!(peer.requests(), 0, "{:?}", peer.seen());
    still_serves(&proxy).await;
}

/// More header fields than `limits.max_headers`: refused (431 or 400), never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_header_fields_are_refused() {
    let peer = HttpPeer::http1("echo");
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound_with("echo", ListenerProtocol::Http)
        .limits(|l| l.max_headers = 20)
        .start();
    let mut request = String::from("GET /many HTTP/1.1\r\nHost: echo\r\n");
    for i in 0..40 {
        request.push_str(&format!("X-F{i}: v\r\n"));
    }
    request.push_str("\r\n");
    let (mut conn, r) = exchange(proxy.outbound(), request.as_bytes()).await;
    let r = r.expect("closed without a response");
    assert!(
        matches!(r.status, 400 | 431),
        "status {}, malla-error {:?}",
        r.status,
        r.cause()
    );
    assert!(conn.closed().await);
    assert_eq!(peer.requests(), 0);
    still_serves(&proxy).await;
}

/// The absolute form of the request target (RFC 9112 §3.2.2) is accepted, and the
/// upstream gets the origin form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_is_accepted() {
    let (peer, proxy) = setup();
    let (_, r) = exchange(
        proxy.outbound(),
        b"GET http://echo/absolute?q=1 HTTP/1.1\r\nHost: echo\r\n\r\n",
    )
    .await;
    let r = r.expect("closed without a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-echo-path"), Some("/absolute?q=1"));
    assert_eq!(peer.requests(), 1);
}
