//! Following one discovered upstream: Watch its service, turn each snapshot or update into
//! the upstream's endpoint set, reconnect with backoff when the stream breaks.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use malla_api::{pb, ConversionError, RegistryClient, WatchEvent};
use malla_core::Instance;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::{backoff::Backoff, set_error, WatchStatus, RETRY_BASE, RETRY_MAX};
use crate::upstream::{DiscoveredEndpoint, Upstream};

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the control plane ended the stream")]
    Ended,
    #[error("the control plane sent an invalid message: {0}")]
    Invalid(#[from] ConversionError),
    #[error("the stream did not start with a snapshot")]
    NoSnapshot,
    #[error("no snapshot within {WATCH_START_TIMEOUT:?}")]
    Timeout,
}

/// Longest wait for a new stream's snapshot.
const WATCH_START_TIMEOUT: Duration = Duration::from_secs(5);

/// The instances the upstream's endpoints come from.
#[derive(Default)]
struct Known {
    instances: BTreeMap<String, Instance>,
    /// The endpoints (with their labels, for locality, and the control plane's health)
    /// last given to the upstream, sorted by address.
    applied: Vec<DiscoveredEndpoint>,
}

impl Known {
    fn apply(&mut self, event: WatchEvent, upstream: &Upstream, status: &WatchStatus) {
        let revision = event.revision();
        match event {
            WatchEvent::Snapshot { instances, .. } => {
                // A snapshot replaces everything: nothing from before a resync survives.
                self.instances = instances.into_iter().map(|i| (i.id.clone(), i)).collect();
            }
            WatchEvent::Update {
                upserted, removed, ..
            } => {
                for i in upserted {
                    self.instances.insert(i.id.clone(), i);
                }
                for id in removed {
                    self.instances.remove(&id);
                }
            }
        }
        let endpoints = endpoints(&self.instances);
        let serving = endpoints.iter().filter(|e| !e.unhealthy).count();
        status
            .instances
            .store(self.instances.len(), Ordering::Relaxed);
        status.serving.store(serving, Ordering::Relaxed);
        status
            .metrics
            .revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
        status.metrics.last_update.touch();
        status.synced.store(true, Ordering::Release);
        if endpoints != self.applied {
            upstream.set_discovered_endpoints(&endpoints);
            info!(upstream = %upstream.name(), revision, instances = self.instances.len(), serving, "endpoints updated from the control plane");
            self.applied = endpoints;
        }
    }
}

/// The endpoints of a set of instances, sorted by address. Instances the control plane
/// marks unhealthy are kept, flagged: whether they take traffic is the upstream's
/// decision (its panic threshold). Two instances on one address are one endpoint, healthy
/// when either may serve, called over mTLS when both accept it.
fn endpoints(instances: &BTreeMap<String, Instance>) -> Vec<DiscoveredEndpoint> {
    let mut by_addr: BTreeMap<SocketAddr, DiscoveredEndpoint> = BTreeMap::new();
    for i in instances.values() {
        let unhealthy = !i.health.serving();
        by_addr
            .entry(i.socket_addr())
            .and_modify(|e| {
                e.unhealthy &= unhealthy;
                e.mtls &= i.mtls;
            })
            .or_insert_with(|| DiscoveredEndpoint {
                addr: i.socket_addr(),
                labels: i.labels.clone(),
                unhealthy,
                mtls: i.mtls,
            });
    }
    by_addr.into_values().collect()
}

pub(super) async fn run(
    mut client: RegistryClient<Channel>,
    upstream: Arc<Upstream>,
    status: Arc<WatchStatus>,
) {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut known = Known::default();
    let mut streams = 0u64;
    loop {
        let before = streams;
        let error = follow(
            &mut client,
            &upstream,
            &status,
            &mut known,
            &mut backoff,
            &mut streams,
        )
        .await;
        status.metrics.connected.set(0);
        set_error(&status.last_error, Some(error.to_string()));
        let wait = backoff.next_delay();
        if streams > before {
            // This stream was up: losing it is news. Failed attempts after it are not.
            warn!(upstream = %upstream.name(), %error, retry_in = ?wait, endpoints = known.applied.len(), "lost the control plane; serving on the last known endpoints");
        } else {
            debug!(upstream = %upstream.name(), %error, retry_in = ?wait, "cannot watch the control plane; retrying");
        }
        tokio::time::sleep(wait).await;
    }
}

