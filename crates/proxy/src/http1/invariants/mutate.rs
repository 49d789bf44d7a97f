//! Deterministic mutations of seed inputs, shared by the bounded runs and the integration
//! suite's differential test.

pub use malla_core::rng::Rng;

/// Fragments that matter to framing, spliced in by [`mutate`].
pub const DICTIONARY: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b"\x0b",
    b"\x0c",
    b"\0",
    b",",
    b";",
    b":",
    b"0x",
    b"+",
    b"-",
    b"chunked",
    b"identity",
    b"gzip, ",
    b", chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Connection: content-length\r\n",
    b"Connection: close\r\n",
    b"Host: other\r\n",
    b"Expect: 100-continue\r\n",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n",
    b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HTTP/1.0",
    b"http://other",
    b"\xff",
];

/// One to five random edits of `seed`: byte replacements, deletions, insertions, copies of
/// a range, dictionary fragments, case flips.
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    const INTERESTING: &[u8] = b"\r\n :,;0\0\xff\t\x0b\"=x";
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(5) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below(4).min(v.len() - i - 1);
                v.drain(i..i + n);
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next_u64() as u8);
            }
            3 => {
                let (i, j) = (rng.below(v.len() + 1), rng.below(v.len() + 1));
                let (a, b) = (i.min(j), i.max(j));
                let piece = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, piece);
            }
            4 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = if v[i].is_ascii_lowercase() {
                    v[i].to_ascii_uppercase()
                } else {
                    v[i].to_ascii_lowercase()
                };
            }
            _ => {
                let piece = DICTIONARY[rng.below(DICTIONARY.len())];
                // Prefer line starts, where fields go.
                let starts: Vec<usize> = v
                    .windows(2)
                    .enumerate()
                    .filter(|(_, w)| w == b"\r\n")
                    .map(|(i, _)| i + 2)
                    .collect();
                let at = if !starts.is_empty() && rng.below(2) == 0 {
                    starts[rng.below(starts.len())]
                } else {
                    rng.below(v.len() + 1)
                };
                v.splice(at..at, piece.iter().copied());
            }
        }
    }
    v
}

/// Seeds of the mutation runs: requests (first), responses, chunked bodies.
pub const REQUEST_SEEDS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
    b"GET http://other/x?y HTTP/1.1\r\nHost: ignored\r\n\r\n",
    b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nVia: 1.0 b\r\nForwarded: for=x\r\nmalla-timeout-ms: 100\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
];

pub const RESPONSE_SEEDS: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nVia: 1.1 x\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nbody",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
];

pub const CHUNKED_SEEDS: &[&[u8]] = &[
    b"5\r\nhello\r\n0\r\n\r\n",
    b"1a;ext=\"v\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ngrpc-status: 0\r\n\r\n",
    b"3;a=b;c\r\nabc\r\n000\r\n\r\nGET / HTTP/1.1\r\n",
    b"0\r\n\r\n",
    b"f\r\n0123456789abcde\r\n1\r\nx\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n",
];
