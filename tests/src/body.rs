//! Message bodies for clients and peers: small ones, and large ones generated on the fly.
//!
//! A generated body is produced in 64 KiB chunks as it is sent, so a 1 GiB upload never
//! holds more than a chunk; each chunk starts with its index, so a lost, repeated or
//! reordered chunk changes the CRC-32 that both ends compute ([`Digest`]).

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};

use crate::BoxError;

/// The body type of every request and response the harness builds.
pub type Body = BoxBody<Bytes, BoxError>;

/// Size of the chunks of a generated body.
pub const CHUNK: usize = 64 * 1024;

/// Bytes generated bodies are made of (a repeating, non-uniform pattern).
static PATTERN: [u8; CHUNK] = pattern();

const fn pattern() -> [u8; CHUNK] {
    let mut out = [0u8; CHUNK];
    let mut i = 0;
    while i < CHUNK {
        out[i] = (i % 251) as u8;
        i += 1;
    }
    out
}

pub fn empty() -> Body {
    Empty::new().map_err(|e: Infallible| match e {}).boxed()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// Byte count and CRC-32 of what went through, updated as it goes.
#[derive(Debug, Default)]
pub struct Digest {
    bytes: AtomicU64,
    crc: Mutex<crc32fast::Hasher>,
}

impl Digest {
    pub fn update(&self, data: &[u8]) {
        self.bytes.fetch_add(data.len() as u64, Ordering::SeqCst);
        self.crc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update(data);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    pub fn crc(&self) -> u32 {
        self.crc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .finalize()
    }
}

/// Chunk `index` of a generated body, `len` bytes long (at most [`CHUNK`]).
fn chunk(index: u64, len: usize) -> Bytes {
    let mut data = BytesMut::with_capacity(len);
    data.extend_from_slice(&PATTERN[..len]);
    let tag = index.to_be_bytes();
    let n = tag.len().min(len);
    data[..n].copy_from_slice(&tag[..n]);
    data.freeze()
}

/// A body of `len` bytes generated chunk by chunk as it is polled, ending with `trailers`
/// when given (which makes HTTP/1 send it chunked). The returned digest is filled in as
/// the chunks are produced.
pub fn generated(len: u64, trailers: Option<HeaderMap>) -> (Body, Arc<Digest>) {
    let digest = Arc::new(Digest::default());
    let produced = digest.clone();
    let frames = stream::unfold((0u64, 0u64, trailers), move |(index, sent, trailers)| {
        let produced = produced.clone();
        async move {
            if sent < len {
                let n = usize::try_from((len - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
                let data = chunk(index, n);
                produced.update(&data);
                let next = (index + 1, sent + n as u64, trailers);
                return Some((Ok::<_, BoxError>(Frame::data(data)), next));
            }
            let trailers = trailers?;
            Some((Ok(Frame::trailers(trailers)), (index, sent, None)))
        }
    });
    (StreamBody::new(frames).boxed(), digest)
}

/// What [`consume`] read from a body.
#[derive(Debug)]
pub struct Consumed {
    pub bytes: u64,
    pub crc: u32,
    pub trailers: Option<HeaderMap>,
}

/// Reads a body to its end without keeping it: counts, hashes, and keeps the trailers.
pub async fn consume<B>(mut body: B) -> Result<Consumed, BoxError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let digest = Digest::default();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        match frame.into_data() {
            Ok(data) => digest.update(&data),
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok(Consumed {
        bytes: digest.bytes(),
        crc: digest.crc(),
        trailers,
    })
}

/// The CRC-32 of a generated body of `len` bytes, computed without sending it.
pub fn generated_crc(len: u64) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    let mut sent = 0u64;
    let mut index = 0u64;
    while sent < len {
        let n = usize::try_from((len - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
        hasher.update(&chunk(index, n));
        sent += n as u64;
        index += 1;
    }
    hasher.finalize()
}
