//! Resilience events reported by sidecars (gRPC `ReportEvents`): ejections, panic mode,
//! limits hit, retry budgets spent. The control plane keeps the last [`CAPACITY`] in
//! memory, oldest dropped first, for `GET /v1/events` and `malla events`.
//!
//! They are kept in memory only, on purpose: they describe what is happening now, are
//! worth little after a restart, and would cost a durable write each (a failing service
//! can make every sidecar report at once, exactly when the store should stay quiet).
//! A sidecar throttles the kinds that fire per request, so the volume is bounded by the
//! number of sidecars and upstreams, not by traffic.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use malla_api::policy_pb as pb;
use malla_core::{service::valid_instance_id, ServiceName};
use serde::Serialize;

/// Events kept.
pub const CAPACITY: usize = 10_000;
/// Most events one `ReportEvents` call may carry.
pub const MAX_BATCH: usize = 1024;
/// Longest `detail` kept (longer ones are cut).
const MAX_DETAIL: usize = 1024;

/// Who reported an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reporter {
    pub service: Option<String>,
    pub instance_id: Option<String>,
}

/// One event as kept.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportedEvent {
    /// 1 for the first event received since the control plane started, then +1 each.
    pub seq: u64,
    /// When it happened (the sidecar's clock), in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// When the control plane received it (its own clock).
    pub received_at_ms: u64,
    pub reporter: Reporter,
    /// The service called (whose policy governs the upstream), when the sidecar knows it.
    pub service: Option<String>,
    /// The sidecar's name for the upstream.
    pub upstream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    pub kind: String,
    pub audit: bool,
    pub count: u64,
    pub detail: String,
}

/// Which events a query wants.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Events about calls to this service, or reported by its sidecars.
    pub service: Option<String>,
    pub kind: Option<String>,
}

impl EventFilter {
    fn matches(&self, e: &ReportedEvent) -> bool {
        let service = self.service.as_deref().is_none_or(|s| {
            e.service.as_deref() == Some(s) || e.reporter.service.as_deref() == Some(s)
        });
        let kind = self.kind.as_deref().is_none_or(|k| e.kind == k);
        service && kind
    }
}

/// The last [`CAPACITY`] events (a ring: the oldest goes when a new one comes).
pub struct EventRing {
    capacity: usize,
    inner: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    events: VecDeque<ReportedEvent>,
    next_seq: u64,
}

impl Default for EventRing {
    fn default() -> Self {
        EventRing::new(CAPACITY)
    }
}

