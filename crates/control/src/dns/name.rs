//! The naming scheme: what a query name asks for, and the names malla gives instances.

use std::{fmt::Write, net::IpAddr};

use hickory_proto::rr::Name;
use malla_core::{Instance, Selector, ServiceName};

/// What a query name refers to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lookup {
    /// Not under the domain.
    Outside,
    /// Under the domain but not a name of the scheme.
    NoSuchName,
    /// The domain itself.
    Apex,
    /// `svc.DOMAIN`: an empty non-terminal (its children are the services).
    SvcRoot,
    /// `[_NAME._tcp.]{VALUE.KEY.}*SERVICE.svc.DOMAIN`
    Service {
        service: ServiceName,
        selector: Selector,
        srv_form: bool,
    },
    /// `[_NAME._tcp.]TARGET.SERVICE.svc.DOMAIN`
    Instance {
        service: ServiceName,
        target: String,
        srv_form: bool,
    },
}

/// Classifies `qname` against the domain, given as lowercase labels (`["malla"]`).
pub(super) fn lookup(qname: &Name, domain: &[Vec<u8>]) -> Lookup {
    let labels: Vec<&[u8]> = qname.iter().collect();
    if labels.len() < domain.len() {
        return Lookup::Outside;
    }
    let (rel, tail) = labels.split_at(labels.len() - domain.len());
    if !tail
        .iter()
        .zip(domain)
        .all(|(a, b)| a.eq_ignore_ascii_case(b))
    {
        return Lookup::Outside;
    }
    let Some((svc, rel)) = rel.split_last() else {
        return Lookup::Apex;
    };
    if !svc.eq_ignore_ascii_case(b"svc") {
        return Lookup::NoSuchName;
    }
    let Some((service, mut rel)) = rel.split_last() else {
        return Lookup::SvcRoot;
    };
    let Some(service) = lower(service).and_then(|s| ServiceName::new(&s).ok()) else {
        return Lookup::NoSuchName;
    };
    // RFC 2782: `_NAME._tcp.` in front.
    let mut srv_form = false;
    if let [name, proto, rest @ ..] = rel {
        if name.len() > 1 && name[0] == b'_' && proto.eq_ignore_ascii_case(b"_tcp") {
            srv_form = true;
            rel = rest;
        }
    }
    let Some(rel) = rel.iter().map(|l| lower(l)).collect::<Option<Vec<_>>>() else {
        return Lookup::NoSuchName;
    };
    match rel.as_slice() {
        [] => Lookup::Service {
            service,
            selector: Selector::all(),
            srv_form,
        },
        [target] => Lookup::Instance {
            service,
            target: target.clone(),
            srv_form,
        },
        pairs if pairs.len() % 2 == 0 => {
            // Read right to left: the label nearest the service is the first key.
            let requirements: Vec<String> = pairs
                .rchunks(2)
                .map(|pair| format!("{}={}", pair[1], pair[0]))
                .collect();
            match Selector::parse(&requirements.join(",")) {
                Ok(selector) => Lookup::Service {
                    service,
                    selector,
                    srv_form,
                },
                Err(_) => Lookup::NoSuchName,
            }
        }
        _ => Lookup::NoSuchName,
    }
}

/// A label lowercased, if it can be a service name, label key or value, or target: ASCII
/// letters, digits, `-` and `_`, starting and ending with a letter or digit. (Anything else
/// could smuggle selector syntax, `=` or `,`, into the selector built from the labels.)
fn lower(label: &[u8]) -> Option<String> {
    let alnum = |c: Option<&u8>| c.is_some_and(u8::is_ascii_alphanumeric);
    let ok = label.len() <= 63
        && alnum(label.first())
        && alnum(label.last())
        && label
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'));
    ok.then(|| String::from_utf8_lossy(label).to_ascii_lowercase())
}

