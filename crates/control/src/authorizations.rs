//! Authorization policies as resources: at most one [`AuthorizationPolicy`] per service,
//! deciding who may call that service and what, written by `malla apply` (HTTP API). The
//! view and its change broadcast are kept for the sidecars' watch (the inbound sidecar
//! enforces them; not yet).
//!
//! Keys:
//!
//! ```text
//! /malla/authorizations/{service}     AuthorizationPolicy (JSON), its `service` set
//! ```
//!
//! As for resilience policies ([`crate::policies`]): a policy's **version** is the store
//! revision of its last write; a write is validated first (whatever the client checked)
//! and written with compare-and-set, so an invalid policy writes nothing; a write
//! identical to the stored policy writes nothing either. Reads come from an in-memory
//! view that one updater task keeps current by watching the store; a write returns once
//! the view includes it (read-your-writes).

use std::{collections::BTreeMap, sync::Arc};

use malla_api::InvalidPolicy;
use malla_core::{authz::AuthorizationPolicy, policy::FieldError, ServiceName};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::store::{EventKind, Precondition, Revision, Store, StoreError};

pub const AUTHORIZATIONS_PREFIX: &str = "/malla/authorizations/";

pub fn authorization_key(service: &ServiceName) -> String {
    format!("{AUTHORIZATIONS_PREFIX}{service}")
}

/// A stored policy.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredAuthorization {
    pub service: ServiceName,
    /// The store revision of its last write.
    pub version: Revision,
    pub policy: Arc<AuthorizationPolicy>,
    /// The stored JSON, as sent to sidecars.
    pub json: Arc<str>,
}

/// Every policy, as of one store revision.
#[derive(Clone, Debug, Default)]
pub struct AuthorizationView {
    pub revision: Revision,
    pub authorizations: BTreeMap<ServiceName, StoredAuthorization>,
}

/// One applied change: the service's policy after it (`None`: deleted).
#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationChange {
    pub revision: Revision,
    pub service: ServiceName,
    pub policy: Option<StoredAuthorization>,
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
pub enum AuthorizationError {
    /// The policy cannot be stored; every problem, each with its dotted field path.
    #[error("invalid authorization policy for {service}: {errors}")]
    Invalid {
        service: String,
        errors: InvalidPolicy,
    },
    #[error("no authorization policy for service {0}")]
    NotFound(ServiceName),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the control plane is shutting down")]
    Closed,
}

pub type Result<T> = std::result::Result<T, AuthorizationError>;

pub struct Authorizations<S> {
    store: S,
    view: watch::Receiver<Arc<AuthorizationView>>,
    changes: broadcast::Sender<Arc<AuthorizationChange>>,
    updater: tokio::task::JoinHandle<()>,
}

impl<S> Drop for Authorizations<S> {
    fn drop(&mut self) {
        self.updater.abort();
    }
}

impl<S: Store + Clone> Authorizations<S> {
    /// Loads the policies from the store and starts following it.
    pub async fn open(store: S) -> Result<Self> {
        let (kvs, revision) = store.range(AUTHORIZATIONS_PREFIX).await?;
        let mut view = AuthorizationView {
            revision,
            authorizations: BTreeMap::new(),
        };
        for kv in &kvs {
            match decode(&kv.key, &kv.value, kv.mod_revision) {
                Ok(stored) => {
                    view.authorizations.insert(stored.service.clone(), stored);
                }
                Err(e) => {
                    warn!(key = %kv.key, error = %e, "ignoring an unreadable authorization policy")
                }
            }
        }
        info!(
            revision,
            authorizations = view.authorizations.len(),
            "authorization policies loaded"
        );
        let (view_tx, view_rx) = watch::channel(Arc::new(view));
        let (changes, _) = broadcast::channel(1024);
        let watch = store.watch(AUTHORIZATIONS_PREFIX, revision)?;
        let updater = tokio::spawn(follow(watch, view_tx, changes.clone()));
        Ok(Authorizations {
            store,
            view: view_rx,
            changes,
            updater,
        })
    }

