//! The embedded store: one [redb](https://docs.rs/redb) file, `malla.redb`, in the data
//! directory.
//!
//! # Shape
//!
//! ```text
//!  handles ──requests (mpsc)──> writer task ──batch──> blocking pool: one redb write txn,
//!     │                            │                      commit (fsync), then publish the
//!     │                            │ wakes at the next    revision, broadcast the events,
//!     │                            │ lease deadline       answer the callers
//!     ├─ get / range ──> blocking pool: redb read txn (MVCC, concurrent with the writer)
//!     └─ watch ──> one task per watch: event log (history), then the broadcast (live)
//! ```
//!
//! - **One writer, group commit.** Writes are serialized through the writer task, which
//!   applies everything queued in one transaction ([`writer`]). redb commits with immediate
//!   durability (fsync) before any caller is answered: an acknowledged write survives
//!   `kill -9` and power loss. A burst of concurrent writes costs a few fsyncs, not one each.
//!   A write whose caller stops waiting may still be applied, as in etcd.
//! - **Revisions.** One global counter; every write is one revision: a put, a delete, a
//!   transaction ([`Store::txn`], whatever number of keys it changes, in one redb
//!   transaction), and a lease revoke or expiry (all the lease's keys, in key order). Each
//!   changed key is one event with the write's revision. `create_revision`, `mod_revision` and `version`
//!   follow etcd; a delete event carries the key, an empty value, `mod_revision` = the
//!   delete's revision, `create_revision` = `version` = 0, and the deleted state in `prev`.
//!   Granting and renewing leases does not bump the revision.
//! - **Event log.** Every event is kept by (revision, index) ([`tables`]) for watches that start in
//!   the past. At least the last [`EVENT_HISTORY`] revisions are kept; older ones are deleted
//!   in chunks, and a watch from before them gets [`StoreError::Compacted`].
//! - **Leases.** The writer owns an in-memory schedule on `tokio::time` (so tests can pause
//!   time) and persists each deadline as wall-clock unix milliseconds. On open, every lease
//!   gets its full TTL from now, as etcd does when a leader takes over: a control plane that
//!   was down longer than a TTL does not expire every registration at once before their
//!   agents can renew (see `Writer::load`); a lease nobody renews expires one TTL later.
//! - **Watches** ([`watch`]): subscribe to the live broadcast, then read history, then go
//!   live; a watcher that lags behind the broadcast catches up from the log.
//!
//! # Limits
//!
//! Keys are non-empty and at most [`MAX_KEY_BYTES`]; values at most [`MAX_VALUE_BYTES`];
//! lease TTLs between [`MIN_LEASE_TTL`] and [`MAX_LEASE_TTL`]. Requests outside them get
//! [`StoreError::Invalid`].

mod codec;
mod leases;
mod tables;
mod watch;
mod writer;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redb::{
    Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable, StorageError,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use self::tables::{get_kv, meta, range_kv, DbResult, KV, META, META_REVISION};
use self::writer::{Reply, Request, Writer};
use super::{
    Event, KeyValue, Lease, LeaseId, Precondition, Result, Revision, Store, StoreError, Txn, TxnOp,
    TxnResult, Watch,
};

/// The database file inside the data directory.
pub const DB_FILE: &str = "malla.redb";
/// The largest value a key can hold: 1 MiB. The store keeps descriptions (instances,
/// policies, certificates), not payloads; every change is also written to the event log.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The longest key: 4 KiB.
pub const MAX_KEY_BYTES: usize = 4 << 10;
/// At least this many of the latest revisions stay in the event log for watches.
pub const EVENT_HISTORY: u64 = 10_000;
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// redb's page cache. The store holds descriptions of a mesh: this is ample. (redb's own
/// default, 1 GiB, also made every commit about ten times slower when measured here.)
const CACHE_BYTES: usize = 64 << 20;
/// Writes waiting for the writer; callers wait (backpressure) beyond this.
const REQUEST_QUEUE: usize = 4096;

/// Tuning, for tests and measurements.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    /// Revisions kept in the event log.
    pub(crate) history: u64,
    /// Compaction runs once this many revisions beyond `history` have accumulated.
    pub(crate) compact_every: u64,
    /// Requests per transaction; 1 turns group commit off.
    pub(crate) max_batch: usize,
    /// Events the live broadcast buffers. Each retains its event (values included), so
    /// this bounds memory as well as how far a watcher may lag before reading the log.
    pub(crate) broadcast_capacity: usize,
    /// The channel of each watch.
    pub(crate) watch_capacity: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            history: EVENT_HISTORY,
            compact_every: 1_000,
            max_batch: 1_024,
            broadcast_capacity: 4_096,
            watch_capacity: 1_024,
        }
    }
}

