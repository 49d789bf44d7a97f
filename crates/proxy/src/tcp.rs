//! Opaque TCP: pick an endpoint, connect, and copy bytes both ways until both sides close.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::debug;

use crate::{connect::connect, metrics::ConnectionTracker, upstream::Upstream};

pub async fn proxy(mut client: TcpStream, prefix: BytesMut, upstream: &Arc<Upstream>) {
    let endpoint = match upstream.pick() {
        Ok(e) => e,
        Err(e) => {
            upstream.error(&e);
            debug!(error = %e, "tcp: closing the client connection");
            return;
        }
    };
    let in_flight = endpoint.start();
    let mut server = match connect(endpoint.addr, upstream.config.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            upstream.error(&e);
            in_flight.failed(502);
            debug!(error = %e, "tcp: closing the client connection");
            return;
        }
    };
    let _open = ConnectionTracker::open(&endpoint.metrics.open_connections);
    if !prefix.is_empty() {
        if let Err(e) = server.write_all(&prefix).await {
            debug!(error = %e, "tcp: upstream write failed");
            return;
        }
    }
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((up, down)) => debug!(up, down, endpoint = %endpoint.addr, "tcp stream closed"),
        Err(e) => debug!(error = %e, endpoint = %endpoint.addr, "tcp stream ended with an error"),
    }
}
