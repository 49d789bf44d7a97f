//! Watches: history from the event log, then live events from the writer's broadcast.
//!
//! Each watch is a task that forwards into the watch's bounded channel. It keeps `last`,
//! the last revision it has accounted for (delivered, or skipped because no key of it is
//! under the prefix). The writer broadcasts each revision whole (all the events of a
//! transaction or a lease revoke together), the log is read in whole revisions, and
//! revisions are consecutive, so the next one it needs is always `last + 1`.
//!
//! **Hand-off.** The task subscribes to the broadcast *before* it reads the log. An event
//! committed before the log read is in the log (and, if it is broadcast after the
//! subscription, dropped as `revision <= last`); an event committed after it is broadcast
//! after the subscription, so it is received live. No gap, no duplicate. When the watch
//! starts at or after the current revision there is no history to read: no disk access.
//!
//! **Lag.** A watcher that falls behind the broadcast (a slow consumer filling its channel,
//! or a burst larger than the broadcast buffer) gets `Lagged`: it then re-reads the missing
//! range from the event log and carries on, losing nothing. Only if that range has been
//! compacted meanwhile does the stream end with [`StoreError::Compacted`], and the client
//! re-reads a snapshot. The live path itself never touches the disk.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use redb::ReadableDatabase;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;

use super::tables::{read_log, LogChunk, EVENTS, META};
use super::{Inner, Shared};
use crate::store::{Event, Result, Revision, StoreError, Watch};

/// Events read from the log per read transaction when catching up (more when a revision
/// holds more: revisions are read whole).
const CHUNK: usize = 1024;

pub(super) fn start(inner: &Arc<Inner>, prefix: &str, after: Revision) -> Result<Watch> {
    let live = inner.subscribe()?;
    // Read after subscribing: every event above `current` is broadcast after this point.
    let compacted = inner.shared.compacted.load(Ordering::SeqCst);
    if after < compacted {
        return Err(compacted_error(after, compacted));
    }
    let current = inner.shared.revision.load(Ordering::SeqCst);
    let (tx, events) = mpsc::channel(inner.options.watch_capacity.max(1));
    let watcher = Watcher {
        inner: Arc::downgrade(inner),
        path: inner.path.clone(),
        shared: inner.shared.clone(),
        prefix: prefix.into(),
        last: after,
        tx,
    };
    inner.runtime.spawn(watcher.run(live, after < current));
    Ok(Watch::new(events))
}

fn compacted_error(after: Revision, compacted: Revision) -> StoreError {
    StoreError::Compacted {
        requested: after + 1,
        oldest: compacted + 1,
    }
}

/// The consumer is gone or the stream has ended.
struct Stop;

struct Watcher {
    inner: Weak<Inner>,
    path: Arc<Path>,
    shared: Arc<Shared>,
    prefix: Arc<str>,
    last: Revision,
    tx: mpsc::Sender<Result<Vec<Event>>>,
}

impl Watcher {
    async fn run(mut self, mut live: broadcast::Receiver<Arc<[Event]>>, history: bool) {
        if history && self.catch_up().await.is_err() {
            return;
        }
        loop {
            let received = tokio::select! {
                biased;
                () = self.tx.closed() => return,
                received = live.recv() => received,
            };
            let flow = match received {
                Ok(events) => {
                    let revision = events.first().map_or(0, |e| e.kv.mod_revision);
                    if revision <= self.last {
                        Ok(())
                    } else if revision == self.last + 1 {
                        self.deliver(revision, &events).await
                    } else {
                        self.catch_up().await
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        prefix = %self.prefix,
                        missed,
                        "watch fell behind; catching up from the event log"
                    );
                    self.shared.catch_ups.fetch_add(1, Ordering::Relaxed);
                    self.catch_up().await
                }
                Err(RecvError::Closed) => {
                    let closed = StoreError::Backend(format!(
                        "the store at {} was closed",
                        self.path.display()
                    ));
                    let _ = self.tx.send(Err(closed)).await;
                    return;
                }
            };
            if flow.is_err() {
                return;
            }
        }
    }

    /// Delivers the events of `revision` that are under the prefix, if any.
    async fn deliver(
        &mut self,
        revision: Revision,
        events: &[Event],
    ) -> std::result::Result<(), Stop> {
        self.last = revision;
        let mine: Vec<Event> = events
            .iter()
            .filter(|e| e.kv.key.starts_with(&*self.prefix))
            .cloned()
            .collect();
        if !mine.is_empty() {
            self.tx.send(Ok(mine)).await.map_err(|_| Stop)?;
        }
        Ok(())
    }

    /// Delivers every event above `last` that the log holds now.
    async fn catch_up(&mut self) -> std::result::Result<(), Stop> {
        loop {
            let chunk = match self.read_chunk().await {
                Ok(chunk) => chunk,
                Err(e) => {
                    let _ = self.tx.send(Err(e)).await;
                    return Err(Stop);
                }
            };
            if self.last < chunk.compacted {
                let _ = self
                    .tx
                    .send(Err(compacted_error(self.last, chunk.compacted)))
                    .await;
                return Err(Stop);
            }
            // The chunk holds whole revisions: one item.
            if !chunk.events.is_empty() {
                self.tx.send(Ok(chunk.events)).await.map_err(|_| Stop)?;
            }
            if let Some(last) = chunk.last {
                self.last = last;
            }
            if !chunk.more {
                return Ok(());
            }
        }
    }

    async fn read_chunk(&self) -> Result<LogChunk> {
        let db = match self.inner.upgrade() {
            Some(inner) => inner.db()?,
            None => {
                return Err(StoreError::Backend(format!(
                    "the store at {} was closed",
                    self.path.display()
                )))
            }
        };
        let (after, prefix, path) = (self.last, self.prefix.clone(), self.path.clone());
        let what = |e: &dyn std::fmt::Display| {
            StoreError::Backend(format!(
                "reading the event log after revision {after} in {}: {e}",
                path.display()
            ))
        };
        tokio::task::spawn_blocking(move || -> super::tables::DbResult<LogChunk> {
            let txn = db.begin_read()?;
            read_log(
                &txn.open_table(EVENTS)?,
                &txn.open_table(META)?,
                after,
                &prefix,
                CHUNK,
            )
        })
        .await
        .map_err(|e| what(&e))?
        .map_err(|e| what(&e))
    }
}
