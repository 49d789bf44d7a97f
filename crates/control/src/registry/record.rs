//! What the store holds for an instance: the [`Instance`] that sidecars and DNS see, plus
//! what describes it to people (annotations, when and by whom it was registered) and the
//! lease TTL it was registered with.
//!
//! The descriptive part is kept beside the instance rather than in it: sidecars receive
//! instances on every change and need none of it, and `malla_core::Instance` stays the
//! small domain type every crate builds. In the store the two are one flat JSON object
//! (records written before these fields existed read as having none).

use std::{net::IpAddr, sync::Arc, time::SystemTime};

use malla_core::{Annotations, Health, Instance, InstanceProtocol, Labels, ServiceName};
use serde::{Deserialize, Serialize};

use crate::store::LeaseId;

/// An instance as stored at `/malla/instances/{service}/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    pub id: String,
    pub service: ServiceName,
    pub address: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub protocol: InstanceProtocol,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub health: Health,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mtls: bool,
    #[serde(default, skip_serializing_if = "Annotations::is_empty")]
    pub annotations: Annotations,
    /// RFC 3339, UTC, to the second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<String>,
    /// Which API and peer registered it: `http 127.0.0.1:51234`, `grpc [fd00::5]:40000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_by: Option<String>,
    /// The TTL of its lease in seconds; none for a static instance (no lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// The descriptive part of a record, as the registry's view keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceMeta {
    pub annotations: Annotations,
    pub registered_at: Option<String>,
    pub registered_by: Option<String>,
    /// The lease (from the key) and its TTL; none for a static instance.
    pub lease: Option<LeaseId>,
    pub ttl_seconds: Option<u64>,
}

impl InstanceRecord {
    pub fn new(instance: Instance, meta: InstanceMeta) -> Self {
        InstanceRecord {
            id: instance.id,
            service: instance.service,
            address: instance.address,
            port: instance.port,
            protocol: instance.protocol,
            labels: instance.labels,
            health: instance.health,
            mtls: instance.mtls,
            annotations: meta.annotations,
            registered_at: meta.registered_at,
            registered_by: meta.registered_by,
            ttl_seconds: meta.ttl_seconds,
        }
    }

    /// Splits the record; `lease` is the key's.
    pub fn split(self, lease: Option<LeaseId>) -> (Instance, InstanceMeta) {
        (
            Instance {
                id: self.id,
                service: self.service,
                address: self.address,
                port: self.port,
                protocol: self.protocol,
                labels: self.labels,
                health: self.health,
                mtls: self.mtls,
            },
            InstanceMeta {
                annotations: self.annotations,
                registered_at: self.registered_at,
                registered_by: self.registered_by,
                lease,
                ttl_seconds: self.ttl_seconds,
            },
        )
    }
}

/// `now` as RFC 3339 UTC to the second (`2026-12-03T14:05:00Z`).
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The JSON of an instance for the HTTP API: the instance's fields, its annotations, when
/// and by whom it was registered, and its lease (`{id, ttl_seconds}`, or null when static).
pub fn instance_json(instance: &Instance, meta: Option<&Arc<InstanceMeta>>) -> serde_json::Value {
    let mut value = serde_json::to_value(instance).unwrap_or_default();
    let default = InstanceMeta::default();
    let meta = meta.map_or(&default, |m| m.as_ref());
    value["annotations"] = serde_json::to_value(&meta.annotations).unwrap_or_default();
    value["registered_at"] = serde_json::json!(meta.registered_at);
    value["registered_by"] = serde_json::json!(meta.registered_by);
    value["lease"] = match meta.lease {
        Some(id) => serde_json::json!({"id": id, "ttl_seconds": meta.ttl_seconds}),
        None => serde_json::Value::Null,
    };
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_records_read_and_round_trip() {
        let old = r#"{"id":"a","service":"s","address":"10.0.0.1","port":80,"health":"unhealthy"}"#;
        let record: InstanceRecord = serde_json::from_str(old).unwrap();
        let (instance, meta) = record.clone().split(Some(7));
        assert_eq!(instance.health, Health::Unhealthy);
        assert_eq!(meta.lease, Some(7));
        assert!(meta.annotations.is_empty() && meta.registered_at.is_none());
        assert_eq!(InstanceRecord::new(instance, meta), record);
    }
}
