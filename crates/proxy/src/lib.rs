//! # malla-proxy
//!
//! The sidecar data plane of malla. A proxy owns a set of listeners (outbound, each bound
//! to an upstream; an HTTP proxy routing by `Host`; inbound, forwarding to the local
//! application; admin) and a set of upstreams (named endpoint sets with a balancer).
//!
//! A connection walks one straight line:
//!
//! ```text
//! accept (server) -> detect -> http1 | http2 | tcp -> route (Host) -> balance (P2C-EWMA)
//!        -> endpoint connection (pool / shared h2 connection / new) -> upstream
//! ```
//!
//! The HTTP/1 path is owned end to end ([`http1`]) because it is the hot path and owning
//! it measurably beats a generic client/server pair (see `shared/PERF.md`); HTTP/2 and gRPC
//! ride on hyper/h2 ([`http2`]). Errors the proxy answers itself are all mapped in
//! [`error`]. The crate is a library; `malla proxy` is a thin command over [`start`].

pub mod admin;
pub mod authz;
pub mod balance;
mod call;
pub mod config;
mod connect;
pub mod detect;
pub mod discovery;
pub mod endpoint;
pub mod error;
mod forwarding;
pub mod http1;
pub mod http2;
pub mod identity;
mod inbound;
mod listener;
pub mod metrics;
mod outbound;
pub mod resilience;
mod server;
pub mod stream;
mod tcp;
pub mod tls;
pub mod upstream;

pub use config::ProxyConfig;
pub use server::{start, Bound, ProxyHandle};
