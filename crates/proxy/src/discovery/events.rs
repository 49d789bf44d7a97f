//! Reporting resilience events to the control plane: the proxy's [`EventLog`] is drained
//! in batches of up to [`BATCH`] and sent with `ReportEvents`.
//!
//! The data plane never waits for this: it only appends to the log (bounded, oldest
//! dropped). A batch that cannot be sent goes back to the front of the log and is tried
//! again after a backoff, so an unreachable control plane costs at most the log's
//! capacity in memory and loses the oldest events, never the newest. A batch the control
//! plane refuses as invalid is dropped (sending it again cannot succeed).
//!
//! # Who reports
//!
//! The control plane takes events from a workload certificate only (and records them as
//! its service's), so they go on the writes channel ([`Channels::writes`]), once this
//! sidecar holds its first certificate; until then they wait in the log. A sidecar that
//! can present no certificate (no identity, or plaintext) says so once and drops what it
//! records instead of sending what would be refused. A refusal of a sent batch (for want
//! of a certificate, or naming another service) drops it too, said once per reason.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use malla_api::{policy_pb as pb, PoliciesClient};
use serde_json::json;
use tonic::Code;
use tracing::{debug, warn};

use super::{
    backoff::Backoff, channel::Channels, get_error, set_error, RETRY_BASE, RETRY_MAX, RPC_TIMEOUT,
};
use crate::{
    identity::IdentityState,
    resilience::events::{Event, EventLog},
};

/// Most events per call.
pub(super) const BATCH: usize = 256;
/// After a send, wait this long for more events to gather into the next call, so that a
/// burst (a service failing for every caller at once) costs a few calls, not one each.
const GATHER: Duration = Duration::from_millis(50);

/// Said when this sidecar has no identity to report with.
pub(super) const NO_IDENTITY: &str = "resilience events are not reported: the control plane needs this sidecar's certificate; give it a join token (control.service, and MALLA_JOIN_TOKEN or --join-token-file, made by `malla token create --service SERVICE`)";
/// Said when it has one but reaches the control plane in plaintext.
pub(super) const PLAINTEXT: &str = "resilience events are not reported: the control plane needs this sidecar's certificate, which plaintext (http://) cannot carry; reach it over TLS, HOST:PORT or https://HOST:PORT with --control-ca";

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

