//! [`answer`]: one DNS message in, one out. Pure (no I/O, no clock), and total: any bytes
//! get a well-formed response or, for what must not be answered, nothing.
//!
//! Parsing is hickory-proto's. Resolving ([`Zone::resolve`]) turns the question into an
//! [`Outcome`] and [`encode`] fits that into the size the transport allows.

mod encode;

use std::{collections::HashSet, net::IpAddr};

use hickory_proto::{
    op::{Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode},
    rr::{rdata::SOA, DNSClass, Name, RData, Record, RecordType},
    serialize::binary::{BinDecodable, BinDecoder},
};
use malla_core::{Instance, Selector, ServiceName};

use self::encode::{bare, encode};
use super::{
    name::{self, Lookup},
    Catalog, DnsConfig, Pick, MAX_UDP_PAYLOAD,
};

/// How the response travels, which bounds its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// At most `max_size` bytes (the server's limit; raised to 512 if lower), and no more
    /// than the client's EDNS buffer size, or 512 bytes without EDNS.
    Udp { max_size: u16 },
    /// At most 65,535 bytes, the most a 2-byte length prefix can frame.
    Tcp,
}

/// The response to the DNS message `query`, or an empty vector when nothing must be sent
/// (fewer bytes than a header, or a message that is itself a response).
pub fn answer(
    query: &[u8],
    transport: Transport,
    catalog: &dyn Catalog,
    config: &DnsConfig,
) -> Vec<u8> {
    match Zone::new(config) {
        Ok(zone) => zone.answer(query, transport, catalog),
        Err(_) => match request_header(query) {
            Some(meta) => bare(meta, ResponseCode::ServFail),
            None => Vec::new(),
        },
    }
}

/// The smallest encoded answer (an A record owned by a pointer to the question), which
/// bounds how many answers are worth building for a given message size.
const MIN_ANSWER_LEN: usize = 16;

/// The served zone, prepared once from a [`DnsConfig`].
pub(super) struct Zone {
    /// The domain's labels, lowercase.
    labels: Vec<Vec<u8>>,
    ttl: u32,
    soa: Record,
}

impl Zone {
    pub(super) fn new(config: &DnsConfig) -> anyhow::Result<Zone> {
        let invalid = || {
            anyhow::anyhow!(
                "invalid DNS domain {:?}: use one or more labels of letters, digits and '-' \
                 separated by '.', such as \"malla.\"",
                config.domain
            )
        };
        let mut apex = Name::from_ascii(&config.domain)
            .map_err(|_| invalid())?
            .to_lowercase();
        apex.set_fqdn(true);
        let labels: Vec<Vec<u8>> = apex.iter().map(<[u8]>::to_vec).collect();
        let ldh = |l: &Vec<u8>| {
            l.first().is_some_and(u8::is_ascii_alphanumeric)
                && l.last().is_some_and(u8::is_ascii_alphanumeric)
                && l.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        };
        if labels.is_empty() || !labels.iter().all(ldh) {
            return Err(invalid());
        }
        // Names under it carry up to `TARGET.SERVICE.svc.` (64 + 64 + 4 bytes on the wire).
        let wire_len: usize = labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1;
        if wire_len > 255 - 132 {
            return Err(anyhow::anyhow!(
                "DNS domain {:?} is too long: names under it must fit in 255 bytes; use at \
                 most 120 characters",
                config.domain
            ));
        }
        // Whole seconds, at most 2^31 - 1 (RFC 2181).
        let ttl = config.ttl.as_secs().min(i32::MAX as u64) as u32;
        let hostmaster = apex.prepend_label("hostmaster")?;
        let soa = SOA::new(apex.clone(), hostmaster, 1, 3600, 600, 86400, ttl);
        let soa = Record::from_rdata(apex, ttl, RData::SOA(soa));
        Ok(Zone { labels, ttl, soa })
    }