/// One stream, from the request to its end (always an error: a watch never completes).
async fn follow(
    client: &mut RegistryClient<Channel>,
    upstream: &Upstream,
    status: &WatchStatus,
    known: &mut Known,
    backoff: &mut Backoff,
    streams: &mut u64,
) -> WatchError {
    // The stream and its snapshot must come within a bound: a control plane that accepts
    // connections but does not answer is as good as gone.
    let start = async {
        let mut stream = client
            .watch(pb::WatchRequest::from(&status.target))
            .await?
            .into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let (mut stream, mut next) = match tokio::time::timeout(WATCH_START_TIMEOUT, start).await {
        Ok(Ok(started)) => started,
        Ok(Err(status)) => return status.into(),
        Err(_) => return WatchError::Timeout,
    };
    let mut first = true;
    loop {
        let message = match next.take() {
            Some(message) => message,
            None if first => return WatchError::Ended,
            None => match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return WatchError::Ended,
                Err(status) => return status.into(),
            },
        };
        let event = match WatchEvent::try_from(message) {
            Ok(event) => event,
            Err(e) => return e.into(),
        };
        if first {
            if !matches!(event, WatchEvent::Snapshot { .. }) {
                return WatchError::NoSnapshot;
            }
            first = false;
            *streams += 1;
            if *streams > 1 {
                status.metrics.reconnects.inc();
                info!(upstream = %upstream.name(), revision = event.revision(), "reconnected to the control plane; resynchronising from a snapshot");
            }
            status.metrics.connected.set(1);
            set_error(&status.last_error, None);
            backoff.reset();
        }
        known.apply(event, upstream, status);
    }
}

#[cfg(test)]
mod tests {
    use malla_core::{Health, Labels, Selector, ServiceName};

    use super::*;
    use crate::{config::UpstreamConfig, metrics::Metrics};

    fn instance(id: &str, port: u16, health: Health) -> Instance {
        Instance {
            id: id.into(),
            service: ServiceName::new("svc").unwrap(),
            address: "127.0.0.1".parse().unwrap(),
            port,
            protocol: Default::default(),
            labels: Labels::new(),
            health,
            mtls: false,
        }
    }

    fn addrs(upstream: &Upstream) -> Vec<u16> {
        let mut ports: Vec<u16> = upstream.endpoints().iter().map(|e| e.addr.port()).collect();
        ports.sort_unstable();
        ports
    }

    fn unhealthy(upstream: &Upstream) -> Vec<u16> {
        let mut ports: Vec<u16> = upstream
            .endpoints()
            .iter()
            .filter(|e| e.control_unhealthy())
            .map(|e| e.addr.port())
            .collect();
        ports.sort_unstable();
        ports
    }

    #[test]
    fn snapshots_replace_updates_patch_and_unhealthy_instances_stay_flagged() {
        let metrics = std::sync::Arc::new(Metrics::new());
        let upstream = Upstream::new(
            UpstreamConfig::new("svc", Vec::new()),
            metrics.clone(),
            malla_core::Labels::new(),
            Default::default(),
        )
        .unwrap();
        let status = WatchStatus {
            target: malla_api::WatchTarget {
                service: ServiceName::new("svc").unwrap(),
                selector: Selector::all(),
            },
            instances: Default::default(),
            serving: Default::default(),
            synced: Default::default(),
            last_error: Default::default(),
            metrics: metrics.discovery("svc"),
        };
        let mut known = Known::default();
        assert!(!status.synced.load(Ordering::Acquire));
        known.apply(
            WatchEvent::Snapshot {
                revision: 3,
                instances: vec![
                    instance("a", 1, Health::Unknown),
                    instance("b", 2, Health::Healthy),
                    instance("c", 3, Health::Unhealthy),
                ],
            },
            &upstream,
            &status,
        );
        // The unhealthy instance stays, flagged: the upstream decides whether it serves.
        assert_eq!(addrs(&upstream), [1, 2, 3]);
        assert_eq!(unhealthy(&upstream), [3]);
        assert_eq!(status.instances.load(Ordering::Relaxed), 3);
        assert_eq!(status.serving.load(Ordering::Relaxed), 2);
        assert_eq!(status.metrics.revision.get(), 3);
        assert!(
            status.synced.load(Ordering::Acquire),
            "a snapshot makes the upstream ready"
        );

        known.apply(
            WatchEvent::Update {
                revision: 5,
                upserted: vec![
                    instance("c", 3, Health::Healthy),
                    instance("d", 4, Health::Unknown),
                ],
                removed: vec!["a".into()],
            },
            &upstream,
            &status,
        );
        assert_eq!(addrs(&upstream), [2, 3, 4]);
        assert!(unhealthy(&upstream).is_empty(), "c is healthy again");

        // Two instances on one address are one endpoint, healthy when either serves.
        known.apply(
            WatchEvent::Update {
                revision: 6,
                upserted: vec![
                    instance("e", 4, Health::Unhealthy),
                    instance("f", 5, Health::Unhealthy),
                ],
                removed: vec![],
            },
            &upstream,
            &status,
        );
        assert_eq!(addrs(&upstream), [2, 3, 4, 5]);
        assert_eq!(unhealthy(&upstream), [5]);

        // A snapshot (after a reconnection) drops everything it does not list.
        known.apply(
            WatchEvent::Snapshot {
                revision: 9,
                instances: vec![instance("b", 2, Health::Healthy)],
            },
            &upstream,
            &status,
        );
        assert_eq!(addrs(&upstream), [2]);
        assert_eq!(status.metrics.revision.get(), 9);
        assert!(status.metrics.last_update.age().is_some());
    }
}
