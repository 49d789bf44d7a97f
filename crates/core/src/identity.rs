//! Workload identities: SPIFFE IDs.
//!
//! Every instance of a service proves the same identity,
//! `spiffe://TRUST_DOMAIN/svc/SERVICE`, in the URI SAN of its X.509 SVID (the certificate
//! the control plane's CA issues it). The path follows Consul's `/svc/NAME` rather than
//! Istio's `/ns/NS/sa/SA`: malla has no namespaces or service accounts, and a service is
//! the unit that authorization policies name. Anything else under the trust domain is a
//! valid SPIFFE ID that is not a service (reserved for later kinds of workload).
//!
//! The syntax is the SPIFFE ID standard's (spiffe/standards, SPIFFE-ID.md): a trust domain
//! of lowercase letters, digits, `.`, `-` and `_`; path segments of letters, digits, `.`,
//! `-` and `_`, none empty, `.` or `..`; no query, fragment, port or user info; 2048 bytes
//! at most.

use std::fmt;

use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use crate::ServiceName;

/// Longest SPIFFE ID, in bytes (the standard's limit).
pub const MAX_ID_BYTES: usize = 2048;
/// Longest trust domain, in bytes (the standard's limit).
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

/// A SPIFFE trust domain: `malla.local`, `prod.example.com`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID: `spiffe://malla.local/svc/checkout`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    domain: TrustDomain,
    /// Empty, or `/` followed by segments.
    path: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("invalid trust domain {0:?}: use 1-255 lowercase letters, digits, '.', '-' and '_' (for example malla.local)")]
    TrustDomain(String),
    #[error("invalid SPIFFE ID {id:?}: {why}")]
    Id { id: String, why: &'static str },
}

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, IdentityError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_TRUST_DOMAIN_BYTES
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(TrustDomain(name.to_string()))
        } else {
            Err(IdentityError::TrustDomain(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, IdentityError> {
        TrustDomain::new(s)
    }
}

/// The path of the control plane's SPIFFE ID ([`SpiffeId::control_plane`]).
pub const CONTROL_PLANE_PATH: &str = "/control";

impl SpiffeId {
    /// The identity of every instance of `service`.
    pub fn for_service(domain: &TrustDomain, service: &ServiceName) -> SpiffeId {
        SpiffeId {
            domain: domain.clone(),
            path: format!("/svc/{service}"),
        }
    }

    /// The control plane's identity: what its API's certificate proves, and what sidecars
    /// and the CLI check before they send it anything. No workload can hold it: join
    /// tokens and renewals only ever certify `/svc/...` paths.
    pub fn control_plane(domain: &TrustDomain) -> SpiffeId {
        SpiffeId {
            domain: domain.clone(),
            path: CONTROL_PLANE_PATH.to_string(),
        }
    }

    /// Whether this is a control plane's identity (in any trust domain).
    pub fn is_control_plane(&self) -> bool {
        self.path == CONTROL_PLANE_PATH
    }

    pub fn parse(id: &str) -> Result<SpiffeId, IdentityError> {
        let err = |why| IdentityError::Id {
            id: id.chars().take(200).collect(),
            why,
        };
        if id.len() > MAX_ID_BYTES {
            return Err(err("longer than 2048 bytes"));
        }
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("it must start with spiffe://"))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if domain.is_empty() {
            return Err(err("the trust domain is empty"));
        }
        let domain = TrustDomain::new(domain).map_err(|_| {
            err("the trust domain may hold only lowercase letters, digits, '.', '-' and '_' (no port, user or uppercase)")
        })?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() {
                    return Err(err("a path segment is empty (a '//' or a trailing '/')"));
                }
                if segment == "." || segment == ".." {
                    return Err(err("'.' and '..' are not allowed as path segments"));
                }
                if !segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                {
                    return Err(err(
                        "the path may hold only letters, digits, '.', '-', '_' and '/' (no query or fragment)",
                    ));
                }
            }
        }
        Ok(SpiffeId {
            domain,
            path: path.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The service this ID names, when it is a service's (`/svc/NAME`).
    pub fn service(&self) -> Option<ServiceName> {
        self.path
            .strip_prefix("/svc/")
            .and_then(|name| ServiceName::new(name).ok())
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.domain, self.path)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, IdentityError> {
        SpiffeId::parse(s)
    }
}

/// The SPIFFE ID an X.509 SVID proves: its one URI SAN. Refused, with the reason: no
/// subject alternative names, no URI SAN, more than one, or one that is not a SPIFFE ID.
pub fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("its subject alternative names do not parse ({e})"))?
        .ok_or("it has no SPIFFE ID (no subject alternative name)")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => SpiffeId::parse(uri).map_err(|e| e.to_string()),
        (None, _) => Err("it has no SPIFFE ID (no URI SAN)".into()),
        (Some(_), Some(_)) => Err("it has more than one URI SAN".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_identity_round_trips() {
        let domain = TrustDomain::new("malla.local").unwrap();
        let id = SpiffeId::for_service(&domain, &ServiceName::new("checkout").unwrap());
        assert_eq!(id.to_string(), "spiffe://malla.local/svc/checkout");
        let parsed = SpiffeId::parse(&id.to_string()).unwrap();
        assert_eq!(parsed, id);
        assert_eq!(parsed.service().unwrap().as_str(), "checkout");
        assert_eq!(parsed.trust_domain().as_str(), "malla.local");
    }

    #[test]
    fn ids_that_are_not_services_parse_without_a_service() {
        for id in [
            "spiffe://malla.local",
            "spiffe://malla.local/ns/default/sa/web",
            "spiffe://malla.local/svc/Not_A_Dns_Label",
            "spiffe://malla.local/svc/checkout/extra",
        ] {
            let parsed = SpiffeId::parse(id).unwrap();
            assert_eq!(parsed.to_string(), id);
            assert_eq!(parsed.service(), None, "{id}");
        }
    }

    #[test]
    fn invalid_ids_say_why() {
        for (id, says) in [
            ("http://malla.local/svc/a", "must start with spiffe://"),
            ("spiffe:///svc/a", "trust domain is empty"),
            ("spiffe://Malla.local/svc/a", "lowercase"),
            ("spiffe://malla.local:443/svc/a", "no port"),
            ("spiffe://user@malla.local/svc/a", "no port, user"),
            ("spiffe://malla.local/svc//a", "segment is empty"),
            ("spiffe://malla.local/svc/a/", "segment is empty"),
            ("spiffe://malla.local/svc/../a", "'..'"),
            ("spiffe://malla.local/svc/a?x=1", "no query"),
            ("spiffe://malla.local/svc/a#f", "no query or fragment"),
            ("spiffe://malla.local/svc/é", "only letters"),
        ] {
            let e = SpiffeId::parse(id).unwrap_err().to_string();
            assert!(e.contains(says), "{id}: {e}");
        }
        let long = format!("spiffe://malla.local/{}", "a".repeat(2100));
        assert!(SpiffeId::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("2048"));
    }

    #[test]
    fn trust_domains() {
        for ok in ["malla.local", "prod_1.example-corp.com", "a"] {
            assert!(TrustDomain::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Malla.local",
            "malla.local:1",
            "malla/x",
            &"a".repeat(256),
        ] {
            let e = TrustDomain::new(bad).unwrap_err().to_string();
            assert!(e.contains("invalid trust domain"), "{bad}: {e}");
        }
    }
}
