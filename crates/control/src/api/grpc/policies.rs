//! `malla.policy.v1.Policies`: sidecars follow the resilience policy of each service they
//! call (`WatchPolicy`), and report the resilience events they observe (`ReportEvents`).
//!
//! A WatchPolicy stream is one task, like a registry Watch: it subscribes to the policies'
//! change broadcast, sends the service's current state, then the new state after every
//! change of that service. Each message is a whole state, so changes already queued when
//! the task wakes collapse into the last one, and a stream that falls behind the broadcast
//! just sends the current state again: nothing to reconstruct.

#[cfg(test)]
mod tests;

use malla_api::policy_pb as pb;
use malla_core::ServiceName;
use tokio::sync::{
    broadcast::error::{RecvError, TryRecvError},
    mpsc, watch,
};
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::{
    api::Backend,
    events,
    metrics::WatchKind,
    policies::{PolicyView, StoredPolicy},
    store::Store,
};

pub struct PoliciesGrpc<S> {
    backend: Backend<S>,
    stop: watch::Receiver<bool>,
}

impl<S: Store + Clone> PoliciesGrpc<S> {
    pub fn new(backend: Backend<S>, stop: watch::Receiver<bool>) -> Self {
        PoliciesGrpc { backend, stop }
    }
}

type PolicyStream = super::Streaming<pb::PolicyUpdate>;

#[tonic::async_trait]
impl<S: Store + Clone> malla_api::PoliciesService for PoliciesGrpc<S> {
    type WatchPolicyStream = PolicyStream;

    async fn watch_policy(
        &self,
        request: Request<pb::WatchPolicyRequest>,
    ) -> Result<Response<PolicyStream>, Status> {
        let held = super::connection(&request).map(|c| c.watch_opened());
        let service = ServiceName::new(&request.into_inner().service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let backend = self.backend.clone();
        super::streaming(&self.stop, |tx, stop| async move {
            run_watch(backend, service, tx, stop).await;
            drop(held);
        })
    }

    async fn report_events(
        &self,
        request: Request<pb::ReportEventsRequest>,
    ) -> Result<Response<pb::ReportEventsResponse>, Status> {
        let events =
            events::from_request(request.into_inner()).map_err(Status::invalid_argument)?;
        let accepted = u32::try_from(events.len()).unwrap_or(u32::MAX);
        self.backend.events.push(events);
        Ok(Response::new(pb::ReportEventsResponse { accepted }))
    }
}

/// The message for a service's state in `view`.
fn state(view: &PolicyView, service: &ServiceName) -> pb::PolicyUpdate {
    update(view.by_service.get(service))
}

fn update(policy: Option<&StoredPolicy>) -> pb::PolicyUpdate {
    match policy {
        Some(p) => pb::PolicyUpdate {
            version: p.version,
            policy_json: p.json.to_string(),
        },
        None => pb::PolicyUpdate {
            version: 0,
            policy_json: String::new(),
        },
    }
}

type Sender = mpsc::Sender<Result<pb::PolicyUpdate, Status>>;

async fn send(tx: &Sender, stop: &mut watch::Receiver<bool>, message: pb::PolicyUpdate) -> bool {
    tokio::select! {
        sent = tx.send(Ok(message)) => sent.is_ok(),
        _ = stop.wait_for(|s| *s) => false,
    }
}

async fn run_watch<S: Store + Clone>(
    backend: Backend<S>,
    service: ServiceName,
    tx: Sender,
    mut stop: watch::Receiver<bool>,
) {
    let _open = backend.metrics.watch_opened(WatchKind::Policy);
    let policies = &backend.policies;
    let (view, mut changes) = policies.subscribe();
    // The revision the client is up to: changes at or below it are already in what it has.
    let mut revision = view.revision;
    let mut sent = state(&view, &service);
    drop(view);
    if !send(&tx, &mut stop, sent.clone()).await {
        return;
    }
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = tx.closed() => return,
            received = changes.recv() => received,
        };
        // The latest state of the service among the changes ready now (`None` when none of
        // them is about it).
        let mut latest: Option<pb::PolicyUpdate> = None;
        let mut note = |change: &crate::policies::PolicyChange| {
            if change.revision > revision {
                revision = change.revision;
                if change.service == service {
                    latest = Some(update(change.policy.as_ref()));
                }
            }
        };
        let mut lagged = false;
        match received {
            Ok(change) => {
                note(&change);
                loop {
                    match changes.try_recv() {
                        Ok(change) => note(&change),
                        Err(TryRecvError::Lagged(_)) => {
                            lagged = true;
                            break;
                        }
                        Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                    }
                }
            }
            Err(RecvError::Lagged(missed)) => {
                debug!(%service, missed, "policy watcher fell behind; sending the current state");
                lagged = true;
            }
            Err(RecvError::Closed) => break,
        }
        if lagged {
            let view = policies.view();
            revision = view.revision;
            latest = Some(state(&view, &service));
        }
        if let Some(message) = latest.filter(|m| *m != sent) {
            sent = message.clone();
            if !send(&tx, &mut stop, message).await {
                break;
            }
        }
    }
    let _ = tx.try_send(Err(Status::unavailable(
        "the control plane is stopping; reconnect and watch again",
    )));
}
