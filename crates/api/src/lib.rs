//! # malla-api
//!
//! The gRPC API between sidecars and the control plane:
//!
//! - `malla.registry.v1.Registry` (`proto/malla/registry/v1/registry.proto`): a sidecar
//!   registers its instance under a lease, heartbeats it, deregisters it on drain, and
//!   watches the instances of the services it calls.
//! - `malla.policy.v1.Policies` (`proto/malla/policy/v1/policy.proto`): a sidecar watches
//!   the resilience policy of each service it calls ([`policy`]) and reports the
//!   resilience events it observes.
//! - `malla.identity.v1.Identity` (`proto/malla/identity/v1/identity.proto`): a sidecar
//!   gets its service's certificate from the control plane's CA and renews it.
//! - `malla.authz.v1.Authorizations` (`proto/malla/authz/v1/authz.proto`): a sidecar
//!   watches the authorization policy of its own service ([`authz`]), which decides who
//!   may call it.
//!
//! This crate sits between the domain model and the two processes that speak the API:
//!
//! ```text
//! malla-core (domain) <- malla-api (protobuf, stubs, conversions) <- malla-control (server)
//!                                                                 <- malla-proxy (client)
//! ```
//!
//! Protobuf messages stop here: [`convert`] turns them into [`malla_core`] types (with a
//! precise error naming the bad field) and back, so the control plane and the sidecar only
//! ever handle domain types. The stubs are generic over the transport; the server brings
//! tonic's server, the sidecar tonic's channel.

pub mod authz;
pub mod convert;
pub mod policy;

/// The generated messages and stubs of `malla.registry.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("malla.registry.v1");
}

/// The generated messages and stubs of `malla.policy.v1`.
pub mod policy_pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("malla.policy.v1");
}

/// The generated messages and stubs of `malla.authz.v1`.
pub mod authz_pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("malla.authz.v1");
}

/// The generated messages and stubs of `malla.identity.v1`.
pub mod identity_pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("malla.identity.v1");
}

pub use authz::AuthorizationState;
pub use authz_pb::authorizations_client::AuthorizationsClient;
pub use authz_pb::authorizations_server::{
    Authorizations as AuthorizationsService, AuthorizationsServer,
};
pub use convert::{ConversionError, Registration, WatchEvent, WatchTarget};
pub use identity_pb::identity_client::IdentityClient;
pub use identity_pb::identity_server::{Identity as IdentityService, IdentityServer};
pub use pb::registry_client::RegistryClient;
pub use pb::registry_server::{Registry as RegistryService, RegistryServer};
pub use policy::{InvalidPolicy, LenientPolicy, PolicyState};
pub use policy_pb::policies_client::PoliciesClient;
pub use policy_pb::policies_server::{Policies as PoliciesService, PoliciesServer};
