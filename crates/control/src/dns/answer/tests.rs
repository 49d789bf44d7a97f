use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType},
};

use malla_core::rng::Rng;

use super::{answer, Transport};
use crate::dns::{testing::FakeCatalog, DnsConfig};

const UDP: Transport = Transport::Udp { max_size: 1232 };

fn config() -> DnsConfig {
    DnsConfig::new("127.0.0.1:0".parse().unwrap())
}

fn request(id: u16, name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

fn exchange_with(msg: &Message, transport: Transport, config: &DnsConfig) -> (Vec<u8>, Message) {
    let bytes = answer(
        &msg.to_vec().unwrap(),
        transport,
        &FakeCatalog::fixture(),
        config,
    );
    let parsed = Message::from_vec(&bytes).unwrap();
    assert_eq!(parsed.metadata.id, msg.metadata.id);
    assert_eq!(parsed.metadata.message_type, MessageType::Response);
    assert!(!parsed.metadata.recursion_available);
    (bytes, parsed)
}

fn ask(name: &str, qtype: RecordType) -> Message {
    exchange_with(&request(0, name, qtype, None), UDP, &config()).1
}

fn addresses(m: &Message) -> BTreeSet<IpAddr> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            other => panic!("not an address: {other:?}"),
        })
        .collect()
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// `(port, target)` of each SRV answer.
fn srvs(m: &Message) -> BTreeSet<(u16, String)> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(srv) => {
                assert_eq!((srv.priority, srv.weight), (0, 1));
                (srv.port, srv.target.to_ascii())
            }
            other => panic!("not an SRV: {other:?}"),
        })
        .collect()
}

fn assert_positive(m: &Message) {
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m}");
    assert!(m.metadata.authoritative, "{m}");
    assert!(!m.metadata.truncation, "{m}");
    assert!(m.authorities.is_empty(), "{m}");
}

/// NXDOMAIN or NODATA: authoritative, no answer, the SOA with minimum = TTL.
fn assert_negative(m: &Message, rcode: ResponseCode, ttl: u32) {
    assert_eq!(m.metadata.response_code, rcode, "{m}");
    assert!(m.metadata.authoritative, "{m}");
    assert!(m.answers.is_empty(), "{m}");
    let [soa] = m.authorities.as_slice() else {
        panic!("one SOA expected: {m}")
    };
    let RData::SOA(data) = &soa.data else {
        panic!("SOA expected: {soa}")
    };
    assert_eq!(soa.name.to_ascii(), "malla.");
    assert_eq!(soa.ttl, ttl);
    assert_eq!(data.minimum, ttl);
}

fn assert_error(m: &Message, rcode: ResponseCode) {
    assert_eq!(m.metadata.response_code, rcode, "{m}");
    assert!(!m.metadata.authoritative, "{m}");
    assert!(m.answers.is_empty() && m.authorities.is_empty(), "{m}");
}

#[test]
fn a_records_of_serving_instances() {
    let m = ask("shipping-quote.svc.malla.", RecordType::A);
    assert_positive(&m);
    assert_eq!(
        addresses(&m),
        ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])
    );
    assert_eq!(m.queries[0].name().to_ascii(), "shipping-quote.svc.malla.");
    for r in &m.answers {
        assert_eq!(r.ttl, 5);
        assert_eq!(r.dns_class, DNSClass::IN);
        assert_eq!(r.name.to_ascii(), "shipping-quote.svc.malla.");
    }
    assert!(m.edns.is_none(), "no OPT without one in the query");
}

#[test]
fn aaaa_records_and_nodata() {
    let m = ask("ledger.svc.malla.", RecordType::AAAA);
    assert_positive(&m);
    assert_eq!(addresses(&m), ips(&["fd00::1", "fd00::2"]));
    // The service exists but has no IPv6 (or no IPv4) address: NODATA.
    assert_negative(
        &ask("shipping-quote.svc.malla.", RecordType::AAAA),
        ResponseCode::NoError,
        5,
    );
    assert_negative(
        &ask("ledger.svc.malla.", RecordType::A),
        ResponseCode::NoError,
        5,
    );
    // ANY: both families.
    let m = ask("ledger.svc.malla.", RecordType::ANY);
    assert_eq!(addresses(&m), ips(&["fd00::1", "fd00::2"]));
    // A type the scheme has no data of.
    assert_negative(
        &ask("ledger.svc.malla.", RecordType::TXT),
        ResponseCode::NoError,
        5,
    );
}

