use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{EmbeddedStore, Options, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::store::{Event, EventKind, Precondition, Store, StoreError, Txn, TxnOp, Watch};

mod crash;
mod perf;

/// A directory under the system temp dir, unique to this process and test, removed on drop.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "malla-store-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) async fn recv(watch: &mut Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(30), watch.next_event())
        .await
        .expect("no event within 30 s")
        .expect("the watch ended")
        .expect("the watch failed")
}

fn none() -> Precondition {
    Precondition::None
}

#[tokio::test]
async fn put_get_range_delete_with_revisions() {
    let dir = TempDir::new("basic");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(store.revision(), 0);
    assert_eq!(store.get("a").await.unwrap(), None);

    assert_eq!(
        store.put("a", b"1".to_vec(), None, none()).await.unwrap(),
        1
    );
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        (
            a.key.as_str(),
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.version,
            a.lease
        ),
        ("a", &b"1"[..], 1, 1, 1, None)
    );
    assert_eq!(
        store.put("a", b"2".to_vec(), None, none()).await.unwrap(),
        2
    );
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.version
        ),
        (&b"2"[..], 1, 2, 2)
    );

    store.put("b", b"x".to_vec(), None, none()).await.unwrap();
    store.put("c/x", b"y".to_vec(), None, none()).await.unwrap();
    assert_eq!(store.revision(), 4);

    let (all, revision) = store.range("").await.unwrap();
    assert_eq!(revision, 4);
    let keys: Vec<_> = all.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c/x"]);
    let (under_c, _) = store.range("c/").await.unwrap();
    assert_eq!(under_c.len(), 1);
    assert_eq!(under_c[0].key, "c/x");
    assert!(store.range("zz").await.unwrap().0.is_empty());

    assert_eq!(store.delete("a", none()).await.unwrap(), Some(5));
    assert_eq!(store.get("a").await.unwrap(), None);
    assert_eq!(store.delete("a", none()).await.unwrap(), None);
    assert_eq!(store.revision(), 5, "deleting a missing key is not a write");

    // A key created again starts a new life.
    assert_eq!(
        store.put("a", b"3".to_vec(), None, none()).await.unwrap(),
        6
    );
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (6, 6, 1));
    store.close().await.unwrap();
}

