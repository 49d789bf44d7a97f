//! The reference reading of chunked framing the invariants compare malla's decoder with.

use super::ChunkedEnd;

/// A strict, independent reading of RFC 9112 §7.1 (written for this check, sharing nothing
/// with [`ChunkedDecoder`]):
///
/// ```text
/// chunked-body = *chunk last-chunk trailer-section CRLF
/// chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
/// chunk-size   = 1*HEXDIG
/// last-chunk   = 1*("0") [ chunk-ext ] CRLF
/// chunk-ext    = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
/// chunk-ext-val = token / quoted-string
/// trailer-section = *( field-line CRLF )
/// field-line   = field-name ":" OWS field-value OWS
/// ```
///
/// BWS and OWS are spaces and tabs only. Sizes beyond 16 hex digits are refused.
pub fn reference_chunked_end(data: &[u8]) -> ChunkedEnd {
    let mut p = Cursor { data, at: 0 };
    match p.chunked_body() {
        Ok(()) => ChunkedEnd::Done(p.at),
        Err(Stop::Short) => ChunkedEnd::NeedMore,
        Err(Stop::Invalid) => ChunkedEnd::Invalid,
    }
}

enum Stop {
    Short,
    Invalid,
}

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Cursor<'_> {
    fn peek(&self) -> Result<u8, Stop> {
        self.data.get(self.at).copied().ok_or(Stop::Short)
    }

    fn expect(&mut self, b: u8) -> Result<(), Stop> {
        if self.peek()? != b {
            return Err(Stop::Invalid);
        }
        self.at += 1;
        Ok(())
    }

    fn crlf(&mut self) -> Result<(), Stop> {
        self.expect(b'\r')?;
        self.expect(b'\n')
    }

    fn ws(&mut self) -> Result<(), Stop> {
        while matches!(self.peek()?, b' ' | b'\t') {
            self.at += 1;
        }
        Ok(())
    }

    fn token(&mut self) -> Result<(), Stop> {
        let start = self.at;
        while is_tchar(self.peek()?) {
            self.at += 1;
        }
        if self.at == start {
            return Err(Stop::Invalid);
        }
        Ok(())
    }

    fn quoted_string(&mut self) -> Result<(), Stop> {
        self.expect(b'"')?;
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Ok(());
                }
                b'\\' => {
                    self.at += 1;
                    match self.peek()? {
                        b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => self.at += 1,
                        _ => return Err(Stop::Invalid),
                    }
                }
                b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => self.at += 1,
                _ => return Err(Stop::Invalid),
            }
        }
    }

    fn chunk_ext(&mut self) -> Result<(), Stop> {
        loop {
            let before = self.at;
            self.ws()?;
            match self.peek()? {
                b';' => {}
                // Whitespace before the line end is not in the grammar, but is tolerated by
                // h11 and others, and harmless relayed as is: allowed.
                b'\r' => return Ok(()),
                _ => {
                    self.at = before;
                    return Ok(());
                }
            }
            self.at += 1;
            self.ws()?;
            self.token()?;
            let before_eq = self.at;
            self.ws()?;
            if self.peek()? == b'=' {
                self.at += 1;
                self.ws()?;
                if self.peek()? == b'"' {
                    self.quoted_string()?;
                } else {
                    self.token()?;
                }
            } else {
                self.at = before_eq;
            }
        }
    }

    /// The size; `None` past 16 hex digits.
    fn chunk_size(&mut self) -> Result<u64, Stop> {
        let mut size = 0u64;
        let mut digits = 0;
        while let Some(d) = (self.peek()? as char).to_digit(16) {
            digits += 1;
            if digits > 16 {
                return Err(Stop::Invalid);
            }
            size = size << 4 | u64::from(d);
            self.at += 1;
        }
        if digits == 0 {
            return Err(Stop::Invalid);
        }
        Ok(size)
    }

    fn chunked_body(&mut self) -> Result<(), Stop> {
        loop {
            let size = self.chunk_size()?;
            self.chunk_ext()?;
            self.crlf()?;
            if size == 0 {
                break;
            }
            let left = (self.data.len() - self.at) as u64;
            if left < size {
                return Err(Stop::Short);
            }
            self.at += size as usize;
            self.crlf()?;
        }
        // trailer-section CRLF
        loop {
            if self.peek()? == b'\r' {
                return self.crlf();
            }
            self.token()?;
            self.expect(b':')?;
            loop {
                match self.peek()? {
                    b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => self.at += 1,
                    b'\r' => break,
                    _ => return Err(Stop::Invalid),
                }
            }
            self.crlf()?;
        }
    }
}
