//! kill -9 in the middle of a burst of writes loses no acknowledged write.
//!
//! The parent test runs this test binary again, restricted to [`child`], with
//! `MALLA_STORE_CRASH_CHILD` naming the data directory. The child writes from many tasks at
//! once and prints `ack <key>` for each write the store acknowledged; the parent kills it
//! with SIGKILL mid-burst, reopens the directory and checks every acknowledged key.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::TempDir;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Precondition, Store};

const CHILD_ENV: &str = "MALLA_STORE_CRASH_CHILD";
const ACKS_BEFORE_KILL: usize = 200;

fn value_of(key: &str) -> Vec<u8> {
    format!("value of {key}").into_bytes()
}

/// Does nothing unless run by [`acknowledged_writes_survive_kill_9`].
#[test]
fn child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = EmbeddedStore::open(dir.as_ref()).await.unwrap();
        let tasks: Vec<_> = (0..32)
            .map(|task| {
                let store = store.clone();
                tokio::spawn(async move {
                    // Bounded: the parent kills the child long before this ends.
                    for i in 0..2_000 {
                        let key = format!("crash/{task}/{i}");
                        store
                            .put(&key, value_of(&key), None, Precondition::None)
                            .await
                            .unwrap();
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ack {key}").unwrap();
                        out.flush().unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = TempDir::new("crash");
    // This module's path without the crate name, as the test harness names tests.
    let module = module_path!().split_once("::").map_or("", |(_, path)| path);
    let child_test = format!("{module}::child");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &child_test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut acked = Vec::new();
    while acked.len() < ACKS_BEFORE_KILL {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => acked.extend(line.strip_prefix("ack ").map(str::to_owned)),
            Err(_) => break,
        }
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    // Lines already in the pipe were acknowledged before the kill, too.
    acked.extend(
        lines
            .iter()
            .filter_map(|line| line.strip_prefix("ack ").map(str::to_owned)),
    );
    reader.join().unwrap();
    assert!(
        acked.len() >= ACKS_BEFORE_KILL,
        "the child acknowledged only {} writes before it ended ({status})",
        acked.len()
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        let (kvs, revision) = store.range("crash/").await.unwrap();
        let stored: HashMap<_, _> = kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
        for key in &acked {
            assert_eq!(
                stored.get(key),
                Some(&value_of(key)),
                "acknowledged write {key} was lost ({} acknowledged, {} stored)",
                acked.len(),
                stored.len()
            );
        }
        assert!(revision >= acked.len() as u64);
        println!(
            "killed the child ({status}) after {} acknowledged writes; {} stored",
            acked.len(),
            stored.len()
        );
        // The store is usable after the crash.
        store
            .put("after", vec![], None, Precondition::None)
            .await
            .unwrap();
        store.close().await.unwrap();
    });
}