impl EventRing {
    pub fn new(capacity: usize) -> Self {
        EventRing {
            capacity: capacity.max(1),
            inner: Mutex::new(Ring {
                events: VecDeque::new(),
                next_seq: 1,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `events` (numbering them), dropping the oldest beyond the capacity.
    pub fn push(&self, events: Vec<ReportedEvent>) {
        let mut ring = self.lock();
        for mut event in events {
            event.seq = ring.next_seq;
            ring.next_seq += 1;
            if ring.events.len() == self.capacity {
                ring.events.pop_front();
            }
            ring.events.push_back(event);
        }
    }

    /// The newest `limit` events that match, oldest first (newest last).
    pub fn query(&self, filter: &EventFilter, limit: usize) -> Vec<ReportedEvent> {
        let ring = self.lock();
        let mut found: Vec<ReportedEvent> = ring
            .events
            .iter()
            .rev()
            .filter(|e| filter.matches(e))
            .take(limit)
            .cloned()
            .collect();
        found.reverse();
        found
    }

    /// Keeps an event the control plane itself decided (kind `health-changed`, say), about
    /// an instance of `service`: reported by no sidecar (`reporter` has no service and no
    /// instance), its `upstream` is the service, its `endpoint` the instance's address, and
    /// its `detail` says which instance and why. It appears among the service's events.
    pub fn record_control(
        &self,
        kind: &str,
        service: &ServiceName,
        endpoint: SocketAddr,
        detail: String,
    ) {
        let now = now_ms();
        self.push(vec![ReportedEvent {
            seq: 0,
            at_ms: now,
            received_at_ms: now,
            reporter: Reporter {
                service: None,
                instance_id: None,
            },
            service: Some(service.to_string()),
            upstream: service.to_string(),
            endpoint: Some(endpoint),
            kind: kind.to_string(),
            audit: false,
            count: 1,
            detail: detail.chars().take(MAX_DETAIL).collect(),
        }]);
    }

    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An event kind as sidecars write them: 1-64 of `[a-z0-9-]`. Kinds this control plane
/// does not know are kept (a newer sidecar may report new ones).
fn valid_kind(kind: &str) -> bool {
    (1..=64).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Turns a `ReportEvents` request into events to keep; the error names the bad field.
pub fn from_request(request: pb::ReportEventsRequest) -> Result<Vec<ReportedEvent>, String> {
    let optional_service = |field: &str, name: String| -> Result<Option<String>, String> {
        if name.is_empty() {
            return Ok(None);
        }
        ServiceName::new(&name)
            .map(|n| Some(n.to_string()))
            .map_err(|e| format!("{field}: {e}"))
    };
    let reporter = Reporter {
        service: optional_service("service", request.service)?,
        instance_id: match request.instance_id {
            id if id.is_empty() => None,
            id if valid_instance_id(&id) => Some(id),
            id => {
                return Err(format!(
                    "instance_id {id:?} is not a valid instance id: use 1-128 letters, digits, '.', '_', ':' or '-'"
                ))
            }
        },
    };
    if request.events.len() > MAX_BATCH {
        return Err(format!(
            "events: {} in one call; send at most {MAX_BATCH}",
            request.events.len()
        ));
    }
    let received_at_ms = now_ms();
    request
        .events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            if !valid_kind(&e.kind) {
                return Err(format!(
                    "events[{i}].kind {:?} is not an event kind (1-64 of a-z, 0-9, '-')",
                    e.kind
                ));
            }
            if e.upstream.is_empty() || e.upstream.len() > 253 {
                return Err(format!("events[{i}].upstream: give the upstream's name"));
            }
            let endpoint = match e.endpoint.as_str() {
                "" => None,
                text => Some(text.parse().map_err(|_| {
                    format!("events[{i}].endpoint {text:?} is not an IP:PORT address")
                })?),
            };
            let mut detail = e.detail;
            if detail.len() > MAX_DETAIL {
                let mut cut = MAX_DETAIL;
                while !detail.is_char_boundary(cut) {
                    cut -= 1;
                }
                detail.truncate(cut);
            }
            Ok(ReportedEvent {
                seq: 0,
                at_ms: e.at_ms,
                received_at_ms,
                reporter: reporter.clone(),
                service: optional_service(&format!("events[{i}].service"), e.service)?,
                upstream: e.upstream,
                endpoint,
                kind: e.kind,
                audit: e.audit,
                count: e.count.max(1),
                detail,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(service: &str, kind: &str) -> ReportedEvent {
        ReportedEvent {
            seq: 0,
            at_ms: 1,
            received_at_ms: 2,
            reporter: Reporter {
                service: Some("frontend".into()),
                instance_id: None,
            },
            service: Some(service.into()),
            upstream: service.into(),
            endpoint: None,
            kind: kind.into(),
            audit: false,
            count: 1,
            detail: String::new(),
        }
    }

    #[test]
    fn keeps_the_newest_and_answers_newest_last() {
        let ring = EventRing::new(3);
        ring.push(vec![event("a", "ejected"), event("b", "ejected")]);
        ring.push(vec![event("a", "closed"), event("a", "limit-hit")]);
        assert_eq!(ring.len(), 3);
        let all = ring.query(&EventFilter::default(), 10);
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3, 4]);
        let last = ring.query(&EventFilter::default(), 1);
        assert_eq!(last[0].kind, "limit-hit");
        let a = EventFilter {
            service: Some("a".into()),
            kind: None,
        };
        assert_eq!(ring.query(&a, 10).len(), 2);
        // The reporter's service matches too.
        let frontend = EventFilter {
            service: Some("frontend".into()),
            kind: Some("ejected".into()),
        };
        assert_eq!(ring.query(&frontend, 10)[0].service.as_deref(), Some("b"));
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let good = pb::ResilienceEvent {
            at_ms: 5,
            upstream: "quote".into(),
            endpoint: "127.0.0.1:8080".into(),
            kind: "ejected".into(),
            audit: false,
            count: 0,
            detail: "5 consecutive failures".into(),
            service: "shipping-quote".into(),
        };
        let request = |events: Vec<pb::ResilienceEvent>| pb::ReportEventsRequest {
            service: "frontend".into(),
            instance_id: "f-1".into(),
            events,
        };
        let kept = from_request(request(vec![good.clone()])).unwrap();
        assert_eq!(kept[0].count, 1);
        assert_eq!(kept[0].reporter.instance_id.as_deref(), Some("f-1"));
        assert_eq!(kept[0].endpoint, Some("127.0.0.1:8080".parse().unwrap()));

        for (change, says) in [
            (
                Box::new(|e: &mut pb::ResilienceEvent| e.kind = "Ejected!".into())
                    as Box<dyn Fn(&mut pb::ResilienceEvent)>,
                "events[0].kind",
            ),
            (
                Box::new(|e| e.endpoint = "here".into()),
                "events[0].endpoint",
            ),
            (Box::new(|e| e.service = "No".into()), "events[0].service"),
            (
                Box::new(|e| e.upstream = String::new()),
                "events[0].upstream",
            ),
        ] {
            let mut bad = good.clone();
            change(&mut bad);
            let err = from_request(request(vec![bad])).unwrap_err();
            assert!(err.starts_with(says), "{err}");
        }
    }
}
