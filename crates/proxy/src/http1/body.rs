//! Relaying HTTP/1 bodies with bounded memory.
//!
//! Bodies are relayed as they arrive through the connection's fixed-size read buffer:
//! a body of any size costs the same few KiB. Chunked bodies are relayed *verbatim*
//! (extensions and trailers included, so HTTP/1 trailers survive) while a strict decoder
//! walks the framing to find where the message ends: hex sizes without overflow, CRLF
//! everywhere (a bare LF is rejected, since the next hop might read it differently),
//! bounded extension and trailer sizes.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::head::BodyKind;

/// Longest chunk-size line (with extensions) and longest trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the sender closed the connection before the body ended")]
    Truncated,
    #[error("reading the body failed: {0}")]
    Read(std::io::Error),
    #[error("writing the body failed: {0}")]
    Write(std::io::Error),
    #[error("invalid chunked encoding: {0}")]
    Chunked(&'static str),
}

/// Reads more bytes into `buf`, reclaiming consumed space so it never grows past
/// `READ_BUF` plus what is unconsumed.
pub async fn fill<R: AsyncRead + Unpin>(src: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(super::READ_BUF);
    }
    src.read_buf(buf).await
}

/// Relays one body of `kind` from `src` (with what is already buffered in `buf`) to `dst`.
/// On success the body's bytes are consumed from `buf`; what follows stays there.
pub async fn relay<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    kind: BodyKind,
) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match kind {
        BodyKind::Empty => Ok(()),
        BodyKind::Length(n) => relay_length(src, buf, dst, n).await,
        BodyKind::Chunked => relay_chunked(src, buf, dst).await,
        BodyKind::UntilClose => relay_until_close(src, buf, dst).await,
    }
}

async fn relay_length<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    mut remaining: u64,
) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let take = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if take > 0 {
            dst.write_all(&buf[..take])
                .await
                .map_err(BodyError::Write)?;
            buf.advance(take);
            remaining -= take as u64;
        }
        if remaining == 0 {
            return Ok(());
        }
        match fill(src, buf).await {
            Ok(0) => return Err(BodyError::Truncated),
            Ok(_) => {}
            Err(e) => return Err(BodyError::Read(e)),
        }
    }
}

async fn relay_until_close<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if !buf.is_empty() {
            dst.write_all(buf).await.map_err(BodyError::Write)?;
            buf.clear();
        }
        match fill(src, buf).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(BodyError::Read(e)),
        }
    }
}

async fn relay_chunked<R, W>(src: &mut R, buf: &mut BytesMut, dst: &mut W) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut decoder = ChunkedDecoder::default();
    loop {
        let used = decoder.advance(buf)?;
        if used > 0 {
            dst.write_all(&buf[..used])
                .await
                .map_err(BodyError::Write)?;
            buf.advance(used);
        }
        if decoder.is_done() {
            return Ok(());
        }
        match fill(src, buf).await {
            Ok(0) => return Err(BodyError::Truncated),
            Ok(_) => {}
            Err(e) => return Err(BodyError::Read(e)),
        }
    }
}

/// Where the decoder is in the chunked framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the digits: whitespace or an extension, up to CR.
    SizeRest,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf {
        empty: bool,
    },
    Done,
}

