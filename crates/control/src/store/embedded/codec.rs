//! The binary records of the `kv` and `events` tables.
//!
//! Hand-written rather than serde_json: values are arbitrary bytes (JSON would spell each
//! byte as a decimal number, up to four times the size) and the writer encodes every change
//! twice (the key's record and the event). Every record opens with a format byte so that a
//! later layout can be told apart; integers are little-endian.
//!
//! ```text
//! kv record:   format u8 | create u64 | mod u64 | version u64 | lease | value (rest)
//! event:       format u8 | kind u8 (0 put, 1 delete) | kv | prev flag u8 (0/1) | [kv]
//!   kv:        key len u32 | key | create u64 | mod u64 | version u64 | lease | value len u32 | value
//! lease:       0u8 | 1u8 id u64
//! ```

use crate::store::{Event, EventKind, KeyValue, LeaseId};

const FORMAT: u8 = 1;

/// Encodes a key's record (its key is the table key, not repeated here).
pub(super) fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 * 4 + 1 + kv.value.len());
    out.push(FORMAT);
    put_meta(&mut out, kv);
    out.extend_from_slice(&kv.value);
    out
}

pub(super) fn decode_kv(key: &str, bytes: &[u8]) -> Result<KeyValue, String> {
    let mut r = Reader(bytes);
    r.format()?;
    let (create_revision, mod_revision, version, lease) = r.meta()?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: r.0.to_vec(),
        create_revision,
        mod_revision,
        version,
        lease,
    })
}

pub(super) fn encode_event(event: &Event) -> Vec<u8> {
    let size = |kv: &KeyValue| 4 + kv.key.len() + 8 * 4 + 1 + 4 + kv.value.len();
    let mut out = Vec::with_capacity(3 + size(&event.kv) + event.prev.as_ref().map_or(0, size));
    out.push(FORMAT);
    out.push(match event.kind {
        EventKind::Put => 0,
        EventKind::Delete => 1,
    });
    put_full(&mut out, &event.kv);
    match &event.prev {
        None => out.push(0),
        Some(prev) => {
            out.push(1);
            put_full(&mut out, prev);
        }
    }
    out
}

pub(super) fn decode_event(bytes: &[u8]) -> Result<Event, String> {
    let mut r = Reader(bytes);
    r.format()?;
    let kind = match r.u8()? {
        0 => EventKind::Put,
        1 => EventKind::Delete,
        other => return Err(format!("unknown event kind {other}")),
    };
    let kv = r.full()?;
    let prev = match r.u8()? {
        0 => None,
        1 => Some(r.full()?),
        other => return Err(format!("bad previous-value flag {other}")),
    };
    if !r.0.is_empty() {
        return Err(format!("{} trailing bytes", r.0.len()));
    }
    Ok(Event { kind, kv, prev })
}

fn put_meta(out: &mut Vec<u8>, kv: &KeyValue) {
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    match kv.lease {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
}

fn put_full(out: &mut Vec<u8>, kv: &KeyValue) {
    put_bytes(out, kv.key.as_bytes());
    put_meta(out, kv);
    put_bytes(out, &kv.value);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys and values are limited far below 4 GiB before they reach the writer.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated record: needed {n} more bytes, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut buf = [0; 8];
        buf.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(buf))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let mut buf = [0; 4];
        buf.copy_from_slice(self.take(4)?);
        self.take(u32::from_le_bytes(buf) as usize)
    }

    fn format(&mut self) -> Result<(), String> {
        match self.u8()? {
            FORMAT => Ok(()),
            other => Err(format!(
                "record format {other} is unknown (this build reads format {FORMAT}): \
                 was the data directory written by a newer malla?"
            )),
        }
    }

    fn meta(&mut self) -> Result<(u64, u64, u64, Option<LeaseId>), String> {
        let create = self.u64()?;
        let modified = self.u64()?;
        let version = self.u64()?;
        let lease = match self.u8()? {
            0 => None,
            1 => Some(self.u64()?),
            other => return Err(format!("bad lease flag {other}")),
        };
        Ok((create, modified, version, lease))
    }

    fn full(&mut self) -> Result<KeyValue, String> {
        let key = std::str::from_utf8(self.bytes()?)
            .map_err(|e| format!("key is not UTF-8: {e}"))?
            .to_owned();
        let (create_revision, mod_revision, version, lease) = self.meta()?;
        let value = self.bytes()?.to_vec();
        Ok(KeyValue {
            key,
            value,
            create_revision,
            mod_revision,
            version,
            lease,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], lease: Option<LeaseId>) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            lease,
        }
    }

    #[test]
    fn round_trips() {
        let a = kv("svc/a", b"\x00\xffhello", Some(42));
        assert_eq!(decode_kv("svc/a", &encode_kv(&a)).unwrap(), a);
        let b = kv("svc/b", b"", None);
        assert_eq!(decode_kv("svc/b", &encode_kv(&b)).unwrap(), b);

        for event in [
            Event {
                kind: EventKind::Put,
                kv: a.clone(),
                prev: None,
            },
            Event {
                kind: EventKind::Delete,
                kv: b.clone(),
                prev: Some(a.clone()),
            },
        ] {
            assert_eq!(decode_event(&encode_event(&event)).unwrap(), event);
        }
    }

    #[test]
    fn rejects_damaged_records() {
        let event = Event {
            kind: EventKind::Put,
            kv: kv("k", b"v", None),
            prev: None,
        };
        let bytes = encode_event(&event);
        for cut in 0..bytes.len() {
            assert!(decode_event(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut newer = bytes.clone();
        newer[0] = 9;
        assert!(decode_event(&newer).unwrap_err().contains("newer malla"));
        assert!(decode_kv("k", &[]).is_err());
    }
}
