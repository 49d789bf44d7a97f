//! Upstreams that misbehave on purpose, on a raw `TcpListener`: each reads HTTP/1 request
//! heads and answers (or not) with exactly the bytes a test needs to provoke one failure.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{serve, ServerTask};

/// Largest request head a raw peer reads before giving up on the connection.
const MAX_HEAD: usize = 64 * 1024;

/// The head and first 10 bytes of a response that announces 1000.
pub const TRUNCATED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789";
/// Not an HTTP response at all.
pub const GARBAGE: &[u8] = b"\x00\x01\x02 this is not http \xff\r\n\r\n";

#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Answers [`TRUNCATED`], then closes.
    Truncate,
    /// Reads and never answers; the connection stays open until the client closes it.
    Silent,
    /// Reads the request head, then closes without a byte.
    CloseAfterRequest,
    /// Answers [`GARBAGE`] and keeps the connection open.
    Malformed,
    /// Answers every request head with these bytes, keeping the connection open.
    Canned(&'static [u8]),
}

/// A running misbehaving upstream; stops when dropped.
#[derive(Debug)]
pub struct RawPeer {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    _task: ServerTask,
}

impl RawPeer {
    /// Closes in the middle of a response: `content-length: 1000`, 10 bytes, close.
    pub fn truncating() -> Self {
        Self::start(Behaviour::Truncate)
    }

    /// Accepts and reads, never answers.
    pub fn silent() -> Self {
        Self::start(Behaviour::Silent)
    }

    /// Closes the connection right after reading the request head.
    pub fn close_after_request() -> Self {
        Self::start(Behaviour::CloseAfterRequest)
    }

    /// Answers with bytes that are not an HTTP response.
    pub fn malformed() -> Self {
        Self::start(Behaviour::Malformed)
    }

    /// Answers each request (heads only; send no request bodies) with `response`, keeping
    /// the connection open: for responses hyper would not write, such as HTTP/1 trailers
    /// to a request without `te: trailers`.
    pub fn canned(response: &'static [u8]) -> Self {
        Self::start(Behaviour::Canned(response))
    }

    fn start(behaviour: Behaviour) -> Self {
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (conns, reqs) = (connections.clone(), requests.clone());
        let (addr, task) = serve(move |stream| {
            conns.fetch_add(1, Ordering::SeqCst);
            connection(stream, behaviour, reqs.clone())
        });
        RawPeer {
            addr,
            connections,
            requests,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Complete request heads read so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn connection(mut stream: TcpStream, behaviour: Behaviour, requests: Arc<AtomicU64>) {
    if let Behaviour::Silent = behaviour {
        drain(&mut stream).await;
        return;
    }
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if !read_head(&mut stream, &mut buf).await {
            return;
        }
        requests.fetch_add(1, Ordering::SeqCst);
        match behaviour {
            Behaviour::Truncate => {
                let _ = stream.write_all(TRUNCATED).await;
                let _ = stream.shutdown().await;
                return;
            }
            Behaviour::CloseAfterRequest | Behaviour::Silent => return,
            Behaviour::Malformed => {
                let _ = stream.write_all(GARBAGE).await;
                drain(&mut stream).await;
                return;
            }
            Behaviour::Canned(response) => {
                if stream.write_all(response).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads until a complete request head is in `buf`, then removes it; false on EOF, error
/// or a head larger than [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream, buf: &mut BytesMut) -> bool {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let _ = buf.split_to(end + 4);
            return true;
        }
        if buf.len() > MAX_HEAD {
            return false;
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

/// Reads and discards until the client closes.
async fn drain(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}
