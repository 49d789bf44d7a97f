//! `malla control`: opens the store, loads the registry, starts the health checker and
//! serves the APIs.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use malla_core::{authz::PeerMtls, Instance, Selector, ServiceName, TrustDomain};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::info;

use crate::{
    api::{self, Backend},
    authorizations::Authorizations,
    dns::{Catalog, DnsConfig, DnsServer, Pick},
    events::EventRing,
    health::HealthChecker,
    identity::{Ca, CaSettings, CaSource, Identity},
    metrics::Metrics,
    operator::{self, OperatorToken},
    policies::Policies,
    proxies::Proxies,
    registry::Registry,
    serving::{
        tls::{self, ControlTls},
        Apis, ServeSettings, Server,
    },
    store::{embedded::EmbeddedStore, Store},
};

/// Default addresses, all on loopback.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7780";
pub const DEFAULT_DNS_ADDR: &str = "127.0.0.1:7753";
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:7781";

/// How long [`Control::stop`] waits for the APIs to finish before cutting them.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub data_dir: PathBuf,
    /// The APIs, HTTP/JSON and gRPC on one port (`--addr`, alias `--http-addr`).
    pub http_addr: SocketAddr,
    /// The same APIs on a second port, the gRPC port of earlier versions (`--grpc-addr`).
    pub grpc_addr: SocketAddr,
    pub dns_addr: Option<SocketAddr>,
    pub dns: DnsSettings,
    pub identity: IdentitySettings,
    /// Names (DNS names or IP addresses) the API's certificate carries besides the
    /// defaults (`--tls-san`): how clients that check a host name reach it.
    pub tls_names: Vec<String>,
}

/// The mesh's identity: the CA's settings (`--trust-domain`, `--cert-ttl`, `--ca-cert`
/// and `--ca-key`) and whether sidecars must be called with it (`--mtls-mode`).
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    pub trust_domain: TrustDomain,
    pub cert_ttl: std::time::Duration,
    /// A root or intermediate (certificate chain file, key file) the operator gives; none:
    /// the CA creates its root under the data directory at first start.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// The mesh's mTLS mode (`--mtls-mode`, default `permissive`): whether the sidecars of
    /// a service whose authorization policy sets no `mtls` refuse plaintext callers. Sent
    /// to them with their policy (`WatchAuthorization`); shown by `GET /v1/identity`.
    pub mtls_mode: PeerMtls,
}

/// The trust domain when none is given.
pub const DEFAULT_TRUST_DOMAIN: &str = "malla.local";

impl Default for IdentitySettings {
    fn default() -> Self {
        IdentitySettings {
            trust_domain: TrustDomain::new(DEFAULT_TRUST_DOMAIN).expect("a valid trust domain"),
            cert_ttl: crate::identity::ca::DEFAULT_CERT_TTL,
            ca_files: None,
            mtls_mode: PeerMtls::default(),
        }
    }
}

