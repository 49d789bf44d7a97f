//! HTTP/2 (prior knowledge) and gRPC, on hyper and h2. TO BE WRITTEN.

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::server::ListenerCtx;

/// The one shared HTTP/2 connection to an endpoint.
#[derive(Default)]
pub(crate) struct EndpointClient {}

pub(crate) async fn serve(_stream: TcpStream, _prefix: BytesMut, _peer: SocketAddr, _ctx: &Arc<ListenerCtx>) {}
