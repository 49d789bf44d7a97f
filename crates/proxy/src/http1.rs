//! HTTP/1.1, owned end to end. TO BE WRITTEN.

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::server::ListenerCtx;

/// Size of the per-connection read buffers.
pub const READ_BUF: usize = 16 * 1024;

pub(crate) async fn serve(_stream: TcpStream, _buf: BytesMut, _peer: SocketAddr, _ctx: &Arc<ListenerCtx>) {}