/// The first label of an instance's SRV target: its id when that is a lowercase DNS label,
/// otherwise its address with dashes.
pub(super) fn target_label(instance: &Instance) -> String {
    let id = instance.id.as_bytes();
    let ldh = !id.is_empty()
        && id.len() <= 63
        && id[0] != b'-'
        && id[id.len() - 1] != b'-'
        && id
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ldh {
        return instance.id.clone();
    }
    let mut out = String::with_capacity(39);
    match instance.address {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().iter().enumerate() {
                let _ = write!(out, "{}{o}", if i > 0 { "-" } else { "" });
            }
        }
        IpAddr::V6(a) => {
            for (i, s) in a.segments().iter().enumerate() {
                let _ = write!(out, "{}{s:x}", if i > 0 { "-" } else { "" });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use malla_core::{Health, InstanceProtocol, Labels};

    use super::*;

    fn domain() -> Vec<Vec<u8>> {
        vec![b"malla".to_vec()]
    }

    /// Labels taken as raw bytes, so that what `Name::from_ascii` refuses can be asked too.
    fn look(name: &str) -> Lookup {
        let labels = name.split('.').filter(|l| !l.is_empty()).map(str::as_bytes);
        lookup(&Name::from_labels(labels).unwrap(), &domain())
    }

    fn service(name: &str, selector: &str, srv_form: bool) -> Lookup {
        Lookup::Service {
            service: ServiceName::new(name).unwrap(),
            selector: Selector::parse(selector).unwrap(),
            srv_form,
        }
    }

    #[test]
    fn names_of_the_scheme() {
        assert_eq!(look("malla."), Lookup::Apex);
        assert_eq!(look("MALLA."), Lookup::Apex);
        assert_eq!(look("svc.malla."), Lookup::SvcRoot);
        assert_eq!(look("a.svc.malla."), service("a", "", false));
        assert_eq!(
            look("shipping-quote.svc.malla."),
            service("shipping-quote", "", false)
        );
        assert_eq!(
            look("Prod.ENV.Shipping-Quote.Svc.Malla."),
            service("shipping-quote", "env=prod", false)
        );
        assert_eq!(
            look("eu-1.zone.prod.env.shipping-quote.svc.malla."),
            service("shipping-quote", "env=prod,zone=eu-1", false)
        );
        assert_eq!(
            look("_http._tcp.shipping-quote.svc.malla."),
            service("shipping-quote", "", true)
        );
        assert_eq!(
            look("_grpc._TCP.prod.env.shipping-quote.svc.malla."),
            service("shipping-quote", "env=prod", true)
        );
        assert_eq!(
            look("q-1.shipping-quote.svc.malla."),
            Lookup::Instance {
                service: ServiceName::new("shipping-quote").unwrap(),
                target: "q-1".into(),
                srv_form: false
            }
        );
        assert_eq!(
            look("_x._tcp.Q-1.shipping-quote.svc.malla."),
            Lookup::Instance {
                service: ServiceName::new("shipping-quote").unwrap(),
                target: "q-1".into(),
                srv_form: true
            }
        );
    }

    #[test]
    fn names_outside_or_malformed() {
        for outside in [".", "com.", "example.com.", "mallax.", "svc.malla.example."] {
            assert_eq!(look(outside), Lookup::Outside, "{outside}");
        }
        for bad in [
            "x.malla.",
            "svc.svc.malla.x.malla.",
            "Bad_Name.svc.malla.",
            "1abc.svc.malla.",
            "d.c.b.a.svc.malla.",
            "_http.a.svc.malla.",
            "_http._udp.a.svc.malla.",
            "prod._env.a.svc.malla.",
            "-x.env.a.svc.malla.",
            "y.z.env.a.svc.malla.",
        ] {
            assert_eq!(look(bad), Lookup::NoSuchName, "{bad}");
        }
        // Bytes a selector would read as syntax never reach it.
        let name = Name::from_labels(vec![
            b"x,y=z".to_vec(),
            b"env".to_vec(),
            b"a".to_vec(),
            b"svc".to_vec(),
            b"malla".to_vec(),
        ])
        .unwrap();
        assert_eq!(lookup(&name, &domain()), Lookup::NoSuchName);
    }

    #[test]
    fn multi_label_domain() {
        let domain = vec![b"mesh".to_vec(), b"internal".to_vec()];
        let name = Name::from_ascii("a.svc.mesh.internal.").unwrap();
        assert_eq!(lookup(&name, &domain), service("a", "", false));
        let name = Name::from_ascii("a.svc.malla.").unwrap();
        assert_eq!(lookup(&name, &domain), Lookup::Outside);
    }

    #[test]
    fn target_labels() {
        let instance = |id: &str, address: &str| Instance {
            mtls: false,
            id: id.into(),
            service: ServiceName::new("a").unwrap(),
            address: address.parse().unwrap(),
            port: 80,
            protocol: InstanceProtocol::Http,
            labels: Labels::new(),
            health: Health::Unknown,
        };
        assert_eq!(
            target_label(&instance("quote-7f9c", "10.0.0.1")),
            "quote-7f9c"
        );
        assert_eq!(target_label(&instance("Quote-1", "10.0.0.1")), "10-0-0-1");
        assert_eq!(target_label(&instance("q.1", "127.0.0.1")), "127-0-0-1");
        assert_eq!(
            target_label(&instance("q:1", "fd00::1")),
            "fd00-0-0-0-0-0-0-1"
        );
        assert_eq!(target_label(&instance("-q", "::")), "0-0-0-0-0-0-0-0");
        assert_eq!(
            target_label(&instance(&"a".repeat(64), "1.2.3.4")),
            "1-2-3-4"
        );
    }
}
