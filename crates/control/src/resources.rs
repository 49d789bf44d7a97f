//! Per-service resources: at most one document of a [`Kind`] per service, stored as JSON
//! under `{Kind::PREFIX}{service}`. Resilience policies ([`crate::policies`]) and
//! authorization policies ([`crate::authorizations`]) are both such resources; this
//! module is what they share, so that both keep the same guarantees by construction:
//!
//! - A resource's **version** is the store revision of its last write: it only grows, so a
//!   sidecar and an operator can tell which write is in force by one number.
//! - A write is validated first (whatever the client checked), then written with
//!   compare-and-set on the revision it was compared against: an invalid resource writes
//!   nothing, so the previous version stays in force everywhere.
//! - A write identical to the stored resource writes nothing either (no new version,
//!   nothing pushed to the sidecars), so applying the same file twice is free.
//! - Reads come from an in-memory view that one updater task keeps current by watching
//!   the store (the same scheme as [`crate::registry`]); every change is broadcast for the
//!   sidecars' watch streams, and a write returns once the view includes it
//!   (read-your-writes).

use std::{collections::BTreeMap, fmt, sync::Arc};

use malla_api::InvalidPolicy;
use malla_core::{policy::FieldError, ServiceName};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::store::{EventKind, Precondition, Revision, Store, StoreError};

/// What differs between two kinds of per-service resource.
pub trait Kind: Sized + Send + Sync + 'static {
    /// The document, as serde reads and writes it.
    type Value: Clone + fmt::Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync;
    /// Where the documents live in the store: `{PREFIX}{service}`.
    const PREFIX: &'static str;
    /// The name of one document in messages and logs (`policy`, `authorization policy`).
    const NAME: &'static str;
    /// The name of several, in logs (`policies`).
    const PLURAL: &'static str;

    /// The service the document names, if it names one.
    fn named_service(value: &Self::Value) -> Option<&str>;
    /// Makes the document name `service` (it named none).
    fn set_service(value: &mut Self::Value, service: &ServiceName);
    /// Every problem of the document, each with its field.
    fn validate(value: &Self::Value) -> Vec<FieldError>;
}

/// The store key of `service`'s resource of kind `K`.
pub fn key<K: Kind>(service: &ServiceName) -> String {
    format!("{}{service}", K::PREFIX)
}

/// A stored resource.
#[derive(Debug)]
pub struct Stored<K: Kind> {
    pub service: ServiceName,
    /// The store revision of its last write.
    pub version: Revision,
    pub policy: Arc<K::Value>,
    /// The stored JSON, as sent to sidecars.
    pub json: Arc<str>,
}

// By hand: derives would ask `K` itself (a marker type) for `Clone` and `PartialEq`.
impl<K: Kind> Clone for Stored<K> {
    fn clone(&self) -> Self {
        Stored {
            service: self.service.clone(),
            version: self.version,
            policy: self.policy.clone(),
            json: self.json.clone(),
        }
    }
}

impl<K: Kind> PartialEq for Stored<K> {
    fn eq(&self, other: &Self) -> bool {
        (&self.service, self.version, &self.policy, &self.json)
            == (&other.service, other.version, &other.policy, &other.json)
    }
}

/// Every resource of a kind, as of one store revision.
#[derive(Debug)]
pub struct View<K: Kind> {
    pub revision: Revision,
    pub by_service: BTreeMap<ServiceName, Stored<K>>,
}

impl<K: Kind> Clone for View<K> {
    fn clone(&self) -> Self {
        View {
            revision: self.revision,
            by_service: self.by_service.clone(),
        }
    }
}

impl<K: Kind> Default for View<K> {
    fn default() -> Self {
        View {
            revision: 0,
            by_service: BTreeMap::new(),
        }
    }
}

/// One applied change: the service's resource after it (`None`: deleted).
#[derive(Debug)]
pub struct Change<K: Kind> {
    pub revision: Revision,
    pub service: ServiceName,
    pub policy: Option<Stored<K>>,
}

/// The outcome of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub version: Revision,
    /// There was no resource for the service before.
    pub created: bool,
    /// Identical to the stored resource: nothing was written.
    pub unchanged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The resource cannot be stored; every problem, each with its dotted field path.
    #[error("invalid {kind} for {service}: {errors}")]
    Invalid {
        kind: &'static str,
        service: String,
        errors: InvalidPolicy,
    },
    #[error("no {kind} for service {service}")]
    NotFound {
        kind: &'static str,
        service: ServiceName,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the control plane is shutting down")]
    Closed,
}

impl ResourceError {
    pub fn not_found<K: Kind>(service: ServiceName) -> Self {
        ResourceError::NotFound {
            kind: K::NAME,
            service,
        }
    }
}

pub type Result<T> = std::result::Result<T, ResourceError>;

/// The resources of one kind: reads from the view, writes through the store.
pub struct Resources<S, K: Kind> {
    store: S,
    view: watch::Receiver<Arc<View<K>>>,
    changes: broadcast::Sender<Arc<Change<K>>>,
    updater: tokio::task::JoinHandle<()>,
}

impl<S, K: Kind> Drop for Resources<S, K> {
    fn drop(&mut self) {
        self.updater.abort();
    }
}

