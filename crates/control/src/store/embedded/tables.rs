//! The redb tables and the reads shared by the writer and the readers.
//!
//! | table        | key              | value                                   |
//! |--------------|------------------|-----------------------------------------|
//! | `kv`         | key (`&str`)     | [`codec::encode_kv`] record             |
//! | `meta`       | name (`&str`)    | `u64`: `revision`, `next_lease`, `compacted` |
//! | `leases`     | lease id         | (ttl ms, expiry as wall-clock unix ms)  |
//! | `lease_keys` | (lease id, key)  | `()`: the keys attached to a lease      |
//! | `log`        | (revision, n)    | [`codec::encode_event`] record: the n-th event of the revision |
//!
//! (Before transactions, the log was `events`, keyed by revision alone; opening such a
//! file moves it to `log`: see [`migrate_events`].)

use redb::{ReadableTable, Table, TableDefinition, TableHandle, WriteTransaction};

use super::codec;
use crate::store::{Event, KeyValue, LeaseId, Revision};

pub(super) const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const LEASES: TableDefinition<u64, (u64, u64)> = TableDefinition::new("leases");
pub(super) const LEASE_KEYS: TableDefinition<(u64, &str), ()> = TableDefinition::new("lease_keys");
pub(super) const EVENTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("log");
/// The log of older versions: one event per revision.
const EVENTS_V1: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// The revision of the last write.
pub(super) const META_REVISION: &str = "revision";
/// The id the next granted lease gets (ids start at 1).
pub(super) const META_NEXT_LEASE: &str = "next_lease";
/// Every event with a revision at or below this one has been deleted from `events`.
pub(super) const META_COMPACTED: &str = "compacted";

pub(super) type DbResult<T> = Result<T, redb::Error>;

pub(super) fn meta(table: &impl ReadableTable<&'static str, u64>, name: &str) -> DbResult<u64> {
    Ok(table.get(name)?.map_or(0, |v| v.value()))
}

pub(super) fn get_kv(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> DbResult<Option<KeyValue>> {
    match table.get(key)? {
        None => Ok(None),
        Some(bytes) => codec::decode_kv(key, bytes.value())
            .map(Some)
            .map_err(|e| corrupt(&format!("the record of key {key:?}"), e)),
    }
}

/// Every key starting with `prefix`, sorted.
pub(super) fn range_kv(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
) -> DbResult<Vec<KeyValue>> {
    let mut out = Vec::new();
    for entry in table.range::<&str>(prefix..)? {
        let (key, bytes) = entry?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        out.push(
            codec::decode_kv(key, bytes.value())
                .map_err(|e| corrupt(&format!("the record of key {key:?}"), e))?,
        );
    }
    Ok(out)
}

/// The keys attached to lease `id`.
pub(super) fn lease_keys(
    table: &impl ReadableTable<(u64, &'static str), ()>,
    id: LeaseId,
) -> DbResult<Vec<String>> {
    let mut out = Vec::new();
    for entry in table.range::<(u64, &str)>((id, "")..)? {
        let (key, _) = entry?;
        let (owner, key) = key.value();
        if owner != id {
            break;
        }
        out.push(key.to_owned());
    }
    Ok(out)
}

/// A stretch of the event log.
pub(super) struct LogChunk {
    /// The events of the stretch whose key starts with the prefix.
    pub(super) events: Vec<Event>,
    /// The revision of the last event read (matching or not), if any.
    pub(super) last: Option<Revision>,
    /// How many events were read.
    pub(super) read: usize,
    /// Whether the log holds more after this chunk.
    pub(super) more: bool,
    /// The compaction floor in the same snapshot.
    pub(super) compacted: Revision,
}

/// Reads the events with a revision above `after`, whole revisions only, stopping at the
/// first revision boundary after `limit` events; keeps those under `prefix`.
pub(super) fn read_log(
    events: &impl ReadableTable<(u64, u32), &'static [u8]>,
    meta_table: &impl ReadableTable<&'static str, u64>,
    after: Revision,
    prefix: &str,
    limit: usize,
) -> DbResult<LogChunk> {
    let mut chunk = LogChunk {
        events: Vec::new(),
        last: None,
        read: 0,
        more: false,
        compacted: meta(meta_table, META_COMPACTED)?,
    };
    if after < chunk.compacted {
        return Ok(chunk);
    }
    let start = after.saturating_add(1);
    for entry in events.range::<(u64, u32)>((start, 0)..)? {
        let (key, bytes) = entry?;
        let (revision, _) = key.value();
        if chunk.read >= limit && chunk.last != Some(revision) {
            chunk.more = true;
            break;
        }
        let event = codec::decode_event(bytes.value())
            .map_err(|e| corrupt(&format!("an event of revision {revision}"), e))?;
        chunk.last = Some(revision);
        chunk.read += 1;
        if event.kv.key.starts_with(prefix) {
            chunk.events.push(event);
        }
    }
    Ok(chunk)
}

/// Moves the log of a file written by an older version (`events`, one event per revision)
/// to `log`, each event as the only one of its revision.
pub(super) fn migrate_events(txn: &WriteTransaction) -> DbResult<()> {
    let exists = txn.list_tables()?.any(|t| t.name() == EVENTS_V1.name());
    if !exists {
        return Ok(());
    }
    {
        let old = txn.open_table(EVENTS_V1)?;
        let mut new = txn.open_table(EVENTS)?;
        for entry in old.iter()? {
            let (revision, bytes) = entry?;
            new.insert((revision.value(), 0), bytes.value())?;
        }
    }
    txn.delete_table(EVENTS_V1)?;
    Ok(())
}

fn corrupt(what: &str, e: String) -> redb::Error {
    redb::Error::Corrupted(format!("{what} cannot be decoded: {e}"))
}

/// The tables of one write transaction, opened once per batch.
pub(super) struct Tables<'t> {
    pub(super) kv: Table<'t, &'static str, &'static [u8]>,
    pub(super) meta: Table<'t, &'static str, u64>,
    pub(super) leases: Table<'t, u64, (u64, u64)>,
    pub(super) lease_keys: Table<'t, (u64, &'static str), ()>,
    pub(super) events: Table<'t, (u64, u32), &'static [u8]>,
}

impl<'t> Tables<'t> {
    pub(super) fn open(txn: &'t WriteTransaction) -> DbResult<Self> {
        Ok(Tables {
            kv: txn.open_table(KV)?,
            meta: txn.open_table(META)?,
            leases: txn.open_table(LEASES)?,
            lease_keys: txn.open_table(LEASE_KEYS)?,
            events: txn.open_table(EVENTS)?,
        })
    }
}
