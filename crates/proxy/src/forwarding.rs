//! The conventions a forwarding proxy applies to every HTTP message (RFC 9110 §7.6), shared
//! by the HTTP/1 and HTTP/2 paths so both behave alike:
//!
//! - Hop-by-hop fields are removed: `Connection` and every field it names, `Keep-Alive`,
//!   `Proxy-Connection`, `TE` (except `te: trailers` on HTTP/2, which gRPC needs),
//!   `Transfer-Encoding` (HTTP/1 re-frames; chunked bodies are relayed as chunked) and
//!   `Upgrade` (kept only when the proxy relays the upgrade itself).
//! - `X-Forwarded-For` gets the client's address appended (`client, proxy1, ...`, the
//!   de-facto convention), `X-Forwarded-Proto` is set to the scheme the client used when
//!   absent, and an existing `Forwarded` (RFC 7239) gets a `for=` element appended; the
//!   proxy does not add `Forwarded` when the client did not send one.
//! - `Via` gets `1.1 malla` (or `2 malla`) appended on requests and responses, as RFC 9110
//!   §7.6.3 asks of proxies.

use std::net::IpAddr;

/// Field names that never cross a hop (lowercase).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// The caller's SPIFFE ID, as the sidecar that terminated its mTLS saw it. Removed from
/// every request a sidecar reads, and set only from a handshake: an application can trust
/// it (see [`crate::inbound`]).
pub const CLIENT_ID_HEADER: &str = "malla-client-id";

pub const VIA_HTTP1: &str = "1.1 malla";
pub const VIA_HTTP2: &str = "2 malla";

/// The list-append rule of every forwarding field: `previous, ours`, or `ours` alone when
/// the request carried nothing. Writes into `out` so the HTTP/1 path can use it without
/// allocating.
pub fn append_list(out: &mut Vec<u8>, previous: Option<&[u8]>, ours: &[u8]) {
    if let Some(prev) = previous.filter(|p| !p.is_empty()) {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(ours);
}

fn appended(previous: Option<&[u8]>, ours: &str) -> String {
    let mut out = Vec::new();
    append_list(&mut out, previous, ours.as_bytes());
    String::from_utf8_lossy(&out).into_owned()
}

/// The `Forwarded` element naming `client` (RFC 7239 quotes IPv6 addresses).
pub fn forwarded_element(client: IpAddr, proto: &str) -> String {
    match client {
        IpAddr::V4(ip) => format!("for={ip};proto={proto}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto={proto}"),
    }
}

/// `X-Forwarded-For` with `client` appended to what the request carried.
pub fn x_forwarded_for(existing: Option<&[u8]>, client: IpAddr) -> String {
    appended(existing, &client.to_string())
}

/// An existing `Forwarded` with a `for=` element for `client` appended.
pub fn forwarded(existing: &[u8], client: IpAddr, proto: &str) -> String {
    appended(Some(existing), &forwarded_element(client, proto))
}

/// A `Via` value with this proxy appended.
pub fn via(existing: Option<&[u8]>, ours: &str) -> String {
    appended(existing, ours)
}

/// Whether a comma-separated field value (such as `Connection`) contains `token`.
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conventions() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(x_forwarded_for(None, v4), "10.1.2.3");
        assert_eq!(x_forwarded_for(Some(b"1.1.1.1"), v4), "1.1.1.1, 10.1.2.3");
        assert_eq!(
            forwarded(b"for=1.1.1.1", v6, "http"),
            "for=1.1.1.1, for=\"[::1]\";proto=http"
        );
        assert_eq!(via(Some(b"1.0 fred"), VIA_HTTP1), "1.0 fred, 1.1 malla");
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(!has_token(b"keep-alive", "close"));
        assert!(is_hop_by_hop(b"Transfer-Encoding"));
        assert!(!is_hop_by_hop(b"trailer"));
    }
}
