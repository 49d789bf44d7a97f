//! The sidecar's side of the control plane: registering this proxy's instance and
//! discovering the endpoints of its upstreams.
//!
//! With a `[control]` section (`malla proxy --control URL`):
//!
//! - **Registration** ([`registration`]), when `control.service` is set: the proxy
//!   registers its instance (the address other sidecars reach it at: the `[inbound]`
//!   listener, or `control.register_address`) under a lease, heartbeats every third of the
//!   TTL, registers again if the lease was lost (the control plane answers `NOT_FOUND`),
//!   and deregisters first thing when it drains, so callers stop choosing it before its
//!   listeners close.
//! - **Discovery** ([`watch`]): every upstream without static endpoints follows a Watch of
//!   its service (the upstream's name, or `service`) filtered by its `selector`, and each
//!   snapshot or update becomes [`Upstream::set_endpoints`] with the addresses of the
//!   instances that may serve (not `unhealthy`). Endpoints that leave finish the requests
//!   they carry.
//! - **Policies** ([`policy`]): every upstream, discovered or static, follows the
//!   resilience policy of its service (`WatchPolicy`); each valid version becomes
//!   [`Upstream::set_policy`], an invalid one is refused and the version in force stays.
//! - **Authorization** ([`authz`]), when `control.service` is set: the proxy follows the
//!   authorization policy of its own service (`WatchAuthorization`); each valid version is
//!   put in force in its [`Authorizer`], which the inbound side asks per call.
//! - **Events** ([`events`]): the resilience events the upstreams record (ejections,
//!   panic mode, limits hit...) are sent in batches with `ReportEvents`, with this
//!   sidecar's certificate (without one they are not reported, and it says so).
//!
//! # Transport
//!
//! TLS to a server that proves the control plane's identity, or plaintext with an `http://`
//! URL ([`channel`]). Writes (registration, renewals, events) go on a channel of their own
//! that presents this sidecar's certificate.
//!
//! # Failure
//!
//! The control plane is not on the request path. When it is unreachable or a stream
//! breaks, the proxy keeps serving on the endpoints it last knew, and reconnects with
//! exponential backoff and full jitter ([`backoff`]: 100 ms doubling to 10 s). The first
//! message of every new stream is a snapshot, which *replaces* the endpoint set: an
//! instance that left while the proxy was disconnected does not survive the resync.
//!
//! # Where it runs
//!
//! On a thread and current-thread runtime of its own (`malla-discovery`), like the admin
//! listener: control-plane work never runs on, or waits behind, a data-plane worker. The
//! workers only see the result, through the upstreams' lock-free endpoint snapshots.
//!
//! The state (connected, revision, last update, lease, policy version) is in
//! [`DiscoveryStatus`]: metrics `malla_proxy_control_*` and the `control` /
//! `upstreams[].discovery` parts of `/config`.

mod authz;
mod backoff;
mod channel;
mod events;
mod identity;
mod policy;
mod registration;
mod state_stream;
mod watch;

pub(crate) use identity::kept_bundle;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;
use malla_api::{AuthorizationsClient, PoliciesClient, Registration, RegistryClient, WatchTarget};
use malla_core::{Health, Instance, InstanceProtocol, Labels, Selector, ServiceName};
use serde_json::json;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use tracing::{info, warn};

use self::channel::{Channels, ControlTls};

use crate::{
    authz::Authorizer,
    config::{ControlPlaneConfig, ListenerProtocol, ProxyConfig},
    identity::IdentityState,
    listener::Shared,
    metrics::{DiscoveryMetrics, Metrics, RegistrationMetrics},
    server::Bound,
};