/// State the writer publishes for everyone.
#[derive(Default)]
pub(super) struct Shared {
    /// The revision of the last committed write.
    revision: AtomicU64,
    /// Events at or below this revision have been deleted from the log.
    compacted: AtomicU64,
    /// How many times a watcher fell behind the broadcast and read the log to catch up.
    catch_ups: AtomicU64,
}

/// The embedded store; a cheap-to-clone handle. See the [module docs](self).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    path: Arc<Path>,
    options: Options,
    requests: mpsc::Sender<Request>,
    /// `None` once closed.
    open: RwLock<Option<Open>>,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

struct Open {
    db: Arc<Database>,
    events: broadcast::Sender<Arc<[Event]>>,
}

impl Inner {
    fn db(&self) -> Result<Arc<Database>> {
        let open = self.open.read().unwrap_or_else(PoisonError::into_inner);
        match open.as_ref() {
            Some(open) => Ok(open.db.clone()),
            None => Err(self.closed()),
        }
    }

    fn subscribe(&self) -> Result<broadcast::Receiver<Arc<[Event]>>> {
        let open = self.open.read().unwrap_or_else(PoisonError::into_inner);
        match open.as_ref() {
            Some(open) => Ok(open.events.subscribe()),
            None => Err(self.closed()),
        }
    }

