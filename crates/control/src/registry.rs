//! The service registry: services, instances, leases and health, on top of a [`Store`].
//!
//! Writes go to the store (the source of truth, shared by every control-plane replica);
//! reads come from an in-memory [`View`] that one updater task keeps current by watching
//! the store. Every API is a projection of that view, and every change the updater applies
//! is broadcast as a [`Change`] so watch streams (gRPC for sidecars, the dashboard) can
//! follow it. A write returns only once the view has caught up with it, so a client reads
//! its own writes.
//!
//! Keys:
//!
//! ```text
//! /malla/services/{service}            ServiceSpec (JSON)
//! /malla/instances/{service}/{id}      Instance (JSON), attached to the instance's lease
//! ```
//!
//! (`/malla/policies/` belongs to [`crate::policies`].)

pub mod record;
pub mod view;

use std::{sync::Arc, time::Duration};

use malla_core::{
    service::valid_instance_id, Annotations, Health, Instance, Labels, Selector, ServiceName,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

pub use self::record::{InstanceMeta, InstanceRecord};
pub use self::view::{Change, ServiceState, View};
use futures_util::StreamExt;

use crate::store::{EventKind, LeaseId, Precondition, Revision, Store, StoreError, Txn, TxnOp};

pub const SERVICES_PREFIX: &str = "/malla/services/";
pub const INSTANCES_PREFIX: &str = "/malla/instances/";

/// Shortest and longest lease a registration may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// The lease of a registration that names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// A service's own settings (its instances are separate keys).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// How the control plane checks the instances; none means "trust the leases".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<crate::health::HealthCheck>,
    /// For people and tools: a display name, an owner, a runbook link.
    #[serde(default, skip_serializing_if = "Annotations::is_empty")]
    pub annotations: Annotations,
}

/// A registration request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub address: std::net::IpAddr,
    pub port: u16,
    #[serde(default)]
    pub protocol: malla_core::InstanceProtocol,
    #[serde(default)]
    pub labels: Labels,
    /// Lease time to live in seconds; the instance leaves the registry if no heartbeat
    /// renews it in time.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// A static endpoint (something outside the mesh, with no agent to send heartbeats):
    /// no lease, no TTL; it stays until deregistered.
    #[serde(default, rename = "static")]
    pub is_static: bool,
    #[serde(default)]
    pub annotations: Annotations,
    /// The instance's sidecar accepts mTLS ([`Instance::mtls`]).
    #[serde(default)]
    pub mtls: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The lease to renew; 0 (etcd's "no lease") for a static instance.
    pub lease: LeaseId,
    /// 0 for a static instance.
    pub ttl_seconds: u64,
    pub revision: Revision,
    #[serde(rename = "static")]
    pub is_static: bool,
}

/// What deleting a service did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceDeleted {
    /// The one revision of the deletion.
    pub revision: Revision,
    pub instances_removed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the registry is shutting down")]
    Closed,
}

pub type Result<T> = std::result::Result<T, RegistryError>;

pub struct Registry<S> {
    store: S,
    view: watch::Receiver<Arc<View>>,
    changes: broadcast::Sender<Arc<Change>>,
    /// The services whose spec was written or deleted, as applied (instance changes go to
    /// `changes`).
    specs: broadcast::Sender<ServiceName>,
    updater: tokio::task::JoinHandle<()>,
}

impl<S> Drop for Registry<S> {
    fn drop(&mut self) {
        self.updater.abort();
    }
}

