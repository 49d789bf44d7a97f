//! Raw HTTP/1 over a `TcpStream`: write exactly the bytes a test chooses (malformed,
//! smuggling, pipelined) and read responses with a small, strict parser.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{within, TIMEOUT};

/// One client connection that speaks bytes.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    eof: bool,
}

/// A response as read off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Field names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body was read to the end its framing announced (false: the connection closed first).
    pub complete: bool,
    pub trailers: Vec<(String, String)>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn cause(&self) -> Option<&str> {
        self.header(malla_proxy::error::ERROR_HEADER)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = within("connect", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        RawConn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            eof: false,
        }
    }

    /// Writes all of `bytes` in one write call (pipelined requests arrive together).
    pub async fn send(&mut self, bytes: &[u8]) {
        // The proxy may answer and close before reading everything: a failed write is then
        // part of the behaviour under test, and the read side tells what happened.
        let _ = self.stream.write_all(bytes).await;
    }

    /// Half-closes the client side.
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Reads more bytes; false at EOF (or a reset, which is the same here). Panics after
    /// [`TIMEOUT`]: a proxy that neither answers nor closes is hanging.
    async fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        let read = within(
            "reading from the proxy",
            self.stream.read_buf(&mut self.buf),
        )
        .await;
        match read {
            Ok(0) | Err(_) => {
                self.eof = true;
                false
            }
            Ok(_) => true,
        }
    }

    /// The response to a `HEAD` request: a head without a body, whatever it announces.
    pub async fn head_response(&mut self) -> Option<RawResponse> {
        self.read_response(true).await
    }

    /// The next response, or `None` when the connection closed before a complete head.
    pub async fn response(&mut self) -> Option<RawResponse> {
        self.read_response(false).await
    }

    async fn read_response(&mut self, to_head: bool) -> Option<RawResponse> {
        loop {
            match parse_head(&self.buf) {
                Head::Complete(len, status, headers) => {
                    self.buf.advance(len);
                    if to_head {
                        return Some(RawResponse {
                            status,
                            headers,
                            body: Vec::new(),
                            complete: true,
                            trailers: Vec::new(),
                        });
                    }
                    return Some(self.body(status, headers).await);
                }
                Head::Invalid(e) => panic!(
                    "invalid response head ({e}): {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Head::Partial => {
                    if !self.fill().await {
                        return None;
                    }
                }
            }
        }
    }

    async fn body(&mut self, status: u16, headers: Vec<(String, String)>) -> RawResponse {
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let mut response = RawResponse {
            status,
            headers: headers.clone(),
            body: Vec::new(),
            complete: true,
            trailers: Vec::new(),
        };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return response;
        }
        let chunked =
            find("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            self.chunked(&mut response).await;
        } else if let Some(len) = find("content-length") {
            let len: usize = len.trim().parse().expect("a numeric content-length");
            while self.buf.len() < len {
                if !self.fill().await {
                    break;
                }
            }
            let n = len.min(self.buf.len());
            response.body = self.buf.split_to(n).to_vec();
            response.complete = n == len;
        } else {
            // Delimited by the end of the connection.
            while self.fill().await {}
            response.body = self.buf.split().to_vec();
        }
        response
    }

    async fn chunked(&mut self, response: &mut RawResponse) {
        loop {
            let Some(line) = self.line().await else {
                response.complete = false;
                return;
            };
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .unwrap_or_else(|_| panic!("invalid chunk size line {line:?}"));
            if size == 0 {
                // Trailers, up to an empty line.
                loop {
                    match self.line().await {
                        Some(l) if l.is_empty() => return,
                        Some(l) => {
                            if let Some((n, v)) = l.split_once(':') {
                                response
                                    .trailers
                                    .push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
                            }
                        }
                        None => {
                            response.complete = false;
                            return;
                        }
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if !self.fill().await {
                    let n = size.min(self.buf.len());
                    response.body.extend_from_slice(&self.buf.split_to(n));
                    response.complete = false;
                    return;
                }
            }
            response.body.extend_from_slice(&self.buf.split_to(size));
            self.buf.advance(2);
        }
    }

    /// One CRLF-terminated line, without the CRLF; `None` at EOF.
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(i);
                self.buf.advance(2);
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Waits until the server closes the connection, discarding anything it sends; false
    /// if it is still open after [`TIMEOUT`] (rather than panicking, so tests can say why).
    pub async fn closed(&mut self) -> bool {
        let wait = async {
            while !self.eof {
                self.buf.clear();
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => self.eof = true,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(TIMEOUT, wait).await.is_ok()
    }

    /// Bytes received but not yet parsed.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}

enum Head {
    Complete(usize, u16, Vec<(String, String)>),
    Partial,
    Invalid(httparse::Error),
}

fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let fields = response
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            Head::Complete(len, response.code.unwrap_or(0), fields)
        }
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(e) => Head::Invalid(e),
    }
}

/// Sends `bytes` on a new connection and reads one response (`None`: closed without one).
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (RawConn, Option<RawResponse>) {
    let mut conn = RawConn::connect(addr).await;
    conn.send(bytes).await;
    let response = conn.response().await;
    (conn, response)
}
