//! malla's integration suites, one test binary (one link, one process, shared helpers).
//!
//! Every test starts its own peers and proxy on `127.0.0.1:0` and stops them when it ends
//! (handles stop on drop). Tests that hold for HTTP/1, HTTP/2 and gRPC alike are written
//! once and expanded per protocol with [`cross_version!`]: `balancing::round_robin::http2`.
//!
//! | module | what |
//! |---|---|
//! | `harness` | the harness itself: peers, clients, macros, parsers, proxy start/stop |
//! | `requests` | a request goes through, by listener and by `Host` (cross-version) |
//! | `resilience` | breakers, half-open probes, retries and budgets, deadlines, limits, rate limits, faults, relayed failures (cross-version; HTTP/1 particulars apart) |
//! | `errors` | the causes the proxy answers itself (cross-version) |
//! | `balancing` | P2C-EWMA, round robin, live endpoint changes (cross-version) |
//! | `drain` | in-flight work completes, new connections are refused (cross-version) |
//! | `http1`, `http2`, `grpc`, `websocket`, `tcp` | what is particular to each protocol |
//! | `bad_input` | malformed and hostile HTTP/1 input, misbehaving upstreams |
//! | `smuggling` | request smuggling: the published desync vectors and mutations of them, what reached the upstream compared with malla's and h11's readings |
//! | `admin` | `/live`, `/ready`, `/metrics`, `/config` |
//! | `control` | the control plane's HTTP API, leases, health checks, restarts, bad input, DNS |
//! | `policy` | policies applied through the control plane reach sidecars; events reach the control plane |
//! | `sidecar_authz` | authorization policies applied through the control plane reach the sidecars of their service, change, survive a control-plane restart, go away on delete |
//! | `mtls_mode` | the inbound mTLS mode set centrally: the mesh's (`--mtls-mode`), a service's (its authorization policy's `mtls`), a sidecar's own `[inbound] mtls` over both, changed without restarting sidecars |
//! | `root_rotation` | the CA's root rotated while two sidecars talk mTLS: no failed request, the new root reaches both before it signs, the old one leaves |
//! | `memory` | a 1 GiB streamed upload keeps the proxy's memory flat |

// All of this binary is test code: an `unwrap` here is an assertion (clippy.toml allows it
// in `#[test]` functions already; this extends it to their helpers).
#![allow(clippy::unwrap_used)]

/// Expands `async fn NAME(flavor: Flavor)` into a module `NAME` with one test per flavor:
/// `NAME::http1`, `NAME::http2`, `NAME::grpc`.
macro_rules! cross_version {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            use malla_tests::cross_version::Flavor;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn http1() {
                super::$body(Flavor::Http1).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn http2() {
                super::$body(Flavor::Http2).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn grpc() {
                super::$body(Flavor::Grpc).await
            }
        }
    )+};
}

mod admin;
mod authz_enforce;
mod bad_input;
mod balancing;
mod control;
mod control_tls;
mod discovery;
mod drain;
mod errors;
mod grpc;
mod harness;
mod http1;
mod http2;
mod inbound_mtls;
mod memory;
mod mesh_mtls;
mod mtls;
mod mtls_mode;
mod policy;
mod registry_health;
mod requests;
mod resilience;
mod root_rotation;
mod sidecar_authz;
mod sidecar_identity;
mod smuggling;
mod stalls;
mod tcp;
mod websocket;
mod workers;
