//! The one writer: every change to the database goes through here.
//!
//! Requests arrive on a channel. The writer task takes the first, drains whatever else is
//! already queued (up to [`Options::max_batch`] requests or [`MAX_BATCH_BYTES`] of values)
//! and applies the whole batch in one redb write transaction on tokio's blocking pool: one
//! commit, so one fsync, for all of them (group commit). Only after the commit does it
//! publish the new revision, broadcast the events and answer the callers, so an answer
//! always means "durable".
//!
//! Inside a batch the requests are applied in arrival order and see each other's effects.
//! A request the store refuses (a failed precondition, an unknown lease) changes nothing and
//! does not disturb the others. A storage error aborts the whole transaction: every request
//! of the batch gets the error and the in-memory state (revision, lease schedule) is rolled
//! back to what is on disk.
//!
//! Lease expiry runs here too, at the start of every batch: the writer task also wakes up at
//! the earliest lease deadline.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use super::leases::{LeaseState, Leases, Undo};
use super::tables::{
    get_kv, lease_keys, meta, migrate_events, range_kv, DbResult, Tables, META_COMPACTED,
    META_NEXT_LEASE, META_REVISION,
};
use super::{codec, Options, Shared};
use crate::store::{
    Event, EventKind, KeyValue, Lease, LeaseId, Precondition, Result, Revision, StoreError, Txn,
    TxnOp, TxnResult,
};

/// One op of a transaction, with what it found.
enum Planned {
    Put(String, Vec<u8>, Option<LeaseId>, Option<KeyValue>),
    Delete(KeyValue),
}

/// A batch stops draining the queue once its values add up to this much.
const MAX_BATCH_BYTES: usize = 16 << 20;

/// How long the writer waits after a failed transaction before the next one, so that a
/// failing disk does not turn lease expiry into a busy loop.
const FAILURE_BACKOFF: Duration = Duration::from_millis(100);

pub(super) type Reply<T> = oneshot::Sender<Result<T>>;

pub(super) enum Request {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        precondition: Precondition,
        reply: Reply<Revision>,
    },
    Delete {
        key: String,
        precondition: Precondition,
        reply: Reply<Option<Revision>>,
    },
    Grant {
        ttl: Duration,
        reply: Reply<Lease>,
    },
    KeepAlive {
        id: LeaseId,
        reply: Reply<Lease>,
    },
    Revoke {
        id: LeaseId,
        reply: Reply<()>,
    },
    Txn {
        txn: Txn,
        reply: Reply<TxnResult>,
    },
    /// Reads the lease schedule, which only the writer holds.
    Lease {
        id: LeaseId,
        reply: Reply<Lease>,
    },
    /// Applies what precedes it in the queue, refuses what follows, and stops the writer.
    Close {
        reply: oneshot::Sender<()>,
    },
}

impl Request {
    fn bytes(&self) -> usize {
        match self {
            Request::Put { key, value, .. } => key.len() + value.len(),
            Request::Delete { key, .. } => key.len(),
            Request::Txn { txn, .. } => txn
                .ops
                .iter()
                .map(|op| match op {
                    TxnOp::Put { key, value, .. } => key.len() + value.len(),
                    TxnOp::Delete { key } => key.len(),
                    TxnOp::DeletePrefix { prefix } => prefix.len(),
                })
                .sum(),
            _ => 0,
        }
    }

    fn writes(&self) -> bool {
        !matches!(self, Request::Lease { .. } | Request::Close { .. })
    }

    /// Answers with an error; returns the acknowledgement channel of a `Close`.
    fn refuse(self, message: &str) -> Option<oneshot::Sender<()>> {
        let err = || StoreError::Backend(message.to_owned());
        match self {
            Request::Put { reply, .. } => drop(reply.send(Err(err()))),
            Request::Delete { reply, .. } => drop(reply.send(Err(err()))),
            Request::Grant { reply, .. }
            | Request::KeepAlive { reply, .. }
            | Request::Lease { reply, .. } => drop(reply.send(Err(err()))),
            Request::Revoke { reply, .. } => drop(reply.send(Err(err()))),
            Request::Txn { reply, .. } => drop(reply.send(Err(err()))),
            Request::Close { reply } => return Some(reply),
        }
        None
    }
}

