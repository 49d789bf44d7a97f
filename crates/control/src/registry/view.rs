//! The registry's in-memory view, rebuilt from store events.
//!
//! The services and each service's instances are persistent ordered maps (`imbl`), and each
//! service's state sits behind its own `Arc`: the updater clones the view for every
//! revision it applies, and that clone shares everything but the path to what changed. So
//! applying an event costs O(log n), whatever the number of services or instances:
//! registering into the 10,000th service, or the 10,000th instance of one, is as cheap as
//! the first.

use std::sync::Arc;

use malla_core::{Instance, ServiceName};

use super::{
    record::{InstanceMeta, InstanceRecord},
    ServiceSpec, INSTANCES_PREFIX, SERVICES_PREFIX,
};
use crate::store::{LeaseId, Revision};

#[derive(Clone, Debug, Default)]
pub struct View {
    /// The store revision this view reflects.
    pub revision: Revision,
    pub services: imbl::OrdMap<ServiceName, Arc<ServiceState>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceState {
    pub spec: ServiceSpec,
    /// Whether the service key exists (a service can also appear through instances only).
    pub defined: bool,
    /// Shared, so readers (DNS, snapshots) hand out pointers instead of copies.
    pub instances: imbl::OrdMap<String, Arc<Instance>>,
    /// What describes each instance (annotations, registration, lease), by id.
    pub meta: imbl::OrdMap<String, Arc<InstanceMeta>>,
}

/// One applied change to an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub revision: Revision,
    pub service: ServiceName,
    /// The instance before and after: `None` before = added, `None` after = removed.
    pub before: Option<Instance>,
    pub after: Option<Instance>,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("key outside the registry layout")]
    UnknownKey,
    #[error("invalid service name in key: {0}")]
    Name(#[from] malla_core::service::InvalidName),
    #[error("cannot decode value: {0}")]
    Decode(#[from] serde_json::Error),
}

enum Key<'a> {
    Service(ServiceName),
    Instance(ServiceName, &'a str),
}

fn parse_key(key: &str) -> Result<Key<'_>, ViewError> {
    if let Some(name) = key.strip_prefix(SERVICES_PREFIX) {
        return Ok(Key::Service(ServiceName::new(name)?));
    }
    if let Some(rest) = key.strip_prefix(INSTANCES_PREFIX) {
        let (service, id) = rest.split_once('/').ok_or(ViewError::UnknownKey)?;
        return Ok(Key::Instance(ServiceName::new(service)?, id));
    }
    Err(ViewError::UnknownKey)
}

impl View {
    pub fn new(revision: Revision) -> Self {
        View {
            revision,
            services: imbl::OrdMap::new(),
        }
    }

    pub fn instance_count(&self) -> usize {
        self.services.values().map(|s| s.instances.len()).sum()
    }

    /// Applies a put (`lease`: the key's); returns the instance change it makes, if any.
    pub fn apply_put(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<Change>, ViewError> {
        match parse_key(key)? {
            Key::Service(name) => {
                let spec: ServiceSpec = serde_json::from_slice(value)?;
                let state = Arc::make_mut(self.services.entry(name).or_default());
                state.spec = spec;
                state.defined = true;
                Ok(None)
            }
            Key::Instance(service, id) => {
                let record: InstanceRecord = serde_json::from_slice(value)?;
                let (instance, meta) = record.split(lease);
                let state = Arc::make_mut(self.services.entry(service.clone()).or_default());
                state.meta.insert(id.to_string(), Arc::new(meta));
                let before = state
                    .instances
                    .insert(id.to_string(), Arc::new(instance.clone()))
                    .map(Arc::unwrap_or_clone);
                Ok(Some(Change {
                    revision: self.revision,
                    service,
                    before,
                    after: Some(instance),
                }))
            }
        }
    }

    /// Applies a delete; returns the instance change it makes, if any.
    pub fn apply_delete(&mut self, key: &str) -> Option<Change> {
        match parse_key(key).ok()? {
            Key::Service(name) => {
                let state = self.services.get_mut(&name)?;
                if state.instances.is_empty() {
                    self.services.remove(&name);
                } else {
                    let s = Arc::make_mut(state);
                    s.defined = false;
                    s.spec = ServiceSpec::default();
                }
                None
            }
            Key::Instance(service, id) => {
                let state = self.services.get_mut(&service)?;
                let s = Arc::make_mut(state);
                s.meta.remove(id);
                let before = Arc::unwrap_or_clone(s.instances.remove(id)?);
                if s.instances.is_empty() && !s.defined {
                    self.services.remove(&service);
                }
                Some(Change {
                    revision: self.revision,
                    service,
                    before: Some(before),
                    after: None,
                })
            }
        }
    }
}
