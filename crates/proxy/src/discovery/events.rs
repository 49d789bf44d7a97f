//! Reporting resilience events to the control plane: the proxy's [`EventLog`] is drained
//! in batches of up to [`BATCH`] and sent with `ReportEvents`.
//!
//! The data plane never waits for this: it only appends to the log (bounded, oldest
//! dropped). A batch that cannot be sent goes back to the front of the log and is tried
//! again after a backoff, so an unreachable control plane costs at most the log's
//! capacity in memory and loses the oldest events, never the newest. A batch the control
//! plane refuses as invalid is dropped (sending it again cannot succeed).

use std::{collections::HashMap, sync::Arc, time::Duration};

use malla_api::{policy_pb as pb, PoliciesClient};
use tonic::{transport::Channel, Code};
use tracing::{debug, warn};

use super::{backoff::Backoff, RETRY_BASE, RETRY_MAX, RPC_TIMEOUT};
use crate::resilience::events::{Event, EventLog};

/// Most events per call.
pub(super) const BATCH: usize = 256;
/// After a send, wait this long for more events to gather into the next call, so that a
/// burst (a service failing for every caller at once) costs a few calls, not one each.
const GATHER: Duration = Duration::from_millis(50);

/// Who reports, and which service each upstream calls.
#[derive(Clone)]
pub(super) struct Reporter {
    /// This sidecar's service and instance id, when it registers (else empty).
    pub service: String,
    pub instance_id: String,
    /// Upstream name to the service it calls.
    pub services: HashMap<String, String>,
}

impl Reporter {
    fn to_pb(&self, event: &Event) -> pb::ResilienceEvent {
        pb::ResilienceEvent {
            at_ms: event.at_ms,
            upstream: event.upstream.clone(),
            endpoint: event.endpoint.map(|e| e.to_string()).unwrap_or_default(),
            kind: event.kind.as_str().to_string(),
            audit: event.audit,
            count: event.count,
            detail: event.detail.clone(),
            service: self
                .services
                .get(&event.upstream)
                .cloned()
                .unwrap_or_default(),
        }
    }

    fn request(&self, events: &[Event]) -> pb::ReportEventsRequest {
        pb::ReportEventsRequest {
            service: self.service.clone(),
            instance_id: self.instance_id.clone(),
            events: events.iter().map(|e| self.to_pb(e)).collect(),
        }
    }
}

pub(super) async fn run(
    mut client: PoliciesClient<Channel>,
    log: Arc<EventLog>,
    reporter: Reporter,
) {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut failing = false;
    loop {
        log.wait().await;
        let batch = log.drain(BATCH);
        if batch.is_empty() {
            continue;
        }
        let sent =
            tokio::time::timeout(RPC_TIMEOUT, client.report_events(reporter.request(&batch))).await;
        let error = match sent {
            Ok(Ok(_)) => {
                if failing {
                    debug!("reporting resilience events again");
                }
                failing = false;
                backoff.reset();
                tokio::time::sleep(GATHER).await;
                continue;
            }
            Ok(Err(status)) if status.code() == Code::InvalidArgument => {
                warn!(events = batch.len(), error = %status.message(), "the control plane refused a batch of resilience events; dropping it");
                continue;
            }
            Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
            Err(_) => format!("no answer within {RPC_TIMEOUT:?}"),
        };
        log.requeue(batch);
        let wait = backoff.next_delay();
        if !failing {
            warn!(%error, retry_in = ?wait, "cannot report resilience events; keeping them to retry");
        }
        failing = true;
        tokio::time::sleep(wait).await;
    }
}

/// Sends what is still queued when the proxy stops, for at most `within`: the last
/// events before a shutdown (an instance ejecting its upstreams as it goes down) are
/// often the ones worth having.
pub(super) async fn flush(
    mut client: PoliciesClient<Channel>,
    log: &EventLog,
    reporter: &Reporter,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let batch = log.drain(BATCH);
        if batch.is_empty() {
            return;
        }
        let sent = client.report_events(reporter.request(&batch));
        if !matches!(tokio::time::timeout_at(deadline, sent).await, Ok(Ok(_))) {
            debug!(
                events = batch.len() + log.drain(usize::MAX).len(),
                "stopping with resilience events not reported"
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::events::EventKind;

    #[test]
    fn events_carry_the_called_service_and_the_reporter() {
        let reporter = Reporter {
            service: "frontend".into(),
            instance_id: "frontend-1".into(),
            services: HashMap::from([("quote".to_string(), "shipping-quote".to_string())]),
        };
        let event = Event::new("quote", EventKind::Ejected, "5 consecutive failures")
            .endpoint("127.0.0.1:9".parse().unwrap());
        let request = reporter.request(&[event]);
        assert_eq!(request.service, "frontend");
        assert_eq!(request.instance_id, "frontend-1");
        let e = &request.events[0];
        assert_eq!(
            (e.kind.as_str(), e.service.as_str(), e.endpoint.as_str()),
            ("ejected", "shipping-quote", "127.0.0.1:9")
        );
        assert_eq!(e.count, 1);
    }
}