/// The first retry waits at most this long...
const RETRY_BASE: Duration = Duration::from_millis(100);
/// ...and no retry waits longer than this.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Longest wait for a unary call (register, heartbeat).
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a draining proxy waits for its deregistration before it closes its listeners
/// anyway (the lease then expires by itself).
pub(crate) const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a stopping proxy spends sending the resilience events still queued.
const EVENTS_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// How the control plane knows a sidecar from other clients (`GET /v1/proxies`).
const USER_AGENT: &str = concat!("malla-proxy/", env!("CARGO_PKG_VERSION"));
/// Said of an `http://` control plane, in the log and in `/config`.
const PLAINTEXT_WARNING: &str = "plaintext (http://): the control plane's identity is not verified and this sidecar's writes are not authenticated; the control plane will refuse plaintext: write HOST:PORT or https://HOST:PORT, with control.ca_file (--control-ca)";
/// HTTP/2 pings to the control plane, so a vanished one is noticed without traffic.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the proxy knows of its control plane, for `/config` and metrics.
pub struct DiscoveryStatus {
    url: String,
    /// TLS to the control plane; `None`: plaintext (`http://`).
    tls: Option<Arc<ControlTls>>,
    registration: Option<Arc<RegistrationStatus>>,
    watches: BTreeMap<String, Arc<WatchStatus>>,
    /// Every upstream's policy watch, by upstream name.
    policies: BTreeMap<String, Arc<policy::PolicyStatus>>,
    /// This sidecar's certificate, when it has a join token for its service or keeps its
    /// identity in a directory.
    identity: Option<(Arc<IdentityState>, identity::Credentials)>,
    /// The authorization policy of this sidecar's service, when it registers one.
    authz: Option<Arc<authz::AuthzWatch>>,
    /// Reporting resilience events.
    events: Arc<events::EventsStatus>,
}

/// The registration of this proxy's instance.
pub(crate) struct RegistrationStatus {
    service: ServiceName,
    instance_id: String,
    labels: Labels,
    /// Known once the listeners are bound.
    address: OnceLock<SocketAddr>,
    /// The current lease; 0 while unregistered.
    lease: AtomicU64,
    last_error: Mutex<Option<String>>,
    metrics: RegistrationMetrics,
}

/// One discovered upstream's watch.
pub(crate) struct WatchStatus {
    target: WatchTarget,
    instances: AtomicUsize,
    serving: AtomicUsize,
    /// Set by the first snapshot: until then the upstream has no endpoints to offer.
    synced: AtomicBool,
    last_error: Mutex<Option<String>>,
    metrics: DiscoveryMetrics,
}

fn set_error(slot: &Mutex<Option<String>>, error: Option<String>) {
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = error;
}