impl<S: Store + Clone> Registry<S> {
    /// Loads the registry from the store and starts following it.
    pub async fn open(store: S) -> Result<Self> {
        let (kvs, revision) = store.range("/malla/").await?;
        let mut view = View::new(revision);
        for kv in kvs.iter().filter(|kv| is_registry_key(&kv.key)) {
            if let Err(e) = view.apply_put(&kv.key, &kv.value, kv.lease) {
                warn!(key = %kv.key, error = %e, "ignoring an unreadable registry key");
            }
        }
        info!(
            revision,
            services = view.services.len(),
            instances = view.instance_count(),
            "registry loaded"
        );
        let (view_tx, view_rx) = watch::channel(Arc::new(view));
        let (changes, _) = broadcast::channel(4096);
        let (specs, _) = broadcast::channel(1024);
        let watch = store.watch("/malla/", revision)?;
        let updater = tokio::spawn(follow(watch, view_tx, changes.clone(), specs.clone()));
        Ok(Registry {
            store,
            view: view_rx,
            changes,
            specs,
            updater,
        })
    }

    /// The current view (cheap: an `Arc`).
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Changes as they are applied; pair with [`Self::view`] for snapshot + updates.
    pub fn subscribe(&self) -> (Arc<View>, broadcast::Receiver<Arc<Change>>) {
        // Subscribe first: a change applied between the two steps is then both in the
        // view and in the stream, and the receiver skips it by revision.
        let rx = self.changes.subscribe();
        (self.view(), rx)
    }