    pub(super) fn answer(
        &self,
        bytes: &[u8],
        transport: Transport,
        catalog: &dyn Catalog,
    ) -> Vec<u8> {
        let Some(meta) = request_header(bytes) else {
            return Vec::new();
        };
        if meta.op_code != OpCode::Query {
            return bare(meta, ResponseCode::NotImp);
        }
        let Ok(request) = Message::from_vec(bytes) else {
            return bare(meta, ResponseCode::FormErr);
        };
        let edns = request.edns.as_ref().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(match transport {
                Transport::Udp { max_size } => max_size.max(512),
                Transport::Tcp => MAX_UDP_PAYLOAD,
            });
            edns
        });
        let limit = match transport {
            Transport::Udp { max_size } => {
                let client = request.edns.as_ref().map_or(512, Edns::max_payload);
                usize::from(client.min(max_size).max(512))
            }
            Transport::Tcp => usize::from(u16::MAX),
        };
        let [query] = request.queries.as_slice() else {
            let out = Outcome::error(ResponseCode::FormErr);
            return encode(meta, None, &out, edns, limit);
        };
        let out = if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Outcome::error(ResponseCode::BADVERS)
        } else {
            self.resolve(query, catalog, meta.id, limit / MIN_ANSWER_LEN + 1)
        };
        encode(meta, Some(query), &out, edns, limit)
    }

    /// What answers `query`, with at most `max_answers` answers built.
    fn resolve(
        &self,
        query: &Query,
        catalog: &dyn Catalog,
        id: u16,
        max_answers: usize,
    ) -> Outcome {
        let qtype = query.query_type();
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY)
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
        {
            return Outcome::error(ResponseCode::Refused);
        }
        let (service, instances, srv_form) = match name::lookup(query.name(), &self.labels) {
            Lookup::Outside => return Outcome::error(ResponseCode::Refused),
            Lookup::NoSuchName => return self.negative(ResponseCode::NXDomain),
            Lookup::Apex if matches!(qtype, RecordType::SOA | RecordType::ANY) => {
                let mut soa = self.soa.clone();
                soa.name = query.name().clone();
                return self.positive(vec![Answer::Record(Box::new(soa))]);
            }
            Lookup::Apex | Lookup::SvcRoot => return self.negative(ResponseCode::NoError),
            Lookup::Service {
                service,
                selector,
                srv_form,
            } => {
                // The instances that may serve, rotated by the query id so that successive
                // queries spread over them, only as many as can fit in the answer.
                let pick = Pick {
                    rotation: usize::from(id),
                    max: max_answers,
                    serving_only: true,
                };
                match catalog.instances(&service, &selector, pick) {
                    Some(instances) => (service, instances, srv_form),
                    None => return self.negative(ResponseCode::NXDomain),
                }
            }
            Lookup::Instance {
                service,
                target,
                srv_form,
            } => {
                let Some(mut instances) = catalog.instances(&service, &Selector::all(), Pick::ALL)
                else {
                    return self.negative(ResponseCode::NXDomain);
                };
                instances.retain(|i| name::target_label(i) == target);
                if instances.is_empty() {
                    return self.negative(ResponseCode::NXDomain);
                }
                (service, instances, srv_form)
            }
        };
        let serving: Vec<&Instance> = instances
            .iter()
            .map(|i| &**i)
            .filter(|i| i.health.serving())
            .collect();
        let answers = match qtype {
            RecordType::A | RecordType::AAAA | RecordType::ANY if !srv_form => {
                let want = |ip: &IpAddr| match qtype {
                    RecordType::A => ip.is_ipv4(),
                    RecordType::AAAA => ip.is_ipv6(),
                    _ => true,
                };
                let mut seen = HashSet::new();
                serving
                    .iter()
                    .map(|i| i.address)
                    .filter(|ip| want(ip) && seen.insert(*ip))
                    .take(max_answers)
                    .map(Answer::Address)
                    .collect()
            }
            RecordType::SRV => self.srv_answers(&service, &serving, max_answers),
            _ => Vec::new(),
        };
        if answers.is_empty() {
            return self.negative(ResponseCode::NoError);
        }
        self.positive(answers)
    }

    /// One SRV per instance (distinct by target and port), each carrying the address of its
    /// target for the additional section (unless an earlier one carries it).
    fn srv_answers(
        &self,
        service: &ServiceName,
        instances: &[&Instance],
        max: usize,
    ) -> Vec<Answer> {
        // `SERVICE.svc.DOMAIN.` in wire format; `Zone::new` made sure targets fit in 255.
        let mut parent = Vec::with_capacity(128);
        push_label(&mut parent, service.as_str().as_bytes());
        push_label(&mut parent, b"svc");
        for label in &self.labels {
            push_label(&mut parent, label);
        }
        parent.push(0);
        let mut seen = HashSet::new();
        let mut glued = HashSet::new();
        let mut answers = Vec::new();
        for instance in instances {
            if answers.len() >= max {
                break;
            }
            let label = name::target_label(instance);
            if !seen.insert((label.clone(), instance.port)) {
                continue;
            }
            let mut target = Vec::with_capacity(label.len() + 1 + parent.len());
            push_label(&mut target, label.as_bytes());
            target.extend_from_slice(&parent);
            let glue = glued
                .insert((label, instance.address))
                .then_some(instance.address);
            answers.push(Answer::Srv {
                port: instance.port,
                target,
                glue,
            });
        }
        answers
    }

    fn positive(&self, answers: Vec<Answer>) -> Outcome {
        Outcome {
            answers,
            authoritative: true,
            ttl: self.ttl,
            ..Outcome::error(ResponseCode::NoError)
        }
    }

    /// NXDOMAIN or NODATA: authoritative, with the SOA for negative caching.
    fn negative(&self, rcode: ResponseCode) -> Outcome {
        Outcome {
            authoritative: true,
            soa: Some(self.soa.clone()),
            ..Outcome::error(rcode)
        }
    }
}

/// What a query resolved to, before it is fitted into a message.
struct Outcome {
    rcode: ResponseCode,
    authoritative: bool,
    /// The TTL of the answers.
    ttl: u32,
    answers: Vec<Answer>,
    /// The zone's SOA for the authority section of negative answers.
    soa: Option<Record>,
}

impl Outcome {
    /// Not an answer from the zone: no AA, no SOA.
    fn error(rcode: ResponseCode) -> Self {
        Outcome {
            rcode,
            authoritative: false,
            ttl: 0,
            answers: Vec::new(),
            soa: None,
        }
    }
}

/// One record of the answer section.
enum Answer {
    /// An A or AAAA record of the question's name.
    Address(IpAddr),
    /// An SRV record of the question's name; `target` in wire format, `glue` the address
    /// to put in the additional section for it.
    Srv {
        port: u16,
        target: Vec<u8>,
        glue: Option<IpAddr>,
    },
    /// Anything else (the SOA at the apex).
    Record(Box<Record>),
}

fn push_label(wire: &mut Vec<u8>, label: &[u8]) {
    // Labels here are at most 63 bytes: service names, target labels, checked domains.
    wire.push(label.len() as u8);
    wire.extend_from_slice(label);
}

/// The header of `bytes` turned into a response's, if `bytes` is a query.
fn request_header(bytes: &[u8]) -> Option<Metadata> {
    let header = Header::read(&mut BinDecoder::new(bytes)).ok()?;
    (header.message_type == MessageType::Query)
        .then(|| Metadata::response_from_request(&header.metadata))
}

#[cfg(test)]
mod tests;
