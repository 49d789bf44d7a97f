//! The server as clients see it: the real `dig` over UDP and TCP, raw TCP framing, stop.

use std::{net::SocketAddr, process::Command, sync::Arc};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

use crate::dns::{testing::FakeCatalog, DnsConfig, DnsServer};

async fn start(catalog: FakeCatalog) -> DnsServer {
    let config = DnsConfig::new("127.0.0.1:0".parse().unwrap());
    DnsServer::start(config, Arc::new(catalog)).await.unwrap()
}

/// Runs `dig @127.0.0.1 -p PORT ARGS` and returns its standard output.
async fn dig(addr: SocketAddr, args: &[&str]) -> String {
    let mut command = Command::new("dig");
    command
        .arg(format!("@{}", addr.ip()))
        .args(["-p", &addr.port().to_string(), "+time=5", "+tries=1"])
        .args(args);
    let shown = format!("{command:?}");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run dig ({e}): the DNS tests query the server with the real `dig`; \
                 run scripts/test, which installs it (Debian/Ubuntu package dnsutils: \
                 apt-get install dnsutils)"
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{shown} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_queries_over_udp_and_tcp() {
    let server = start(FakeCatalog::fixture()).await;
    let addr = server.local_addr();
    let a = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"];

    let out = dig(addr, &["+short", "shipping-quote.svc.malla", "A"]).await;
    assert_eq!(sorted_lines(&out), a, "{out}");
    let out = dig(addr, &["+tcp", "+short", "shipping-quote.svc.malla", "A"]).await;
    assert_eq!(sorted_lines(&out), a, "{out}");
    let out = dig(
        addr,
        &["+short", "eu-1.zone.prod.env.shipping-quote.svc.malla", "A"],
    )
    .await;
    assert_eq!(sorted_lines(&out), ["10.0.0.1", "10.0.0.4"], "{out}");
    let out = dig(addr, &["+short", "ledger.svc.malla", "AAAA"]).await;
    assert_eq!(sorted_lines(&out), ["fd00::1", "fd00::2"], "{out}");

    let out = dig(addr, &["+short", "shipping-quote.svc.malla", "SRV"]).await;
    assert_eq!(
        sorted_lines(&out),
        [
            "0 1 8080 q-1.shipping-quote.svc.malla.",
            "0 1 8080 q-2.shipping-quote.svc.malla.",
            "0 1 8080 q-3.shipping-quote.svc.malla.",
            "0 1 9090 10-0-0-4.shipping-quote.svc.malla.",
        ],
        "{out}"
    );
    // The full SRV answer carries the targets' addresses.
    let out = dig(addr, &["_http._tcp.shipping-quote.svc.malla", "SRV"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("flags: qr aa rd;"), "{out}");
    assert!(
        out.contains("ANSWER: 4, AUTHORITY: 0, ADDITIONAL: 5"),
        "{out}"
    );
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        words(&out).contains("q-1.shipping-quote.svc.malla. 5 IN A 10.0.0.1"),
        "{out}"
    );
    let out = dig(addr, &["+short", "10-0-0-4.shipping-quote.svc.malla"]).await;
    assert_eq!(out.trim(), "10.0.0.4");

    let out = dig(addr, &["nope.svc.malla", "A"]).await;
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains("flags: qr aa rd;"), "{out}");
    assert!(
        words(&out).contains("malla. 5 IN SOA malla. hostmaster.malla. 1 3600 600 86400 5"),
        "{out}"
    );
    let out = dig(addr, &["+tcp", "shipping-quote.svc.malla", "AAAA"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("ANSWER: 0, AUTHORITY: 1"), "{out}");
    let out = dig(addr, &["example.com", "A"]).await;
    assert!(out.contains("status: REFUSED"), "{out}");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_sees_truncation_over_udp_and_everything_over_tcp() {
    let server = start(FakeCatalog::fixture()).await;
    let addr = server.local_addr();

    // Plain UDP without EDNS: 512 bytes, TC set (+ignore: do not retry over TCP).
    let out = dig(addr, &["+noedns", "+ignore", "many.svc.malla", "A"]).await;
    assert!(out.contains("flags: qr aa tc rd;"), "{out}");
    let answers = count_after(&out, "ANSWER: ");
    assert!(answers > 0 && answers < 300, "{answers}: {out}");
    let size = count_after(&out, "MSG SIZE  rcvd: ");
    assert!(size <= 512, "{size}");
    // With EDNS (dig advertises 1232): more fit, still truncated.
    let out = dig(addr, &["+ignore", "many.svc.malla", "A"]).await;
    assert!(out.contains("flags: qr aa tc rd;"), "{out}");
    assert!(count_after(&out, "ANSWER: ") > answers, "{out}");
    assert!(out.contains("; EDNS: version: 0"), "{out}");
    // Over TCP: all 300; and dig by itself retries over TCP when it sees TC.
    let out = dig(addr, &["+tcp", "+short", "many.svc.malla", "A"]).await;
    assert_eq!(out.lines().count(), 300, "{out}");
    let out = dig(addr, &["+short", "many.svc.malla", "A"]).await;
    assert_eq!(out.lines().count(), 300, "{out}");
    let out = dig(addr, &["+tcp", "+short", "many.svc.malla", "SRV"]).await;
    assert_eq!(out.lines().count(), 300, "{out}");

    server.stop().await;
}

/// The number after `label` in dig's output.
fn count_after(out: &str, label: &str) -> usize {
    let at = out
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {out}"))
        + label.len();
    out[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

#[tokio::test]
async fn tcp_serves_several_queries_per_connection_in_order() {
    let server = start(FakeCatalog::fixture()).await;
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    // Two queries in one write (pipelined), then read both answers.
    let mut out = Vec::new();
    for (id, name) in [(1, "shipping-quote.svc.malla."), (2, "nope.svc.malla.")] {
        let q = query(id, name, RecordType::A);
        out.extend_from_slice(&(q.len() as u16).to_be_bytes());
        out.extend_from_slice(&q);
    }
    stream.write_all(&out).await.unwrap();
    for (id, rcode) in [(1, ResponseCode::NoError), (2, ResponseCode::NXDomain)] {
        let len = stream.read_u16().await.unwrap();
        let mut buf = vec![0; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (id, rcode));
    }
    // Garbage gets FORMERR, and the connection still serves.
    stream
        .write_all(&[0, 13, 0xab, 0xcd, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff])
        .await
        .unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut buf = vec![0; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    let m = Message::from_vec(&buf).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0xabcd, ResponseCode::FormErr)
    );
    server.stop().await;
}

#[tokio::test]
async fn udp_and_tcp_share_the_port_and_stop_closes_both() {
    let server = start(FakeCatalog::fixture()).await;
    let addr = server.local_addr();
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(
        &query(5, "q-1.shipping-quote.svc.malla.", RecordType::A),
        addr,
    )
    .await
    .unwrap();
    let mut buf = [0; 512];
    let (len, from) = udp.recv_from(&mut buf).await.unwrap();
    assert_eq!(from, addr);
    assert_eq!(Message::from_vec(&buf[..len]).unwrap().answers.len(), 1);
    TcpStream::connect(addr).await.unwrap();

    server.stop().await;
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The port is free again, UDP included.
    UdpSocket::bind(addr).await.unwrap();
}

#[tokio::test]
async fn a_taken_port_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = DnsConfig::new(taken.local_addr().unwrap());
    let err = DnsServer::start(config, Arc::new(FakeCatalog::fixture()))
        .await
        .err()
        .expect("the TCP port is taken");
    let msg = err.to_string();
    assert!(
        msg.contains("cannot bind the DNS interface to TCP"),
        "{msg}"
    );
    assert!(msg.contains("choose a free address"), "{msg}");
}

/// DNS queries per second with 10,000 instances, for the benchmarks:
/// `cargo test --release -p malla-control dns_queries_per_second -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a test"]
async fn dns_queries_per_second() {
    use tokio::time::{Duration, Instant};

    use crate::dns::{answer, Catalog, Transport};

    let shapes = [
        ("1 service x 10,000", 1, 10_000),
        ("100 services x 100", 100, 100),
    ];
    for (shape, services, per_service) in shapes {
        let mut catalog = FakeCatalog::default();
        for s in 0..services {
            catalog.many(&format!("s{s}"), per_service);
        }
        let names: Vec<String> = (0..services)
            .flat_map(|s| {
                [
                    format!("s{s}.svc.malla."),
                    format!("prod.env.s{s}.svc.malla."),
                ]
            })
            .collect();

        // The catalog alone: what the `Catalog` contract (instances by value) costs.
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < Duration::from_secs(1) {
            let service = malla_core::ServiceName::new(&format!("s{}", n % services as u64));
            let got = catalog.instances(
                &service.unwrap(),
                &malla_core::Selector::all(),
                super::super::Pick::ALL,
            );
            assert!(got.is_some());
            n += 1;
        }
        let per_sec = n as f64 / started.elapsed().as_secs_f64();
        eprintln!("{shape}: the fake catalog's instances() alone: {per_sec:.0} calls/s");

        // The pure function on one core.
        let config = DnsConfig::new("127.0.0.1:0".parse().unwrap());
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < Duration::from_secs(2) {
            let q = query(n as u16, &names[n as usize % names.len()], RecordType::A);
            let r = answer(&q, Transport::Udp { max_size: 1232 }, &catalog, &config);
            assert!(!r.is_empty());
            n += 1;
        }
        let per_sec = n as f64 / started.elapsed().as_secs_f64();
        eprintln!("{shape}: answer(): {per_sec:.0} queries/s on one core");

        // Over UDP, 8 clients each with one query in flight.
        let server = start(catalog).await;
        let addr = server.local_addr();
        let started = Instant::now();
        let mut clients = Vec::new();
        for c in 0..8u16 {
            let names = names.clone();
            clients.push(tokio::spawn(async move {
                let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let mut buf = [0; 2048];
                let mut n = 0u64;
                while started.elapsed() < Duration::from_secs(3) {
                    let name = &names[(n as usize + usize::from(c)) % names.len()];
                    udp.send_to(&query(n as u16, name, RecordType::A), addr)
                        .await
                        .unwrap();
                    udp.recv_from(&mut buf).await.unwrap();
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for c in clients {
            total += c.await.unwrap();
        }
        let per_sec = total as f64 / started.elapsed().as_secs_f64();
        eprintln!("{shape}: UDP server: {per_sec:.0} queries/s (8 clients, 1 in flight each)");
        server.stop().await;
    }
}