#[test]
fn label_filters_chain() {
    let prod = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.4"]);
    let m = ask("prod.env.shipping-quote.svc.malla.", RecordType::A);
    assert_positive(&m);
    assert_eq!(addresses(&m), prod);
    let prod_eu1 = ips(&["10.0.0.1", "10.0.0.4"]);
    for name in [
        "eu-1.zone.prod.env.shipping-quote.svc.malla.",
        "prod.env.eu-1.zone.shipping-quote.svc.malla.",
    ] {
        assert_eq!(addresses(&ask(name, RecordType::A)), prod_eu1, "{name}");
    }
    assert_eq!(
        addresses(&ask("staging.env.shipping-quote.svc.malla.", RecordType::A)),
        ips(&["10.0.0.3"])
    );
    // A known service with no match (only the unhealthy one, or none): NODATA.
    for name in [
        "qa.env.shipping-quote.svc.malla.",
        "eu-3.zone.shipping-quote.svc.malla.",
        "staging.env.eu-2.zone.shipping-quote.svc.malla.",
    ] {
        assert_negative(&ask(name, RecordType::A), ResponseCode::NoError, 5);
    }
    // Filters apply to SRV too.
    let m = ask(
        "eu-1.zone.prod.env.shipping-quote.svc.malla.",
        RecordType::SRV,
    );
    assert_eq!(
        srvs(&m),
        BTreeSet::from([
            (8080, "q-1.shipping-quote.svc.malla.".to_string()),
            (9090, "10-0-0-4.shipping-quote.svc.malla.".to_string()),
        ])
    );
}

#[test]
fn names_match_case_insensitively_and_echo_the_case_asked() {
    let name = "PROD.Env.Shipping-QUOTE.SVC.Malla.";
    let m = ask(name, RecordType::A);
    assert_positive(&m);
    assert_eq!(addresses(&m), ips(&["10.0.0.1", "10.0.0.2", "10.0.0.4"]));
    assert_eq!(m.queries[0].name().to_ascii(), name);
    assert!(m.answers.iter().all(|r| r.name.to_ascii() == name));
    assert_eq!(
        addresses(&ask("Q-1.shipping-quote.svc.MALLA.", RecordType::A)),
        ips(&["10.0.0.1"])
    );
}

#[test]
fn srv_with_addresses_in_the_additional_section() {
    let expected = BTreeSet::from([
        (8080, "q-1.shipping-quote.svc.malla.".to_string()),
        (8080, "q-2.shipping-quote.svc.malla.".to_string()),
        (8080, "q-3.shipping-quote.svc.malla.".to_string()),
        (9090, "10-0-0-4.shipping-quote.svc.malla.".to_string()),
    ]);
    for name in [
        "shipping-quote.svc.malla.",
        "_http._tcp.shipping-quote.svc.malla.",
        "_grpc._TCP.shipping-quote.svc.malla.",
    ] {
        let m = ask(name, RecordType::SRV);
        assert_positive(&m);
        assert_eq!(srvs(&m), expected, "{name}");
        let glue: BTreeSet<(String, IpAddr)> = m
            .additionals
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => (r.name.to_ascii(), IpAddr::V4(a.0)),
                other => panic!("not an A: {other:?}"),
            })
            .collect();
        assert_eq!(
            glue,
            BTreeSet::from([
                (
                    "q-1.shipping-quote.svc.malla.".into(),
                    "10.0.0.1".parse().unwrap()
                ),
                (
                    "q-2.shipping-quote.svc.malla.".into(),
                    "10.0.0.2".parse().unwrap()
                ),
                (
                    "q-3.shipping-quote.svc.malla.".into(),
                    "10.0.0.3".parse().unwrap()
                ),
                (
                    "10-0-0-4.shipping-quote.svc.malla.".into(),
                    "10.0.0.4".parse().unwrap()
                ),
            ])
        );
        assert!(m.answers.iter().chain(&m.additionals).all(|r| r.ttl == 5));
    }
    // The RFC 2782 form holds only SRV.
    assert_negative(
        &ask("_http._tcp.shipping-quote.svc.malla.", RecordType::A),
        ResponseCode::NoError,
        5,
    );
    // IPv6 targets: AAAA glue; an id that is not a lowercase DNS label becomes the address.
    let m = ask("ledger.svc.malla.", RecordType::SRV);
    assert_eq!(
        srvs(&m),
        BTreeSet::from([
            (7000, "fd00-0-0-0-0-0-0-1.ledger.svc.malla.".to_string()),
            (7000, "ledger-b.ledger.svc.malla.".to_string()),
        ])
    );
    assert!(m
        .additionals
        .iter()
        .all(|r| r.record_type() == RecordType::AAAA));
    assert_eq!(m.additionals.len(), 2);
}

