//! Opaque TCP: pick an endpoint, connect, and copy bytes both ways until both sides close.

use std::sync::Arc;

use bytes::BytesMut;
use malla_core::policy::Outcome;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::debug;

use crate::{connect::connect, metrics::ConnectionTracker, upstream::Upstream};

pub async fn proxy(mut client: TcpStream, prefix: BytesMut, upstream: &Arc<Upstream>) {
    // A connect failure sent nothing, so another endpoint may be tried at once, up to the
    // policy's attempts (and within its retry budget).
    let resilience = upstream.resilience();
    let attempts = resilience.max_attempts;
    let mut failed: Option<Arc<crate::endpoint::Endpoint>> = None;
    let mut attempt = 0;
    let (in_flight, mut server) = loop {
        attempt += 1;
        let in_flight = match upstream.pick(failed.as_deref()) {
            Ok(f) => f,
            Err(e) => {
                upstream.error(&e);
                debug!(error = %e, "tcp: closing the client connection");
                return;
            }
        };
        match connect(in_flight.endpoint().addr, resilience.connect_timeout).await {
            Ok(s) => break (in_flight, s),
            Err(e) => {
                upstream.record(&in_flight, Outcome::ConnectFailure, false);
                in_flight.failed(502);
                if attempt < attempts && upstream.withdraw_retry(&resilience) {
                    failed = Some(in_flight.endpoint().clone());
                    continue;
                }
                upstream.error(&e);
                debug!(error = %e, "tcp: closing the client connection");
                return;
            }
        }
    };
    let endpoint = in_flight.endpoint().clone();
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
