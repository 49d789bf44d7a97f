//! Storage with etcd's semantics, behind one trait.
//!
//! The control plane keeps everything (services, instances, policies, the CA) as keys in a
//! [`Store`]. The contract is etcd's, so that the embedded default ([`embedded`]) and an
//! etcd-backed store for several control-plane replicas are interchangeable:
//!
//! - Every successful write bumps one global **revision**; each key remembers the revision
//!   that created it and the one that last changed it. A write may change several keys at
//!   once ([`Store::txn`], a lease revoke or expiry): it is still one revision, and all its
//!   events carry that revision as their `mod_revision`, in the write's order.
//! - Writes can be conditional (**compare-and-set** on the key's modification revision, or
//!   on its absence), which is how concurrent updaters avoid lost updates.
//! - A **lease** has a TTL; keys attached to it are deleted when it expires or is revoked.
//!   Keep-alives renew it. Leases survive restarts with their remaining time.
//! - A **watch** streams every change under a prefix from a given revision on, with no gap
//!   and no duplicate, so a watcher can resume exactly where it stopped (or learns that the
//!   history it asks for was compacted and must re-read a snapshot). Like etcd's watch
//!   responses, each item of the stream holds whole revisions: a reader that applies an
//!   item at a time never sees half of a transaction.
//! - A write is acknowledged only once durable: a crash at any point loses no acknowledged
//!   write.

pub mod embedded;

use std::{future::Future, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub type Revision = u64;
pub type LeaseId = u64;

/// One key with its value and history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the write that created the key.
    pub create_revision: Revision,
    /// The revision of the last write to the key.
    pub mod_revision: Revision,
    /// Writes since creation (1 for a new key).
    pub version: u64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// The condition a write requires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precondition {
    #[default]
    None,
    /// The key must not exist.
    Absent,
    /// The key must exist with this modification revision.
    ModRevision(Revision),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as a watcher sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// After a put: the new state. After a delete: the key, an empty value, and
    /// `mod_revision` = the revision of the delete.
    pub kv: KeyValue,
    /// The state before the change, when there was one.
    pub prev: Option<KeyValue>,
}

/// Lease state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
    /// Time left before expiry.
    pub remaining: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("precondition failed on {key:?}: expected {expected}, found {found}")]
    Conflict {
        key: String,
        expected: String,
        found: String,
    },
    #[error("lease {0} does not exist (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("revision {requested} has been compacted; the oldest available is {oldest}: re-read a snapshot and watch from its revision")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    /// The request itself is wrong (an empty key, a value over the size limit, a TTL out of
    /// range): retrying it unchanged cannot succeed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The storage failed or is closed; the message names the operation and the file.
    #[error("storage failure: {0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A watch: a snapshot-free stream of events under a prefix, from `start_revision` on.
/// Each item holds the events (under the prefix) of one or more whole revisions, in order;
/// a revision is never split across items. Dropping it cancels the watch.
pub struct Watch {
    pub events: mpsc::Receiver<Result<Vec<Event>>>,
    /// What [`Watch::next_event`] has taken from `events` and not handed out yet.
    buffered: std::collections::VecDeque<Event>,
}

impl Watch {
    pub fn new(events: mpsc::Receiver<Result<Vec<Event>>>) -> Watch {
        Watch {
            events,
            buffered: Default::default(),
        }
    }

    /// The next event, one at a time, for readers that do not care where revisions end;
    /// `None` once the stream has ended.
    pub async fn next_event(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(event) = self.buffered.pop_front() {
                return Some(Ok(event));
            }
            match self.events.recv().await? {
                Ok(events) => self.buffered.extend(events),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// One write of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    /// Deletes the key if it exists.
    Delete { key: String },
    /// Deletes every key starting with `prefix` (etcd: a DeleteRange up to the prefix's
    /// range end).
    DeletePrefix { prefix: String },
}

/// Several writes applied atomically, as one revision, if every comparison holds: etcd's
/// `Txn` with `compare` as its `If` and `ops` as its `Then` (a failed comparison is
/// [`StoreError::Conflict`] and changes nothing, where etcd answers `succeeded: false`).
/// A key may be written by one op only (as etcd requires).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<(String, Precondition)>,
    pub ops: Vec<TxnOp>,
}

/// What a [`Txn`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// The revision of the transaction: every event it made carries it. When it changed
    /// nothing (only deletes of absent keys), the store's revision at the time.
    pub revision: Revision,
    /// For each op, in order, how many keys it deleted (0 for a put), as etcd's
    /// `DeleteRangeResponse.deleted`.
    pub deleted: Vec<usize>,
}

impl TxnResult {
    /// Keys deleted by every op together.
    pub fn total_deleted(&self) -> usize {
        self.deleted.iter().sum()
    }
}

/// The storage contract. Implementations are cheap to clone handles.
pub trait Store: Send + Sync + 'static {
    /// The revision of the last write.
    fn revision(&self) -> Revision;

    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>>> + Send;

    /// Every key starting with `prefix`, sorted, and the revision they were read at.
    fn range(&self, prefix: &str)
        -> impl Future<Output = Result<(Vec<KeyValue>, Revision)>> + Send;

    /// Writes `value` at `key`; returns the revision of the write.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        precondition: Precondition,
    ) -> impl Future<Output = Result<Revision>> + Send;

    /// Deletes `key`; returns the revision of the delete, or `None` if it did not exist
    /// (and the precondition allowed that).
    fn delete(
        &self,
        key: &str,
        precondition: Precondition,
    ) -> impl Future<Output = Result<Option<Revision>>> + Send;

    /// Applies a [`Txn`]: all of it, as one revision, or nothing.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnResult>> + Send;

    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<Lease>> + Send;

    /// Renews a lease to its full TTL.
    fn keep_alive(&self, id: LeaseId) -> impl Future<Output = Result<Lease>> + Send;

    /// Revokes a lease, deleting every key attached to it in one revision.
    fn revoke_lease(&self, id: LeaseId) -> impl Future<Output = Result<()>> + Send;

    fn lease(&self, id: LeaseId) -> impl Future<Output = Result<Lease>> + Send;

    /// Streams changes under `prefix` with revision > `after` (`after` = the revision of a
    /// snapshot taken with [`Store::range`]).
    fn watch(&self, prefix: &str, after: Revision) -> Result<Watch>;
}
