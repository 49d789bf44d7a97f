//! # malla-core
//!
//! The domain model every other part of malla speaks: services, their instances, labels and
//! label selectors. No I/O and no protocol types: the control plane's store, its APIs and
//! the sidecars convert to and from these types at their edges.

pub mod annotations;
pub mod authz;
pub mod duration;
pub mod identity;
pub mod labels;
pub mod policy;
pub mod rng;
pub mod selector;
pub mod service;
pub mod slug;

pub use annotations::Annotations;
pub use identity::{SpiffeId, TrustDomain};
pub use labels::Labels;
pub use policy::Policy;
pub use selector::Selector;
pub use service::{Health, Instance, InstanceProtocol, ServiceName};
