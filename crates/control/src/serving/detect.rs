//! Which HTTP version a new connection speaks, from its first bytes.
//!
//! HTTP/2 without TLS starts with a fixed preface (`PRI * HTTP/2.0...`, RFC 9113 §3.4):
//! anything else is HTTP/1. The bytes read to decide are handed back to the connection
//! ([`Prefixed`]), so nothing is lost. Done here rather than by hyper-util's automatic
//! builder because that one waits for the first bytes without a deadline: a client that
//! connects and sends nothing would hold its connection for ever.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), as gRPC clients speak it.
    Http2,
}

/// Reads until the protocol is known: the first byte that differs from the HTTP/2 preface
/// (HTTP/1), or the whole preface (HTTP/2). `None` when the client closed first.
pub async fn detect<R: AsyncRead + Unpin>(io: &mut R) -> io::Result<Option<(Protocol, Vec<u8>)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        // Never reads past the preface: what follows belongs to the protocol's parser.
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(None);
        }
        filled += n;
        if buf[..filled] != H2_PREFACE[..filled] {
            return Ok(Some((Protocol::Http1, buf[..filled].to_vec())));
        }
    }
    Ok(Some((Protocol::Http2, buf.to_vec())))
}

/// A connection whose first bytes were already read: reads return them first.
pub struct Prefixed<IO> {
    prefix: Vec<u8>,
    taken: usize,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Vec<u8>, io: IO) -> Self {
        Prefixed {
            prefix,
            taken: 0,
            io,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken < this.prefix.len() {
            let rest = &this.prefix[this.taken..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.taken += n;
            if this.taken == this.prefix.len() {
                this.prefix = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn detected(input: &[u8]) -> Option<(Protocol, Vec<u8>)> {
        let mut reader = input;
        detect(&mut reader).await.unwrap()
    }

    #[tokio::test]
    async fn http1_is_known_at_the_first_byte_that_differs_from_the_preface() {
        let (protocol, read) = detected(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        // A slice reader hands over all it has at once: everything up to the preface's length.
        assert!(b"GET / HTTP/1.1\r\n\r\n".starts_with(&read));
        let (protocol, _) = detected(b"PUT /v1/x HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
    }

    #[tokio::test]
    async fn http2_needs_the_whole_preface_and_reads_nothing_past_it() {
        let mut input = H2_PREFACE.to_vec();
        input.extend_from_slice(b"\x00\x00\x00\x04");
        let mut reader = &input[..];
        let (protocol, read) = detect(&mut reader).await.unwrap().unwrap();
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(read, H2_PREFACE);
        assert_eq!(reader, b"\x00\x00\x00\x04");
    }

    #[tokio::test]
    async fn a_client_that_closes_early_is_none() {
        assert_eq!(detected(b"").await, None);
        assert_eq!(detected(b"PRI * HTTP").await, None);
    }

    #[tokio::test]
    async fn the_prefix_is_read_back_before_the_rest() {
        let mut io = Prefixed::new(b"GE".to_vec(), &b"T /"[..]);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET /");
    }
}