impl<S: Store + Clone, K: Kind> Resources<S, K> {
    /// Loads the resources from the store and starts following it.
    pub async fn open(store: S) -> Result<Self> {
        let (kvs, revision) = store.range(K::PREFIX).await?;
        let mut view = View::<K> {
            revision,
            by_service: BTreeMap::new(),
        };
        for kv in &kvs {
            match decode::<K>(&kv.key, &kv.value, kv.mod_revision) {
                Ok(stored) => {
                    view.by_service.insert(stored.service.clone(), stored);
                }
                Err(e) => warn!(key = %kv.key, error = %e, "ignoring an unreadable {}", K::NAME),
            }
        }
        info!(
            revision,
            count = view.by_service.len(),
            "{} loaded",
            K::PLURAL
        );
        let (view_tx, view_rx) = watch::channel(Arc::new(view));
        let (changes, _) = broadcast::channel(1024);
        let watch = store.watch(K::PREFIX, revision)?;
        let updater = tokio::spawn(follow(watch, view_tx, changes.clone()));
        Ok(Resources {
            store,
            view: view_rx,
            changes,
            updater,
        })
    }

    /// The current view (cheap: an `Arc`).
    pub fn view(&self) -> Arc<View<K>> {
        self.view.borrow().clone()
    }

    /// Changes as they are applied, and the view they start after: a change whose
    /// revision is not above the view's is already in it.
    pub fn subscribe(&self) -> (Arc<View<K>>, broadcast::Receiver<Arc<Change<K>>>) {
        let rx = self.changes.subscribe();
        (self.view(), rx)
    }

    pub fn get(&self, service: &ServiceName) -> Option<Stored<K>> {
        self.view().by_service.get(service).cloned()
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
            .map_err(|_| ResourceError::Closed)
    }

    /// Stores `value` as the resource of `service`, unless it is invalid (nothing is
    /// written then) or identical to the stored one. A document that names no service gets
    /// this one; one that names another is refused.
    pub async fn put(&self, service: &ServiceName, mut value: K::Value) -> Result<Applied> {
        let invalid = |errors| ResourceError::Invalid {
            kind: K::NAME,
            service: service.to_string(),
            errors: InvalidPolicy(errors),
        };
        match K::named_service(&value) {
            None => K::set_service(&mut value, service),
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
        let errors = K::validate(&value);
        if !errors.is_empty() {
            return Err(invalid(errors));
        }
        let key = key::<K>(service);
        let current = self.store.get(&key).await?;
        let precondition = match &current {
            Some(kv) => {
                let stored: Option<K::Value> = serde_json::from_slice(&kv.value).ok();
                if stored.as_ref() == Some(&value) {
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
        let json = serde_json::to_vec(&value).map_err(|e| {
            invalid(vec![FieldError {
                field: String::new(),
                message: e.to_string(),
            }])
        })?;
        let version = self.store.put(&key, json, None, precondition).await?;
        self.caught_up(version).await?;
        info!(%service, version, "{} stored", K::NAME);
        Ok(Applied {
            version,
            created: current.is_none(),
            unchanged: false,
        })
    }

    /// Deletes the resource of `service`; returns the revision of the delete.
    pub async fn delete(&self, service: &ServiceName) -> Result<Revision> {
        let revision = self
            .store
            .delete(&key::<K>(service), Precondition::None)
            .await?
            .ok_or_else(|| ResourceError::not_found::<K>(service.clone()))?;
        self.caught_up(revision).await?;
        info!(%service, revision, "{} deleted", K::NAME);
        Ok(revision)
    }
}

#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("key outside {0}")]
    Key(&'static str),
    #[error("invalid service name in key: {0}")]
    Name(#[from] malla_core::service::InvalidName),
    #[error("cannot decode the {0}: {1}")]
    Json(&'static str, serde_json::Error),
}

fn service_of<K: Kind>(key: &str) -> std::result::Result<ServiceName, DecodeError> {
    let name = key
        .strip_prefix(K::PREFIX)
        .ok_or(DecodeError::Key(K::PREFIX))?;
    Ok(ServiceName::new(name)?)
}

fn decode<K: Kind>(
    key: &str,
    value: &[u8],
    version: Revision,
) -> std::result::Result<Stored<K>, DecodeError> {
    let service = service_of::<K>(key)?;
    let policy: K::Value =
        serde_json::from_slice(value).map_err(|e| DecodeError::Json(K::NAME, e))?;
    Ok(Stored {
        service,
        version,
        policy: Arc::new(policy),
        json: Arc::from(String::from_utf8_lossy(value).as_ref()),
    })
}

/// Applies store events to the view and broadcasts them; the view is published once per
/// watch item (whole revisions).
async fn follow<K: Kind>(
    mut watch: crate::store::Watch,
    view_tx: watch::Sender<Arc<View<K>>>,
    changes: broadcast::Sender<Arc<Change<K>>>,
) {
    while let Some(events) = watch.events.recv().await {
        let events = match events {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "the {} watch failed; {} are frozen until restart", K::NAME, K::PLURAL);
                return;
            }
        };
        let mut next = (**view_tx.borrow()).clone();
        let mut applied = Vec::new();
        for event in events {
            let revision = event.kv.mod_revision;
            next.revision = revision;
            let change = match event.kind {
                EventKind::Put => match decode::<K>(&event.kv.key, &event.kv.value, revision) {
                    Ok(stored) => {
                        next.by_service
                            .insert(stored.service.clone(), stored.clone());
                        Some(Change {
                            revision,
                            service: stored.service.clone(),
                            policy: Some(stored),
                        })
                    }
                    Err(e) => {
                        warn!(key = %event.kv.key, error = %e, "ignoring an unreadable {}", K::NAME);
                        None
                    }
                },
                EventKind::Delete => service_of::<K>(&event.kv.key).ok().map(|service| {
                    next.by_service.remove(&service);
                    Change {
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
