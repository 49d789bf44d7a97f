//! A small UDP load generator for the DNS interface: a few sockets, each keeping a window of
//! queries in flight (a new query for every answer), for a fixed time.

use std::{net::SocketAddr, time::Duration};

use tokio::{net::UdpSocket, time::Instant};

/// Queries each socket keeps in flight.
const WINDOW: usize = 8;
/// An answer not back within this is counted lost and its slot refilled.
const LOST_AFTER: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, Default)]
pub struct DnsLoad {
    pub name: String,
    pub instances: usize,
    pub seconds: f64,
    pub answered: u64,
    pub lost: u64,
    /// From the last answer: records in the answer section, size, TC bit, rcode.
    pub answer_records: u16,
    pub answer_bytes: usize,
    pub truncated: bool,
    pub rcode: u8,
}

impl DnsLoad {
    pub fn qps(&self) -> f64 {
        self.answered as f64 / self.seconds
    }
}

/// An A query for `name` (no EDNS: a 512-byte UDP answer at most).
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]); // flags, QD=1, AN, NS, AR
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).unwrap_or(63));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// Sends one query; a failed send shows as a lost answer.
async fn send(socket: &UdpSocket, id: u16, name: &str) {
    let _ = socket.send(&query(id, name)).await;
}

/// Sends A queries for `name` from `sockets` sockets for `seconds`.
pub async fn load(
    server: SocketAddr,
    name: &str,
    instances: usize,
    sockets: usize,
    seconds: f64,
) -> anyhow::Result<DnsLoad> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for s in 0..sockets {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(server).await?;
        let name = name.to_string();
        tasks.push(tokio::spawn(async move {
            let mut result = DnsLoad::default();
            let mut id = u16::try_from(s).unwrap_or(0).wrapping_mul(10_000);
            let mut buf = vec![0u8; 65_535];
            for _ in 0..WINDOW {
                id = id.wrapping_add(1);
                send(&socket, id, &name).await;
            }
            while Instant::now() < deadline {
                match tokio::time::timeout(LOST_AFTER, socket.recv(&mut buf)).await {
                    Ok(Ok(len)) if len >= 12 => {
                        result.answered += 1;
                        result.answer_bytes = len;
                        result.truncated = buf[2] & 0x02 != 0;
                        result.rcode = buf[3] & 0x0f;
                        result.answer_records = u16::from_be_bytes([buf[6], buf[7]]);
                        id = id.wrapping_add(1);
                        send(&socket, id, &name).await;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // The whole window went quiet: count it lost and refill it.
                        result.lost += WINDOW as u64;
                        for _ in 0..WINDOW {
                            id = id.wrapping_add(1);
                            send(&socket, id, &name).await;
                        }
                    }
                }
            }
            result
        }));
    }
    let mut total = DnsLoad {
        name: name.to_string(),
        instances,
        seconds,
        ..DnsLoad::default()
    };
    for task in tasks {
        let r = task.await?;
        total.answered += r.answered;
        total.lost += r.lost;
        if r.answer_bytes > 0 {
            total.answer_records = r.answer_records;
            total.answer_bytes = r.answer_bytes;
            total.truncated = r.truncated;
            total.rcode = r.rcode;
        }
    }
    Ok(total)
}
