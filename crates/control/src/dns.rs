//! The DNS interface: the registry as an authoritative DNS zone, so that any program that
//! can resolve a host name can find the instances of a service, no client library needed.
//!
//! # Names
//!
//! Everything lives under one domain, `malla.` by default ([`DnsConfig::domain`]):
//!
//! | name | type | answer |
//! |---|---|---|
//! | `SERVICE.svc.malla.` | A, AAAA | the addresses of the serving instances of `SERVICE` |
//! | `VALUE.KEY.SERVICE.svc.malla.` | A, AAAA | the same, of the instances with label `KEY=VALUE` |
//! | `V2.K2.V1.K1.SERVICE.svc.malla.` | A, AAAA | filters chain: `K1=V1,K2=V2` |
//! | any of the above | SRV | one SRV per serving instance: priority 0, weight 1, its port, target `TARGET.SERVICE.svc.malla.`; the target's A/AAAA in the additional section |
//! | `_NAME._tcp.` + any of the above | SRV | the same (the RFC 2782 form; `NAME` is not interpreted) |
//! | `TARGET.SERVICE.svc.malla.` | A, AAAA, SRV | that one instance |
//! | `malla.` | SOA | the zone's SOA |
//!
//! `TARGET` is the instance id when the id is a lowercase DNS label (`[a-z0-9-]`, at most
//! 63, not starting or ending with `-`), and otherwise the address with dashes
//! (`127-0-0-1`, or the eight IPv6 groups in hex: `fd00-0-0-0-0-0-0-1`).
//!
//! A label filter can only name label keys and values that are themselves DNS labels after
//! lowercasing: letters, digits, `-` and `_`, starting and ending with a letter or digit, at
//! most 63. Keys with a prefix (`malla.dev/zone`), values with `.` or upper-case letters, and
//! empty values cannot be expressed; use the HTTP API's selectors for those. Names match
//! case-insensitively, as DNS requires: `Prod.ENV.Shipping-Quote.svc.malla.` is
//! `prod.env.shipping-quote.svc.malla.`.
//!
//! Only serving instances ([`malla_core::Health::serving`]) are answered. Records are rotated
//! by the query id so that clients that take the first address spread their load.
//!
//! # Answers
//!
//! - Authoritative (AA) for every name under the domain; never recursive (RA clear).
//! - Records carry [`DnsConfig::ttl`]; negative answers carry the zone's SOA (whose minimum is
//!   the same TTL) in the authority section, so resolvers cache them no longer than that.
//! - NXDOMAIN: an unknown service, an unknown instance target, or a name under the domain
//!   that is not of the scheme (an odd number of filter labels, a bad character...).
//! - NOERROR without answers (NODATA): the name exists but holds nothing of the asked type:
//!   no instance matches the filters, AAAA when all are IPv4, `svc.malla.` itself.
//! - REFUSED: names outside the domain (this is not a recursive resolver), classes other than
//!   IN and ANY, zone transfers (AXFR/IXFR).
//! - FORMERR: a query that does not parse, or does not hold exactly one question.
//! - NOTIMP: opcodes other than QUERY. BADVERS: EDNS versions above 0.
//! - Nothing at all for a message shorter than a DNS header, or for a response.
//!
//! # Sizes and transports
//!
//! UDP answers fit the client's buffer: 512 bytes, or the EDNS size it advertised, capped at
//! 1232 (the DNS flag day 2020 value, which avoids IP fragmentation). When the answers do
//! not all fit, as many as fit are sent with the TC bit set and the client retries over TCP.
//! TCP (RFC 7766, 2-byte length framing, several queries per connection) sends up to
//! 65,535 bytes: about 4,000 A records, 2,300 AAAA or 1,000 SRV with their addresses;
//! beyond that the answer is cut the same way (TC set). SRV additionals that do not fit are
//! left out without setting TC, as RFC 2181 allows. A query with an EDNS OPT gets one back.
//!
//! The packet handling is the pure function [`answer`]; [`DnsServer`] only moves bytes.

mod answer;
mod name;
mod server;
#[cfg(test)]
mod testing;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use malla_core::{Instance, Selector, ServiceName};

pub use answer::{answer, Transport};
pub use server::DnsServer;

/// What DNS answers from: the registry's current view.
pub trait Catalog: Send + Sync + 'static {
    /// The instances of `service` matching `selector`, or None if the service is unknown.
    /// Shared pointers: a service with 10,000 instances is answered without copying them.
    fn instances(&self, service: &ServiceName, selector: &Selector) -> Option<Vec<Arc<Instance>>>;
}

/// The domain when none is configured.
pub const DEFAULT_DOMAIN: &str = "malla.";
/// The TTL of records (and of negative answers) when none is configured.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// The largest UDP answer sent, whatever the client advertises (DNS flag day 2020).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Where and how the DNS interface serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP listen address; port 0 picks a free port (the same for both).
    pub addr: SocketAddr,
    /// The zone served, `malla.` by default; with or without the final dot.
    pub domain: String,
    /// TTL of every record, and the SOA minimum (how long resolvers cache "no such name").
    /// Whole seconds; 5 s by default.
    pub ttl: Duration,
}

impl DnsConfig {
    /// `addr` with the default domain and TTL.
    pub fn new(addr: SocketAddr) -> Self {
        DnsConfig {
            addr,
            domain: DEFAULT_DOMAIN.to_string(),
            ttl: DEFAULT_TTL,
        }
    }
}
