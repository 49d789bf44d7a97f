//! An in-memory [`Catalog`] and the fixture the DNS tests answer from.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use malla_core::{Health, Instance, InstanceProtocol, Labels, Selector, ServiceName};

use super::{Catalog, Pick};

#[derive(Default)]
pub(super) struct FakeCatalog {
    services: BTreeMap<ServiceName, Vec<Arc<Instance>>>,
}

impl Catalog for FakeCatalog {
    fn instances(
        &self,
        service: &ServiceName,
        selector: &Selector,
        pick: Pick,
    ) -> Option<Vec<Arc<Instance>>> {
        self.services
            .get(service)
            .map(|all| pick.from(|| all.iter().filter(|i| selector.matches(&i.labels))))
    }
}

impl FakeCatalog {
    pub(super) fn service(&mut self, name: &str) -> &mut Self {
        self.services
            .entry(ServiceName::new(name).expect("valid service name"))
            .or_default();
        self
    }

    pub(super) fn add(
        &mut self,
        service: &str,
        id: &str,
        address: &str,
        port: u16,
        labels: &[(&str, &str)],
        health: Health,
    ) -> &mut Self {
        let mut l = Labels::new();
        for (k, v) in labels {
            l.insert(k, v).expect("valid label");
        }
        let service = ServiceName::new(service).expect("valid service name");
        let address: IpAddr = address.parse().expect("valid address");
        self.services
            .entry(service.clone())
            .or_default()
            .push(Arc::new(Instance {
                mtls: false,
                id: id.to_string(),
                service,
                address,
                port,
                protocol: InstanceProtocol::Http,
                labels: l,
                health,
            }));
        self
    }

    /// `count` instances `NAME-i` of `name` on 10.x.y.z, port 8000 + i % 1000, half of them
    /// `env=prod`.
    pub(super) fn many(&mut self, name: &str, count: usize) -> &mut Self {
        for i in 0..count {
            let address = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
            let env = if i % 2 == 0 { "prod" } else { "staging" };
            self.add(
                name,
                &format!("{name}-{i}"),
                &address,
                8000 + (i % 1000) as u16,
                &[("env", env)],
                Health::Healthy,
            );
        }
        self
    }

    /// The fixture of the tests:
    ///
    /// - `shipping-quote`: q-1 10.0.0.1 (prod, eu-1), q-2 10.0.0.2 (prod, eu-2),
    ///   q-3 10.0.0.3 (staging, eu-1), `q.4` 10.0.0.4:9090 (prod, eu-1; not a DNS label),
    ///   q-5 10.0.0.5 (prod, eu-1, unhealthy); port 8080 unless said.
    /// - `ledger`: `Ledger-A` on fd00::1 and `ledger-b` on fd00::2, port 7000.
    /// - `idle`: no instances. `many`: 300 instances. `nine`: 9 instances.
    pub(super) fn fixture() -> Self {
        let mut c = FakeCatalog::default();
        let sq = "shipping-quote";
        c.add(
            sq,
            "q-1",
            "10.0.0.1",
            8080,
            &[("env", "prod"), ("zone", "eu-1")],
            Health::Healthy,
        )
        .add(
            sq,
            "q-2",
            "10.0.0.2",
            8080,
            &[("env", "prod"), ("zone", "eu-2")],
            Health::Unknown,
        )
        .add(
            sq,
            "q-3",
            "10.0.0.3",
            8080,
            &[("env", "staging"), ("zone", "eu-1")],
            Health::Healthy,
        )
        .add(
            sq,
            "q.4",
            "10.0.0.4",
            9090,
            &[("env", "prod"), ("zone", "eu-1")],
            Health::Healthy,
        )
        .add(
            sq,
            "q-5",
            "10.0.0.5",
            8080,
            &[("env", "prod"), ("zone", "eu-1")],
            Health::Unhealthy,
        )
        .add("ledger", "Ledger-A", "fd00::1", 7000, &[], Health::Healthy)
        .add("ledger", "ledger-b", "fd00::2", 7000, &[], Health::Healthy)
        .service("idle")
        .many("many", 300)
        .many("nine", 9);
        c
    }
}