    /// The current view (cheap: an `Arc`).
    pub fn view(&self) -> Arc<AuthorizationView> {
        self.view.borrow().clone()
    }

    /// Changes as they are applied, and the view they start after: a change whose
    /// revision is not above the view's is already in it.
    pub fn subscribe(
        &self,
    ) -> (
        Arc<AuthorizationView>,
        broadcast::Receiver<Arc<AuthorizationChange>>,
    ) {
        let rx = self.changes.subscribe();
        (self.view(), rx)
    }

    pub fn get(&self, service: &ServiceName) -> Option<StoredAuthorization> {
        self.view().authorizations.get(service).cloned()
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
            .map_err(|_| AuthorizationError::Closed)
    }

    /// Stores `policy` as the authorization policy of `service`, unless it is invalid
    /// (nothing is written then) or identical to the stored one. A policy that names
    /// another service is refused; one that names none (empty) gets this one.
    pub async fn put(
        &self,
        service: &ServiceName,
        mut policy: AuthorizationPolicy,
    ) -> Result<Applied> {
        let invalid = |errors| AuthorizationError::Invalid {
            service: service.to_string(),
            errors: InvalidPolicy(errors),
        };
        if policy.service.is_empty() {
            policy.service = service.to_string();
        } else if policy.service != service.as_str() {
            return Err(invalid(vec![FieldError {
                field: "service".into(),
                message: format!(
                    "{:?} does not match the service in the path ({service:?})",
                    policy.service
                ),
            }]));
        }
        let errors = policy.validate();
        if !errors.is_empty() {
            return Err(invalid(errors));
        }
        let key = authorization_key(service);
        let current = self.store.get(&key).await?;
        let precondition = match &current {
            Some(kv) => {
                let stored: Option<AuthorizationPolicy> = serde_json::from_slice(&kv.value).ok();
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
        info!(%service, version, "authorization policy stored");
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
            .delete(&authorization_key(service), Precondition::None)
            .await?
            .ok_or_else(|| AuthorizationError::NotFound(service.clone()))?;
        self.caught_up(revision).await?;
        info!(%service, revision, "authorization policy deleted");
        Ok(revision)
    }
}

#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("key outside {AUTHORIZATIONS_PREFIX}")]
    Key,
    #[error("invalid service name in key: {0}")]
    Name(#[from] malla_core::service::InvalidName),
    #[error("cannot decode the authorization policy: {0}")]
    Json(#[from] serde_json::Error),
}

fn service_of(key: &str) -> std::result::Result<ServiceName, DecodeError> {
    let name = key
        .strip_prefix(AUTHORIZATIONS_PREFIX)
        .ok_or(DecodeError::Key)?;
    Ok(ServiceName::new(name)?)
}

fn decode(
    key: &str,
    value: &[u8],
    version: Revision,
) -> std::result::Result<StoredAuthorization, DecodeError> {
    let service = service_of(key)?;
    let policy: AuthorizationPolicy = serde_json::from_slice(value)?;
    Ok(StoredAuthorization {
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
    view_tx: watch::Sender<Arc<AuthorizationView>>,
    changes: broadcast::Sender<Arc<AuthorizationChange>>,
) {
    while let Some(events) = watch.events.recv().await {
        let events = match events {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "authorization watch failed; authorization policies are frozen until restart");
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
                        next.authorizations
                            .insert(stored.service.clone(), stored.clone());
                        Some(AuthorizationChange {
                            revision,
                            service: stored.service.clone(),
                            policy: Some(stored),
                        })
                    }
                    Err(e) => {
                        warn!(key = %event.kv.key, error = %e, "ignoring an unreadable authorization policy");
                        None
                    }
                },
                EventKind::Delete => service_of(&event.kv.key).ok().map(|service| {
                    next.authorizations.remove(&service);
                    AuthorizationChange {
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
