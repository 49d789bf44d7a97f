//! Opening connections to endpoints.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::error::ProxyError;

pub async fn connect(
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(ProxyError::from_connect(addr, e)),
        Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
    }
}
