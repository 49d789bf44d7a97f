//! Resilience policies as resources: at most one [`Policy`] per service, for the callers
//! of that service, written by `malla apply` (HTTP API) and streamed to every sidecar that
//! calls the service (gRPC `WatchPolicy`).
//!
//! Keys:
//!
//! ```text
//! /malla/policies/{service}     Policy (JSON), its `service` set
//! ```
//!
//! A policy's **version** is the store revision of its last write: it only grows, so a
//! sidecar and an operator can tell which write is in force by one number.
//!
//! A write is validated first (`malla_api::policy::parse_json`, the very function the
//! sidecars apply to what they receive), then written with compare-and-set on the
//! revision it was compared against: an invalid policy writes nothing, so the previous
//! version stays in force everywhere. A write identical to the stored policy writes
//! nothing either (no new version, nothing pushed to the sidecars), so applying the same
//! file twice is free.
//!
//! Reads come from an in-memory view that one updater task keeps current by watching the
//! store (the same scheme as [`crate::registry`]); every change is broadcast for the watch
//! streams, and a write returns once the view includes it (read-your-writes).

use std::{collections::BTreeMap, sync::Arc};

use malla_api::InvalidPolicy;
use malla_core::{policy::FieldError, Policy, ServiceName};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::store::{EventKind, Precondition, Revision, Store, StoreError};

pub const POLICIES_PREFIX: &str = "/malla/policies/";

pub fn policy_key(service: &ServiceName) -> String {
    format!("{POLICIES_PREFIX}{service}")
}

/// A stored policy.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredPolicy {
    pub service: ServiceName,
    /// The store revision of its last write.
    pub version: Revision,
    pub policy: Arc<Policy>,
    /// The stored JSON, as sent to sidecars.
    pub json: Arc<str>,
}

/// Every policy, as of one store revision.
#[derive(Clone, Debug, Default)]
pub struct PolicyView {
    pub revision: Revision,
    pub policies: BTreeMap<ServiceName, StoredPolicy>,
}

/// One applied change: the service's policy after it (`None`: deleted).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyChange {
    pub revision: Revision,
    pub service: ServiceName,
    pub policy: Option<StoredPolicy>,
}

/// The outcome of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub version: Revision,
    /// There was no policy for the service before.
    pub created: bool,
    /// Identical to the stored policy: nothing was written.
    pub unchanged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy cannot be stored; every problem, each with its dotted field path.
    #[error("invalid policy for {service}: {errors}")]
    Invalid {
        service: String,
        errors: InvalidPolicy,
    },
    #[error("no policy for service {0}")]
    NotFound(ServiceName),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the control plane is shutting down")]
    Closed,
}

pub type Result<T> = std::result::Result<T, PolicyError>;

pub struct Policies<S> {
    store: S,
    view: watch::Receiver<Arc<PolicyView>>,
    changes: broadcast::Sender<Arc<PolicyChange>>,
    updater: tokio::task::JoinHandle<()>,
}

impl<S> Drop for Policies<S> {
    fn drop(&mut self) {
        self.updater.abort();
    }
}

impl<S: Store + Clone> Policies<S> {
    /// Loads the policies from the store and starts following it.
    pub async fn open(store: S) -> Result<Self> {
        let (kvs, revision) = store.range(POLICIES_PREFIX).await?;
        let mut view = PolicyView {
            revision,
            policies: BTreeMap::new(),
        };
        for kv in &kvs {
            match decode(&kv.key, &kv.value, kv.mod_revision) {
                Ok(stored) => {
                    view.policies.insert(stored.service.clone(), stored);
                }
                Err(e) => warn!(key = %kv.key, error = %e, "ignoring an unreadable policy"),
            }
        }
        info!(revision, policies = view.policies.len(), "policies loaded");
        let (view_tx, view_rx) = watch::channel(Arc::new(view));
        let (changes, _) = broadcast::channel(1024);
        let watch = store.watch(POLICIES_PREFIX, revision)?;
        let updater = tokio::spawn(follow(watch, view_tx, changes.clone()));
        Ok(Policies {
            store,
            view: view_rx,
            changes,
            updater,
        })
    }

    /// The current view (cheap: an `Arc`).
    pub fn view(&self) -> Arc<PolicyView> {
        self.view.borrow().clone()
    }

    /// Changes as they are applied, and the view they start after: a change whose
    /// revision is not above the view's is already in it.
    pub fn subscribe(&self) -> (Arc<PolicyView>, broadcast::Receiver<Arc<PolicyChange>>) {
        let rx = self.changes.subscribe();
        (self.view(), rx)
    }

    pub fn get(&self, service: &ServiceName) -> Option<StoredPolicy> {
        self.view().policies.get(service).cloned()
    }

    /// Stops following the store (before closing it).
    pub fn stop_following(&self) {
        self.updater.abort();
    }

