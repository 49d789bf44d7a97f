//! # malla-control
//!
//! The control plane: the one stateful process of a mesh. Every API (HTTP/JSON, gRPC for
//! sidecars, DNS) is a projection of one model (services, instances, leases, resilience
//! policies, authorization policies) kept in a [`store::Store`] with etcd's semantics (a global revision,
//! compare-and-set, leases, watch from a revision), embedded by default and etcd-backed for
//! several replicas. The resilience events sidecars report are kept in memory
//! ([`events`]).

pub mod api;
pub mod authorizations;
pub mod dns;
pub mod events;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod operator;
pub mod policies;
pub mod proxies;
pub mod registry;
pub mod resources;
pub mod server;
pub mod serving;
pub mod store;