/// An answer held back until the batch commits.
enum Done {
    Revision(Reply<Revision>, Result<Revision>),
    Deleted(Reply<Option<Revision>>, Result<Option<Revision>>),
    Lease(Reply<Lease>, Result<Lease>),
    Revoked(Reply<()>, Result<()>),
    Txn(Reply<TxnResult>, Result<TxnResult>),
}

impl Done {
    fn send(self) {
        // A caller that gave up waiting is not an error.
        match self {
            Done::Revision(reply, r) => drop(reply.send(r)),
            Done::Deleted(reply, r) => drop(reply.send(r)),
            Done::Lease(reply, r) => drop(reply.send(r)),
            Done::Revoked(reply, r) => drop(reply.send(r)),
            Done::Txn(reply, r) => drop(reply.send(r)),
        }
    }

    /// Answers with the storage error `message`. Refusals too: they were decided on a state
    /// that included the batch's earlier, now rolled back, changes.
    fn fail(self, message: &str) {
        let err = || StoreError::Backend(message.to_owned());
        match self {
            Done::Revision(reply, _) => drop(reply.send(Err(err()))),
            Done::Deleted(reply, _) => drop(reply.send(Err(err()))),
            Done::Lease(reply, _) => drop(reply.send(Err(err()))),
            Done::Revoked(reply, _) => drop(reply.send(Err(err()))),
            Done::Txn(reply, _) => drop(reply.send(Err(err()))),
        }
    }
}

/// The outcome of one request inside a transaction: the outer error is a storage failure
/// (it aborts the batch), the inner one a refusal (it changes nothing).
type Op<T> = DbResult<Result<T>>;

/// Records `outcome` for `reply`, passing a storage failure on.
fn finish<T>(
    done: &mut Vec<Done>,
    reply: Reply<T>,
    outcome: Op<T>,
    wrap: fn(Reply<T>, Result<T>) -> Done,
) -> DbResult<()> {
    match outcome {
        Ok(result) => {
            done.push(wrap(reply, result));
            Ok(())
        }
        Err(e) => {
            // The batch fails and `Done::fail` answers every request of it with the storage
            // error: the result here only keeps the reply channel.
            done.push(wrap(reply, Err(StoreError::Backend(String::new()))));
            Err(e)
        }
    }
}

/// The state of one batch.
struct Batch {
    now: Instant,
    wall_ms: u64,
    undo: Undo,
    /// The events of the batch, in revision order.
    events: Vec<Event>,
    /// The index the next event of the current revision gets in the log.
    index: u32,
    done: Vec<Done>,
    closing: Vec<oneshot::Sender<()>>,
    expired: usize,
}

pub(super) struct Applied {
    /// The acknowledgements of `Close` requests: the writer stops after this batch.
    pub(super) closing: Vec<oneshot::Sender<()>>,
    pub(super) failed: bool,
}

pub(super) struct Writer {
    db: Arc<Database>,
    path: Arc<Path>,
    options: Options,
    shared: Arc<Shared>,
    events: broadcast::Sender<Arc<[Event]>>,
    revision: Revision,
    next_lease: LeaseId,
    compacted: Revision,
    leases: Leases,
}

