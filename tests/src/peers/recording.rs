//! An upstream that records every byte it receives, connection by connection, and answers
//! each complete request it reads with `200` (keep-alive, `content-length: 2`, no `Date`):
//! the far end of the request-smuggling tests, whose recordings go to an independent parser
//! (h11) to see what malla really forwarded.
//!
//! It frames requests itself (httparse for heads, `Content-Length`, chunked bodies) only to
//! know when to answer; once bytes do not parse it stops answering and keeps recording. It
//! closes after answering a request that asks for it (`Connection: close`, HTTP/1.0 without
//! keep-alive), as a real server does.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::{Buf, BytesMut};
use malla_proxy::http1::body::ChunkedDecoder;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

use super::{serve, ServerTask};

/// What one connection brought.
#[derive(Debug, Clone)]
pub struct ConnLog {
    /// The client's (the proxy's) end of the connection.
    pub peer: Option<SocketAddr>,
    /// Every byte received, in order.
    pub bytes: Vec<u8>,
    /// Requests answered.
    pub answered: usize,
    /// The connection has closed (the peer saw EOF, or a read failed).
    pub closed: bool,
    /// Bytes arrived that the peer could not frame as requests.
    pub unframed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    conns: Mutex<BTreeMap<u64, ConnLog>>,
    next_id: AtomicU64,
}

impl Shared {
    fn update(&self, id: u64, change: impl FnOnce(&mut ConnLog)) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = conns.get_mut(&id) {
            change(log);
        }
    }
}

/// A running recording upstream; stops when dropped.
#[derive(Debug)]
pub struct RecordingPeer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    changed: watch::Sender<u64>,
    _task: ServerTask,
}

impl RecordingPeer {
    pub fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let changed = watch::Sender::new(0u64);
        let (s, c) = (shared.clone(), changed.clone());
        let (addr, task) = serve(move |stream| connection(stream, s.clone(), c.clone()));
        RecordingPeer {
            addr,
            shared,
            changed,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until every connection made to the peer before this call has been accepted
    /// and closed, then hands over their logs (oldest first) and forgets them. A sentinel
    /// connection made here is the barrier: the accept queue is first in, first out, so
    /// once it is accepted, every earlier connection has been too. `false` with the logs:
    /// some connection was still open after `timeout`.
    pub async fn settle(&self, timeout: Duration) -> (Vec<ConnLog>, bool) {
        let sentinel = TcpStream::connect(self.addr).await.ok();
        let marker = sentinel.as_ref().and_then(|s| s.local_addr().ok());
        drop(sentinel);
        let mut rx = self.changed.subscribe();
        let done = |_: &u64| {
            let conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.values().any(|c| c.peer == marker) && conns.values().all(|c| c.closed)
        };
        let settled = tokio::time::timeout(timeout, rx.wait_for(done))
            .await
            .is_ok_and(|r| r.is_ok());
        let mut conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        let logs = std::mem::take(&mut *conns)
            .into_values()
            .filter(|c| c.peer != marker)
            .collect();
        (logs, settled)
    }
}

async fn connection(mut stream: TcpStream, shared: Arc<Shared>, changed: watch::Sender<u64>) {
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let log = ConnLog {
        peer: stream.peer_addr().ok(),
        bytes: Vec::new(),
        answered: 0,
        closed: false,
        unframed: false,
    };
    shared
        .conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, log);
    changed.send_modify(|n| *n += 1);
    let mut buf = BytesMut::with_capacity(8192);
    let mut framing = true;
    let mut answered = 0usize;
    loop {
        let before = buf.len();
        let read = stream.read_buf(&mut buf).await;
        let n = match read {
            Ok(0) | Err(_) => {
                shared.update(id, |log| log.closed = true);
                changed.send_modify(|n| *n += 1);
                return;
            }
            Ok(n) => n,
        };
        let fresh = buf[before..before + n].to_vec();
        shared.update(id, |log| log.bytes.extend_from_slice(&fresh));
        while framing {
            match next_request(&buf) {
                Framed::Need => break,
                Framed::Invalid => {
                    framing = false;
                    shared.update(id, |log| log.unframed = true);
                }
                Framed::Request { len, head, close } => {
                    buf.advance(len);
                    answered += 1;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-recorded: {answered}\r\n{}\r\n",
                        if close { "connection: close\r\n" } else { "" }
                    );
                    let mut bytes = response.into_bytes();
                    if !head {
                        bytes.extend_from_slice(b"ok");
                    }
                    let _ = stream.write_all(&bytes).await;
                    shared.update(id, |log| log.answered = answered);
                    if close {
                        // Stop answering; keep recording whatever still comes until EOF.
                        let _ = stream.shutdown().await;
                        framing = false;
                    }
                }
            }
        }
        if !framing {
            buf.clear();
        }
        changed.send_modify(|n| *n += 1);
    }
}

enum Framed {
    Need,
    Invalid,
    Request { len: usize, head: bool, close: bool },
}

/// The next complete request at the start of `buf`, framed the plain way.
fn next_request(buf: &[u8]) -> Framed {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Framed::Need,
        Err(_) => return Framed::Invalid,
    };
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let (mut close, mut keep_alive) = (false, false);
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.trim().parse::<usize>() {
                Ok(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => return Framed::Invalid,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if value.trim() != "chunked" || chunked {
                return Framed::Invalid;
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= value.split(',').any(|t| t.trim() == "close");
            keep_alive |= value.split(',').any(|t| t.trim() == "keep-alive");
        }
    }
    if chunked && length.is_some() {
        return Framed::Invalid;
    }
    let body = if chunked {
        let mut decoder = ChunkedDecoder::default();
        match decoder.advance(&buf[head_len..]) {
            Ok(used) if decoder.is_done() => used,
            Ok(_) => return Framed::Need,
            Err(_) => return Framed::Invalid,
        }
    } else {
        length.unwrap_or(0)
    };
    if buf.len() < head_len + body {
        return Framed::Need;
    }
    let http10 = req.version == Some(0);
    Framed::Request {
        len: head_len + body,
        head: req.method == Some("HEAD"),
        close: close || (http10 && !keep_alive),
    }
}