fn get_error(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl DiscoveryStatus {
    /// The status of a configuration's control-plane client; `None` without `[control]`.
    /// The configuration must have been validated.
    pub(crate) fn new(config: &ProxyConfig, metrics: &Metrics) -> anyhow::Result<Option<Self>> {
        let Some(control) = &config.control else {
            return Ok(None);
        };
        let registration = match &control.service {
            Some(service) => {
                let service = ServiceName::new(service)?;
                let instance_id = control
                    .instance_id
                    .clone()
                    .unwrap_or_else(|| default_instance_id(&service));
                Some(Arc::new(RegistrationStatus {
                    service,
                    instance_id,
                    labels: Labels::try_from(control.labels.clone())?,
                    address: OnceLock::new(),
                    lease: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                    metrics: metrics.registration(),
                }))
            }
            None => None,
        };
        let mut watches = BTreeMap::new();
        let mut policies = BTreeMap::new();
        for u in &config.upstreams {
            let service = ServiceName::new(u.discovery_service())?;
            policies.insert(u.name.clone(), Arc::new(policy::PolicyStatus::new(service)));
        }
        for u in config.upstreams.iter().filter(|u| u.is_discovered(true)) {
            let selector = match &u.selector {
                Some(s) => Selector::parse(s)?,
                None => Selector::all(),
            };
            let target = WatchTarget {
                service: ServiceName::new(u.discovery_service())?,
                selector,
            };
            watches.insert(
                u.name.clone(),
                Arc::new(WatchStatus {
                    target,
                    instances: AtomicUsize::new(0),
                    serving: AtomicUsize::new(0),
                    synced: AtomicBool::new(false),
                    last_error: Mutex::new(None),
                    metrics: metrics.discovery(&u.name),
                }),
            );
        }
        let identity = match (
            &registration,
            control.join_token().map_err(anyhow::Error::msg)?,
            &control.identity_dir,
        ) {
            (Some(r), token, dir) if token.is_some() || dir.is_some() => Some((
                Arc::new(IdentityState::new(r.service.clone())),
                identity::Credentials {
                    join_token: token,
                    dir: dir.clone(),
                },
            )),
            _ => None,
        };
        let authz = registration.as_ref().map(|r| {
            Arc::new(authz::AuthzWatch::new(Authorizer::new(
                r.service.clone(),
                metrics,
            )))
        });
        let target = control
            .target()
            .map_err(|why| anyhow::anyhow!("control.url {:?}: {why}", control.url))?;
        let tls = match target.tls {
            true => Some(Arc::new(ControlTls::new(
                control,
                target,
                identity.as_ref().map(|(state, _)| state.clone()),
            )?)),
            false => None,
        };
        let events = Arc::new(events::EventsStatus::new(
            identity.as_ref().map(|(state, _)| state.clone()),
            tls.is_some(),
        ));
        Ok(Some(DiscoveryStatus {
            url: control.url.clone(),
            tls,
            registration,
            watches,
            policies,
            identity,
            authz,
            events,
        }))
    }

    /// Upstreams still waiting for their first snapshot from the control plane. A sidecar
    /// is not ready before it knows where to send traffic (as Envoy-based sidecars wait
    /// for their first configuration); afterwards it stays ready on its last known
    /// endpoints even if the control plane goes away.
    pub fn unsynced(&self) -> Vec<&str> {
        self.watches
            .iter()
            .filter(|(_, w)| !w.synced.load(Ordering::Acquire))
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// The `control` part of `/config`.
    pub fn to_json(&self) -> serde_json::Value {
        let registration = self.registration.as_ref().map(|r| {
            let lease = r.lease.load(Ordering::Relaxed);
            json!({
                "service": r.service,
                "instance_id": r.instance_id,
                "address": r.address.get().map(ToString::to_string),
                "labels": r.labels,
                "registered": lease != 0,
                "lease": (lease != 0).then_some(lease),
                "registrations": r.metrics.registrations.get(),
                "last_error": get_error(&r.last_error),
            })
        });
        let watches: BTreeMap<_, _> = self
            .watches
            .keys()
            .filter_map(|name| Some((name.clone(), self.upstream_json(name)?)))
            .collect();
        let policies: BTreeMap<_, _> = self
            .policies
            .iter()
            .map(|(name, p)| (name.clone(), p.to_json()))
            .collect();
        let tls = match &self.tls {
            Some(tls) => tls.to_json(),
            None => json!({
                "enabled": false,
                "warning": PLAINTEXT_WARNING,
            }),
        };
        json!({
            "url": self.url,
            "tls": tls,
            "registration": registration,
            "identity": self.identity.as_ref().map(|(state, _)| state.to_json()),
            "watches": watches,
            "policies": policies,
            "events": self.events.to_json(),
        })
    }

    /// This sidecar's identity, when it has one configured (a join token for its service).
    pub fn identity(&self) -> Option<&Arc<IdentityState>> {
        self.identity.as_ref().map(|(state, _)| state)
    }

    /// This sidecar's authorization state, for the inbound side to [`Authorizer::check`]
    /// each call with; `None` when the sidecar registers no service (no policy can apply:
    /// every call is allowed).
    pub fn authorizer(&self) -> Option<&Arc<Authorizer>> {
        self.authz.as_ref().map(|w| &w.authorizer)
    }

    /// The `authorization` part of `/config`: the policy in force (version, mode, default,
    /// rules) and its watch; `None` when the sidecar registers no service.
    pub fn authorization_json(&self) -> Option<serde_json::Value> {
        self.authz.as_ref().map(|w| w.to_json())
    }

    /// The control-plane policy version in force for an upstream, if any.
    pub fn policy_version(&self, upstream: &str) -> Option<u64> {
        self.policies.get(upstream)?.version()
    }

    /// The `discovery` part of an upstream in `/config`: its endpoint watch (discovered
    /// upstreams only) and its policy watch (every upstream).
    pub fn upstream_json(&self, upstream: &str) -> Option<serde_json::Value> {
        let policy = self.policies.get(upstream);
        let Some(w) = self.watches.get(upstream) else {
            return policy.map(|p| {
                json!({
                    "policy_version": p.version(),
                    "policy_watch": p.to_json(),
                })
            });
        };
        let m = &w.metrics;
        Some(json!({
            "service": w.target.service,
            "selector": w.target.selector.to_string(),
            "connected": m.connected.get() == 1,
            "revision": m.revision.get(),
            "last_update_unix_ms": m.last_update.last_unix_ms(),
            "last_update_age_seconds": m.last_update.age().map(|a| a.as_secs_f64()),
            "instances": w.instances.load(Ordering::Relaxed),
            "serving": w.serving.load(Ordering::Relaxed),
            "reconnects": m.reconnects.get(),
            "last_error": get_error(&w.last_error),
            "policy_version": policy.and_then(|p| p.version()),
            "policy_watch": policy.map(|p| p.to_json()),
        }))
    }
}

/// `SERVICE-HOSTNAME-PID`, cut to the 128 characters an instance id may have.
fn default_instance_id(service: &ServiceName) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    let raw = format!("{service}-{host}-{}", std::process::id());
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect()
}

/// The running control-plane client.
pub(crate) struct Discovery {
    /// Asks the registration task to deregister; it answers on the enclosed channel.
    deregister: Option<mpsc::UnboundedSender<std::sync::mpsc::SyncSender<()>>>,
    thread: thread::JoinHandle<()>,
}

impl Discovery {
    /// Starts the client's thread. `bound` gives the inbound listener's real address.
    pub(crate) fn start(shared: Arc<Shared>, bound: &Bound) -> anyhow::Result<Option<Discovery>> {
        let (Some(control), Some(status)) =
            (shared.config.control.clone(), shared.discovery.clone())
        else {
            return Ok(None);
        };
        let registration = match &status.registration {
            Some(r) => {
                let address = control
                    .register_address
                    .or(bound.inbound)
                    .context("control.service is set but there is no address to register: add an [inbound] listener or --register-address IP:PORT")?;
                let _ = r.address.set(address);
                let protocol = match shared.config.inbound.as_ref().map(|i| i.protocol) {
                    Some(ListenerProtocol::Tcp) => InstanceProtocol::Tcp,
                    _ => InstanceProtocol::Http,
                };
                Some(Registration {
                    instance: Instance {
                        id: r.instance_id.clone(),
                        service: r.service.clone(),
                        address: address.ip(),
                        port: address.port(),
                        protocol,
                        labels: r.labels.clone(),
                        health: Health::Unknown,
                        mtls: shared.inbound_tls.is_some(),
                    },
                    ttl: Some(control.lease_ttl),
                })
            }
            None => None,
        };
        let endpoint = channel::endpoint(&control)?;
        let runtime = crate::server::thread_runtime("discovery")?;
        let (deregister_tx, deregister_rx) = mpsc::unbounded_channel();
        let deregister = registration.is_some().then_some(deregister_tx);
        let thread = thread::Builder::new()
            .name("malla-discovery".into())
            .spawn(move || {
                runtime.block_on(run(
                    shared,
                    status,
                    control,
                    endpoint,
                    registration,
                    deregister_rx,
                ))
            })?;
        Ok(Some(Discovery { deregister, thread }))
    }

    /// Deregisters this proxy's instance, waiting at most `timeout`; a no-op when it does
    /// not register.
    pub(crate) fn deregister(&self, timeout: Duration) {
        let Some(tx) = &self.deregister else { return };
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        if tx.send(done_tx).is_ok() && done_rx.recv_timeout(timeout).is_err() {
            warn!(
                ?timeout,
                "deregistration did not finish in time; the lease will expire by itself"
            );
        }
    }

    /// Waits for the thread (it ends once the proxy has stopped).
    pub(crate) fn join(self) {
        let _ = self.thread.join();
    }
}

async fn run(
    shared: Arc<Shared>,
    status: Arc<DiscoveryStatus>,
    control: ControlPlaneConfig,
    endpoint: Endpoint,
    registration: Option<Registration>,
    deregister: mpsc::UnboundedReceiver<std::sync::mpsc::SyncSender<()>>,
) {
    // HTTP/2 connections, made lazily and remade after they break: one for reads, and
    // with TLS and an identity one per certificate for writes (see `channel`).
    let channels = Arc::new(Channels::new(endpoint, status.tls.clone()));
    let reads = channels.reads();
    let client = RegistryClient::new(reads.clone());
    let authorizations = AuthorizationsClient::new(reads.clone());
    let policies = PoliciesClient::new(reads);
    info!(url = %control.url, tls = status.tls.is_some(), upstreams = status.watches.len(), policies = status.policies.len(), registers = registration.is_some(), "following the control plane");
    if status.tls.is_none() {
        warn!(url = %control.url, "{PLAINTEXT_WARNING}");
        if control.ca_file.is_some() {
            warn!("control.ca_file is not used: the control plane is reached in plaintext");
        }
    } else if status.registration.is_some() && status.identity.is_none() {
        warn!("this sidecar registers its instance but has no identity (no join token, no control.identity_dir): the control plane will refuse its registration; give it a join token of its service (`malla token create --service SERVICE`, then MALLA_JOIN_TOKEN or --join-token-file)");
    }
    let mut tasks = tokio::task::JoinSet::new();
    let reporter = events::Reporter {
        service: status
            .registration
            .as_ref()
            .map(|r| r.service.to_string())
            .unwrap_or_default(),
        instance_id: status
            .registration
            .as_ref()
            .map(|r| r.instance_id.clone())
            .unwrap_or_default(),
        services: status
            .policies
            .iter()
            .map(|(name, p)| (name.clone(), p.service.to_string()))
            .collect(),
    };
    tasks.spawn(events::run(
        channels.clone(),
        shared.events.clone(),
        reporter.clone(),
        status.events.clone(),
    ));
    if let Some((state, credentials)) = &status.identity {
        tasks.spawn(identity::run(
            channels.clone(),
            state.clone(),
            credentials.clone(),
            shared.metrics.identity(),
        ));
    }
    if let (Some(registration), Some(reg_status)) = (registration, status.registration.clone()) {
        // An instance that accepts mTLS registers once it can: callers would otherwise
        // reach a sidecar with no certificate to answer their handshake with. Over TLS,
        // writes wait for the certificate they are authenticated with anyway.
        let ready = (registration.instance.mtls || status.tls.is_some())
            .then(|| status.identity().cloned())
            .flatten();
        tasks.spawn(registration::run(
            channels.clone(),
            registration,
            reg_status,
            registration::Identity {
                ready,
                configured: status.identity.is_some(),
                tls: status.tls.is_some(),
            },
            deregister,
        ));
    }
    if let Some(watch) = &status.authz {
        tasks.spawn(authz::run(authorizations, watch.clone()));
    }
    for (name, watch_status) in &status.watches {
        let Some(upstream) = shared.upstreams.get(name).cloned() else {
            continue;
        };
        tasks.spawn(watch::run(client.clone(), upstream, watch_status.clone()));
    }
    for (name, policy_status) in &status.policies {
        let Some(upstream) = shared.upstreams.get(name).cloned() else {
            continue;
        };
        tasks.spawn(policy::run(
            policies.clone(),
            upstream,
            policy_status.clone(),
        ));
    }
    let mut stopped = shared.stopped_signal();
    let _ = stopped.wait_for(|s| *s).await;
    tasks.shutdown().await;
    events::flush(
        &channels,
        &shared.events,
        &reporter,
        &status.events,
        EVENTS_FLUSH_TIMEOUT,
    )
    .await;
}