pub(super) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Writer {
    /// Loads the state of the database. Every lease starts with its full TTL from `now`,
    /// whatever its persisted deadline (see [`Writer::load`]). `now` and `wall_ms` are the
    /// same moment on the two clocks.
    pub(super) fn open(
        db: Arc<Database>,
        path: Arc<Path>,
        options: Options,
        shared: Arc<Shared>,
        events: broadcast::Sender<Arc<[Event]>>,
        now: Instant,
        wall_ms: u64,
    ) -> Result<Box<Writer>> {
        let mut writer = Box::new(Writer {
            db,
            path,
            options,
            shared,
            events,
            revision: 0,
            next_lease: 1,
            compacted: 0,
            leases: Leases::default(),
        });
        let overdue = writer
            .load(now, wall_ms)
            .map_err(|e| writer.backend("loading the store state", e))?;
        tracing::info!(
            path = %writer.path.display(),
            revision = writer.revision,
            leases = writer.leases.len(),
            deadline_passed_while_closed = overdue,
            "store opened; every lease has its full TTL from now"
        );
        Ok(writer)
    }

    /// Reads the revision counters and the leases; returns how many leases' deadlines
    /// passed while the store was closed.
    ///
    /// **Grace on open.** Each lease gets its full TTL from now, as etcd gives every lease
    /// when a new leader takes over: after an outage longer than a TTL, expiring the leases
    /// whose deadline passed would empty the registry at once, before the agents that hold
    /// them (alive all along, retrying) have had a chance to renew, and a client that
    /// resyncs in that moment would drop every endpoint. A lease nobody renews still
    /// expires, one TTL after the open. The new deadlines are persisted.
    fn load(&mut self, now: Instant, wall_ms: u64) -> DbResult<usize> {
        let txn = self.db.begin_write()?;
        let mut overdue = 0;
        {
            migrate_events(&txn)?;
            // Opening the tables in a write transaction creates them in a new file.
            let mut t = Tables::open(&txn)?;
            self.revision = meta(&t.meta, META_REVISION)?;
            self.next_lease = meta(&t.meta, META_NEXT_LEASE)?.max(1);
            self.compacted = meta(&t.meta, META_COMPACTED)?;
            let mut undo = Undo::new();
            let mut renewed = Vec::new();
            for entry in t.leases.iter()? {
                let (id, record) = entry?;
                let (ttl_ms, expiry_ms) = record.value();
                if expiry_ms <= wall_ms {
                    overdue += 1;
                }
                renewed.push((id.value(), ttl_ms));
            }
            for (id, ttl_ms) in renewed {
                t.leases
                    .insert(id, (ttl_ms, wall_ms.saturating_add(ttl_ms)))?;
                let state = LeaseState {
                    ttl: Duration::from_millis(ttl_ms),
                    deadline: now + Duration::from_millis(ttl_ms),
                };
                self.leases.set(id, Some(state), &mut undo);
            }
        }
        txn.commit()?;
        self.publish();
        Ok(overdue)
    }

    fn publish(&self) {
        self.shared
            .compacted
            .store(self.compacted, Ordering::SeqCst);
        self.shared.revision.store(self.revision, Ordering::SeqCst);
    }

    fn backend(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend(format!("{what} in {}: {e}", self.path.display()))
    }

    /// Applies one batch and answers its requests.
    pub(super) fn apply(&mut self, batch: Vec<Request>, now: Instant, wall_ms: u64) -> Applied {
        let mut b = Batch {
            now,
            wall_ms,
            undo: Undo::new(),
            events: Vec::new(),
            index: 0,
            done: Vec::with_capacity(batch.len()),
            closing: Vec::new(),
            expired: 0,
        };
        if self.leases.due(now).is_empty() && !batch.iter().any(Request::writes) {
            // Nothing to write: no transaction.
            for request in batch {
                match request {
                    Request::Lease { id, reply } if b.closing.is_empty() => {
                        let _ = reply.send(self.lease_info(id, now));
                    }
                    other => b.closing.extend(other.refuse(&self.closed_message())),
                }
            }
            return Applied {
                closing: b.closing,
                failed: false,
            };
        }

        let saved = (self.revision, self.next_lease, self.compacted);
        let mut pending = batch.into_iter();
        match self.transact(&mut b, &mut pending) {
            Ok(()) => {
                self.publish();
                if b.expired > 0 {
                    tracing::debug!(leases = b.expired, "leases expired");
                    crate::metrics::process().leases_expired(b.expired);
                }
                // One message per revision, so watchers never see half of one. No receiver
                // is not an error: nobody watches.
                for revision in b
                    .events
                    .chunk_by(|a, b| a.kv.mod_revision == b.kv.mod_revision)
                {
                    let _ = self.events.send(Arc::from(revision));
                }
                for done in b.done {
                    done.send();
                }
                Applied {
                    closing: b.closing,
                    failed: false,
                }
            }
            Err(e) => {
                let message = self.backend("writing", e).to_string();
                tracing::error!(error = %message, "store transaction failed");
                (self.revision, self.next_lease, self.compacted) = saved;
                self.leases.rollback(b.undo);
                for done in b.done {
                    done.fail(&message);
                }
                for request in pending {
                    b.closing.extend(request.refuse(&message));
                }
                Applied {
                    closing: b.closing,
                    failed: true,
                }
            }
        }
    }

    fn closed_message(&self) -> String {
        format!("the store at {} is closed", self.path.display())
    }

    fn transact(
        &mut self,
        b: &mut Batch,
        pending: &mut std::vec::IntoIter<Request>,
    ) -> DbResult<()> {
        let _timer = crate::metrics::process().store_write();
        let txn = self.db.begin_write()?;
        {
            let mut t = Tables::open(&txn)?;
            for id in self.leases.due(b.now) {
                self.remove_lease(&mut t, b, id)?;
                b.expired += 1;
            }
            for request in pending.by_ref() {
                if !b.closing.is_empty() {
                    b.closing.extend(request.refuse(&self.closed_message()));
                    continue;
                }
                match request {
                    Request::Put {
                        key,
                        value,
                        lease,
                        precondition,
                        reply,
                    } => {
                        let outcome = self.put(&mut t, b, key, value, lease, precondition);
                        finish(&mut b.done, reply, outcome, Done::Revision)?;
                    }
                    Request::Delete {
                        key,
                        precondition,
                        reply,
                    } => {
                        let outcome = self.delete(&mut t, b, &key, precondition);
                        finish(&mut b.done, reply, outcome, Done::Deleted)?;
                    }
                    Request::Grant { ttl, reply } => {
                        let outcome = self.grant(&mut t, b, ttl);
                        finish(&mut b.done, reply, outcome, Done::Lease)?;
                    }
                    Request::KeepAlive { id, reply } => {
                        let outcome = self.keep_alive(&mut t, b, id);
                        finish(&mut b.done, reply, outcome, Done::Lease)?;
                    }
                    Request::Revoke { id, reply } => {
                        let outcome = self.revoke(&mut t, b, id);
                        finish(&mut b.done, reply, outcome, Done::Revoked)?;
                    }
                    Request::Txn { txn, reply } => {
                        let outcome = self.txn(&mut t, b, txn);
                        finish(&mut b.done, reply, outcome, Done::Txn)?;
                    }
                    Request::Lease { id, reply } => {
                        b.done.push(Done::Lease(reply, self.lease_info(id, b.now)));
                    }
                    Request::Close { reply } => b.closing.push(reply),
                }
            }
            self.compact(&mut t)?;
            t.meta.insert(META_REVISION, self.revision)?;
            t.meta.insert(META_NEXT_LEASE, self.next_lease)?;
            t.meta.insert(META_COMPACTED, self.compacted)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Starts a new revision: the events recorded until the next one carry it.
    fn next_revision(&mut self, b: &mut Batch) -> Revision {
        self.revision += 1;
        b.index = 0;
        self.revision
    }

    fn put(
        &mut self,
        t: &mut Tables<'_>,
        b: &mut Batch,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        precondition: Precondition,
    ) -> Op<Revision> {
        let prev = get_kv(&t.kv, &key)?;
        if let Err(e) = check(&key, prev.as_ref(), precondition) {
            return Ok(Err(e));
        }
        if let Some(id) = lease {
            if self.leases.get(id).is_none() {
                return Ok(Err(StoreError::LeaseNotFound(id)));
            }
        }
        let revision = self.next_revision(b);
        self.put_key(t, b, key, value, lease, prev)?;
        Ok(Ok(revision))
    }

    /// Writes a key at the current revision (the caller checked the lease exists).
    fn put_key(
        &mut self,
        t: &mut Tables<'_>,
        b: &mut Batch,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        prev: Option<KeyValue>,
    ) -> DbResult<()> {
        let revision = self.revision;
        let old_lease = prev.as_ref().and_then(|p| p.lease);
        if old_lease != lease {
            if let Some(old) = old_lease {
                t.lease_keys.remove((old, key.as_str()))?;
            }
            if let Some(new) = lease {
                t.lease_keys.insert((new, key.as_str()), ())?;
            }
        }
        let kv = KeyValue {
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            mod_revision: revision,
            key,
            value,
            lease,
        };
        t.kv.insert(kv.key.as_str(), codec::encode_kv(&kv).as_slice())?;
        self.record(
            t,
            b,
            Event {
                kind: EventKind::Put,
                kv,
                prev,
            },
        )
    }

    fn delete(
        &mut self,
        t: &mut Tables<'_>,
        b: &mut Batch,
        key: &str,
        precondition: Precondition,
    ) -> Op<Option<Revision>> {
        let prev = get_kv(&t.kv, key)?;
        if let Err(e) = check(key, prev.as_ref(), precondition) {
            return Ok(Err(e));
        }
        match prev {
            None => Ok(Ok(None)),
            Some(prev) => {
                let revision = self.next_revision(b);
                self.delete_key(t, b, prev)?;
                Ok(Ok(Some(revision)))
            }
        }
    }

    /// Deletes a key at the current revision.
    fn delete_key(&mut self, t: &mut Tables<'_>, b: &mut Batch, prev: KeyValue) -> DbResult<()> {
        t.kv.remove(prev.key.as_str())?;
        if let Some(id) = prev.lease {
            t.lease_keys.remove((id, prev.key.as_str()))?;
        }
        let kv = KeyValue {
            key: prev.key.clone(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: self.revision,
            version: 0,
            lease: None,
        };
        self.record(
            t,
            b,
            Event {
                kind: EventKind::Delete,
                kv,
                prev: Some(prev),
            },
        )
    }

    fn record(&mut self, t: &mut Tables<'_>, b: &mut Batch, event: Event) -> DbResult<()> {
        t.events.insert(
            (event.kv.mod_revision, b.index),
            codec::encode_event(&event).as_slice(),
        )?;
        b.index += 1;
        b.events.push(event);
        Ok(())
    }

    /// A transaction: every comparison and lease is checked before anything is written, so
    /// a refusal changes nothing; then every op is applied at one new revision.
    fn txn(&mut self, t: &mut Tables<'_>, b: &mut Batch, txn: Txn) -> Op<TxnResult> {
        for (key, precondition) in &txn.compare {
            let current = get_kv(&t.kv, key)?;
            if let Err(e) = check(key, current.as_ref(), *precondition) {
                return Ok(Err(e));
            }
        }
        // What each op finds, read before any is applied (ops never overlap).
        let mut plan = Vec::with_capacity(txn.ops.len());
        let mut deleted = Vec::with_capacity(txn.ops.len());
        for op in txn.ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    if let Some(id) = lease {
                        if self.leases.get(id).is_none() {
                            return Ok(Err(StoreError::LeaseNotFound(id)));
                        }
                    }
                    let prev = get_kv(&t.kv, &key)?;
                    plan.push(Planned::Put(key, value, lease, prev));
                    deleted.push(0);
                }
                TxnOp::Delete { key } => {
                    let prev = get_kv(&t.kv, &key)?;
                    deleted.push(usize::from(prev.is_some()));
                    plan.extend(prev.map(Planned::Delete));
                }
                TxnOp::DeletePrefix { prefix } => {
                    let found = range_kv(&t.kv, &prefix)?;
                    deleted.push(found.len());
                    plan.extend(found.into_iter().map(Planned::Delete));
                }
            }
        }
        if plan.is_empty() {
            return Ok(Ok(TxnResult {
                revision: self.revision,
                deleted,
            }));
        }
        let revision = self.next_revision(b);
        for planned in plan {
            match planned {
                Planned::Put(key, value, lease, prev) => {
                    self.put_key(t, b, key, value, lease, prev)?
                }
                Planned::Delete(prev) => self.delete_key(t, b, prev)?,
            }
        }
        Ok(Ok(TxnResult { revision, deleted }))
    }

    fn grant(&mut self, t: &mut Tables<'_>, b: &mut Batch, ttl: Duration) -> Op<Lease> {
        let id = self.next_lease;
        self.next_lease += 1;
        let ttl_ms = millis(ttl);
        let ttl = Duration::from_millis(ttl_ms);
        t.leases
            .insert(id, (ttl_ms, b.wall_ms.saturating_add(ttl_ms)))?;
        let state = LeaseState {
            ttl,
            deadline: b.now + ttl,
        };
        self.leases.set(id, Some(state), &mut b.undo);
        Ok(Ok(Lease {
            id,
            ttl,
            remaining: ttl,
        }))
    }

    fn keep_alive(&mut self, t: &mut Tables<'_>, b: &mut Batch, id: LeaseId) -> Op<Lease> {
        let Some(state) = self.leases.get(id) else {
            return Ok(Err(StoreError::LeaseNotFound(id)));
        };
        let ttl_ms = millis(state.ttl);
        t.leases
            .insert(id, (ttl_ms, b.wall_ms.saturating_add(ttl_ms)))?;
        let renewed = LeaseState {
            ttl: state.ttl,
            deadline: b.now + state.ttl,
        };
        self.leases.set(id, Some(renewed), &mut b.undo);
        Ok(Ok(Lease {
            id,
            ttl: state.ttl,
            remaining: state.ttl,
        }))
    }

    fn revoke(&mut self, t: &mut Tables<'_>, b: &mut Batch, id: LeaseId) -> Op<()> {
        if self.leases.get(id).is_none() {
            return Ok(Err(StoreError::LeaseNotFound(id)));
        }
        self.remove_lease(t, b, id)?;
        Ok(Ok(()))
    }

    /// Deletes a lease and its keys: one revision (none without keys), one event per key,
    /// in key order, as etcd does.
    fn remove_lease(&mut self, t: &mut Tables<'_>, b: &mut Batch, id: LeaseId) -> DbResult<()> {
        let mut revision = None;
        for key in lease_keys(&t.lease_keys, id)? {
            match get_kv(&t.kv, &key)? {
                Some(prev) => {
                    if revision.is_none() {
                        revision = Some(self.next_revision(b));
                    }
                    self.delete_key(t, b, prev)?;
                }
                None => {
                    // Not reachable through this writer; tidy up rather than fail.
                    t.lease_keys.remove((id, key.as_str()))?;
                }
            }
        }
        t.leases.remove(id)?;
        self.leases.set(id, None, &mut b.undo);
        Ok(())
    }

    fn lease_info(&self, id: LeaseId, now: Instant) -> Result<Lease> {
        let state = self.leases.get(id).ok_or(StoreError::LeaseNotFound(id))?;
        Ok(Lease {
            id,
            ttl: state.ttl,
            remaining: state.deadline.saturating_duration_since(now),
        })
    }

    /// Deletes old events, keeping at least the last `history` revisions; runs once per
    /// `compact_every` revisions so the deletes come in chunks.
    fn compact(&mut self, t: &mut Tables<'_>) -> DbResult<()> {
        let history = self.options.history;
        if self.revision.saturating_sub(self.compacted) <= history + self.options.compact_every {
            return Ok(());
        }
        let floor = self.revision - history;
        t.events
            .retain_in::<(u64, u32), _>((self.compacted + 1, 0)..=(floor, u32::MAX), |_, _| {
                false
            })?;
        self.compacted = floor;
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.next_deadline()
    }
}

