//! The control plane's APIs. Each is a projection of the [`crate::registry::Registry`].

pub mod grpc;
pub mod http;
