//! A TCP echo server: whatever arrives goes back, until the client half-closes; then the
//! server closes too. Optionally it speaks first (a greeting, like SMTP or MySQL do).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{serve, ServerTask};

/// A running TCP echo server; stops when dropped.
#[derive(Debug)]
pub struct TcpPeer {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    _task: ServerTask,
}

impl TcpPeer {
    pub fn echo() -> Self {
        Self::start(None)
    }

    /// Sends `greeting` as soon as a client connects, then echoes.
    pub fn greeting(greeting: &'static [u8]) -> Self {
        Self::start(Some(greeting))
    }

    fn start(greeting: Option<&'static [u8]>) -> Self {
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (conns, total) = (connections.clone(), bytes.clone());
        let (addr, task) = serve(move |mut stream| {
            conns.fetch_add(1, Ordering::SeqCst);
            let total = total.clone();
            async move {
                if let Some(g) = greeting {
                    if stream.write_all(g).await.is_err() {
                        return;
                    }
                }
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total.fetch_add(n as u64, Ordering::SeqCst);
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown().await;
            }
        });
        TcpPeer {
            addr,
            connections,
            bytes,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Bytes received (and echoed) so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}
