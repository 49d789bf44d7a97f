//! A WebSocket echo server (tokio-tungstenite): every text or binary message comes back
//! as sent. The handshake response carries `x-peer: NAME`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{
    handshake::server::{Request, Response},
    http::HeaderValue,
    Message,
};

use super::{serve, ServerTask};

/// A running WebSocket echo server; stops when dropped.
#[derive(Debug)]
pub struct WebSocketPeer {
    addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    _task: ServerTask,
}

impl WebSocketPeer {
    pub fn start(name: &str) -> Self {
        let handshakes = Arc::new(AtomicU64::new(0));
        let counter = handshakes.clone();
        let name = HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("ws"));
        let (addr, task) = serve(move |stream| {
            let counter = counter.clone();
            let name = name.clone();
            async move {
                // The callback's signature is tungstenite's.
                #[allow(clippy::result_large_err)]
                let add_name = |_: &Request, mut response: Response| {
                    response.headers_mut().insert("x-peer", name);
                    Ok(response)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, add_name).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                while let Some(Ok(message)) = ws.next().await {
                    let echo = match message {
                        Message::Text(_) | Message::Binary(_) => message,
                        Message::Close(_) => break,
                        // Pings are answered by tungstenite itself.
                        _ => continue,
                    };
                    if ws.send(echo).await.is_err() {
                        break;
                    }
                }
                let _ = ws.close(None).await;
            }
        });
        WebSocketPeer {
            addr,
            handshakes,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Completed WebSocket handshakes.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }
}