impl IdentitySettings {
    fn ca_settings(&self, data_dir: &std::path::Path) -> CaSettings {
        CaSettings {
            trust_domain: self.trust_domain.clone(),
            cert_ttl: self.cert_ttl,
            source: match &self.ca_files {
                Some((cert, key)) => CaSource::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                None => CaSource::Generated {
                    dir: data_dir.join("ca"),
                },
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct DnsSettings {
    pub domain: String,
    pub ttl: std::time::Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            domain: "malla.".into(),
            ttl: std::time::Duration::from_secs(5),
        }
    }
}

/// A running control plane.
pub struct Control {
    pub registry: Arc<Registry<EmbeddedStore>>,
    /// Resilience policies, one per service.
    pub policies: Arc<Policies<EmbeddedStore>>,
    /// Authorization policies, one per service.
    pub authorizations: Arc<Authorizations<EmbeddedStore>>,
    /// The resilience events sidecars reported (in memory).
    pub events: Arc<EventRing>,
    /// The CA and the join tokens.
    pub identity: Arc<Identity<EmbeddedStore>>,
    /// The operator token the HTTP API's operator routes require, kept in
    /// `DATA_DIR/operator.token`.
    pub operator: Arc<OperatorToken>,
    /// The operator token when this start created it (the data directory's first start),
    /// for `malla control` to show once; `None` when it was read from its file.
    pub created_operator_token: Option<String>,
    /// The address of the APIs (`--addr`): HTTP/JSON and gRPC.
    pub http_addr: SocketAddr,
    /// The same APIs on the gRPC address kept for sidecars configured with it
    /// (`--grpc-addr`).
    pub grpc_addr: SocketAddr,
    pub dns_addr: Option<SocketAddr>,
    /// The API port's TLS: its certificate, and the trust bundle file
    /// (`DATA_DIR/trust-bundle.pem`) clients verify it with.
    pub tls: Arc<ControlTls>,
    health: Option<HealthChecker>,
    dns: Option<DnsServer>,
    http: JoinHandle<()>,
    grpc: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Control {
    /// Starts with the default serving limits ([`ServeSettings::default`]).
    pub async fn start(config: ControlConfig) -> anyhow::Result<Control> {
        Self::start_with(config, ServeSettings::default()).await
    }

    pub async fn start_with(
        config: ControlConfig,
        serving: ServeSettings,
    ) -> anyhow::Result<Control> {
        // The CA before the store: a CA that cannot be read leaves nothing open.
        let ca = Ca::open(&config.identity.ca_settings(&config.data_dir))
            .context("cannot set up the certificate authority")?;
        // A port in use must fail before the store is opened (and its file locked), so that
        // a retry with another port finds the data directory free.
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot listen on {} (--addr)", config.http_addr))?;
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on {} (--grpc-addr)", config.grpc_addr))?;
        let store = EmbeddedStore::open(&config.data_dir)
            .await
            .with_context(|| {
                format!(
                    "cannot open the data directory {}",
                    config.data_dir.display()
                )
            })?;
        let opened = async {
            // After the store: its lock makes this the data directory's one control plane.
            let operator = OperatorToken::open(&config.data_dir.join(operator::FILE_NAME))?;
            let registry = Arc::new(Registry::open(store.clone()).await?);
            let policies = Arc::new(Policies::open(store.clone()).await?);
            let authorizations = Arc::new(Authorizations::open(store.clone()).await?);
            anyhow::Ok(Backend {
                registry,
                policies,
                authorizations,
                events: Arc::new(EventRing::default()),
                metrics: Arc::new(Metrics::default()),
                proxies: Arc::new(Proxies::default()),
                identity: Arc::new(Identity::new(ca, store.clone())),
                operator: Arc::new(operator.token),
                mesh_mtls: config.identity.mtls_mode,
            })
            .map(|backend| (backend, operator.created))
        }
        .await;
        let started = match opened {
            Ok((backend, created)) => Self::serve(&config, serving, backend.clone(), [http, grpc])
                .await
                .map(|mut control| {
                    control.created_operator_token = created;
                    control
                }),
            Err(e) => Err(e),
        };
        if started.is_err() {
            // Release the store at once, not when the last handle happens to drop (the
            // registry and policies hold handles until their updaters stop).
            if let Err(e) = store.close().await {
                tracing::warn!(error = %e, "closing the store");
            }
        }
        started
    }

    /// Starts every API over an open registry; fallible steps come first so that a
    /// failure leaves nothing running.
    async fn serve(
        config: &ControlConfig,
        serving: ServeSettings,
        backend: Backend<EmbeddedStore>,
        [http_listener, grpc_listener]: [TcpListener; 2],
    ) -> anyhow::Result<Control> {
        let registry = backend.registry.clone();
        let (stop, _) = watch::channel(false);
        let dns = match config.dns_addr {
            Some(addr) => {
                let catalog: Arc<dyn Catalog> = Arc::new(RegistryCatalog(registry.clone()));
                let server = DnsServer::start(
                    DnsConfig {
                        addr,
                        domain: config.dns.domain.clone(),
                        ttl: config.dns.ttl,
                    },
                    catalog,
                )
                .await
                .map_err(|e| e.context(format!("cannot serve DNS on {addr} (--dns-addr)")))?;
                info!(addr = %server.local_addr(), "DNS listening");
                Some(server)
            }
            None => None,
        };

        let http_addr = http_listener.local_addr()?;
        let grpc_addr = grpc_listener.local_addr()?;
        let tls = Arc::new(ControlTls::new(
            backend.identity.clone(),
            tls::server_names(&[http_addr, grpc_addr], &config.tls_names),
            &config.data_dir,
        )?);
        let apis = Apis::new(
            api::http::router(backend.clone()),
            api::grpc::routes(backend.clone(), stop.subscribe()),
            backend.metrics.clone(),
            backend.proxies.clone(),
        );
        let server = Server::new(apis, tls.clone(), serving, stop.subscribe());
        tokio::spawn(refresh_tls(tls.clone(), stop.subscribe()));
        let http = tokio::spawn(server.clone().serve(http_listener));
        let grpc = tokio::spawn(server.serve(grpc_listener));
        info!(addr = %http_addr, "HTTP and gRPC APIs listening");
        info!(addr = %grpc_addr, "HTTP and gRPC APIs listening (--grpc-addr)");
        let health = HealthChecker::start(registry.clone(), backend.events.clone());

        Ok(Control {
            dns_addr: dns.as_ref().map(|d| d.local_addr()),
            tls,
            registry,
            policies: backend.policies,
            authorizations: backend.authorizations,
            events: backend.events,
            identity: backend.identity,
            operator: backend.operator,
            created_operator_token: None,
            http_addr,
            grpc_addr,
            health: Some(health),
            dns,
            http,
            grpc,
            stop,
        })
    }

    /// Stops serving and closes the store, so that a new control plane can open the same
    /// data directory at once. Watch streams end with `UNAVAILABLE` (sidecars reconnect);
    /// leases keep running in the store and resume with their remaining time.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        self.health.take();
        self.dns.take();
        for (name, task) in [("HTTP", &mut self.http), ("gRPC", &mut self.grpc)] {
            if tokio::time::timeout(STOP_TIMEOUT, &mut *task)
                .await
                .is_err()
            {
                tracing::warn!("the {name} API did not stop within {STOP_TIMEOUT:?}; cutting it");
                task.abort();
            }
        }
        self.registry.stop_following();
        self.policies.stop_following();
        self.authorizations.stop_following();
        if let Err(e) = self.registry.store().close().await {
            tracing::warn!(error = %e, "closing the store");
        }
    }
}

/// Dropping a control plane without [`Control::stop`] stops serving at once (without
/// waiting for anything); the store closes when its last handle goes.
impl Drop for Control {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.http.abort();
        self.grpc.abort();
    }
}

/// How often the API's certificate and the trust bundle file are checked for renewal
/// when no client connects.
const TLS_REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the API's certificate and the bundle file current until the stop signal.
async fn refresh_tls(tls: Arc<ControlTls>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TLS_REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let tls = tls.clone();
                let _ = tokio::task::spawn_blocking(move || tls.refresh()).await;
            }
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once the stop signal is on (holding no borrow of it afterwards).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Control {
    /// `DATA_DIR/trust-bundle.pem`: what clients verify the API's certificate with.
    pub fn trust_bundle_path(&self) -> &std::path::Path {
        self.tls.bundle_file()
    }
}

/// DNS answers from the registry's view.
struct RegistryCatalog<S>(Arc<Registry<S>>);

impl<S: Store + Clone> Catalog for RegistryCatalog<S> {
    fn instances(
        &self,
        service: &ServiceName,
        selector: &Selector,
        pick: Pick,
    ) -> Option<Vec<Arc<Instance>>> {
        let view = self.0.view();
        let state = view.services.get(service)?;
        Some(pick.from(|| {
            state
                .instances
                .values()
                .filter(|i| selector.matches(&i.labels))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, dns_addr: SocketAddr) -> ControlConfig {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        ControlConfig {
            data_dir: dir.to_path_buf(),
            http_addr: any,
            grpc_addr: any,
            dns_addr: Some(dns_addr),
            dns: DnsSettings::default(),
            identity: Default::default(),
            tls_names: Vec::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_start_leaves_the_data_directory_free_for_a_retry() {
        let dir = std::env::temp_dir().join(format!(
            "malla-server-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        // DNS cannot bind a port that a UDP socket already holds.
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = Control::start(config(&dir, taken.local_addr().unwrap()))
            .await
            .err()
            .expect("the DNS port is taken");
        assert!(format!("{err:#}").contains("--dns-addr"), "{err:#}");
        // At once, the same directory opens.
        let control = Control::start(config(&dir, "127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        control.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