#[test]
fn srv_targets_resolve_to_their_instance() {
    let cases = [
        ("q-1.shipping-quote.svc.malla.", RecordType::A, "10.0.0.1"),
        (
            "10-0-0-4.shipping-quote.svc.malla.",
            RecordType::A,
            "10.0.0.4",
        ),
        (
            "fd00-0-0-0-0-0-0-1.ledger.svc.malla.",
            RecordType::AAAA,
            "fd00::1",
        ),
        ("ledger-b.ledger.svc.malla.", RecordType::AAAA, "fd00::2"),
    ];
    for (name, qtype, ip) in cases {
        let m = ask(name, qtype);
        assert_positive(&m);
        assert_eq!(addresses(&m), ips(&[ip]), "{name}");
    }
    let m = ask("q-1.shipping-quote.svc.malla.", RecordType::SRV);
    assert_eq!(
        srvs(&m),
        BTreeSet::from([(8080, "q-1.shipping-quote.svc.malla.".to_string())])
    );
    // An unknown target does not exist; an unhealthy instance exists but is not served.
    assert_negative(
        &ask("q-9.shipping-quote.svc.malla.", RecordType::A),
        ResponseCode::NXDomain,
        5,
    );
    assert_negative(
        &ask("q-5.shipping-quote.svc.malla.", RecordType::A),
        ResponseCode::NoError,
        5,
    );
    // The id `Ledger-A` is not a lowercase label, so only its address form names it.
    assert_negative(
        &ask("ledger-a.ledger.svc.malla.", RecordType::AAAA),
        ResponseCode::NXDomain,
        5,
    );
}

#[test]
fn nxdomain_for_unknown_services_and_malformed_names() {
    for name in [
        "nope.svc.malla.",
        "x.malla.",
        "d.c.b.a.svc.malla.",
        "d.c.b.shipping-quote.svc.malla.",
        "Bad_Name.svc.malla.",
        "_http.shipping-quote.svc.malla.",
        "prod.env.nope.svc.malla.",
    ] {
        for qtype in [RecordType::A, RecordType::SRV] {
            assert_negative(&ask(name, qtype), ResponseCode::NXDomain, 5);
        }
    }
}

#[test]
fn nodata_for_names_that_exist_without_records() {
    assert_negative(&ask("svc.malla.", RecordType::A), ResponseCode::NoError, 5);
    assert_negative(&ask("malla.", RecordType::A), ResponseCode::NoError, 5);
    assert_negative(
        &ask("idle.svc.malla.", RecordType::A),
        ResponseCode::NoError,
        5,
    );
    assert_negative(
        &ask("idle.svc.malla.", RecordType::SRV),
        ResponseCode::NoError,
        5,
    );
    // The apex has its SOA.
    let m = ask("malla.", RecordType::SOA);
    assert_positive(&m);
    assert!(matches!(m.answers[0].data, RData::SOA(_)));
}

#[test]
fn refused_outside_the_domain() {
    for name in [".", "example.com.", "malla.example.com.", "svc.mallas."] {
        assert_error(&ask(name, RecordType::A), ResponseCode::Refused);
    }
    let mut chaos = request(7, "version.bind.", RecordType::TXT, None);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_error(
        &exchange_with(&chaos, UDP, &config()).1,
        ResponseCode::Refused,
    );
    assert_error(&ask("malla.", RecordType::AXFR), ResponseCode::Refused);
}

#[test]
fn formerr_notimp_and_silence() {
    let catalog = FakeCatalog::fixture();
    let cfg = config();
    let respond = |bytes: &[u8]| answer(bytes, UDP, &catalog, &cfg);
    let parse = |bytes: &[u8]| Message::from_vec(&respond(bytes)).unwrap();

    // A header promising a question that is not there.
    let mut bytes = request(0x1234, "a.svc.malla.", RecordType::A, None)
        .to_vec()
        .unwrap();
    bytes.truncate(14);
    let m = parse(&bytes);
    assert_eq!(m.metadata.id, 0x1234);
    assert_error(&m, ResponseCode::FormErr);
    // No question, two questions.
    let none = Message::new(9, MessageType::Query, OpCode::Query);
    assert_error(&parse(&none.to_vec().unwrap()), ResponseCode::FormErr);
    let mut two = request(9, "a.svc.malla.", RecordType::A, Some(1232));
    two.add_query(Query::query(
        Name::from_ascii("b.svc.malla.").unwrap(),
        RecordType::A,
    ));
    let m = parse(&two.to_vec().unwrap());
    assert_error(&m, ResponseCode::FormErr);
    assert!(m.edns.is_some(), "the OPT is kept on errors");
    // Opcodes other than QUERY.
    for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut m = request(3, "a.svc.malla.", RecordType::A, None);
        m.metadata.op_code = op;
        let r = parse(&m.to_vec().unwrap());
        assert_error(&r, ResponseCode::NotImp);
        assert_eq!(r.metadata.op_code, op);
    }
    // Nothing for less than a header, or for a response.
    assert!(respond(&[]).is_empty());
    assert!(respond(&[0; 11]).is_empty());
    let mut resp = request(3, "a.svc.malla.", RecordType::A, None);
    resp.metadata.message_type = MessageType::Response;
    assert!(respond(&resp.to_vec().unwrap()).is_empty());
}

