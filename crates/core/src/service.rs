//! Services and their instances.

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::Labels;

/// A service name: a DNS label (`[a-z][a-z0-9-]*`, at most 63), so it can appear in DNS
/// names, hosts and metric labels unchanged.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}", invalid_name_message(.0))]
pub struct InvalidName(pub String);

/// Says what a service name must be and, when one can be made from it, which would do:
/// `invalid service name "Cotización de Envío": use ...; try "cotizacion-de-envio"`. (The
/// message starts as it always has, for scripts and tests that look for it.)
fn invalid_name_message(name: &str) -> String {
    let rule = "use 1-63 lowercase letters, digits and '-', starting with a letter and not \
                ending with '-' (a display name with any characters can go in the \
                `display-name` annotation)";
    match crate::slug::slug(name) {
        Some(slug) if slug != name => {
            format!("invalid service name {name:?}: {rule}; try {slug:?}")
        }
        _ => format!("invalid service name {name:?}: {rule}"),
    }
}

impl ServiceName {
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        if is_dns_label(name) {
            Ok(ServiceName(name.to_string()))
        } else {
            Err(InvalidName(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `[a-z][a-z0-9-]{0,62}` not ending in `-`.
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

impl TryFrom<String> for ServiceName {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, InvalidName> {
        ServiceName::new(&s)
    }
}

impl From<ServiceName> for String {
    fn from(s: ServiceName) -> Self {
        s.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an instance speaks, which decides how health checks and sidecars talk to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceProtocol {
    #[default]
    Http,
    Http2,
    Grpc,
    Tcp,
}

/// The health of an instance as the control plane last judged it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked yet, or the service has no active check: eligible for traffic.
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    /// Whether the instance should receive traffic.
    pub fn serving(self) -> bool {
        !matches!(self, Health::Unhealthy)
    }
}

/// One running copy of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// Unique within the service (`quote-7f9c`, a host name, a pod name...).
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
    /// Its sidecar accepts mTLS from the mesh's sidecars: it registered holding a
    /// certificate of its service. Callers then connect over TLS and require the service's
    /// SPIFFE ID, which they derive from the service, never from this record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mtls: bool,
}

impl Instance {
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        (self.address, self.port).into()
    }
}

/// Whether `address` can be an instance's endpoint, one that other instances connect to;
/// the error says why not and what to register instead. Refused: the unspecified addresses
/// (`0.0.0.0`, `::`: a listening socket's "every interface", not a destination), multicast
/// addresses and the IPv4 broadcast address (not one instance). IPv4-mapped IPv6 addresses
/// are judged as the IPv4 address they carry.
pub fn check_endpoint_address(address: IpAddr) -> Result<(), String> {
    let what = match address.to_canonical() {
        a if a.is_unspecified() => "the unspecified address (\"every interface\" for a listening socket, not a destination)",
        a if a.is_multicast() => "a multicast address (a group, not one instance)",
        IpAddr::V4(v4) if v4.is_broadcast() => "the broadcast address (every host, not one instance)",
        _ => return Ok(()),
    };
    Err(format!(
        "address {address} is {what}: register the address other instances reach this one \
         at, such as its pod, host or interface IP (127.0.0.1 or ::1 for a local test)"
    ))
}

/// Instance ids: 1-128 characters of `[A-Za-z0-9._:-]`, so they fit keys, URLs and DNS.
pub fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(ServiceName::new("shipping-quote").is_ok());
        for bad in ["", "Shipping", "1a", "a-", "a_b", &"a".repeat(64)] {
            assert!(ServiceName::new(bad).is_err(), "{bad}");
        }
        let e = ServiceName::new("Cotización de Envío")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid service name \"Cotización de Envío\": use 1-63")
                && e.ends_with("; try \"cotizacion-de-envio\""),
            "{e}"
        );
        assert!(!ServiceName::new("!!")
            .unwrap_err()
            .to_string()
            .contains("try"));
        assert!(valid_instance_id("quote-1.eu:8080"));
        assert!(!valid_instance_id("a/b"));
    }

    #[test]
    fn endpoint_addresses() {
        for ok in ["10.0.0.5", "127.0.0.1", "fd00::5", "::1", "192.168.1.255"] {
            assert_eq!(check_endpoint_address(ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            let e = check_endpoint_address(bad.parse().unwrap()).unwrap_err();
            assert!(
                e.contains(says) && e.contains("register the address"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn instance_json_rejects_unknown_fields_and_bad_names() {
        let ok = r#"{"id":"q1","service":"shipping-quote","address":"127.0.0.1","port":8080,"labels":{"env":"prod"}}"#;
        let i: Instance = serde_json::from_str(ok).unwrap();
        assert_eq!(i.health, Health::Unknown);
        assert_eq!(i.protocol, InstanceProtocol::Http);
        let bad = r#"{"id":"q1","service":"Bad","address":"127.0.0.1","port":8080}"#;
        assert!(serde_json::from_str::<Instance>(bad).is_err());
        let unknown = r#"{"id":"q1","service":"a","address":"127.0.0.1","port":1,"colour":"red"}"#;
        assert!(serde_json::from_str::<Instance>(unknown)
            .unwrap_err()
            .to_string()
            .contains("colour"));
    }
}
