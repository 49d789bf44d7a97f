//! The control plane, through its real APIs: each test starts a
//! [`TestControl`](malla_tests::control::TestControl) (HTTP API and DNS on `127.0.0.1:0`, a
//! store in a fresh temporary directory) and talks to it as clients do.
//!
//! | module | what |
//! |---|---|
//! | `authorizations` | authorization policies: put, get, list, delete; every invalid field named; versions; a restart |
//! | `registry` | register, list, get, deregister; label selectors; `serving=true` |
//! | `leases` | expiry removes an instance; heartbeats keep it |
//! | `health` | HTTP, TCP and gRPC checks flip an instance's health |
//! | `identity` | the CA: join tokens, certificates over HTTP and gRPC checked with openssl, renewal, refusals, the root across restarts, an operator's CA |
//! | `restart` | registrations, specs and leases survive a restart on the same data dir |
//! | `bad_input` | every API refuses bad input with a precise 4xx in the JSON error shape |
//! | `dns` | the DNS interface through `dig` |
//! | `metrics` | the control plane's own `/metrics` move with known traffic |
//! | `operator` | the operator token: refusals (401, what to do, counted), the exempt routes, rotation, a restart |
//! | `proxies` | `GET /v1/proxies` lists connected sidecars |
//! | `serving` | both APIs on each port, 405s, head timeout, connection limit |
//!
//! The CLI verbs and a `kill -9` of the real binary are tested in `crates/malla/tests/`,
//! where Cargo provides the binary.

mod authorizations;
mod bad_input;
mod dns;
mod health;
mod identity;
mod leases;
mod metrics;
mod operator;
mod proxies;
mod registry;
mod restart;
mod serving;
mod writers;

use serde_json::{json, Value};

/// A registration body: loopback address, `port`, `labels` as `[(key, value)]`.
pub fn registration(port: u16, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({"address": "127.0.0.1", "port": port, "labels": labels})
}
