//! Conversions between the protobuf messages and the domain model.
//!
//! Inbound messages are validated as they are converted ([`TryFrom`]); every error names
//! the field and the bad value and says what is expected. Outbound conversions ([`From`])
//! cannot fail: domain types are valid by construction.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use malla_core::{
    labels::LabelError,
    selector::SelectorError,
    service::{valid_instance_id, InvalidName},
    Health, Instance, InstanceProtocol, Labels, Selector, ServiceName,
};

use crate::pb;

/// A message that does not describe valid domain values.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    #[error("{field}: {source}")]
    Service {
        field: &'static str,
        source: InvalidName,
    },
    #[error("{field} {value:?} is not a valid instance id: use 1-128 letters, digits, '.', '_', ':' or '-'")]
    InstanceId { field: &'static str, value: String },
    #[error("{field} {value:?} is not an IP address: give an IPv4 or IPv6 address without a port (the port is a field of its own)")]
    Address { field: &'static str, value: String },
    #[error("{field} {value} is out of range: use 1-65535")]
    Port { field: &'static str, value: u32 },
    #[error("{field}: unknown protocol {value}; use PROTOCOL_HTTP, PROTOCOL_HTTP2, PROTOCOL_GRPC or PROTOCOL_TCP")]
    Protocol { field: &'static str, value: i32 },
    #[error(
        "{field}: unknown health {value}; use HEALTH_UNKNOWN, HEALTH_HEALTHY or HEALTH_UNHEALTHY"
    )]
    Health { field: &'static str, value: i32 },
    #[error("{field}: {source}")]
    Label {
        field: &'static str,
        source: LabelError,
    },
    #[error("{field}: {source}")]
    Selector {
        field: &'static str,
        source: SelectorError,
    },
    #[error("{0} is missing")]
    Missing(&'static str),
}

fn service(field: &'static str, name: &str) -> Result<ServiceName, ConversionError> {
    ServiceName::new(name).map_err(|source| ConversionError::Service { field, source })
}

fn instance_id(field: &'static str, id: &str) -> Result<String, ConversionError> {
    if valid_instance_id(id) {
        Ok(id.to_string())
    } else {
        Err(ConversionError::InstanceId {
            field,
            value: id.to_string(),
        })
    }
}

fn address(field: &'static str, address: &str) -> Result<IpAddr, ConversionError> {
    address.parse().map_err(|_| ConversionError::Address {
        field,
        value: address.to_string(),
    })
}

fn port(field: &'static str, port: u32) -> Result<u16, ConversionError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(ConversionError::Port { field, value: port })
}

fn protocol(field: &'static str, value: i32) -> Result<InstanceProtocol, ConversionError> {
    match pb::Protocol::try_from(value) {
        Ok(pb::Protocol::Unspecified | pb::Protocol::Http) => Ok(InstanceProtocol::Http),
        Ok(pb::Protocol::Http2) => Ok(InstanceProtocol::Http2),
        Ok(pb::Protocol::Grpc) => Ok(InstanceProtocol::Grpc),
        Ok(pb::Protocol::Tcp) => Ok(InstanceProtocol::Tcp),
        Err(_) => Err(ConversionError::Protocol { field, value }),
    }
}

fn health(field: &'static str, value: i32) -> Result<Health, ConversionError> {
    match pb::Health::try_from(value) {
        Ok(pb::Health::Unknown) => Ok(Health::Unknown),
        Ok(pb::Health::Healthy) => Ok(Health::Healthy),
        Ok(pb::Health::Unhealthy) => Ok(Health::Unhealthy),
        Err(_) => Err(ConversionError::Health { field, value }),
    }
}

fn labels(
    field: &'static str,
    map: impl IntoIterator<Item = (String, String)>,
) -> Result<Labels, ConversionError> {
    Labels::try_from(map.into_iter().collect::<BTreeMap<_, _>>())
        .map_err(|source| ConversionError::Label { field, source })
}

impl From<InstanceProtocol> for pb::Protocol {
    fn from(p: InstanceProtocol) -> Self {
        match p {
            InstanceProtocol::Http => pb::Protocol::Http,
            InstanceProtocol::Http2 => pb::Protocol::Http2,
            InstanceProtocol::Grpc => pb::Protocol::Grpc,
            InstanceProtocol::Tcp => pb::Protocol::Tcp,
        }
    }
}

impl From<Health> for pb::Health {
    fn from(h: Health) -> Self {
        match h {
            Health::Unknown => pb::Health::Unknown,
            Health::Healthy => pb::Health::Healthy,
            Health::Unhealthy => pb::Health::Unhealthy,
        }
    }
}

impl TryFrom<pb::Instance> for Instance {
    type Error = ConversionError;

    fn try_from(i: pb::Instance) -> Result<Self, ConversionError> {
        Ok(Instance {
            service: service("instance.service", &i.service)?,
            id: instance_id("instance.id", &i.id)?,
            address: address("instance.address", &i.address)?,
            port: port("instance.port", i.port)?,
            protocol: protocol("instance.protocol", i.protocol)?,
            labels: labels("instance.labels", i.labels)?,
            health: health("instance.health", i.health)?,
            mtls: i.mtls,
        })
    }
}

impl From<&Instance> for pb::Instance {
    fn from(i: &Instance) -> Self {
        pb::Instance {
            service: i.service.to_string(),
            id: i.id.clone(),
            address: i.address.to_string(),
            port: u32::from(i.port),
            protocol: pb::Protocol::from(i.protocol).into(),
            labels: i
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            health: pb::Health::from(i.health).into(),
            mtls: i.mtls,
        }
    }
}

impl From<Instance> for pb::Instance {
    fn from(i: Instance) -> Self {
        pb::Instance::from(&i)
    }
}

/// A registration: the instance to add (its health is ignored: a new registration starts
/// `Unknown`) and the lease TTL it asks for (`None`: the server's default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub instance: Instance,
    pub ttl: Option<Duration>,
}

impl TryFrom<pb::RegisterRequest> for Registration {
    type Error = ConversionError;

    fn try_from(r: pb::RegisterRequest) -> Result<Self, ConversionError> {
        Ok(Registration {
            instance: Instance {
                service: service("service", &r.service)?,
                id: instance_id("id", &r.id)?,
                address: address("address", &r.address)?,
                port: port("port", r.port)?,
                protocol: protocol("protocol", r.protocol)?,
                labels: labels("labels", r.labels)?,
                health: Health::Unknown,
                mtls: r.mtls,
            },
            ttl: (r.ttl_seconds > 0).then(|| Duration::from_secs(u64::from(r.ttl_seconds))),
        })
    }
}

impl From<&Registration> for pb::RegisterRequest {
    fn from(r: &Registration) -> Self {
        let i = pb::Instance::from(&r.instance);
        pb::RegisterRequest {
            service: i.service,
            id: i.id,
            address: i.address,
            port: i.port,
            protocol: i.protocol,
            labels: i.labels,
            mtls: i.mtls,
            // Whole seconds, at least one; 0 asks for the server's default.
            ttl_seconds: r
                .ttl
                .map_or(0, |t| u32::try_from(t.as_secs().max(1)).unwrap_or(u32::MAX)),
        }
    }
}

/// What a watch follows: the instances of `service` that match `selector`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchTarget {
    pub service: ServiceName,
    pub selector: Selector,
}

impl TryFrom<pb::WatchRequest> for WatchTarget {
    type Error = ConversionError;

    fn try_from(r: pb::WatchRequest) -> Result<Self, ConversionError> {
        Ok(WatchTarget {
            service: service("service", &r.service)?,
            selector: Selector::parse(&r.selector).map_err(|source| ConversionError::Selector {
                field: "selector",
                source,
            })?,
        })
    }
}

impl From<&WatchTarget> for pb::WatchRequest {
    fn from(t: &WatchTarget) -> Self {
        pb::WatchRequest {
            service: t.service.to_string(),
            selector: t.selector.to_string(),
        }
    }
}

/// One message of a watch stream, in domain terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// Every matching instance at `revision`: replaces the watcher's whole set.
    Snapshot {
        revision: u64,
        instances: Vec<Instance>,
    },
    /// Changes since the previous message, up to `revision`.
    Update {
        revision: u64,
        upserted: Vec<Instance>,
        removed: Vec<String>,
    },
}