    fn closed(&self) -> StoreError {
        StoreError::Backend(format!("the store at {} is closed", self.path.display()))
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .field("revision", &self.revision())
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (creating it and the directory if needed) the store in `dir`.
    ///
    /// Must be called inside a tokio runtime: the store's tasks run on it. Fails if the
    /// directory cannot be created or written, or if another process has the file open.
    pub async fn open(dir: &Path) -> Result<EmbeddedStore> {
        Self::open_with(dir, Options::default()).await
    }

    pub(crate) async fn open_with(dir: &Path, options: Options) -> Result<EmbeddedStore> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Backend("EmbeddedStore::open must be called inside a tokio runtime".into())
        })?;
        let dir = dir.to_path_buf();
        let path: Arc<Path> = dir.join(DB_FILE).into();
        let shared = Arc::new(Shared::default());
        let (events, _) = broadcast::channel(options.broadcast_capacity.max(1));
        let (now, wall_ms) = (Instant::now(), writer::unix_millis());
        let opened = tokio::task::spawn_blocking({
            let (dir, path, options) = (dir.clone(), path.clone(), options.clone());
            let (shared, events) = (shared.clone(), events.clone());
            move || -> Result<(Arc<Database>, Box<Writer>)> {
                let db = Arc::new(open_db(&dir, &path)?);
                let writer = Writer::open(db.clone(), path, options, shared, events, now, wall_ms)?;
                Ok((db, writer))
            }
        })
        .await
        .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let (db, writer) = opened?;
        let (requests, queue) = mpsc::channel(REQUEST_QUEUE);
        runtime.spawn(writer::run(writer, queue));
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                dir,
                path,
                options,
                requests,
                open: RwLock::new(Some(Open { db, events })),
                shared,
                runtime,
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Closes the store for every handle: writes already queued are applied, later calls
    /// fail, watches end with an error, and the file is released (it can be opened again)
    /// once the reads in flight finish. Dropping the last handle also closes the store, but
    /// without waiting. Closing twice is harmless.
    pub async fn close(&self) -> Result<()> {
        let open = self
            .inner
            .open
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Open { db, events }) = open else {
            return Ok(());
        };
        drop(events);
        let (ack, acked) = oneshot::channel();
        if self
            .inner
            .requests
            .send(Request::Close { reply: ack })
            .await
            .is_ok()
        {
            // The writer drops its database handle before acknowledging.
            let _ = acked.await;
        }
        // Reads in flight hold the database for a moment.
        let mut db = db;
        let give_up = Instant::now() + Duration::from_secs(30);
        let db = loop {
            match Arc::try_unwrap(db) {
                Ok(db) => break db,
                Err(shared) if Instant::now() < give_up => {
                    db = shared;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(_) => {
                    return Err(StoreError::Backend(format!(
                    "closing {}: reads still hold the database after 30 s; it closes when they end",
                    self.inner.path.display()
                )))
                }
            }
        };
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || db.close())
            .await
            .map_err(|e| StoreError::Backend(format!("closing {}: {e}", path.display())))?
            .map_err(|e| StoreError::Backend(format!("closing {}: {e}", path.display())))
    }

    async fn call<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .requests
            .send(request(reply))
            .await
            .map_err(|_| self.inner.closed())?;
        answer.await.map_err(|_| self.inner.closed())?
    }

    async fn read<T: Send + 'static>(
        &self,
        what: String,
        read: impl FnOnce(&ReadTransaction) -> DbResult<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.inner.db()?;
        let path = self.inner.path.clone();
        let fail = move |e: &dyn fmt::Display| {
            StoreError::Backend(format!("{what} in {}: {e}", path.display()))
        };
        tokio::task::spawn_blocking(move || read(&db.begin_read()?))
            .await
            .map_err(|e| fail(&e))?
            .map_err(|e| fail(&e))
    }

    /// For tests of what a long outage does: moves every lease's persisted wall-clock
    /// deadline `by` into the past, in the closed store in `dir` (as if the control plane had
    /// been down that much longer). Returns how many leases it moved.
    #[doc(hidden)]
    pub fn age_leases_while_closed(dir: &Path, by: Duration) -> Result<usize> {
        let path = dir.join(DB_FILE);
        let fail = |e: &dyn fmt::Display| {
            StoreError::Backend(format!("ageing the leases in {}: {e}", path.display()))
        };
        let db = Database::open(&path).map_err(|e| fail(&e))?;
        let by_ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let txn = db.begin_write().map_err(|e| fail(&e))?;
        let mut moved = 0;
        {
            let mut leases = txn.open_table(tables::LEASES).map_err(|e| fail(&e))?;
            let all: Vec<(u64, (u64, u64))> = leases
                .iter()
                .map_err(|e| fail(&e))?
                .map(|entry| entry.map(|(id, record)| (id.value(), record.value())))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| fail(&e))?;
            for (id, (ttl_ms, expiry_ms)) in all {
                leases
                    .insert(id, (ttl_ms, expiry_ms.saturating_sub(by_ms)))
                    .map_err(|e| fail(&e))?;
                moved += 1;
            }
        }
        txn.commit().map_err(|e| fail(&e))?;
        Ok(moved)
    }

    /// How many times a watcher fell behind the live broadcast and caught up from the log.
    #[cfg(test)]
    fn catch_ups(&self) -> u64 {
        self.inner.shared.catch_ups.load(Ordering::Relaxed)
    }
}

fn open_db(dir: &Path, path: &Path) -> Result<Database> {
    std::fs::create_dir_all(dir).map_err(|e| {
        StoreError::Backend(format!(
            "cannot create the data directory {}: {e}",
            dir.display()
        ))
    })?;
    redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Backend(format!(
                "{} is locked by another process: is another malla control running with \
                 --data-dir {}?",
                path.display(),
                dir.display()
            )),
            DatabaseError::Storage(StorageError::Io(e))
                if e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                StoreError::Backend(format!(
                    "cannot open {}: {e}: make {} writable by this user or choose another \
                     --data-dir",
                    path.display(),
                    dir.display()
                ))
            }
            e => StoreError::Backend(format!("cannot open {}: {e}", path.display())),
        })
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::Invalid("the key is empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::Invalid(format!(
            "the key {:?}... is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.chars().take(64).collect::<String>(),
            key.len()
        )));
    }
    Ok(())
}

