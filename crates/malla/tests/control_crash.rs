//! `kill -9` of the real `malla control` during a burst of registrations loses none that it
//! acknowledged: a write is answered only once it is durable (docs/control.md, Storage).
//!
//! The test runs the binary Cargo built for this package, registers from many tasks at
//! once, records every registration answered with 200, sends SIGKILL in the middle of the
//! burst, starts the binary again on the same data directory and looks for each of them.

// Test code: an `unwrap` here is an assertion.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use malla_tests::{
    control::{api::Api, TempDir},
    eventually,
};
use serde_json::json;

/// A `malla control` process; killed (SIGKILL) when dropped.
struct ControlProcess {
    child: Child,
    api: Api,
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (bound to `127.0.0.1:0`, then released).
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Starts `malla control` on `dir` and waits until its API answers `/ready`.
async fn start(dir: &TempDir) -> ControlProcess {
    for _attempt in 0..5 {
        let http = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_malla"))
            .arg("control")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--http-addr", &http.to_string()])
            .args(["--grpc-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0"])
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start malla control");
        let mut process = ControlProcess {
            child,
            api: Api::new(http),
        };
        for _ in 0..eventually::TRIES {
            // Over TLS with its trust bundle, and its operator token: both written before
            // the APIs listen.
            let api = process.api.with_credentials_of(dir.path());
            if let Ok(reply) = api
                .try_request(http::Method::GET, "/ready", bytes::Bytes::new())
                .await
            {
                if reply.status == 200 {
                    process.api = api;
                    return process;
                }
            }
            // Exited (the port was taken meanwhile, say): try another port.
            if process.child.try_wait().unwrap().is_some() {
                break;
            }
            eventually::pause().await;
        }
    }
    panic!(
        "malla control never became ready on {}",
        dir.path().display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_registration() {
    let dir = TempDir::new("crash");
    let mut control = start(&dir).await;
    let api = control.api.clone();
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));

    // 16 writers, each registering its own ids one after another until the process dies.
    let mut writers = Vec::new();
    for w in 0..16u32 {
        let acknowledged = acknowledged.clone();
        let api = api.clone();
        writers.push(tokio::spawn(async move {
            let mut failures = 0;
            for n in 0..10_000u32 {
                let id = format!("w{w:02}-{n:05}");
                let body = json!({"address": "127.0.0.1", "port": 10_000 + n % 50_000,
                                  "labels": {"writer": format!("w{w}")}, "ttl_seconds": 3600});
                let path = format!("/v1/services/burst/instances/{id}");
                match api
                    .try_request(http::Method::PUT, &path, body.to_string())
                    .await
                {
                    Ok(reply) if reply.status == 200 => {
                        acknowledged.lock().unwrap().insert(id);
                    }
                    Ok(reply) => panic!("registration refused: {reply}"),
                    // The process is gone: stop after a few, so we do not spin.
                    Err(_) => {
                        failures += 1;
                        if failures > 3 {
                            return;
                        }
                    }
                }
            }
        }));
    }

    // Kill once a good number is acknowledged, with writes in flight.
    let mut waited = 0;
    while acknowledged.lock().unwrap().len() < 300 {
        waited += 1;
        assert!(
            waited < 3_000,
            "only {} registrations in 60 s",
            acknowledged.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    control.child.kill().expect("SIGKILL malla control");
    control.child.wait().unwrap();
    for writer in writers {
        tokio::time::timeout(Duration::from_secs(30), writer)
            .await
            .expect("writers stop once the process is gone")
            .unwrap();
    }
    drop(control);
    let acked = acknowledged.lock().unwrap().clone();

    let control = start(&dir).await;
    let reply = control.api.get("/v1/services/burst/instances").await.ok();
    let present: BTreeSet<String> = malla_tests::control::api::ids(&reply).into_iter().collect();
    let lost: Vec<&String> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged registrations were lost after kill -9: {:?}",
        lost.len(),
        acked.len(),
        lost.iter().take(20).collect::<Vec<_>>()
    );
    // Every instance present is whole (labels and all), acknowledged or not.
    for instance in reply["instances"].as_array().unwrap() {
        assert!(instance["labels"]["writer"].is_string(), "{instance}");
    }
    eprintln!(
        "kill -9: {} acknowledged, {} present after restart (the difference had been written \
         but not yet answered)",
        acked.len(),
        present.len()
    );
}
