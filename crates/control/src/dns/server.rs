//! The DNS listeners: UDP and TCP on one port, moving bytes to and from [`super::answer`].

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    task::{JoinHandle, JoinSet},
    time::timeout,
};

use super::{
    answer::{Transport, Zone},
    Catalog, DnsConfig, MAX_UDP_PAYLOAD,
};

/// How long a TCP connection may sit between queries, or take to send one or to take an
/// answer (RFC 7766 recommends idle timeouts of seconds).
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connections served at once; more wait in the listen backlog.
const MAX_TCP_CONNECTIONS: usize = 512;
/// A port-0 start retries this many times when TCP cannot have the port UDP got.
const BIND_ATTEMPTS: usize = 16;

/// A running DNS interface. Serving stops when it is dropped (or [`DnsServer::stop`]ped).
pub struct DnsServer {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP and TCP on config.addr (port 0 allowed: UDP and TCP then share the port UDP
    /// got; retry if TCP can't bind it) and serves until the returned handle is
    /// dropped/stopped.
    pub async fn start(config: DnsConfig, catalog: Arc<dyn Catalog>) -> anyhow::Result<DnsServer> {
        let zone = Arc::new(Zone::new(&config)?);
        let (udp, tcp) = bind(config.addr).await?;
        let addr = udp.local_addr()?;
        let udp = Arc::new(udp);
        let mut tasks = Vec::new();
        // A few receivers on one socket, so that answering one query never holds up the rest.
        let receivers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
        for _ in 0..receivers {
            tasks.push(tokio::spawn(serve_udp(
                udp.clone(),
                zone.clone(),
                catalog.clone(),
            )));
        }
        tasks.push(tokio::spawn(serve_tcp(tcp, zone, catalog)));
        tracing::info!(%addr, domain = %config.domain, "DNS interface listening (UDP and TCP)");
        Ok(DnsServer { addr, tasks })
    }

    /// The address served, UDP and TCP.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits until the sockets are closed.
    pub async fn stop(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let context = |proto: &str, at: SocketAddr, e: io::Error| {
        anyhow::anyhow!(
            "cannot bind the DNS interface to {proto} {at}: {e}; choose a free address or \
             port (or port 0 for any)"
        )
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|e| context("UDP", addr, e))?;
        let at = udp.local_addr()?;
        match TcpListener::bind(at).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // Someone holds the TCP side of the port UDP picked: pick another.
            Err(e) if addr.port() == 0 && attempt < BIND_ATTEMPTS => {
                tracing::debug!(%at, error = %e, "TCP port taken, retrying DNS bind");
            }
            Err(e) => return Err(context("TCP", at, e)),
        }
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, zone: Arc<Zone>, catalog: Arc<dyn Catalog>) {
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    let transport = Transport::Udp {
        max_size: MAX_UDP_PAYLOAD,
    };
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                // ICMP errors from earlier sends surface here on some systems; keep serving.
                tracing::debug!(error = %e, "DNS UDP receive failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let response = zone.answer(&buf[..len], transport, catalog.as_ref());
        if response.is_empty() {
            continue;
        }
        if let Err(e) = socket.send_to(&response, peer).await {
            tracing::debug!(%peer, error = %e, "DNS UDP send failed");
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Zone>, catalog: Arc<dyn Catalog>) {
    // Connections live in this set, so aborting this task ends them all.
    let mut connections = JoinSet::new();
    let permits = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        match accepted {
            Ok((stream, peer)) => {
                let zone = zone.clone();
                let catalog = catalog.clone();
                connections.spawn(async move {
                    if let Err(e) = serve_connection(stream, &zone, catalog.as_ref()).await {
                        tracing::debug!(%peer, error = %e, "DNS TCP connection ended");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while connections.try_join_next().is_some() {}
    }
}

/// Length-prefixed queries in, answers out, in order, until the client closes or idles.
async fn serve_connection(
    mut stream: TcpStream,
    zone: &Zone,
    catalog: &dyn Catalog,
) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match timeout(TCP_TIMEOUT, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()), // idle
        }
        // At most 65,535 bytes by construction of the prefix.
        buf.resize(usize::from(u16::from_be_bytes(len)), 0);
        timeout(TCP_TIMEOUT, stream.read_exact(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query not received in time"))??;
        let response = zone.answer(&buf, Transport::Tcp, catalog);
        if response.is_empty() {
            continue;
        }
        let Ok(len) = u16::try_from(response.len()) else {
            continue;
        };
        let mut framed = Vec::with_capacity(response.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&response);
        timeout(TCP_TIMEOUT, stream.write_all(&framed))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "answer not taken in time"))??;
    }
}

#[cfg(test)]
mod tests;