/// Checks a precondition against the current state of `key`.
fn check(key: &str, current: Option<&KeyValue>, precondition: Precondition) -> Result<()> {
    let found = || match current {
        None => "absent".to_owned(),
        Some(kv) => format!("mod_revision {}", kv.mod_revision),
    };
    let expected = match (precondition, current) {
        (Precondition::None, _) | (Precondition::Absent, None) => return Ok(()),
        (Precondition::ModRevision(r), Some(kv)) if kv.mod_revision == r => return Ok(()),
        (Precondition::Absent, Some(_)) => "absent".to_owned(),
        (Precondition::ModRevision(r), _) => format!("mod_revision {r}"),
    };
    Err(StoreError::Conflict {
        key: key.to_owned(),
        expected,
        found: found(),
    })
}

/// The writer task: batches requests, runs each batch on the blocking pool, and wakes up
/// for lease deadlines. Ends on a `Close` request or when every handle is gone.
pub(super) async fn run(mut writer: Box<Writer>, mut requests: mpsc::Receiver<Request>) {
    let max_batch = writer.options.max_batch.max(1);
    let closing = loop {
        let mut batch = Vec::new();
        let deadline = writer.next_deadline();
        tokio::select! {
            biased;
            request = requests.recv() => match request {
                Some(request) => batch.push(request),
                None => break Vec::new(),
            },
            () = sleep_until(deadline) => {}
        }
        let mut bytes = batch.iter().map(Request::bytes).sum::<usize>();
        while batch.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match requests.try_recv() {
                Ok(request) => {
                    bytes += request.bytes();
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let wall_ms = unix_millis();
        let applied = tokio::task::spawn_blocking(move || {
            let applied = writer.apply(batch, now, wall_ms);
            (writer, applied)
        })
        .await;
        match applied {
            Ok((w, applied)) => {
                writer = w;
                if !applied.closing.is_empty() {
                    break applied.closing;
                }
                if applied.failed {
                    tokio::time::sleep(FAILURE_BACKOFF).await;
                }
            }
            Err(e) => {
                // The batch panicked: its callers see the store as closed.
                tracing::error!(error = %e, "the store writer failed; the store is closed");
                return;
            }
        }
    };
    // Release the database before acknowledging the close, so the file can be reopened.
    drop(writer);
    drop(requests);
    for ack in closing {
        let _ = ack.send(());
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(mod_revision: Revision) -> KeyValue {
        KeyValue {
            key: "k".into(),
            value: Vec::new(),
            create_revision: 1,
            mod_revision,
            version: 1,
            lease: None,
        }
    }

    #[test]
    fn preconditions() {
        assert!(check("k", None, Precondition::None).is_ok());
        assert!(check("k", Some(&kv(3)), Precondition::None).is_ok());
        assert!(check("k", None, Precondition::Absent).is_ok());
        assert!(check("k", Some(&kv(3)), Precondition::ModRevision(3)).is_ok());
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert_eq!(
            msg(check("k", Some(&kv(3)), Precondition::Absent)),
            r#"precondition failed on "k": expected absent, found mod_revision 3"#
        );
        assert_eq!(
            msg(check("k", Some(&kv(3)), Precondition::ModRevision(2))),
            r#"precondition failed on "k": expected mod_revision 2, found mod_revision 3"#
        );
        assert_eq!(
            msg(check("k", None, Precondition::ModRevision(2))),
            r#"precondition failed on "k": expected mod_revision 2, found absent"#
        );
    }
}
