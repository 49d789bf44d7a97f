//! Relaying HTTP/1 bodies with bounded memory.
//!
//! Bodies are relayed as they arrive through the connection's fixed-size read buffer:
//! a body of any size costs the same few KiB. Chunked bodies are relayed *verbatim*
//! (extensions and trailers included, so HTTP/1 trailers survive) while a strict decoder
//! walks the framing to find where the message ends: hex sizes without overflow, CRLF
//! everywhere (a bare LF is rejected, since the next hop might read it differently),
//! chunk extensions and trailer fields held to their RFC 9112 §7.1 grammar (a size line
//! such as `0x5` or `0_2e` is read as two different sizes by lax parsers, and a trailer
//! line without a colon is a request in disguise to some), bounded extension and trailer
//! sizes.

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
    /// After the digits: optional whitespace and extensions, up to CR.
    SizeRest(Ext),
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// In a trailer field's name, then its value.
    TrailerName,
    TrailerValue,
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
                        let next = self.size_rest(Ext::AfterSize, b)?;
                        self.pending_size = value;
                        next
                    }
                },
                State::SizeRest(ext) => self.size_rest(ext, b)?,
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
                    _ if is_tchar(b) => {
                        self.count_trailer()?;
                        State::TrailerName
                    }
                    _ => return Err(BodyError::Chunked("invalid trailer field name")),
                },
                State::TrailerName => {
                    self.count_trailer()?;
                    match b {
                        b':' => State::TrailerValue,
                        _ if is_tchar(b) => State::TrailerName,
                        _ => return Err(BodyError::Chunked("invalid trailer field name")),
                    }
                }
                State::TrailerValue => {
                    self.count_trailer()?;
                    match b {
                        b'\r' => State::TrailerLf { empty: false },
                        b'\n' => return Err(BodyError::Chunked("bare LF in trailers")),
                        b'\t' | b' '..=b'~' | 0x80..=0xff => State::TrailerValue,
                        _ => return Err(BodyError::Chunked("invalid trailer field value")),
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

    /// One byte of a chunk-size line after the digits: `*( BWS ";" BWS name [ BWS "="
    /// BWS value ] )` then CRLF, where a name is a token and a value a token or a quoted
    /// string (RFC 9112 §7.1.1). Whitespace before the CRLF is allowed, as strict parsers
    /// (h11) allow it.
    fn size_rest(&mut self, ext: Ext, b: u8) -> Result<State, BodyError> {
        self.line_len += 1;
        if self.line_len > MAX_CHUNK_LINE {
            return Err(BodyError::Chunked("chunk extension too long"));
        }
        let ows = b == b' ' || b == b'\t';
        let next = match (ext, b) {
            (Ext::Quoted, b'"') => Ext::AfterValue,
            (Ext::Quoted, b'\\') => Ext::Escaped,
            (Ext::Quoted, b'\t' | b' ' | b'!'..=b'~' | 0x80..=0xff) => Ext::Quoted,
            (Ext::Escaped, b'\t' | b' '..=b'~' | 0x80..=0xff) => Ext::Quoted,
            (Ext::Quoted | Ext::Escaped, _) => {
                return Err(BodyError::Chunked("invalid chunk extension value"))
            }
            (_, b'\n') => return Err(BodyError::Chunked("bare LF after chunk size")),
            (Ext::BeforeName | Ext::BeforeValue, b'\r') => {
                return Err(BodyError::Chunked("incomplete chunk extension"))
            }
            (_, b'\r') => return Ok(State::SizeLf),
            (Ext::AfterSize | Ext::AfterValue, _) if ows => ext,
            (Ext::AfterSize | Ext::AfterValue | Ext::Name | Ext::AfterName | Ext::Token, b';') => {
                Ext::BeforeName
            }
            (Ext::BeforeName, _) if ows => Ext::BeforeName,
            (Ext::BeforeName | Ext::Name, _) if is_tchar(b) => Ext::Name,
            (Ext::Name | Ext::AfterName, _) if ows => Ext::AfterName,
            (Ext::Name | Ext::AfterName, b'=') => Ext::BeforeValue,
            (Ext::BeforeValue, _) if ows => Ext::BeforeValue,
            (Ext::BeforeValue, b'"') => Ext::Quoted,
            (Ext::BeforeValue | Ext::Token, _) if is_tchar(b) => Ext::Token,
            (Ext::Token, _) if ows => Ext::AfterValue,
            _ => return Err(BodyError::Chunked("invalid character in a chunk-size line")),
        };
        Ok(State::SizeRest(next))
    }

    fn count_trailer(&mut self) -> Result<(), BodyError> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILERS {
            return Err(BodyError::Chunked("trailers too large"));
        }
        Ok(())
    }
}

/// Where a chunk-size line is after its digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    /// Right after the size, or after an extension: whitespace, `;` or CR.
    AfterSize,
    AfterValue,
    /// After `;`: the extension's name.
    BeforeName,
    Name,
    /// After the name and whitespace: `=`, `;` or CR.
    AfterName,
    /// After `=`: a token or a quoted string.
    BeforeValue,
    Token,
    Quoted,
    /// After a backslash in a quoted string.
    Escaped,
}

fn is_tchar(b: u8) -> bool {
    crate::detect::is_tchar(b)
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
        for ok in [
            &b"5 \r\nhello\r\n0\r\n\r\n"[..],
            b"5 ; a = b ; c\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"q \\\" ;x\"\r\nhello\r\n0\r\n\r\n",
            b"0\r\nX-Trailer: a b\r\ngrpc-status:0\r\n\r\n",
        ] {
            assert_eq!(
                decode(ok, 1).unwrap(),
                Some(ok.len()),
                "{}",
                String::from_utf8_lossy(ok)
            );
        }
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
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"0_2e\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5;a/b\r\nhello\r\n0\r\n\r\n",
            b"5;\r\nhello\r\n0\r\n\r\n",
            b"5;a=\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x\r\n",
            b"0\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            b"0\r\nX: a\x00b\r\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\nX Y: v\r\n\r\n",
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
