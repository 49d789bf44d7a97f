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
    /// Some of the instances of `service` matching `selector` (see [`Pick`]), or None if
    /// the service is unknown.
    fn instances(
        &self,
        service: &ServiceName,
        selector: &Selector,
        pick: Pick,
    ) -> Option<Vec<Arc<Instance>>>;
}

/// Which of the matching instances an answer needs: at most `max`, starting at the
/// `rotation`-th (modulo their number) and wrapping around, so that successive queries
/// get the instances in a rotated order. A name with 10,000 instances is answered by
/// looking at each once or twice and copying only the few that fit in the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub rotation: usize,
    pub max: usize,
    /// Only instances that may serve (health not `unhealthy`).
    pub serving_only: bool,
}

impl Pick {
    /// Every matching instance, serving or not, in order.
    pub const ALL: Pick = Pick {
        rotation: 0,
        max: usize::MAX,
        serving_only: false,
    };

    /// Applies the pick to the instances `instances()` iterates (it is called up to three
    /// times: to count them, then for each side of the wrap; only the picked are copied).
    pub fn from<'a, I>(self, instances: impl Fn() -> I) -> Vec<Arc<Instance>>
    where
        I: Iterator<Item = &'a Arc<Instance>>,
    {
        let wanted = || instances().filter(move |i| !self.serving_only || i.health.serving());
        let n = wanted().count();
        if n == 0 {
            return Vec::new();
        }
        let start = self.rotation % n;
        wanted()
            .skip(start)
            .chain(wanted().take(start))
            .take(self.max)
            .cloned()
            .collect()
    }
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

#[cfg(test)]
mod pick_tests {
    use super::*;
    use malla_core::{Health, InstanceProtocol, Labels};

    fn instance(i: u8, health: Health) -> Arc<Instance> {
        Arc::new(Instance {
            mtls: false,
            id: format!("i{i}"),
            service: ServiceName::new("s").unwrap(),
            address: std::net::IpAddr::from([10, 0, 0, i]),
            port: 80,
            protocol: InstanceProtocol::Http,
            labels: Labels::new(),
            health,
        })
    }

    #[test]
    fn picks_rotate_wrap_and_keep_to_serving_instances() {
        let all: Vec<_> = (0..5)
            .map(|i| {
                instance(
                    i,
                    if i == 1 {
                        Health::Unhealthy
                    } else {
                        Health::Healthy
                    },
                )
            })
            .collect();
        let ids = |pick: Pick| -> Vec<String> {
            pick.from(|| all.iter())
                .iter()
                .map(|i| i.id.clone())
                .collect()
        };
        let serving = |rotation, max| Pick {
            rotation,
            max,
            serving_only: true,
        };
        assert_eq!(ids(serving(0, 10)), ["i0", "i2", "i3", "i4"]);
        assert_eq!(ids(serving(2, 3)), ["i3", "i4", "i0"]);
        assert_eq!(
            ids(serving(6, 2)),
            ["i3", "i4"],
            "the rotation wraps modulo 4"
        );
        assert_eq!(ids(Pick::ALL).len(), 5, "ALL keeps the unhealthy one");
        assert!(Pick::ALL.from(|| all[..0].iter()).is_empty());
    }
}