    /// The names of services whose spec changes (written, replaced or deleted), as the
    /// view applies them: what instance [`Change`]s do not say. Subscribe before reading
    /// the view, as with [`Self::subscribe`].
    pub fn subscribe_specs(&self) -> broadcast::Receiver<ServiceName> {
        self.specs.subscribe()
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Stops following the store (before closing it): the view stays as it is.
    pub fn stop_following(&self) {
        self.updater.abort();
    }

    /// Waits until the view includes `revision` (read-your-writes).
    async fn caught_up(&self, revision: Revision) -> Result<()> {
        let mut rx = self.view.clone();
        rx.wait_for(|v| v.revision >= revision)
            .await
            .map(|_| ())
            .map_err(|_| RegistryError::Closed)
    }

    pub async fn put_service(&self, name: &ServiceName, spec: &ServiceSpec) -> Result<Revision> {
        let value = serde_json::to_vec(spec).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let rev = self
            .store
            .put(&service_key(name), value, None, Precondition::None)
            .await?;
        self.caught_up(rev).await?;
        Ok(rev)
    }

    /// Deletes a service and all its instances in one write (one revision: watchers see
    /// every removal at once, and a crash leaves all of it or none), then revokes the
    /// instances' leases, so that their heartbeats fail and their agents learn the
    /// registration is gone.
    pub async fn delete_service(&self, name: &ServiceName) -> Result<ServiceDeleted> {
        if !self.view().services.contains_key(name) {
            return Err(RegistryError::NotFound(format!("service {name}")));
        }
        let prefix = format!("{INSTANCES_PREFIX}{name}/");
        let (kvs, _) = self.store.range(&prefix).await?;
        let leases: Vec<LeaseId> = kvs.iter().filter_map(|kv| kv.lease).collect();
        let result = self
            .store
            .txn(Txn {
                compare: Vec::new(),
                ops: vec![
                    TxnOp::DeletePrefix { prefix },
                    TxnOp::Delete {
                        key: service_key(name),
                    },
                ],
            })
            .await?;
        self.caught_up(result.revision).await?;
        // Keyless now; a lease renewed meanwhile by a re-registration is that one's.
        let revokes = leases.into_iter().map(|lease| async move {
            let _ = self.store.revoke_lease(lease).await;
        });
        futures_util::stream::iter(revokes)
            .buffer_unordered(256)
            .collect::<()>()
            .await;
        Ok(ServiceDeleted {
            revision: result.revision,
            instances_removed: result.deleted.first().copied().unwrap_or(0),
        })
    }

    /// [`Self::register_from`] for callers inside the process (tests, the demo).
    pub async fn register(
        &self,
        service: &ServiceName,
        id: &str,
        reg: Registration,
    ) -> Result<Registered> {
        self.register_from(service, id, reg, "in-process").await
    }

    /// Registers (or re-registers) an instance under a new lease, or with none when
    /// static. `registered_by` says which API and peer asked (`http 127.0.0.1:51234`).
    pub async fn register_from(
        &self,
        service: &ServiceName,
        id: &str,
        reg: Registration,
        registered_by: &str,
    ) -> Result<Registered> {
        if !valid_instance_id(id) {
            return Err(RegistryError::Invalid(format!(
                "invalid instance id {id:?}: use 1-128 letters, digits, '.', '_', ':' or '-'"
            )));
        }
        malla_core::service::check_endpoint_address(reg.address).map_err(RegistryError::Invalid)?;
        if reg.port == 0 {
            return Err(RegistryError::Invalid(
                "port must be from 1 to 65535".into(),
            ));
        }
        let ttl = match (reg.is_static, reg.ttl_seconds) {
            (true, Some(_)) => {
                return Err(RegistryError::Invalid(
                    "ttl_seconds cannot go with static: a static instance has no lease and \
                     stays until deregistered; drop one of the two"
                        .into(),
                ))
            }
            (true, None) => None,
            (false, ttl) => {
                let ttl = Duration::from_secs(ttl.unwrap_or(DEFAULT_TTL.as_secs()));
                if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
                    return Err(RegistryError::Invalid(format!(
                        "ttl_seconds must be from {} to {} (or register with \"static\": true \
                         for an endpoint without heartbeats)",
                        MIN_TTL.as_secs(),
                        MAX_TTL.as_secs()
                    )));
                }
                Some(ttl)
            }
        };
        // A service comes into being with its first instance.
        if !self.view().services.contains_key(service) {
            match self
                .store
                .put(
                    &service_key(service),
                    b"{}".to_vec(),
                    None,
                    Precondition::Absent,
                )
                .await
            {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let lease = match ttl {
            Some(ttl) => Some(self.store.grant_lease(ttl).await?),
            None => None,
        };
        let instance = Instance {
            id: id.to_string(),
            service: service.clone(),
            address: reg.address,
            port: reg.port,
            protocol: reg.protocol,
            labels: reg.labels,
            health: Health::Unknown,
            mtls: reg.mtls,
        };
        let record = InstanceRecord::new(
            instance,
            InstanceMeta {
                annotations: reg.annotations,
                registered_at: Some(record::rfc3339_now()),
                registered_by: Some(registered_by.to_string()),
                lease: None,
                ttl_seconds: ttl.map(|t| t.as_secs()),
            },
        );
        let value =
            serde_json::to_vec(&record).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let key = instance_key(service, id);
        let previous = self.store.get(&key).await?;
        let lease_id = lease.map(|l| l.id);
        let rev = self
            .store
            .put(&key, value, lease_id, Precondition::None)
            .await?;
        // The previous registration's lease has nothing left to protect.
        if let Some(old) = previous
            .and_then(|kv| kv.lease)
            .filter(|l| Some(*l) != lease_id)
        {
            let _ = self.store.revoke_lease(old).await;
        }
        self.caught_up(rev).await?;
        Ok(Registered {
            lease: lease_id.unwrap_or(0),
            ttl_seconds: ttl.map_or(0, |t| t.as_secs()),
            revision: rev,
            is_static: ttl.is_none(),
        })
    }

    /// Removes an instance at once (graceful deregistration).
    pub async fn deregister(&self, service: &ServiceName, id: &str) -> Result<Revision> {
        let key = instance_key(service, id);
        let kv = self.store.get(&key).await?.ok_or_else(|| {
            RegistryError::NotFound(format!("instance {id} of service {service}"))
        })?;
        let rev = match kv.lease {
            // Revoking deletes the key and frees the lease in one step.
            Some(lease) => {
                self.store.revoke_lease(lease).await?;
                self.store.revision()
            }
            None => self
                .store
                .delete(&key, Precondition::None)
                .await?
                .unwrap_or(kv.mod_revision),
        };
        self.caught_up(rev).await?;
        Ok(rev)
    }

    pub async fn heartbeat(&self, lease: LeaseId) -> Result<crate::store::Lease> {
        Ok(self.store.keep_alive(lease).await?)
    }

    /// Records a health verdict; returns whether it changed the recorded health (not when
    /// it was already that, nor when the instance changed or went meanwhile).
    pub async fn set_health(
        &self,
        service: &ServiceName,
        id: &str,
        health: Health,
    ) -> Result<bool> {
        let key = instance_key(service, id);
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(false); // gone meanwhile
        };
        let mut record: InstanceRecord =
            serde_json::from_slice(&kv.value).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if record.health == health {
            return Ok(false);
        }
        record.health = health;
        let value =
            serde_json::to_vec(&record).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        match self
            .store
            .put(
                &key,
                value,
                kv.lease,
                Precondition::ModRevision(kv.mod_revision),
            )
            .await
        {
            Ok(_) => Ok(true),
            // Changed meanwhile (re-registered, deregistered): the next check decides.
            Err(StoreError::Conflict { .. } | StoreError::LeaseNotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The instances of a service that match a selector.
    pub fn instances(
        &self,
        service: &ServiceName,
        selector: &Selector,
    ) -> Option<(Revision, Vec<Arc<Instance>>)> {
        let view = self.view();
        let state = view.services.get(service)?;
        Some((
            view.revision,
            state
                .instances
                .values()
                .filter(|i| selector.matches(&i.labels))
                .cloned()
                .collect(),
        ))
    }
}

/// Applies store events to the view and broadcasts them. The view is published once per
/// watch item, which holds whole revisions: a reader never sees part of a revision (half
/// of a deleted service), and [`Registry::caught_up`] on a revision means all of it.
async fn follow(
    mut watch: crate::store::Watch,
    view_tx: watch::Sender<Arc<View>>,
    changes: broadcast::Sender<Arc<Change>>,
    specs: broadcast::Sender<ServiceName>,
) {
    while let Some(events) = watch.events.recv().await {
        let events = match events {
            Ok(e) => e,
            Err(e) => {
                // The store lost our place (compaction after a long stall): the
                // control plane must restart its registry; say so loudly.
                warn!(error = %e, "registry watch failed; the view is frozen until restart");
                return;
            }
        };
        let mut next = (**view_tx.borrow()).clone();
        let mut applied = Vec::new();
        let mut touched_specs = Vec::new();
        for event in events {
            let revision = event.kv.mod_revision;
            next.revision = revision;
            let key = &event.kv.key;
            let change = match event.kind {
                _ if !is_registry_key(key) => Ok(None),
                EventKind::Put => next.apply_put(key, &event.kv.value, event.kv.lease),
                EventKind::Delete => Ok(next.apply_delete(key)),
            };
            match change {
                Ok(Some(change)) => applied.push(Arc::new(Change { revision, ..change })),
                Ok(None) => {}
                Err(e) => warn!(key = %key, error = %e, "ignoring an unreadable registry key"),
            }
            if let Some(name) = key
                .strip_prefix(SERVICES_PREFIX)
                .and_then(|name| ServiceName::new(name).ok())
            {
                touched_specs.push(name);
            }
        }
        view_tx.send_replace(Arc::new(next));
        for change in applied {
            let _ = changes.send(change);
        }
        for name in touched_specs {
            let _ = specs.send(name);
        }
    }
}

/// Whether the registry owns `key`. It follows all of `/malla/`, so that its view's
/// revision is the store's (a write answers once the view includes it, whatever it
/// wrote), but keys that other parts own (`/malla/policies/`) are theirs to read.
fn is_registry_key(key: &str) -> bool {
    key.starts_with(SERVICES_PREFIX) || key.starts_with(INSTANCES_PREFIX)
}

pub fn service_key(name: &ServiceName) -> String {
    format!("{SERVICES_PREFIX}{name}")
}

pub fn instance_key(service: &ServiceName, id: &str) -> String {
    format!("{INSTANCES_PREFIX}{service}/{id}")
}
