//! The upstream's side of the stall check ([`crate::resilience::stall`]): a task on the
//! `malla-resilience` thread that looks at every endpoint once a second and reports
//! stalls and recoveries as events and the `upstream_endpoints_stalled` gauge.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
};

use crate::{
    endpoint::Endpoint,
    resilience::{
        events::{Event, EventKind},
        outlier,
        stall::{self, Change, Sample, Tracker},
    },
};

use super::Upstream;

impl Upstream {
    /// Runs the stall check until the proxy stops.
    pub(crate) async fn watch_stalls(self: Arc<Self>) {
        let mut trackers: HashMap<SocketAddr, (Arc<Endpoint>, Tracker)> = HashMap::new();
        let mut tick = tokio::time::interval(stall::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check_stalls(&mut trackers);
        }
    }

    /// One look at every endpoint.
    pub(crate) fn check_stalls(
        &self,
        trackers: &mut HashMap<SocketAddr, (Arc<Endpoint>, Tracker)>,
    ) {
        let limits = stall::thresholds(&self.resilience());
        let endpoints = self.endpoints();
        let now_ms = outlier::now_ms();
        // Endpoints that left (or came back as new ones) start over.
        trackers.retain(|addr, (e, _)| {
            endpoints
                .iter()
                .any(|x| x.addr == *addr && Arc::ptr_eq(x, e))
        });
        let mut stalled = 0;
        for e in endpoints.iter() {
            let sample = Sample {
                now_ms,
                progress_ms: e.progress_ms(),
                unanswered_ms: e.unanswered_ms(),
                requests: e.requests(),
                in_flight: e.in_flight(),
            };
            let (_, tracker) = trackers
                .entry(e.addr)
                .or_insert_with(|| (e.clone(), Tracker::new(&sample)));
            match tracker.observe(&sample, limits) {
                None => {}
                Some(Change::Stalled(s)) => {
                    self.event(
                        Event::new(self.name(), EventKind::EndpointStalled, s.describe())
                            .endpoint(e.addr),
                    );
                }
                Some(Change::Recovered { stalled_ms }) => self.event(
                    Event::new(
                        self.name(),
                        EventKind::EndpointRecovered,
                        format!(
                            "answered again after a stall of {}",
                            stall::seconds(stalled_ms)
                        ),
                    )
                    .endpoint(e.addr),
                ),
            }
            e.stalled.store(tracker.is_stalled(), Ordering::Relaxed);
            stalled += i64::from(tracker.is_stalled());
        }
        self.upstream_metrics.endpoints_stalled.set(stalled);
    }
}