    async fn caught_up(&self, revision: Revision) -> Result<()> {
        let mut rx = self.view.clone();
        rx.wait_for(|v| v.revision >= revision)
            .await
            .map(|_| ())
            .map_err(|_| PolicyError::Closed)
    }

    /// Stores `policy` as the policy of `service`, unless it is invalid (nothing is
    /// written then) or identical to the stored one. A policy that names no service gets
    /// this one; one that names another is refused.
    pub async fn put(&self, service: &ServiceName, mut policy: Policy) -> Result<Applied> {
        let invalid = |errors| PolicyError::Invalid {
            service: service.to_string(),
            errors: InvalidPolicy(errors),
        };
        match policy.service.as_deref() {
            None => policy.service = Some(service.to_string()),
            Some(named) if named != service.as_str() => {
                return Err(invalid(vec![FieldError {
                    field: "service".into(),
                    message: format!(
                        "{named:?} does not match the service in the path ({service:?})"
                    ),
                }]))
            }
            Some(_) => {}
        }
        let errors = policy.validate();
        if !errors.is_empty() {
            return Err(invalid(errors));
        }
        let key = policy_key(service);
        let current = self.store.get(&key).await?;
        let precondition = match &current {
            Some(kv) => {
                let stored: Option<Policy> = serde_json::from_slice(&kv.value).ok();
                if stored.as_ref() == Some(&policy) {
                    self.caught_up(kv.mod_revision).await?;
                    return Ok(Applied {
                        version: kv.mod_revision,
                        created: false,
                        unchanged: true,
                    });
                }
                Precondition::ModRevision(kv.mod_revision)
            }
            None => Precondition::Absent,
        };
        let value = serde_json::to_vec(&policy).map_err(|e| {
            invalid(vec![FieldError {
                field: String::new(),
                message: e.to_string(),
            }])
        })?;
        let version = self.store.put(&key, value, None, precondition).await?;
        self.caught_up(version).await?;
        info!(%service, version, "policy stored");
        Ok(Applied {
            version,
            created: current.is_none(),
            unchanged: false,
        })
    }

    /// Deletes the policy of `service`; returns the revision of the delete.
    pub async fn delete(&self, service: &ServiceName) -> Result<Revision> {
        let revision = self
            .store
            .delete(&policy_key(service), Precondition::None)
            .await?
            .ok_or_else(|| PolicyError::NotFound(service.clone()))?;
        self.caught_up(revision).await?;
        info!(%service, revision, "policy deleted");
        Ok(revision)
    }
}

#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("key outside {POLICIES_PREFIX}")]
    Key,
    #[error("invalid service name in key: {0}")]
    Name(#[from] malla_core::service::InvalidName),
    #[error("cannot decode the policy: {0}")]
    Json(#[from] serde_json::Error),
}

fn service_of(key: &str) -> std::result::Result<ServiceName, DecodeError> {
    let name = key.strip_prefix(POLICIES_PREFIX).ok_or(DecodeError::Key)?;
    Ok(ServiceName::new(name)?)
}

fn decode(
    key: &str,
    value: &[u8],
    version: Revision,
) -> std::result::Result<StoredPolicy, DecodeError> {
    let service = service_of(key)?;
    let policy: Policy = serde_json::from_slice(value)?;
    Ok(StoredPolicy {
        service,
        version,
        policy: Arc::new(policy),
        json: Arc::from(String::from_utf8_lossy(value).as_ref()),
    })
}

/// Applies store events to the view and broadcasts them; the view is published once per
/// watch item (whole revisions).
async fn follow(
    mut watch: crate::store::Watch,
    view_tx: watch::Sender<Arc<PolicyView>>,
    changes: broadcast::Sender<Arc<PolicyChange>>,
) {
    while let Some(events) = watch.events.recv().await {
        let events = match events {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "policy watch failed; policies are frozen until restart");
                return;
            }
        };
        let mut next = (**view_tx.borrow()).clone();
        let mut applied = Vec::new();
        for event in events {
            let revision = event.kv.mod_revision;
            next.revision = revision;
            let change = match event.kind {
                EventKind::Put => match decode(&event.kv.key, &event.kv.value, revision) {
                    Ok(stored) => {
                        next.policies.insert(stored.service.clone(), stored.clone());
                        Some(PolicyChange {
                            revision,
                            service: stored.service.clone(),
                            policy: Some(stored),
                        })
                    }
                    Err(e) => {
                        warn!(key = %event.kv.key, error = %e, "ignoring an unreadable policy");
                        None
                    }
                },
                EventKind::Delete => service_of(&event.kv.key).ok().map(|service| {
                    next.policies.remove(&service);
                    PolicyChange {
                        revision,
                        service,
                        policy: None,
                    }
                }),
            };
            applied.extend(change);
        }
        view_tx.send_replace(Arc::new(next));
        for change in applied {
            let _ = changes.send(Arc::new(change));
        }
    }
}