#[test]
fn edns_is_answered_in_kind() {
    let (_, m) = exchange_with(
        &request(1, "shipping-quote.svc.malla.", RecordType::A, Some(4096)),
        UDP,
        &config(),
    );
    assert_positive(&m);
    let edns = m.edns.expect("an OPT answers an OPT");
    assert_eq!(edns.max_payload(), 1232);
    assert_eq!(edns.version(), 0);
    // Versions above 0: BADVERS (an extended code carried by the OPT).
    let mut req = request(1, "shipping-quote.svc.malla.", RecordType::A, Some(1232));
    req.edns.as_mut().unwrap().set_version(1);
    let (_, m) = exchange_with(&req, UDP, &config());
    // hickory names the extended code 16 BADSIG (it is also BADVERS).
    assert_eq!(u16::from(m.metadata.response_code), 16);
    assert!(m.answers.is_empty());
}

#[test]
fn udp_answers_are_truncated_to_fit_and_tcp_answers_are_whole() {
    let cfg = config();
    let many = "many.svc.malla.";
    let cases = [
        (request(1, many, RecordType::A, None), UDP, 512),
        (request(1, many, RecordType::A, Some(1000)), UDP, 1000),
        // The server's own limit caps what the client advertises.
        (request(1, many, RecordType::A, Some(4096)), UDP, 1232),
        // Below 512 counts as 512.
        (request(1, many, RecordType::A, Some(100)), UDP, 512),
        (
            request(1, many, RecordType::A, None),
            Transport::Udp { max_size: 100 },
            512,
        ),
        (request(1, many, RecordType::SRV, None), UDP, 512),
    ];
    for (req, transport, limit) in cases {
        let (bytes, m) = exchange_with(&req, transport, &cfg);
        assert!(bytes.len() <= limit, "{} > {limit}", bytes.len());
        assert!(
            bytes.len() > limit - 60,
            "as many as fit: {} of {limit}",
            bytes.len()
        );
        assert!(m.metadata.truncation);
        assert!(m.metadata.authoritative);
        assert!(!m.answers.is_empty() && m.answers.len() < 300);
        assert!(m.authorities.is_empty());
        assert!(m.additionals.is_empty(), "no glue in a truncated answer");
        assert_eq!(m.edns.is_some(), req.edns.is_some());
    }
    for qtype in [RecordType::A, RecordType::SRV] {
        let (_, m) = exchange_with(&request(1, many, qtype, None), Transport::Tcp, &cfg);
        assert_positive(&m);
        assert_eq!(m.answers.len(), 300);
        if qtype == RecordType::SRV {
            assert_eq!(m.additionals.len(), 300);
        }
    }
}

#[test]
fn additionals_that_do_not_fit_are_left_out_without_tc() {
    let (bytes, m) = exchange_with(
        &request(1, "nine.svc.malla.", RecordType::SRV, None),
        UDP,
        &config(),
    );
    assert!(bytes.len() <= 512);
    assert_positive(&m);
    assert_eq!(m.answers.len(), 9);
    assert!(m.additionals.len() < 9, "{}", m.additionals.len());
}

#[test]
fn tcp_answers_stop_at_65535_bytes() {
    let mut catalog = FakeCatalog::default();
    catalog.many("huge", 5000);
    let req = request(1, "huge.svc.malla.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let bytes = answer(&req, Transport::Tcp, &catalog, &config());
    let m = Message::from_vec(&bytes).unwrap();
    assert!(
        bytes.len() <= 65535 && bytes.len() > 65535 - 16,
        "{} {} {:?}",
        bytes.len(),
        m.answers.len(),
        &bytes[..80]
    );
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.metadata.truncation);
    assert!(m.answers.len() > 4000 && m.answers.len() < 5000);
}