/// Finds the end of a chunked body without changing a byte of it.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    /// The size read from the current chunk-size line.
    pending_size: u64,
    line_len: usize,
    trailer_len: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            pending_size: 0,
            line_len: 0,
            trailer_len: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes a prefix of `input` that belongs to the body and returns its length.
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, BodyError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Size { value, digits } => match hex(b) {
                    Some(d) => {
                        if digits >= 16 {
                            return Err(BodyError::Chunked("chunk size too large"));
                        }
                        State::Size {
                            value: value << 4 | u64::from(d),
                            digits: digits + 1,
                        }
                    }
                    None if digits == 0 => return Err(BodyError::Chunked("missing chunk size")),
                    None => {
                        self.line_len = 0;
                        let next = self.size_rest(b)?;
                        self.pending_size = value;
                        next
                    }
                },
                State::SizeRest => self.size_rest(b)?,
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(BodyError::Chunked("chunk size line must end with CRLF"));
                    }
                    match self.pending_size {
                        0 => State::TrailerStart,
                        n => State::Data(n),
                    }
                }
                State::Data(n) => {
                    let take = usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(BodyError::Chunked("chunk data must be followed by CRLF"));
                    }
                    State::DataLf
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(BodyError::Chunked("chunk data must be followed by CRLF"));
                    }
                    State::Size {
                        value: 0,
                        digits: 0,
                    }
                }
                State::TrailerStart => match b {
                    b'\r' => State::TrailerLf { empty: true },
                    b'\n' => return Err(BodyError::Chunked("bare LF in trailers")),
                    _ => {
                        self.count_trailer()?;
                        State::TrailerLine
                    }
                },
                State::TrailerLine => {
                    self.count_trailer()?;
                    match b {
                        b'\r' => State::TrailerLf { empty: false },
                        b'\n' => return Err(BodyError::Chunked("bare LF in trailers")),
                        _ => State::TrailerLine,
                    }
                }
                State::TrailerLf { empty } => {
                    if b != b'\n' {
                        return Err(BodyError::Chunked("trailer lines must end with CRLF"));
                    }
                    if empty {
                        i += 1;
                        self.state = State::Done;
                        return Ok(i);
                    }
                    State::TrailerStart
                }
                State::Done => return Ok(i),
            };
            i += 1;
        }
        Ok(i)
    }

    fn size_rest(&mut self, b: u8) -> Result<State, BodyError> {
        self.line_len += 1;
        if self.line_len > MAX_CHUNK_LINE {
            return Err(BodyError::Chunked("chunk extension too long"));
        }
        match b {
            b'\r' => Ok(State::SizeLf),
            b'\n' => Err(BodyError::Chunked("bare LF after chunk size")),
            b'\t' | b' ' | b'!'..=b'~' => Ok(State::SizeRest),
            _ => Err(BodyError::Chunked("invalid character after chunk size")),
        }
    }

    fn count_trailer(&mut self) -> Result<(), BodyError> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILERS {
            return Err(BodyError::Chunked("trailers too large"));
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the body length found.
    fn decode(input: &[u8], step: usize) -> Result<Option<usize>, BodyError> {
        let mut d = ChunkedDecoder::default();
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + step).min(input.len());
            let used = d.advance(&input[pos..end])?;
            pos += used;
            if d.is_done() {
                return Ok(Some(pos));
            }
            assert_eq!(pos, end, "a non-final piece is consumed whole");
        }
        Ok(None)
    }

    #[test]
    fn finds_the_end_of_chunked_bodies_in_any_split() {
        let body = b"5\r\nhello\r\n1a;ext=\"v\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ngrpc-status: 0\r\n\r\nGET /next";
        let end = body.len() - "GET /next".len();
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(decode(body, step).unwrap(), Some(end), "step {step}");
        }
        assert_eq!(decode(b"0\r\n\r\n", 1).unwrap(), Some(5));
        assert_eq!(decode(b"5\r\nhel", 100).unwrap(), None);
    }

    #[test]
    fn rejects_invalid_framing() {
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX: y\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"-1\r\n",
        ] {
            assert!(
                decode(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn relays_lengths_and_leaves_the_rest() {
        let mut src: &[u8] = b"world";
        let mut buf = BytesMut::from(&b"hello "[..]);
        let mut out = Vec::new();
        relay(&mut src, &mut buf, &mut out, BodyKind::Length(8))
            .await
            .unwrap();
        assert_eq!(out, b"hello wo");
        assert_eq!(&buf[..], b"rld");

        let mut src: &[u8] = b"";
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert!(matches!(
            relay(&mut src, &mut buf, &mut Vec::new(), BodyKind::Length(8)).await,
            Err(BodyError::Truncated)
        ));
    }
}