fn check_value(key: &str, value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(StoreError::Invalid(format!(
            "the value of {key:?} is {} bytes; the limit is {MAX_VALUE_BYTES} (1 MiB): keep \
             large data elsewhere and store a reference",
            value.len()
        )));
    }
    Ok(())
}

/// The most ops a transaction may carry (etcd's default `--max-txn-ops` is 128; deleting a
/// service with every instance needs more, and a prefix delete counts as one).
pub const MAX_TXN_OPS: usize = 10_000;

/// Keys and values in range, and no key written by two ops (etcd refuses both).
fn check_txn(txn: &Txn) -> Result<()> {
    if txn.ops.len() > MAX_TXN_OPS {
        return Err(StoreError::Invalid(format!(
            "the transaction has {} ops; the limit is {MAX_TXN_OPS}: split it, or delete by \
             prefix",
            txn.ops.len()
        )));
    }
    for (key, _) in &txn.compare {
        check_key(key)?;
    }
    let mut written = std::collections::BTreeSet::new();
    let mut prefixes = Vec::new();
    for op in &txn.ops {
        match op {
            TxnOp::Put { key, value, .. } => {
                check_key(key)?;
                check_value(key, value)?;
                if !written.insert(key.as_str()) {
                    return Err(duplicate(key));
                }
            }
            TxnOp::Delete { key } => {
                check_key(key)?;
                if !written.insert(key.as_str()) {
                    return Err(duplicate(key));
                }
            }
            TxnOp::DeletePrefix { prefix } => {
                if prefix.is_empty() {
                    return Err(StoreError::Invalid(
                        "a prefix delete needs a prefix: an empty one would delete every key"
                            .into(),
                    ));
                }
                check_key(prefix)?;
                prefixes.push(prefix.as_str());
            }
        }
    }
    for prefix in &prefixes {
        if let Some(key) = written.iter().find(|k| k.starts_with(prefix)) {
            return Err(duplicate(key));
        }
    }
    Ok(())
}

fn duplicate(key: &str) -> StoreError {
    StoreError::Invalid(format!(
        "the transaction writes {key:?} more than once: a key may be written by one op only"
    ))
}

fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < MIN_LEASE_TTL || ttl > MAX_LEASE_TTL {
        return Err(StoreError::Invalid(format!(
            "lease TTL {ttl:?} is out of range: it must be between {MIN_LEASE_TTL:?} and \
             {MAX_LEASE_TTL:?}"
        )));
    }
    Ok(())
}

impl Store for EmbeddedStore {
    fn revision(&self) -> Revision {
        self.inner.shared.revision.load(Ordering::SeqCst)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let key = key.to_owned();
        self.read(format!("reading {key:?}"), move |txn| {
            get_kv(&txn.open_table(KV)?, &key)
        })
        .await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_owned();
        self.read(format!("reading the keys under {prefix:?}"), move |txn| {
            let kvs = range_kv(&txn.open_table(KV)?, &prefix)?;
            Ok((kvs, meta(&txn.open_table(META)?, META_REVISION)?))
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        precondition: Precondition,
    ) -> Result<Revision> {
        check_key(key)?;
        check_value(key, &value)?;
        self.call(|reply| Request::Put {
            key: key.to_owned(),
            value,
            lease,
            precondition,
            reply,
        })
        .await
    }

    async fn delete(&self, key: &str, precondition: Precondition) -> Result<Option<Revision>> {
        check_key(key)?;
        self.call(|reply| Request::Delete {
            key: key.to_owned(),
            precondition,
            reply,
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        check_txn(&txn)?;
        self.call(|reply| Request::Txn { txn, reply }).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        check_ttl(ttl)?;
        self.call(|reply| Request::Grant { ttl, reply }).await
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<Lease> {
        self.call(|reply| Request::KeepAlive { id, reply }).await
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        self.call(|reply| Request::Revoke { id, reply }).await
    }

    async fn lease(&self, id: LeaseId) -> Result<Lease> {
        self.call(|reply| Request::Lease { id, reply }).await
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        watch::start(&self.inner, prefix, after)
    }
}