#[test]
fn answers_rotate_with_the_query_id() {
    let first = |id| {
        let (_, m) = exchange_with(
            &request(id, "shipping-quote.svc.malla.", RecordType::A, None),
            UDP,
            &config(),
        );
        match &m.answers[0].data {
            RData::A(a) => a.0,
            other => panic!("{other:?}"),
        }
    };
    let firsts: BTreeSet<_> = (0..4).map(first).collect();
    assert_eq!(
        firsts.len(),
        4,
        "each of the 4 instances comes first for some id"
    );
}

#[test]
fn ttl_and_domain_come_from_the_config() {
    let cfg = DnsConfig {
        domain: "Mesh.Internal".into(),
        ttl: Duration::from_secs(30),
        ..config()
    };
    let (_, m) = exchange_with(
        &request(1, "shipping-quote.svc.mesh.internal.", RecordType::A, None),
        UDP,
        &cfg,
    );
    assert_positive(&m);
    assert!(m.answers.iter().all(|r| r.ttl == 30));
    let (_, m) = exchange_with(
        &request(1, "nope.svc.mesh.internal.", RecordType::A, None),
        UDP,
        &cfg,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let Some(Record {
        data: RData::SOA(soa),
        name,
        ttl,
        ..
    }) = m.authorities.first()
    else {
        panic!("SOA expected: {m}")
    };
    assert_eq!(
        (name.to_ascii().as_str(), *ttl, soa.minimum),
        ("mesh.internal.", 30, 30)
    );
    let (_, m) = exchange_with(
        &request(1, "shipping-quote.svc.malla.", RecordType::A, None),
        UDP,
        &cfg,
    );
    assert_error(&m, ResponseCode::Refused);
}

#[test]
fn an_invalid_domain_is_a_servfail_and_a_start_error() {
    for domain in ["", ".", "a..b", "under_score.", "-x."] {
        let cfg = DnsConfig {
            domain: domain.into(),
            ..config()
        };
        let err = super::Zone::new(&cfg).err().expect(domain);
        assert!(err.to_string().contains("invalid DNS domain"), "{err}");
        let req = request(1, "a.svc.malla.", RecordType::A, None)
            .to_vec()
            .unwrap();
        let m = Message::from_vec(&answer(&req, UDP, &FakeCatalog::fixture(), &cfg)).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
}

/// Whatever the bytes, `answer` returns nothing or a response to them that parses.
fn check_any(bytes: &[u8], catalog: &FakeCatalog, cfg: &DnsConfig) {
    for transport in [UDP, Transport::Tcp] {
        let out = answer(bytes, transport, catalog, cfg);
        if out.is_empty() {
            continue;
        }
        let m = Message::from_vec(&out)
            .unwrap_or_else(|e| panic!("unparsable answer {out:?} to {bytes:?}: {e}"));
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(&out[..2], &bytes[..2], "the id is echoed");
        if let Transport::Udp { max_size } = transport {
            assert!(out.len() <= usize::from(max_size));
        }
    }
}

#[test]
fn never_panics_on_random_truncated_or_mutated_packets() {
    let catalog = FakeCatalog::fixture();
    let cfg = config();
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    // Pure noise.
    for _ in 0..20_000 {
        let len = rng.below(600);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        check_any(&bytes, &catalog, &cfg);
    }
    // Valid queries, cut at every length and mutated a byte or a few at a time.
    let seeds: Vec<Vec<u8>> = [
        ("shipping-quote.svc.malla.", RecordType::A, None),
        (
            "eu-1.zone.prod.env.shipping-quote.svc.malla.",
            RecordType::SRV,
            Some(1232),
        ),
        ("_http._tcp.many.svc.malla.", RecordType::SRV, None),
        (
            "q-1.shipping-quote.svc.malla.",
            RecordType::AAAA,
            Some(4096),
        ),
        ("malla.", RecordType::SOA, None),
    ]
    .into_iter()
    .map(|(name, qtype, edns)| {
        request(rng.next_u64() as u16, name, qtype, edns)
            .to_vec()
            .unwrap()
    })
    .collect();
    for seed in &seeds {
        for len in 0..=seed.len() {
            check_any(&seed[..len], &catalog, &cfg);
        }
        for _ in 0..4_000 {
            let mut bytes = seed.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next_u64() as u8;
            }
            // Queries only, or the interesting paths are never reached.
            bytes[2] &= 0x7f;
            check_any(&bytes, &catalog, &cfg);
        }
    }
}
