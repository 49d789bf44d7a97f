//! A watch of one service's resource of some kind ([`crate::resources`]): the stream
//! behind `Policies/WatchPolicy` and `Authorizations/WatchAuthorization`.
//!
//! A stream is one task, like a registry Watch: it subscribes to the resources' change
//! broadcast, sends the service's current state, then the new state after every change
//! of that service. Each message is a whole state, so changes already queued when the
//! task wakes collapse into the last one, and a stream that falls behind the broadcast
//! just sends the current state again: nothing to reconstruct. A state equal to the one
//! sent last is not sent again. A client that reconnects gets the current state first
//! and resumes by its version: the same version is the same resource.

use std::sync::Arc;

use malla_core::ServiceName;
use tokio::sync::{
    broadcast::error::{RecvError, TryRecvError},
    mpsc, watch,
};
use tonic::Status;
use tracing::debug;

use crate::{
    resources::{Change, Kind, Resources, Stored},
    store::Store,
};

type Sender<M> = mpsc::Sender<Result<M, Status>>;

async fn send<M>(tx: &Sender<M>, stop: &mut watch::Receiver<bool>, message: M) -> bool {
    tokio::select! {
        sent = tx.send(Ok(message)) => sent.is_ok(),
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Streams the state of `service`'s resource, each as `message` makes it (from the stored
/// resource, `None` when there is none), until the client leaves or the control plane
/// stops.
pub(super) async fn run<S, K, M>(
    resources: Arc<Resources<S, K>>,
    service: ServiceName,
    tx: Sender<M>,
    mut stop: watch::Receiver<bool>,
    message: impl Fn(Option<&Stored<K>>) -> M,
) where
    S: Store + Clone,
    K: Kind,
    M: Clone + PartialEq,
{
    let (view, mut changes) = resources.subscribe();
    // The revision the client is up to: changes at or below it are already in what it has.
    let mut revision = view.revision;
    let mut sent = message(view.by_service.get(&service));
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
        let mut latest: Option<M> = None;
        let mut note = |change: &Change<K>| {
            if change.revision > revision {
                revision = change.revision;
                if change.service == service {
                    latest = Some(message(change.policy.as_ref()));
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
                debug!(%service, missed, "{} watcher fell behind; sending the current state", K::NAME);
                lagged = true;
            }
            Err(RecvError::Closed) => break,
        }
        if lagged {
            let view = resources.view();
            revision = view.revision;
            latest = Some(message(view.by_service.get(&service)));
        }
        if let Some(next) = latest.filter(|m| *m != sent) {
            sent = next.clone();
            if !send(&tx, &mut stop, next).await {
                break;
            }
        }
    }
    let _ = tx.try_send(Err(Status::unavailable(
        "the control plane is stopping; reconnect and watch again",
    )));
}