/// How reporting goes: the `events` part of `/config`'s `control`.
pub(crate) struct EventsStatus {
    /// The certificate events are sent with; `None`: they are not reported.
    identity: Option<Arc<IdentityState>>,
    /// Why they are not reported, when they are not.
    unreported: Option<&'static str>,
    sent: AtomicU64,
    not_sent: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl EventsStatus {
    /// `identity`: this sidecar's, when it has one; `tls`: whether it can present it.
    pub(super) fn new(identity: Option<Arc<IdentityState>>, tls: bool) -> Self {
        let (identity, unreported) = match (identity, tls) {
            (None, _) => (None, Some(NO_IDENTITY)),
            (Some(_), false) => (None, Some(PLAINTEXT)),
            (Some(identity), true) => (Some(identity), None),
        };
        EventsStatus {
            identity,
            unreported,
            sent: AtomicU64::new(0),
            not_sent: AtomicU64::new(0),
            last_error: Mutex::new(unreported.map(str::to_string)),
        }
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        json!({
            "reported": self.unreported.is_none(),
            "sent": self.sent.load(Ordering::Relaxed),
            "not_sent": self.not_sent.load(Ordering::Relaxed),
            "last_error": get_error(&self.last_error),
        })
    }

    fn dropped(&self, events: usize) {
        self.not_sent
            .fetch_add(u64::try_from(events).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

fn client(channels: &Channels) -> PoliciesClient<tonic::transport::Channel> {
    PoliciesClient::new(channels.writes())
}

pub(super) async fn run(
    channels: Arc<Channels>,
    log: Arc<EventLog>,
    reporter: Reporter,
    status: Arc<EventsStatus>,
) {
    let Some(identity) = status.identity.clone() else {
        // Nothing would be accepted: say it once, and keep the log from filling up with
        // what will never be sent (`/events` still shows the recent ones).
        warn!("{}", status.unreported.unwrap_or(NO_IDENTITY));
        loop {
            log.wait().await;
            status.dropped(log.drain(usize::MAX).len());
        }
    };
    // Events gather in the log until there is a certificate to send them with.
    identity.issued().await;
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut failing = false;
    loop {
        log.wait().await;
        let batch = log.drain(BATCH);
        if batch.is_empty() {
            continue;
        }
        let sent = tokio::time::timeout(
            RPC_TIMEOUT,
            client(&channels).report_events(reporter.request(&batch)),
        )
        .await;
        let error = match sent {
            Ok(Ok(_)) => {
                if failing {
                    debug!("reporting resilience events again");
                }
                failing = false;
                backoff.reset();
                status.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                set_error(&status.last_error, None);
                tokio::time::sleep(GATHER).await;
                continue;
            }
            Ok(Err(refusal))
                if matches!(
                    refusal.code(),
                    Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
                ) =>
            {
                // Sending it again cannot succeed.
                let error = format!("{:?}: {}", refusal.code(), refusal.message());
                if get_error(&status.last_error).as_deref() != Some(error.as_str()) {
                    warn!(events = batch.len(), %error, "the control plane refused a batch of resilience events; dropping it");
                }
                status.dropped(batch.len());
                set_error(&status.last_error, Some(error));
                continue;
            }
            Ok(Err(failed)) => format!("{:?}: {}", failed.code(), failed.message()),
            Err(_) => format!("no answer within {RPC_TIMEOUT:?}"),
        };
        log.requeue(batch);
        let wait = backoff.next_delay();
        if !failing {
            warn!(%error, retry_in = ?wait, "cannot report resilience events; keeping them to retry");
        }
        failing = true;
        set_error(&status.last_error, Some(error));
        tokio::time::sleep(wait).await;
    }
}

/// Sends what is still queued when the proxy stops, for at most `within`: the last
/// events before a shutdown (an instance ejecting its upstreams as it goes down) are
/// often the ones worth having. Nothing is sent without a certificate to send it with.
pub(super) async fn flush(
    channels: &Channels,
    log: &EventLog,
    reporter: &Reporter,
    status: &EventsStatus,
    within: Duration,
) {
    if status.identity.as_ref().and_then(|i| i.current()).is_none() {
        return;
    }
    let mut client = client(channels);
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
    #![allow(clippy::unwrap_used)]

    use malla_core::ServiceName;
    use tokio::net::TcpListener;
    use tonic::transport::Endpoint;

    use super::*;
    use crate::resilience::events::EventKind;

    fn reporter() -> Reporter {
        Reporter {
            service: String::new(),
            instance_id: String::new(),
            services: HashMap::new(),
        }
    }

    /// Channels to a listener that counts on nobody connecting.
    async fn channels() -> (Arc<Channels>, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let endpoint = Endpoint::from_shared(url).unwrap();
        (Arc::new(Channels::new(endpoint, None)), listener)
    }

    async fn nobody_connects(listener: &TcpListener) {
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "the control plane was called");
    }

    #[tokio::test]
    async fn without_a_certificate_events_are_dropped_and_it_is_said_once() {
        let (channels, listener) = channels().await;
        let log = Arc::new(EventLog::default());
        let status = Arc::new(EventsStatus::new(None, true));
        let task = tokio::spawn(run(channels, log.clone(), reporter(), status.clone()));
        for _ in 0..3 {
            log.record(Event::new(
                "quote",
                EventKind::Ejected,
                "5 consecutive failures",
            ));
        }
        let mut waited = 0;
        while status.not_sent.load(Ordering::Relaxed) < 3 && waited < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        nobody_connects(&listener).await;
        let json = status.to_json();
        assert_eq!(json["reported"], false);
        assert_eq!(
            (json["sent"].as_u64(), json["not_sent"].as_u64()),
            (Some(0), Some(3))
        );
        assert_eq!(json["last_error"], NO_IDENTITY);
        assert!(NO_IDENTITY.starts_with("resilience events are not reported: the control plane needs this sidecar's certificate; give it a join token"));
        // Not retried: the queue is empty, nothing counted as overflow; `/events` still
        // shows them.
        assert!(log.drain(usize::MAX).is_empty());
        assert_eq!(log.dropped(), 0);
        assert_eq!(log.recent().len(), 3);
        task.abort();
    }

    #[test]
    fn over_plaintext_a_certificate_cannot_report() {
        let identity = Arc::new(IdentityState::new(ServiceName::new("checkout").unwrap()));
        let status = EventsStatus::new(Some(identity.clone()), false);
        assert_eq!(status.to_json()["reported"], false);
        assert_eq!(status.to_json()["last_error"], PLAINTEXT);
        let status = EventsStatus::new(Some(identity), true);
        assert_eq!(status.to_json()["reported"], true);
        assert_eq!(status.to_json()["last_error"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn with_an_identity_events_wait_in_the_log_for_the_certificate() {
        let (channels, listener) = channels().await;
        let log = Arc::new(EventLog::default());
        let identity = Arc::new(IdentityState::new(ServiceName::new("checkout").unwrap()));
        let status = Arc::new(EventsStatus::new(Some(identity), true));
        let task = tokio::spawn(run(channels, log.clone(), reporter(), status.clone()));
        log.record(Event::new(
            "quote",
            EventKind::Ejected,
            "5 consecutive failures",
        ));
        nobody_connects(&listener).await;
        task.abort();
        assert_eq!(log.drain(usize::MAX).len(), 1);
        assert_eq!(status.not_sent.load(Ordering::Relaxed), 0);
    }

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
