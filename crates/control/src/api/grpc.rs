//! The gRPC API for sidecars: `malla.registry.v1.Registry` (`crates/api`), here,
//! `malla.policy.v1.Policies` ([`policies`]), `malla.authz.v1.Authorizations`
//! ([`authorizations`]) and `malla.identity.v1.Identity` ([`identity`]), on the same port.
//!
//! Register, Heartbeat and Deregister are thin: convert the request to domain types
//! (`malla-api` rejects bad fields with a precise message), call the [`Registry`], map its
//! error to a status in [`status`] (the one place that does).
//!
//! # Watch fan-out
//!
//! Each Watch stream is one task. It subscribes to the registry's change broadcast, sends a
//! snapshot of the matching instances taken from the view it subscribed with, then turns
//! every change of its service into an update: an instance that matches the selector after
//! the change is upserted, one that matched before and no longer does (deregistered, expired,
//! relabelled) is removed. Changes already queued when the task wakes are coalesced into one
//! update, so a burst costs one message per watcher, not one per change. The registry's
//! broadcast is shared by every watcher (a change is one `Arc`, never copied per watcher),
//! and each task only filters and encodes, so a thousand watchers of one service receive a
//! registration within milliseconds.
//!
//! A watcher that falls behind the broadcast (its client reads too slowly, or the task was
//! starved) has lost changes; it does not try to reconstruct them but sends a fresh
//! snapshot, which the client takes as its whole new set. The stream's channel is bounded,
//! so a stalled client costs at most [`STREAM_BUFFER`] messages of memory before its task
//! waits, lags, and resynchronises.
//!
//! When the control plane stops, every stream ends with `UNAVAILABLE`, so sidecars reconnect
//! (to this process when it comes back, or to another replica) and resynchronise from a
//! snapshot.

pub mod authorizations;
pub mod identity;
pub mod policies;
mod resource_watch;
#[cfg(test)]
pub(crate) mod tests;

use std::{collections::BTreeMap, pin::Pin, sync::Arc};

use malla_api::{pb, ConversionError, PoliciesServer, Registration, RegistryServer, WatchTarget};
use malla_core::{service::valid_instance_id, Instance, ServiceName, TrustDomain};
use tokio::sync::{
    broadcast::{self, error::RecvError, error::TryRecvError},
    mpsc, watch,
};
use tonic::{codegen::tokio_stream::Stream, Request, Response, Status};
use tracing::debug;

use crate::{
    api::{
        auth::{self, Caller},
        Backend,
    },
    metrics::{Metrics, WatchKind},
    operator::OperatorToken,
    proxies::Connection,
    registry::{self, Change, Registry, RegistryError, View},
    serving::tls::PeerIdentity,
    store::{Store, StoreError},
};

/// Messages a watch stream (registry, policy or authorization) buffers for a slow client
/// before its task waits.
pub const STREAM_BUFFER: usize = 64;
/// Most queued changes coalesced into one update.
const MAX_BATCH: usize = 1024;

/// The service implementation.
pub struct RegistryGrpc<S> {
    registry: Arc<Registry<S>>,
    metrics: Arc<Metrics>,
    /// Who may write ([`auth`]): the operator token, and the trust domain workloads'
    /// certificates must be of.
    operator: Arc<OperatorToken>,
    trust_domain: TrustDomain,
    /// Turns `true` when the control plane stops: every watch stream ends.
    stop: watch::Receiver<bool>,
}

impl<S: Store + Clone> RegistryGrpc<S> {
    pub fn new(backend: &Backend<S>, stop: watch::Receiver<bool>) -> Self {
        RegistryGrpc {
            registry: backend.registry.clone(),
            metrics: backend.metrics.clone(),
            operator: backend.operator.clone(),
            trust_domain: backend.identity.ca.trust_domain().clone(),
            stop,
        }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        caller(request, &self.operator, &self.trust_domain, &self.metrics)
    }

    fn refuse(&self, refused: &auth::Refusal) -> Status {
        refuse(&self.metrics, refused)
    }
}

/// Who sent a gRPC `request` ([`auth::caller`]); a refusal (a wrong token) is counted and
/// returned as a status.
pub(super) fn caller<T>(
    request: &Request<T>,
    operator: &OperatorToken,
    trust_domain: &TrustDomain,
    metrics: &Metrics,
) -> Result<Caller, Status> {
    let headers = request.metadata().clone().into_headers();
    auth::caller(
        &headers,
        request.extensions().get::<PeerIdentity>(),
        operator,
        trust_domain,
    )
    .map_err(|refused| refuse(metrics, &refused))
}

/// A refusal, counted, as its gRPC status.
pub(super) fn refuse(metrics: &Metrics, refused: &auth::Refusal) -> Status {
    metrics.refused_for(refused.reason());
    refused.to_status()
}