#[tokio::test]
async fn compare_and_set_conflicts_are_precise() {
    let dir = TempDir::new("cas");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let absent = Precondition::Absent;

    assert_eq!(
        store.put("k", b"1".to_vec(), None, absent).await.unwrap(),
        1
    );
    let err = store
        .put("k", b"2".to_vec(), None, absent)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key, expected, found }
            if key == "k" && expected == "absent" && found == "mod_revision 1"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        r#"precondition failed on "k": expected absent, found mod_revision 1"#
    );

    let at = |r| Precondition::ModRevision(r);
    assert_eq!(store.put("k", b"2".to_vec(), None, at(1)).await.unwrap(), 2);
    let err = store
        .put("k", b"3".to_vec(), None, at(1))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"precondition failed on "k": expected mod_revision 1, found mod_revision 2"#
    );
    let err = store
        .put("missing", b"".to_vec(), None, at(5))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"precondition failed on "missing": expected mod_revision 5, found absent"#
    );

    let err = store.delete("k", at(1)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let err = store.delete("k", absent).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert_eq!(store.revision(), 2, "refused writes change nothing");
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"2");

    assert_eq!(store.delete("k", at(2)).await.unwrap(), Some(3));
    assert_eq!(store.delete("k", absent).await.unwrap(), None);
    assert_eq!(store.delete("k", none()).await.unwrap(), None);
    store.close().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_clearly() {
    let dir = TempDir::new("bad");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    fn invalid<T: std::fmt::Debug>(result: Result<T, StoreError>) -> String {
        match result {
            Err(StoreError::Invalid(message)) => message,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    assert!(invalid(store.put("", vec![], None, none()).await).contains("empty"));
    assert!(invalid(store.get("").await).contains("empty"));
    assert!(invalid(store.delete("", none()).await).contains("empty"));
    let long = "k".repeat(MAX_KEY_BYTES + 1);
    assert!(invalid(store.put(&long, vec![], None, none()).await).contains("limit"));

    let message = invalid(
        store
            .put("big", vec![0; MAX_VALUE_BYTES + 1], None, none())
            .await,
    );
    assert!(
        message.contains("1048577 bytes") && message.contains("1 MiB"),
        "{message}"
    );
    store
        .put("big", vec![7; MAX_VALUE_BYTES], None, none())
        .await
        .unwrap();
    assert_eq!(
        store.get("big").await.unwrap().unwrap().value.len(),
        MAX_VALUE_BYTES
    );

    for ttl in [Duration::ZERO, Duration::from_millis(999)] {
        assert!(invalid(store.grant_lease(ttl).await).contains("out of range"));
    }
    assert_eq!(store.revision(), 1);
    store.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn leases_keep_alive_and_expire() {
    let dir = TempDir::new("lease-expiry");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        (lease.ttl, lease.remaining),
        (Duration::from_secs(10), Duration::from_secs(10))
    );
    store
        .put("svc/a", b"a".to_vec(), Some(lease.id), none())
        .await
        .unwrap();
    store
        .put("svc/b", b"b".to_vec(), Some(lease.id), none())
        .await
        .unwrap();
    store
        .put("svc/c", b"c".to_vec(), None, none())
        .await
        .unwrap();
    assert_eq!(
        store.get("svc/a").await.unwrap().unwrap().lease,
        Some(lease.id)
    );
    let mut watch = store.watch("svc/", store.revision()).unwrap();

    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        store.lease(lease.id).await.unwrap().remaining,
        Duration::from_secs(4)
    );
    let renewed = store.keep_alive(lease.id).await.unwrap();
    assert_eq!(renewed.remaining, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        store.lease(lease.id).await.unwrap().remaining,
        Duration::from_secs(4)
    );
    assert!(
        store.get("svc/a").await.unwrap().is_some(),
        "renewed, so still alive"
    );

    tokio::time::sleep(Duration::from_secs(5)).await;
    for key in ["svc/a", "svc/b"] {
        let event = recv(&mut watch).await;
        assert_eq!(
            (event.kind, event.kv.key.as_str()),
            (EventKind::Delete, key)
        );
        assert_eq!(event.prev.unwrap().lease, Some(lease.id));
    }
    assert_eq!(store.revision(), 4, "one revision for the lease's keys");
    assert_eq!(store.get("svc/a").await.unwrap(), None);
    assert!(store.get("svc/c").await.unwrap().is_some());
    assert!(
        matches!(store.lease(lease.id).await, Err(StoreError::LeaseNotFound(id)) if id == lease.id)
    );
    assert!(matches!(
        store.keep_alive(lease.id).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.put("svc/a", vec![], Some(lease.id), none()).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    store.close().await.unwrap();
}

#[tokio::test]
async fn revoke_deletes_keys_with_events() {
    let dir = TempDir::new("revoke");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .put("x/b", b"b".to_vec(), Some(lease.id), none())
        .await
        .unwrap();
    store
        .put("x/a", b"a".to_vec(), Some(lease.id), none())
        .await
        .unwrap();
    let mut watch = store.watch("x/", 2).unwrap();

    store.revoke_lease(lease.id).await.unwrap();
    let (first, second) = (recv(&mut watch).await, recv(&mut watch).await);
    assert_eq!(
        [
            (
                first.kind.clone(),
                first.kv.key.as_str(),
                first.kv.mod_revision
            ),
            (
                second.kind.clone(),
                second.kv.key.as_str(),
                second.kv.mod_revision
            )
        ],
        // One revision for the whole revoke, as in etcd.
        [(EventKind::Delete, "x/a", 3), (EventKind::Delete, "x/b", 3)]
    );
    assert_eq!(first.kv.value, b"");
    assert_eq!(first.prev.unwrap().value, b"a");
    assert!(store.range("x/").await.unwrap().0.is_empty());
    assert!(matches!(
        store.revoke_lease(lease.id).await,
        Err(StoreError::LeaseNotFound(_))
    ));

    let err = store
        .put("x/c", vec![], Some(999), none())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseNotFound(999)), "{err:?}");
    assert_eq!(store.revision(), 3);
    store.close().await.unwrap();
}

#[tokio::test]
async fn re_put_moves_a_key_between_leases() {
    let dir = TempDir::new("reattach");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let one = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let two = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_ne!(one.id, two.id);
    store
        .put("k", b"1".to_vec(), Some(one.id), none())
        .await
        .unwrap();
    store
        .put("k", b"2".to_vec(), Some(two.id), none())
        .await
        .unwrap();
    store.revoke_lease(one.id).await.unwrap();
    assert_eq!(store.get("k").await.unwrap().unwrap().lease, Some(two.id));
    store.put("k", b"3".to_vec(), None, none()).await.unwrap();
    store.revoke_lease(two.id).await.unwrap();
    let k = store.get("k").await.unwrap().unwrap();
    assert_eq!(
        (k.value.as_slice(), k.lease, k.version),
        (&b"3"[..], None, 3)
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn watch_from_now_sees_later_writes_under_its_prefix() {
    let dir = TempDir::new("watch-now");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    store
        .put("svc/old", b"0".to_vec(), None, none())
        .await
        .unwrap();
    let (_, revision) = store.range("svc/").await.unwrap();
    let mut watch = store.watch("svc/", revision).unwrap();

    store
        .put("other", b"1".to_vec(), None, none())
        .await
        .unwrap();
    store
        .put("svc/a", b"2".to_vec(), None, none())
        .await
        .unwrap();
    store
        .put("svc/a", b"3".to_vec(), None, none())
        .await
        .unwrap();
    let created = recv(&mut watch).await;
    assert_eq!(
        (
            created.kind,
            created.kv.key.as_str(),
            created.kv.mod_revision
        ),
        (EventKind::Put, "svc/a", 3)
    );
    assert_eq!(created.prev, None);
    let updated = recv(&mut watch).await;
    assert_eq!(
        (updated.kv.value.as_slice(), updated.kv.version),
        (&b"3"[..], 2)
    );
    assert_eq!(updated.prev.unwrap().value, b"2");
    assert!(watch.events.try_recv().is_err(), "nothing else under svc/");
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_the_past_hands_off_to_live_without_gap_or_duplicate() {
    let dir = TempDir::new("watch-handoff");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    store.put("noise", vec![], None, none()).await.unwrap();
    let start = store.revision();
    let writers: Vec<_> = (0..10)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    store
                        .put(&format!("w/{w}/{i}"), vec![w], None, none())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    while store.revision() < start + 250 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut watch = store.watch("w/", start).unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let mut revisions = Vec::new();
    for _ in 0..500 {
        revisions.push(recv(&mut watch).await.kv.mod_revision);
    }
    assert_eq!(revisions, (start + 1..=start + 500).collect::<Vec<_>>());
    store.put("w/last", vec![], None, none()).await.unwrap();
    assert_eq!(recv(&mut watch).await.kv.mod_revision, start + 501);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watcher_catches_up_from_the_log() {
    let dir = TempDir::new("watch-lag");
    let options = Options {
        broadcast_capacity: 8,
        watch_capacity: 4,
        ..Options::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).await.unwrap();
    let mut watch = store.watch("", 0).unwrap();
    // Nobody reads the watch while 300 writes happen: it must fall behind the broadcast.
    let writers: Vec<_> = (0..10)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..30 {
                    store
                        .put(&format!("k/{w}/{i}"), vec![], None, none())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for expected in 1..=300 {
        assert_eq!(recv(&mut watch).await.kv.mod_revision, expected);
    }
    assert!(
        store.catch_ups() > 0,
        "the watcher never lagged: the test proves nothing"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn compaction_keeps_recent_history_and_refuses_older() {
    let dir = TempDir::new("compaction");
    let options = Options {
        history: 50,
        compact_every: 10,
        ..Options::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).await.unwrap();
    for i in 0..200 {
        store
            .put(&format!("k{}", i % 7), vec![], None, none())
            .await
            .unwrap();
    }
    let err = store
        .watch("", 0)
        .err()
        .expect("history from revision 1 is gone");
    let StoreError::Compacted { requested, oldest } = err else {
        panic!("expected Compacted, got {err:?}");
    };
    assert_eq!(requested, 1);
    assert!(
        (200 - 60 + 1..=200 - 50 + 1).contains(&oldest),
        "oldest {oldest}"
    );
    assert!(err_message(store.watch("", oldest - 2)).contains("re-read a snapshot"));

    // The last `history` revisions are always there.
    let mut watch = store.watch("", 150).unwrap();
    for expected in 151..=200 {
        assert_eq!(recv(&mut watch).await.kv.mod_revision, expected);
    }
    store.close().await.unwrap();
}

fn err_message(watch: Result<Watch, StoreError>) -> String {
    watch.err().expect("expected an error").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_left_behind_by_compaction_ends_with_compacted() {
    let dir = TempDir::new("lag-compacted");
    let options = Options {
        history: 20,
        compact_every: 1,
        broadcast_capacity: 4,
        watch_capacity: 1,
        ..Options::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).await.unwrap();
    let mut watch = store.watch("", 0).unwrap();
    for i in 0..200 {
        store
            .put(&format!("k{i}"), vec![], None, none())
            .await
            .unwrap();
    }
    let mut last = 0;
    loop {
        let item = tokio::time::timeout(Duration::from_secs(30), watch.next_event())
            .await
            .expect("the watch neither delivered nor ended");
        match item {
            Some(Ok(event)) => {
                assert_eq!(event.kv.mod_revision, last + 1, "no gap before the error");
                last = event.kv.mod_revision;
            }
            Some(Err(StoreError::Compacted { requested, .. })) => {
                assert_eq!(requested, last + 1);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(last < 200);
    assert!(
        watch.events.recv().await.is_none(),
        "the stream ends after the error"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn restart_keeps_keys_revision_leases_and_history() {
    let dir = TempDir::new("restart");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store
        .put("a", b"1".to_vec(), Some(lease.id), none())
        .await
        .unwrap();
    store.put("b", b"2".to_vec(), None, none()).await.unwrap();
    store.put("c", b"3".to_vec(), None, none()).await.unwrap();
    store.delete("c", none()).await.unwrap();
    store.close().await.unwrap();
    assert!(store
        .get("a")
        .await
        .unwrap_err()
        .to_string()
        .contains("closed"));
    assert!(store
        .put("z", vec![], None, none())
        .await
        .unwrap_err()
        .to_string()
        .contains("closed"));

    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(store.revision(), 4);
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.lease, a.mod_revision),
        (&b"1"[..], Some(lease.id), 1)
    );
    assert_eq!(store.get("c").await.unwrap(), None);
    let remaining = store.lease(lease.id).await.unwrap().remaining;
    assert!(
        remaining <= Duration::from_secs(30) && remaining > Duration::from_secs(25),
        "the lease resumes with its remaining time, got {remaining:?}"
    );
    let next = store.grant_lease(Duration::from_secs(5)).await.unwrap();
    assert!(next.id > lease.id, "lease ids are not reused");

    let mut watch = store.watch("", 0).unwrap();
    let mut history = Vec::new();
    for _ in 0..4 {
        let event = recv(&mut watch).await;
        history.push((event.kind, event.kv.key, event.kv.mod_revision));
    }
    assert_eq!(
        history,
        [
            (EventKind::Put, "a".to_owned(), 1),
            (EventKind::Put, "b".to_owned(), 2),
            (EventKind::Put, "c".to_owned(), 3),
            (EventKind::Delete, "c".to_owned(), 4),
        ]
    );
    store.close().await.unwrap();
}

/// A lease whose deadline passed while the store was closed (an outage longer than its
/// TTL) is not expired on open: every lease gets its full TTL from the open, as etcd gives
/// them when a leader takes over, and can be renewed; one nobody renews expires one TTL
/// after the open. Time is paused: the deadlines are exact.
#[tokio::test(start_paused = true)]
async fn leases_get_their_full_ttl_on_open() {
    let dir = TempDir::new("lease-grace");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let renewed = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    let forgotten = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store
        .put("inst/a", b"a".to_vec(), Some(renewed.id), none())
        .await
        .unwrap();
    store
        .put("inst/b", b"b".to_vec(), Some(forgotten.id), none())
        .await
        .unwrap();
    store.close().await.unwrap();
    // Down for an hour, as far as the persisted deadlines say.
    let moved =
        EmbeddedStore::age_leases_while_closed(dir.path(), Duration::from_secs(3600)).unwrap();
    assert_eq!(moved, 2);

    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(store.revision(), 2, "nothing expired on open");
    for lease in [renewed.id, forgotten.id] {
        assert_eq!(
            store.lease(lease).await.unwrap().remaining,
            Duration::from_secs(10)
        );
    }
    let mut watch = store.watch("inst/", 2).unwrap();
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(store.get("inst/b").await.unwrap().is_some());
    store.keep_alive(renewed.id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let event = recv(&mut watch).await;
    assert_eq!(
        (event.kind, event.kv.key.as_str(), event.kv.mod_revision),
        (EventKind::Delete, "inst/b", 3)
    );
    assert_eq!(store.get("inst/b").await.unwrap(), None);
    assert!(store.get("inst/a").await.unwrap().is_some());
    store.close().await.unwrap();
}

#[tokio::test]
async fn close_ends_watches_and_releases_the_file() {
    let dir = TempDir::new("close");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let err = EmbeddedStore::open(dir.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is another malla control running with --data-dir")
            && err.contains(&dir.path().display().to_string()),
        "{err}"
    );
    let mut watch = store.watch("", 0).unwrap();
    let handle = store.clone();
    handle.close().await.unwrap();
    store.close().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), watch.events.recv())
        .await
        .unwrap();
    assert!(matches!(ended, Some(Err(StoreError::Backend(m))) if m.contains("closed")));
    assert!(store.watch("", 0).is_err());

    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    store.put("k", vec![], None, none()).await.unwrap();
    drop(store);
}

#[tokio::test]
async fn open_names_the_directory_it_cannot_create() {
    let dir = TempDir::new("bad-dir");
    std::fs::create_dir_all(dir.path()).unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let err = EmbeddedStore::open(&file.join("data"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot create the data directory") && err.contains("file/data"),
        "{err}"
    );
}

fn put_op(key: &str, value: &[u8]) -> TxnOp {
    TxnOp::Put {
        key: key.into(),
        value: value.to_vec(),
        lease: None,
    }
}

/// A transaction is one revision: every event carries it, a watcher receives them in one
/// item, and a prefix delete removes every key under the prefix.
#[tokio::test]
async fn a_transaction_is_one_revision() {
    let dir = TempDir::new("txn");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    for i in 0..100 {
        store
            .put(&format!("svc/a/{i:03}"), vec![1], None, none())
            .await
            .unwrap();
    }
    store.put("svc/b/0", vec![1], None, none()).await.unwrap();
    store.put("spec/a", vec![1], None, none()).await.unwrap();
    let before = store.revision();
    let mut watch = store.watch("", before).unwrap();
    let result = store
        .txn(Txn {
            compare: vec![("spec/a".into(), Precondition::ModRevision(before))],
            ops: vec![
                TxnOp::DeletePrefix {
                    prefix: "svc/a/".into(),
                },
                TxnOp::Delete {
                    key: "spec/a".into(),
                },
                put_op("note", b"deleted a"),
                TxnOp::Delete {
                    key: "absent".into(),
                },
            ],
        })
        .await
        .unwrap();
    assert_eq!(result.revision, before + 1);
    assert_eq!(result.deleted, [100, 1, 0, 0]);
    assert_eq!(store.revision(), before + 1);
    let item = tokio::time::timeout(Duration::from_secs(30), watch.events.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(item.len(), 102, "the whole revision in one item");
    assert!(item.iter().all(|e| e.kv.mod_revision == before + 1));
    assert_eq!(item[101].kv.key, "note");
    assert_eq!(item[101].kv.create_revision, before + 1);
    let (left, _) = store.range("svc/").await.unwrap();
    assert_eq!(
        left.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        ["svc/b/0"]
    );

    // From the log too: a watch from the past gets the revision whole.
    let mut past = store.watch("svc/", before).unwrap();
    let item = tokio::time::timeout(Duration::from_secs(30), past.events.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(item.len(), 100);
    store.close().await.unwrap();
}

/// A failed comparison, an unknown lease or a key written twice change nothing.
#[tokio::test]
async fn a_refused_transaction_changes_nothing() {
    let dir = TempDir::new("txn-refused");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    store.put("a", vec![1], None, none()).await.unwrap();
    let revision = store.revision();
    let conflict = store
        .txn(Txn {
            compare: vec![("a".into(), Precondition::Absent)],
            ops: vec![TxnOp::Delete { key: "a".into() }],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&conflict, StoreError::Conflict { key, .. } if key == "a"),
        "{conflict}"
    );
    let lease = store
        .txn(Txn {
            compare: vec![],
            ops: vec![
                TxnOp::Delete { key: "a".into() },
                TxnOp::Put {
                    key: "b".into(),
                    value: vec![],
                    lease: Some(42),
                },
            ],
        })
        .await
        .unwrap_err();
    assert!(matches!(lease, StoreError::LeaseNotFound(42)), "{lease}");
    let twice = store
        .txn(Txn {
            compare: vec![],
            ops: vec![
                TxnOp::DeletePrefix { prefix: "a".into() },
                put_op("ab", b""),
            ],
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(twice.contains("more than once"), "{twice}");
    assert_eq!(store.revision(), revision);
    assert!(store.get("a").await.unwrap().is_some());
    store.close().await.unwrap();
}

/// A file written before transactions (its log in `events`, one event per revision) opens
/// with its history intact.
#[tokio::test]
async fn an_older_event_log_is_migrated() {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    let dir = TempDir::new("migrate");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    for key in ["a", "b", "c"] {
        store.put(key, vec![1], None, none()).await.unwrap();
    }
    store.close().await.unwrap();
    // Rewrite the log in the old shape.
    {
        let db = redb::Database::open(dir.path().join(super::DB_FILE)).unwrap();
        let old: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
        let txn = db.begin_write().unwrap();
        {
            let log = txn.open_table(super::tables::EVENTS).unwrap();
            let mut events = txn.open_table(old).unwrap();
            for entry in log.iter().unwrap() {
                let (key, bytes) = entry.unwrap();
                events.insert(key.value().0, bytes.value()).unwrap();
            }
        }
        txn.delete_table(super::tables::EVENTS).unwrap();
        txn.commit().unwrap();
        let read = db.begin_read().unwrap();
        assert!(read.open_table(super::tables::EVENTS).is_err());
    }
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let mut watch = store.watch("", 0).unwrap();
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(recv(&mut watch).await.kv.key);
    }
    assert_eq!(keys, ["a", "b", "c"]);
    store.put("d", vec![], None, none()).await.unwrap();
    assert_eq!(recv(&mut watch).await.kv.mod_revision, 4);
    store.close().await.unwrap();
}
