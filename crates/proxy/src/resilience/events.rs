//! Resilience events: every state change of a breaker, limit or budget, as a structured
//! record the sidecar sends to the control plane (which keeps them for cascade alerts).
//!
//! Recording never blocks the data plane: events go into a bounded queue that the
//! control-plane client drains; when it cannot keep up, the oldest are dropped and counted.
//! Kinds that can fire on every request (a limit hit, an exhausted budget) are throttled
//! to one event per second per upstream and kind, carrying how many occurrences it stands
//! for.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::Notify;

/// Events kept while nobody drains them.
const CAPACITY: usize = 4096;
/// The latest events kept for the admin listener's `/events`, sent or not.
const RECENT: usize = 256;
/// Throttled kinds emit at most once per this interval.
const THROTTLE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// An endpoint was taken out of the balancer.
    Ejected,
    /// An ejection ended: the next request is a probe.
    HalfOpen,
    /// A probe succeeded: the endpoint is back.
    Closed,
    /// An ejection was due but the max-ejection percentage forbade it.
    EjectionSkipped,
    /// Too few endpoints are available: balancing over all of them.
    PanicEntered,
    PanicLeft,
    /// A service limit rejected (or in audit mode would have rejected) a request.
    LimitHit,
    /// A retry was due but the retry budget was spent.
    RetryBudgetExhausted,
    /// A rate limit rejected (or would have rejected) a request.
    RateLimited,
    /// Calls wait on an endpoint that makes no progress (see [`super::stall`]).
    EndpointStalled,
    /// A stalled endpoint made progress again.
    EndpointRecovered,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Ejected => "ejected",
            EventKind::HalfOpen => "half-open",
            EventKind::Closed => "closed",
            EventKind::EjectionSkipped => "ejection-skipped",
            EventKind::PanicEntered => "panic-entered",
            EventKind::PanicLeft => "panic-left",
            EventKind::LimitHit => "limit-hit",
            EventKind::RetryBudgetExhausted => "retry-budget-exhausted",
            EventKind::RateLimited => "rate-limited",
            EventKind::EndpointStalled => "endpoint-stalled",
            EventKind::EndpointRecovered => "endpoint-recovered",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub upstream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    pub kind: EventKind,
    /// Audit mode: what the policy would have done; nothing was done.
    pub audit: bool,
    /// Occurrences this event stands for (throttled kinds), else 1.
    pub count: u64,
    /// Why, in words (`5 consecutive failures (last: 500)`, `max_requests 100`).
    pub detail: String,
}

impl Event {
    pub fn new(upstream: &str, kind: EventKind, detail: impl Into<String>) -> Self {
        Event {
            at_ms: now_ms(),
            upstream: upstream.to_string(),
            endpoint: None,
            kind,
            audit: false,
            count: 1,
            detail: detail.into(),
        }
    }

    pub fn endpoint(mut self, addr: SocketAddr) -> Self {
        self.endpoint = Some(addr);
        self
    }

    pub fn audit(mut self, audit: bool) -> Self {
        self.audit = audit;
        self
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The proxy's queue of events waiting to be sent.
#[derive(Default)]
pub struct EventLog {
    queue: Mutex<VecDeque<Event>>,
    ready: Notify,
    dropped: AtomicU64,
    /// The last [`RECENT`] events, for `/events` (whether or not they were sent).
    recent: Mutex<VecDeque<Event>>,
}

impl EventLog {
    pub fn record(&self, event: Event) {
        tracing::info!(
            upstream = %event.upstream,
            endpoint = ?event.endpoint,
            kind = event.kind.as_str(),
            audit = event.audit,
            count = event.count,
            detail = %event.detail,
            "resilience event"
        );
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() >= RECENT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= CAPACITY {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(event);
        drop(queue);
        self.ready.notify_one();
    }

    /// The latest events, oldest first, sent to the control plane or not.
    pub fn recent(&self) -> Vec<Event> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// Waits until at least one event is queued.
    pub async fn wait(&self) {
        loop {
            let notified = self.ready.notified();
            if !self.is_empty() {
                return;
            }
            notified.await;
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.lock().map_or(true, |q| q.is_empty())
    }

    /// Takes up to `max` queued events, oldest first.
    pub fn drain(&self, max: usize) -> Vec<Event> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }

    /// Puts events that could not be sent back at the front (newer ones win on overflow).
    pub fn requeue(&self, events: Vec<Event>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for event in events.into_iter().rev() {
            if queue.len() >= CAPACITY {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            queue.push_front(event);
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Lets a frequent kind through at most once per second, counting what it held back.
#[derive(Default)]
pub struct Throttle {
    last_ms: AtomicU64,
    held: AtomicU64,
}

impl Throttle {
    /// `Some(count)` when an event is due now (standing for `count` occurrences).
    pub fn admit(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < THROTTLE.as_millis() as u64
            || self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held.swap(0, Ordering::Relaxed) + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_log_drops_the_oldest_and_counts() {
        let log = EventLog::default();
        for i in 0..CAPACITY + 3 {
            log.record(Event::new("u", EventKind::Ejected, i.to_string()));
        }
        assert_eq!(log.dropped(), 3);
        let first = log.drain(1);
        assert_eq!(first[0].detail, "3");
        log.requeue(first);
        assert_eq!(log.drain(CAPACITY + 10).len(), CAPACITY);
        // Draining does not touch what `/events` shows: the latest, whatever was sent.
        let recent = log.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[RECENT - 1].detail, (CAPACITY + 2).to_string());
    }

    #[test]
    fn throttle_admits_once_per_interval_and_counts_the_rest() {
        let t = Throttle::default();
        assert_eq!(t.admit(), Some(1));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        t.last_ms.store(0, Ordering::Relaxed);
        assert_eq!(t.admit(), Some(3));
    }
}
