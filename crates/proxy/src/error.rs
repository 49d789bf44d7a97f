//! The errors a client can meet, and the one place that turns them into responses.
//!
//! Every error the proxy answers itself carries a stable *cause* — sent in the
//! `malla-error` response header, counted in `malla_proxy_errors_total{cause}` and listed in
//! `docs/proxy.md` — a status code, and for gRPC callers the matching `grpc-status`
//! (the mapping of gRPC's `http-grpc-status-mapping.md`, refined where the cause is known).

use std::{io, net::SocketAddr, time::Duration};

use http::StatusCode;
use malla_core::policy::{LIMIT_HEADER, RELAYED_FAILURE_HEADER};

use crate::resilience::rate::retry_after_secs;

/// The response header that names why the proxy answered instead of the upstream.
pub const ERROR_HEADER: &str = "malla-error";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "no route for host {host:?}; configure an [[http_proxy.route]] or an upstream of that name"
    )]
    NoRoute { host: String },
    #[error("upstream {upstream} has no endpoints")]
    NoEndpoints { upstream: String },
    #[error("all {endpoints} endpoints of upstream {upstream} are ejected by their circuit breakers; they are probed again when their ejection time ends")]
    AllEjected { upstream: String, endpoints: usize },
    #[error("connection to {addr} refused")]
    ConnectRefused { addr: SocketAddr },
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("the mTLS handshake with {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("{addr} closed or reset the connection before answering")]
    UpstreamReset { addr: SocketAddr },
    #[error("{addr} sent no response head within {timeout:?}")]
    ResponseTimeout { addr: SocketAddr, timeout: Duration },
    #[error("{addr} sent an invalid response: {reason}")]
    UpstreamProtocol { addr: SocketAddr, reason: String },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("request head larger than {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("more header fields than the proxy accepts")]
    TooManyHeaders,
    #[error("request head not received within {0:?}")]
    HeadTimeout(Duration),
    #[error("the proxy is shutting down")]
    Draining,
    #[error("upstream {upstream} is at its limit {limit} = {max}; the call was not queued")]
    LimitReached {
        upstream: String,
        limit: &'static str,
        max: u32,
    },
    #[error("upstream {upstream} is over its rate limit; retry after {retry_after:?}")]
    RateLimited {
        upstream: String,
        retry_after: Duration,
    },
    #[error("the request's deadline passed before an answer (budget {budget:?})")]
    DeadlineExceeded { budget: Duration },
    #[error("fault injected by policy (status {status})")]
    FaultAbort { status: u16 },
    /// The callee's authorization policy denies the call (`reason`: the caller and the
    /// verdict, never the rules themselves).
    #[error("forbidden: {reason}")]
    Forbidden { reason: String },
}

impl ProxyError {
    /// Stable, documented identifier of the cause.
    pub fn cause(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "no-route",
            ProxyError::NoEndpoints { .. } => "no-endpoints",
            ProxyError::AllEjected { .. } => "no-healthy-endpoints",
            ProxyError::ConnectRefused { .. } => "connect-refused",
            ProxyError::ConnectTimeout { .. } => "connect-timeout",
            ProxyError::Connect { .. } => "connect-error",
            ProxyError::Handshake { .. } => "tls-handshake-error",
            ProxyError::UpstreamReset { .. } => "upstream-reset",
            ProxyError::ResponseTimeout { .. } => "response-timeout",
            ProxyError::UpstreamProtocol { .. } => "upstream-protocol-error",
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::NotImplemented(_) => "not-implemented",
            ProxyError::HeadTooLarge { .. } | ProxyError::TooManyHeaders => {
                "request-header-too-large"
            }
            ProxyError::HeadTimeout(_) => "request-timeout",
            ProxyError::Draining => "draining",
            ProxyError::LimitReached { .. } => "limit-reached",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::DeadlineExceeded { .. } => "deadline-exceeded",
            ProxyError::FaultAbort { .. } => "fault-injected",
            ProxyError::Forbidden { .. } => "forbidden",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoints { .. }
            | ProxyError::AllEjected { .. }
            | ProxyError::Draining
            | ProxyError::LimitReached { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::FaultAbort { status } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            ProxyError::ConnectRefused { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Handshake { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamProtocol { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout { .. } | ProxyError::ResponseTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::HeadTooLarge { .. } | ProxyError::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ProxyError::HeadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// The `grpc-status` a gRPC caller gets.
    pub fn grpc_status(&self) -> u8 {
        const INTERNAL: u8 = 13;
        const UNAVAILABLE: u8 = 14;
        const DEADLINE_EXCEEDED: u8 = 4;
        const UNIMPLEMENTED: u8 = 12;
        const RESOURCE_EXHAUSTED: u8 = 8;
        const PERMISSION_DENIED: u8 = 7;
        match self {
            ProxyError::NoRoute { .. } | ProxyError::NotImplemented(_) => UNIMPLEMENTED,
            ProxyError::ResponseTimeout { .. } | ProxyError::DeadlineExceeded { .. } => {
                DEADLINE_EXCEEDED
            }
            ProxyError::RateLimited { .. } => RESOURCE_EXHAUSTED,
            ProxyError::Forbidden { .. } => PERMISSION_DENIED,
            ProxyError::FaultAbort { status } => grpc_status_for_http(*status),
            ProxyError::UpstreamProtocol { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::HeadTooLarge { .. }
            | ProxyError::TooManyHeaders => INTERNAL,
            _ => UNAVAILABLE,
        }
    }

    /// Whether the error is about the upstream (its endpoints, limits or deadline) rather
    /// than about the request or this proxy: relayed by a sidecar's outbound side, such an
    /// error is marked `malla-relayed-failure` so that the caller's outlier detector does
    /// not blame the relaying instance.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::NoEndpoints { .. }
                | ProxyError::AllEjected { .. }
                | ProxyError::ConnectRefused { .. }
                | ProxyError::ConnectTimeout { .. }
                | ProxyError::Connect { .. }
                | ProxyError::Handshake { .. }
                | ProxyError::UpstreamReset { .. }
                | ProxyError::ResponseTimeout { .. }
                | ProxyError::UpstreamProtocol { .. }
                | ProxyError::LimitReached { .. }
                | ProxyError::RateLimited { .. }
                | ProxyError::DeadlineExceeded { .. }
                | ProxyError::FaultAbort { .. }
        )
    }

    /// Header fields that go with the error besides `malla-error`: the limit that
    /// rejected the call, `retry-after`, and the relayed-failure mark (`relay`: the
    /// upstream's name, when the error is relayed by an outbound listener).
    fn extra_fields(&self, relay: Option<&str>) -> Vec<(&'static str, String)> {
        let mut fields = Vec::new();
        match self {
            ProxyError::LimitReached { limit, .. } => {
                fields.push((LIMIT_HEADER, limit.to_string()))
            }
            ProxyError::RateLimited { retry_after, .. } => {
                fields.push((LIMIT_HEADER, "rate-limit".to_string()));
                fields.push(("retry-after", retry_after_secs(*retry_after).to_string()));
            }
            _ => {}
        }
        if let Some(upstream) = relay.filter(|_| self.is_upstream_failure()) {
            fields.push((RELAYED_FAILURE_HEADER, upstream.to_string()));
        }
        fields
    }

    /// Classifies a failed connect.
    pub fn from_connect(addr: SocketAddr, e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ProxyError::ConnectRefused { addr },
            _ => ProxyError::Connect { addr, source: e },
        }
    }

    /// An HTTP/1 response, complete with head and body, ready to write to a client.
    pub fn http1_response(&self, close: bool, relay: Option<&str>) -> Vec<u8> {
        let status = self.status();
        let body = format!("malla: {self}\n");
        let mut extra = String::new();
        for (name, value) in self.extra_fields(relay) {
            extra.push_str(&format!("{name}: {value}\r\n"));
        }
        format!(
            "HTTP/1.1 {} {}\r\n{ERROR_HEADER}: {}\r\n{extra}content-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ndate: {}\r\n{}\r\n{}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.cause(),
            body.len(),
            httpdate::fmt_http_date(std::time::SystemTime::now()),
            if close { "connection: close\r\n" } else { "" },
            body
        )
        .into_bytes()
    }

    /// An `http::Response` for HTTP/2 clients; gRPC callers (`content-type:
    /// application/grpc...`) get a trailers-only response with `grpc-status`.
    pub fn http_response<B: Default + From<String>>(
        &self,
        grpc: bool,
        relay: Option<&str>,
    ) -> http::Response<B> {
        let mut builder = http::Response::builder().header(ERROR_HEADER, self.cause());
        for (name, value) in self.extra_fields(relay) {
            builder = builder.header(name, value);
        }
        if grpc {
            builder = builder
                .status(StatusCode::OK)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", self.grpc_status().to_string())
                .header("grpc-message", percent_encode(&self.to_string()));
            return builder.body(B::default()).unwrap_or_default();
        }
        builder
            .status(self.status())
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(B::from(format!("malla: {self}\n")))
            .unwrap_or_default()
    }
}

/// gRPC's mapping of HTTP statuses (http-grpc-status-mapping.md), for injected aborts.
fn grpc_status_for_http(status: u16) -> u8 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// `grpc-message` is percent-encoded (gRPC's PROTOCOL-HTTP2.md).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_map_to_documented_statuses() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let cases = [
            (
                ProxyError::NoEndpoints {
                    upstream: "a".into(),
                },
                503,
                14,
            ),
            (ProxyError::ConnectRefused { addr }, 502, 14),
            (
                ProxyError::ConnectTimeout {
                    addr,
                    timeout: Duration::from_secs(1),
                },
                504,
                14,
            ),
            (ProxyError::UpstreamReset { addr }, 502, 14),
            (
                ProxyError::ResponseTimeout {
                    addr,
                    timeout: Duration::from_secs(1),
                },
                504,
                4,
            ),
        ];
        for (err, status, grpc) in cases {
            assert_eq!(err.status().as_u16(), status, "{err}");
            assert_eq!(err.grpc_status(), grpc, "{err}");
        }
    }

    #[test]
    fn http1_error_response_is_well_formed() {
        let err = ProxyError::NoEndpoints {
            upstream: "shipping-quote".into(),
        };
        let bytes = err.http1_response(true, Some("shipping-quote"));
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head_len) = resp.parse(&bytes).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(resp.code, Some(503));
        let cl: usize = resp
            .headers
            .iter()
            .find(|h| h.name == "content-length")
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .unwrap();
        assert_eq!(bytes.len() - head_len, cl);
        assert!(resp
            .headers
            .iter()
            .any(|h| h.name == ERROR_HEADER && h.value == b"no-endpoints"));
        assert!(resp
            .headers
            .iter()
            .any(|h| h.name == RELAYED_FAILURE_HEADER && h.value == b"shipping-quote"));
        // A client's own error is never marked as an upstream's.
        let own = ProxyError::BadRequest("x").http1_response(true, Some("shipping-quote"));
        assert!(!String::from_utf8_lossy(&own).contains(RELAYED_FAILURE_HEADER));
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a b%\n"), "a b%25%0A");
    }
}