impl WatchEvent {
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Snapshot { revision, .. } | WatchEvent::Update { revision, .. } => {
                *revision
            }
        }
    }
}

fn instances(list: Vec<pb::Instance>) -> Result<Vec<Instance>, ConversionError> {
    list.into_iter().map(Instance::try_from).collect()
}

impl TryFrom<pb::WatchResponse> for WatchEvent {
    type Error = ConversionError;

    fn try_from(r: pb::WatchResponse) -> Result<Self, ConversionError> {
        match r.event {
            Some(pb::watch_response::Event::Snapshot(s)) => Ok(WatchEvent::Snapshot {
                revision: r.revision,
                instances: instances(s.instances)?,
            }),
            Some(pb::watch_response::Event::Update(u)) => Ok(WatchEvent::Update {
                revision: r.revision,
                upserted: instances(u.upserted)?,
                removed: u
                    .removed_ids
                    .iter()
                    .map(|id| instance_id("update.removed_ids", id))
                    .collect::<Result<_, _>>()?,
            }),
            None => Err(ConversionError::Missing("watch_response.event")),
        }
    }
}

impl From<&WatchEvent> for pb::WatchResponse {
    fn from(e: &WatchEvent) -> Self {
        use pb::watch_response::Event;
        let event = match e {
            WatchEvent::Snapshot { instances, .. } => Event::Snapshot(pb::Snapshot {
                instances: instances.iter().map(pb::Instance::from).collect(),
            }),
            WatchEvent::Update {
                upserted, removed, ..
            } => Event::Update(pb::Update {
                upserted: upserted.iter().map(pb::Instance::from).collect(),
                removed_ids: removed.clone(),
            }),
        };
        pb::WatchResponse {
            revision: e.revision(),
            event: Some(event),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        let mut labels = Labels::new();
        labels.insert("env", "prod").unwrap();
        Instance {
            mtls: false,
            id: "quote-1".into(),
            service: ServiceName::new("shipping-quote").unwrap(),
            address: "10.0.0.7".parse().unwrap(),
            port: 8080,
            protocol: InstanceProtocol::Grpc,
            labels,
            health: Health::Unhealthy,
        }
    }

    #[test]
    fn instance_round_trips() {
        let i = instance();
        let back = Instance::try_from(pb::Instance::from(&i)).unwrap();
        assert_eq!(back, i);
        let v6 = Instance {
            address: "::1".parse().unwrap(),
            ..i
        };
        assert_eq!(Instance::try_from(pb::Instance::from(&v6)).unwrap(), v6);
    }

    #[test]
    fn bad_fields_are_named() {
        let good = pb::Instance::from(&instance());
        let cases: Vec<(pb::Instance, &str)> = vec![
            (
                pb::Instance {
                    service: "Bad".into(),
                    ..good.clone()
                },
                "instance.service: invalid service name \"Bad\"",
            ),
            (
                pb::Instance {
                    id: "a/b".into(),
                    ..good.clone()
                },
                "instance.id \"a/b\" is not a valid instance id",
            ),
            (
                pb::Instance {
                    address: "10.0.0.7:80".into(),
                    ..good.clone()
                },
                "instance.address \"10.0.0.7:80\" is not an IP address",
            ),
            (
                pb::Instance {
                    port: 70_000,
                    ..good.clone()
                },
                "instance.port 70000 is out of range",
            ),
            (
                pb::Instance {
                    port: 0,
                    ..good.clone()
                },
                "instance.port 0 is out of range",
            ),
            (
                pb::Instance {
                    protocol: 42,
                    ..good.clone()
                },
                "instance.protocol: unknown protocol 42",
            ),
            (
                pb::Instance {
                    health: 9,
                    ..good.clone()
                },
                "instance.health: unknown health 9",
            ),
            (
                pb::Instance {
                    labels: [("env".to_string(), "a b".to_string())].into(),
                    ..good.clone()
                },
                "instance.labels: invalid value \"a b\" for label \"env\"",
            ),
        ];
        for (message, expected) in cases {
            let err = Instance::try_from(message).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "{err:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn unspecified_protocol_is_http() {
        let message = pb::Instance {
            protocol: pb::Protocol::Unspecified.into(),
            ..pb::Instance::from(&instance())
        };
        assert_eq!(
            Instance::try_from(message).unwrap().protocol,
            InstanceProtocol::Http
        );
    }

    #[test]
    fn registration_round_trips_and_ttl_zero_is_default() {
        let r = Registration {
            instance: Instance {
                health: Health::Unknown,
                ..instance()
            },
            ttl: Some(Duration::from_secs(10)),
        };
        let message = pb::RegisterRequest::from(&r);
        assert_eq!(message.ttl_seconds, 10);
        assert_eq!(Registration::try_from(message.clone()).unwrap(), r);
        let default = Registration::try_from(pb::RegisterRequest {
            ttl_seconds: 0,
            ..message
        })
        .unwrap();
        assert_eq!(default.ttl, None);
    }

    #[test]
    fn watch_requests_validate_the_selector() {
        let t = WatchTarget::try_from(pb::WatchRequest {
            service: "shipping-quote".into(),
            selector: "env=prod, zone in (a,b)".into(),
        })
        .unwrap();
        assert_eq!(
            pb::WatchRequest::from(&t).selector,
            "env=prod,zone in (a,b)"
        );
        let err = WatchTarget::try_from(pb::WatchRequest {
            service: "shipping-quote".into(),
            selector: "env=prod,,".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("selector: invalid selector"), "{err}");
        assert!(err.contains("position 9"), "{err}");
    }

    #[test]
    fn watch_events_round_trip() {
        let events = [
            WatchEvent::Snapshot {
                revision: 7,
                instances: vec![instance()],
            },
            WatchEvent::Update {
                revision: 9,
                upserted: vec![instance()],
                removed: vec!["quote-2".into()],
            },
        ];
        for e in events {
            assert_eq!(
                WatchEvent::try_from(pb::WatchResponse::from(&e)).unwrap(),
                e
            );
        }
        let empty = pb::WatchResponse {
            revision: 1,
            event: None,
        };
        assert_eq!(
            WatchEvent::try_from(empty).unwrap_err(),
            ConversionError::Missing("watch_response.event")
        );
    }
}
