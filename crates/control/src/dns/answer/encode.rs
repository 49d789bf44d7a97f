//! Fitting an [`Outcome`] into a message of at most so many bytes.
//!
//! Answers are written here rather than through hickory's record encoder, for two reasons
//! that matter with thousands of instances: every answer's owner is the question's name, so
//! it is always the 2-byte pointer to offset 12 (hickory compresses only the first 120
//! names of a message, a guard against CVE-2024-8508-style costs, after which each record
//! would repeat the name in full); and the A record of an SRV target can point at that
//! target inside the SRV. That lets a TCP answer carry about 4,000 A records instead of
//! about 2,000, and skips building a `Record` per instance.

use std::{iter, net::IpAddr};

use hickory_proto::{
    op::{Edns, Header, HeaderCounts, Metadata, Query, ResponseCode},
    serialize::binary::{BinEncodable, BinEncoder},
    ProtoError,
};

use super::{Answer, Outcome};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;
/// A compression pointer to the question's name, right after the 12-byte header.
const QUESTION_NAME: [u8; 2] = [0xc0, 12];

/// A response of only a header.
pub(super) fn bare(meta: Metadata, rcode: ResponseCode) -> Vec<u8> {
    encode(meta, None, &Outcome::error(rcode), None, 512)
}

/// Encodes the response in at most `limit` bytes: the question, answers until one does not
/// fit (then TC), the SOA, additionals while they fit (no TC for those, RFC 2181 9), and the
/// OPT record, for which room is kept from the start.
pub(super) fn encode(
    meta: Metadata,
    query: Option<&Query>,
    out: &Outcome,
    edns: Option<Edns>,
    limit: usize,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(limit.min(4096));
    if try_encode(&mut buf, meta, query, out, edns, limit).is_ok() {
        return buf;
    }
    // Only a question longer than the limit could get here, which a parsed one cannot be.
    buf.clear();
    let mut metadata = meta;
    metadata.response_code = ResponseCode::ServFail;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    match header.emit(&mut BinEncoder::new(&mut buf)) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

fn try_encode(
    buf: &mut Vec<u8>,
    mut meta: Metadata,
    query: Option<&Query>,
    out: &Outcome,
    edns: Option<Edns>,
    limit: usize,
) -> Result<(), ProtoError> {
    let opt = edns.map(|mut edns| {
        edns.set_rcode_high(out.rcode.high());
        edns
    });
    let opt_len = match &opt {
        Some(opt) => opt.to_bytes()?.len(),
        None => 0,
    };
    let limit = u16::try_from(limit).unwrap_or(u16::MAX);
    let mut enc = BinEncoder::new(buf);
    enc.set_max_size(limit.saturating_sub(opt_len as u16));
    let place = enc.place::<Header>()?;
    let mut counts = HeaderCounts::default();
    let mut truncated = false;
    // Where each SRV target written starts, with the address that goes with it.
    let mut glue: Vec<(usize, &[u8], IpAddr)> = Vec::new();
    if let Some(query) = query {
        query.emit(&mut enc)?;
        counts.queries = 1;
        let mut rr = Vec::with_capacity(64);
        for answer in &out.answers {
            rr.clear();
            let written = match answer {
                Answer::Address(ip) => {
                    address_record(&mut rr, &QUESTION_NAME, *ip, out.ttl);
                    enc.emit_vec(&rr).is_ok()
                }
                Answer::Srv {
                    port,
                    target,
                    glue: address,
                } => {
                    rr.extend_from_slice(&QUESTION_NAME);
                    let rdata_len = 6 + target.len() as u16;
                    record_header(&mut rr, TYPE_SRV, out.ttl, rdata_len);
                    rr.extend_from_slice(&[0, 0, 0, 1]); // priority 0, weight 1
                    rr.extend_from_slice(&port.to_be_bytes());
                    let target_at = enc.offset() + rr.len();
                    rr.extend_from_slice(target);
                    let ok = enc.emit_vec(&rr).is_ok();
                    if let (true, Some(ip)) = (ok, address) {
                        glue.push((target_at, target, *ip));
                    }
                    ok
                }
                Answer::Record(record) => enc.emit_all(iter::once(record.as_ref())).is_ok(),
            };
            if !written {
                truncated = true;
                break;
            }
            counts.answers += 1;
        }
    }
    if let (Some(soa), false) = (&out.soa, truncated) {
        if enc.emit_all(iter::once(soa)).is_ok() {
            counts.authorities = 1;
        } else {
            truncated = true;
        }
    }
    if !truncated {
        let mut rr = Vec::with_capacity(64);
        for (target_at, target, ip) in glue {
            rr.clear();
            match u16::try_from(target_at) {
                // A pointer to the target in its SRV, when within reach of one (14 bits).
                Ok(at) if at < 0x4000 => {
                    address_record(&mut rr, &(0xc000 | at).to_be_bytes(), ip, out.ttl)
                }
                _ => address_record(&mut rr, target, ip, out.ttl),
            }
            if enc.emit_vec(&rr).is_err() {
                break;
            }
            counts.additionals += 1;
        }
    }
    if let Some(opt) = &opt {
        enc.set_max_size(limit);
        opt.emit(&mut enc)?;
        counts.additionals += 1;
    }
    enc.trim();
    meta.authoritative = out.authoritative;
    meta.truncation = truncated;
    meta.response_code = out.rcode;
    place.replace(
        &mut enc,
        Header {
            metadata: meta,
            counts,
        },
    )
}

fn record_header(rr: &mut Vec<u8>, rtype: u16, ttl: u32, rdata_len: u16) {
    rr.extend_from_slice(&rtype.to_be_bytes());
    rr.extend_from_slice(&CLASS_IN.to_be_bytes());
    rr.extend_from_slice(&ttl.to_be_bytes());
    rr.extend_from_slice(&rdata_len.to_be_bytes());
}

fn address_record(rr: &mut Vec<u8>, owner: &[u8], ip: IpAddr, ttl: u32) {
    rr.extend_from_slice(owner);
    match ip {
        IpAddr::V4(ip) => {
            record_header(rr, TYPE_A, ttl, 4);
            rr.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            record_header(rr, TYPE_AAAA, ttl, 16);
            rr.extend_from_slice(&ip.octets());
        }
    }
}