/// Every gRPC service, to be served by [`crate::serving`] (on the same connections as the
/// HTTP API); every watch stream ends when `stop` turns `true`.
pub fn routes<S: Store + Clone>(
    backend: Backend<S>,
    stop: watch::Receiver<bool>,
) -> tonic::service::Routes {
    tonic::service::Routes::new(RegistryServer::new(RegistryGrpc::new(
        &backend,
        stop.clone(),
    )))
    .add_service(malla_api::IdentityServer::new(identity::IdentityGrpc::new(
        backend.identity.clone(),
    )))
    .add_service(malla_api::AuthorizationsServer::new(
        authorizations::AuthorizationsGrpc::new(backend.clone(), stop.clone()),
    ))
    .add_service(PoliciesServer::new(policies::PoliciesGrpc::new(
        backend, stop,
    )))
}

/// Maps registry errors to gRPC statuses; the message says what to do.
pub fn status(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(m) => Status::invalid_argument(m),
        RegistryError::NotFound(what) => Status::not_found(format!("{what} not found")),
        RegistryError::Store(StoreError::LeaseNotFound(id)) => Status::not_found(format!(
            "lease {id} not found (expired or revoked): register again"
        )),
        RegistryError::Store(StoreError::Invalid(m)) => Status::invalid_argument(m),
        RegistryError::Store(e @ StoreError::Conflict { .. }) => {
            Status::aborted(format!("{e}; retry"))
        }
        e @ (RegistryError::Store(_) | RegistryError::Closed) => Status::unavailable(e.to_string()),
    }
}

