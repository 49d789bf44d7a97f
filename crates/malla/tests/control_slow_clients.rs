//! Slow clients against the real `malla control`: 1,500 connections that send half a
//! request head, half a TLS handshake (or nothing) are all closed by the server after its
//! head timeout, the process's memory stays bounded (its RSS read from `/proc`), and it
//! keeps serving.
//! Before the head timeout existed they stayed open for minutes (43 → 82 MB).

// Test code: an `unwrap` here is an assertion.
#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
};

use malla_tests::{
    client::within,
    control::{api::Api, TempDir},
    eventually,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const SLOW_CLIENTS: usize = 1_500;
const HEAD_TIMEOUT: &str = "2s";

/// A `malla control` process; killed when dropped.
struct ControlProcess {
    child: Child,
    api: Api,
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControlProcess {
    /// Resident memory, in KiB (`VmRSS` in `/proc/PID/status`).
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

async fn start(dir: &TempDir) -> ControlProcess {
    for _attempt in 0..5 {
        let addr = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_malla"))
            .arg("control")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--addr", &addr.to_string()])
            .args(["--grpc-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0"])
            .args(["--head-timeout", HEAD_TIMEOUT, "--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start malla control");
        let mut process = ControlProcess {
            child,
            api: Api::new(addr),
        };
        for _ in 0..eventually::TRIES {
            // Over TLS with its trust bundle, and its operator token: both written before
            // the APIs listen.
            let api = process.api.with_credentials_of(dir.path());
            if let Ok(reply) = api
                .try_request(http::Method::GET, "/ready", bytes::Bytes::new())
                .await
            {
                if reply.status == 200 {
                    process.api = api;
                    return process;
                }
            }
            if process.child.try_wait().unwrap().is_some() {
                break;
            }
            eventually::pause().await;
        }
    }
    panic!("malla control never became ready");
}

/// Opens the slow clients: each sends part of a request head, then nothing more.
async fn slow_clients(addr: SocketAddr) -> Vec<TcpStream> {
    let starts: [&[u8]; 5] = [
        b"",
        b"GET /v1/services HTTP/1.1\r\nhost: x\r\nx-padding: ",
        b"PUT /v1/services/orders/instances/o-1 HTTP/1.1\r\nhost: x\r\ncontent-length: 40\r\n",
        b"PRI * HTTP/2.0\r\n",
        // A TLS record announcing a 512-byte ClientHello, and its first bytes.
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ];
    let mut clients = Vec::with_capacity(SLOW_CLIENTS);
    for i in 0..SLOW_CLIENTS {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(starts[i % starts.len()]).await.unwrap();
        clients.push(stream);
    }
    clients
}

/// Waits until the server closed every client (EOF or reset).
async fn all_closed(clients: Vec<TcpStream>) {
    within("the server closing every slow client", async {
        for mut stream in clients {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_after_the_head_timeout_and_memory_stays_bounded() {
    let dir = TempDir::new("slow-clients");
    let control = start(&dir).await;
    let addr = control.api.addr();
    let before = control.rss_kib();

    // Three rounds: memory must not grow round after round.
    for round in 1..=3 {
        let clients = slow_clients(addr).await;
        // Served meanwhile.
        assert_eq!(control.api.get("/v1/status").await.status, 200);
        let open = control.rss_kib();
        all_closed(clients).await;
        eprintln!(
            "round {round}: RSS {before} KiB before, {open} KiB with {SLOW_CLIENTS} slow clients"
        );
        // Bounded: 1,500 half-open connections cost well under 40 MiB (each holds a task
        // and a read buffer of a few KiB until its head timeout).
        assert!(
            open < before + 40 * 1024,
            "round {round}: RSS grew from {before} to {open} KiB with {SLOW_CLIENTS} slow clients"
        );
    }
    assert_eq!(control.api.get("/v1/status").await.status, 200);
}