fn invalid(e: ConversionError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn to_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The stream of a server-streaming call.
pub(super) type Streaming<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type WatchStream = Streaming<pb::WatchResponse>;

#[tonic::async_trait]
impl<S: Store + Clone> malla_api::RegistryService for RegistryGrpc<S> {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let connection = connection(&request);
        let caller = self.caller(&request)?;
        // `SocketAddr`'s display brackets IPv6: `grpc [fd00::5]:40000`.
        let by = match request.remote_addr() {
            Some(peer) => format!("grpc {peer} {}", caller.describe()),
            None => format!("grpc {}", caller.describe()),
        };
        let Registration { instance, ttl } =
            Registration::try_from(request.into_inner()).map_err(invalid)?;
        caller
            .may_write(&instance.service)
            .map_err(|refused| self.refuse(&refused))?;
        let registered = self
            .registry
            .register_from(
                &instance.service,
                &instance.id,
                registry::Registration {
                    address: instance.address,
                    port: instance.port,
                    protocol: instance.protocol,
                    labels: instance.labels,
                    ttl_seconds: ttl.map(|t| t.as_secs()),
                    is_static: false,
                    annotations: Default::default(),
                    mtls: instance.mtls,
                },
                &by,
            )
            .await
            .map_err(status)?;
        debug!(service = %instance.service, id = %instance.id, lease = registered.lease, "registered over gRPC");
        if let Some(connection) = connection {
            connection.registered(&instance.service, &instance.id);
        }
        Ok(Response::new(pb::RegisterResponse {
            lease: registered.lease,
            ttl_seconds: to_u32(registered.ttl_seconds),
            revision: registered.revision,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = self.caller(&request)?;
        let lease = request.into_inner().lease;
        caller
            .may_heartbeat(&self.registry, lease)
            .map_err(|refused| self.refuse(&refused))?;
        let lease = self.registry.heartbeat(lease).await.map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse {
            ttl_seconds: to_u32(lease.ttl.as_secs()),
            remaining_ms: u64::try_from(lease.remaining.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let connection = connection(&request);
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let service = ServiceName::new(&request.service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        caller
            .may_write(&service)
            .map_err(|refused| self.refuse(&refused))?;
        if !valid_instance_id(&request.id) {
            return Err(invalid(ConversionError::InstanceId {
                field: "id",
                value: request.id,
            }));
        }
        let revision = self
            .registry
            .deregister(&service, &request.id)
            .await
            .map_err(status)?;
        if let Some(connection) = connection {
            connection.deregistered(&service, &request.id);
        }
        Ok(Response::new(pb::DeregisterResponse { revision }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let held = connection(&request).map(|c| c.watch_opened());
        let target = WatchTarget::try_from(request.into_inner()).map_err(invalid)?;
        let registry = self.registry.clone();
        let open = self.metrics.watch_opened(WatchKind::Registry);
        streaming(&self.stop, |tx, stop| async move {
            run_watch(registry, target, tx, stop).await;
            drop((open, held));
        })
    }
}

/// The connection a call came on, as [`crate::serving`] hands it over (`None` only when
/// the service is served some other way, as in a unit test of a handler).
pub(super) fn connection<T>(request: &Request<T>) -> Option<Arc<Connection>> {
    request.extensions().get::<Arc<Connection>>().cloned()
}

/// Starts a server-streaming call (refused once the control plane is stopping): `run`
/// feeds the stream from a task of its own, through a channel of [`STREAM_BUFFER`]
/// messages, until it returns.
pub(super) fn streaming<T, F>(
    stop: &watch::Receiver<bool>,
    run: impl FnOnce(mpsc::Sender<Result<T, Status>>, watch::Receiver<bool>) -> F,
) -> Result<Response<Streaming<T>>, Status>
where
    T: Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if *stop.borrow() {
        return Err(Status::unavailable("the control plane is stopping"));
    }
    let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(run(tx, stop.clone()));
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok(Response::new(Box::pin(stream)))
}

/// The set one watcher's client holds, and what it has been told of.
struct WatchState {
    target: WatchTarget,
    /// The revision the client is up to.
    revision: u64,
    /// The instances the client holds, by id.
    known: BTreeMap<String, Instance>,
    /// Changes not sent yet: `Some` = matches now, `None` = does not (or is gone).
    pending: BTreeMap<String, Option<Instance>>,
}

impl WatchState {
    fn new(target: WatchTarget) -> Self {
        WatchState {
            target,
            revision: 0,
            known: BTreeMap::new(),
            pending: BTreeMap::new(),
        }
    }

    /// Resets to `view` and returns the snapshot message.
    fn snapshot(&mut self, view: &View) -> pb::WatchResponse {
        self.revision = view.revision;
        self.pending.clear();
        self.known = view
            .services
            .get(&self.target.service)
            .map(|state| {
                state
                    .instances
                    .values()
                    .filter(|i| self.target.selector.matches(&i.labels))
                    .map(|i| (i.id.clone(), Instance::clone(i)))
                    .collect()
            })
            .unwrap_or_default();
        pb::WatchResponse {
            revision: self.revision,
            event: Some(pb::watch_response::Event::Snapshot(pb::Snapshot {
                instances: self.known.values().map(pb::Instance::from).collect(),
            })),
        }
    }

    /// Notes one change (those already in the snapshot, or of other services, are skipped).
    fn apply(&mut self, change: &Change) {
        // Several changes may share a revision (a service deleted in one write), and one
        // already in the snapshot is harmless to note again: `flush` sends only what differs.
        if change.revision < self.revision {
            return;
        }
        self.revision = change.revision;
        if change.service != self.target.service {
            return;
        }
        let Some(id) = change
            .after
            .as_ref()
            .or(change.before.as_ref())
            .map(|i| i.id.clone())
        else {
            return;
        };
        let now = change
            .after
            .as_ref()
            .filter(|i| self.target.selector.matches(&i.labels))
            .cloned();
        self.pending.insert(id, now);
    }

    /// The update for the pending changes, if they change what the client holds.
    fn flush(&mut self) -> Option<pb::WatchResponse> {
        let mut update = pb::Update::default();
        for (id, now) in std::mem::take(&mut self.pending) {
            match now {
                Some(instance) => {
                    if self.known.get(&id) != Some(&instance) {
                        update.upserted.push(pb::Instance::from(&instance));
                        self.known.insert(id, instance);
                    }
                }
                None => {
                    if self.known.remove(&id).is_some() {
                        update.removed_ids.push(id);
                    }
                }
            }
        }
        if update.upserted.is_empty() && update.removed_ids.is_empty() {
            return None;
        }
        Some(pb::WatchResponse {
            revision: self.revision,
            event: Some(pb::watch_response::Event::Update(update)),
        })
    }
}

type Sender = mpsc::Sender<Result<pb::WatchResponse, Status>>;

/// Sends one message unless the client left or the control plane stops first.
async fn send(tx: &Sender, stop: &mut watch::Receiver<bool>, message: pb::WatchResponse) -> bool {
    tokio::select! {
        sent = tx.send(Ok(message)) => sent.is_ok(),
        _ = stop.wait_for(|s| *s) => false,
    }
}

async fn run_watch<S: Store + Clone>(
    registry: Arc<Registry<S>>,
    target: WatchTarget,
    tx: Sender,
    mut stop: watch::Receiver<bool>,
) {
    let (view, mut changes) = registry.subscribe();
    let mut state = WatchState::new(target);
    if !send(&tx, &mut stop, state.snapshot(&view)).await {
        return;
    }
    drop(view);
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = tx.closed() => return,
            received = changes.recv() => received,
        };
        let message = match received {
            Ok(change) => {
                state.apply(&change);
                match drain_queued(&mut changes, &mut state) {
                    Ok(()) => state.flush(),
                    Err(()) => Some(state.snapshot(&registry.view())),
                }
            }
            Err(RecvError::Lagged(missed)) => {
                debug!(service = %state.target.service, missed, "watcher fell behind; sending a fresh snapshot");
                Some(state.snapshot(&registry.view()))
            }
            Err(RecvError::Closed) => break,
        };
        if let Some(message) = message {
            if !send(&tx, &mut stop, message).await {
                break;
            }
        }
    }
    // The control plane is stopping (or its registry is gone): tell the client to go
    // elsewhere or come back, rather than ending the stream as if it were complete.
    let _ = tx.try_send(Err(Status::unavailable(
        "the control plane is stopping; reconnect and watch again",
    )));
}

/// Applies the changes already queued (up to [`MAX_BATCH`]); `Err` when the watcher lagged.
fn drain_queued(
    changes: &mut broadcast::Receiver<Arc<Change>>,
    state: &mut WatchState,
) -> Result<(), ()> {
    for _ in 0..MAX_BATCH {
        match changes.try_recv() {
            Ok(change) => state.apply(&change),
            Err(TryRecvError::Lagged(_)) => return Err(()),
            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
        }
    }
    Ok(())
}
