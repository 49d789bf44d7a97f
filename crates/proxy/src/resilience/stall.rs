//! Stalled endpoints: work waiting on an endpoint that makes no progress.
//!
//! A hanging endpoint (it accepts connections and requests, and never answers) does not
//! open a breaker quickly: nothing fails until a timeout fires, a client that gives up
//! first leaves no outcome at all, and a TCP stream has no timeout. Traffic just stops.
//! So once a second, off the request path (the `malla-resilience` thread), each endpoint
//! is checked for calls that wait while nothing comes back from it.
//!
//! The request path pays at most one relaxed atomic store per response: the time of the
//! endpoint's last *progress* (a response head, an opened connection, a failure other
//! than a timeout, bytes of a TCP stream from it; see [`crate::endpoint`]). The check
//! compares that with what it sees between two looks:
//!
//! - **HTTP and gRPC**: requests started on the endpoint since its last progress was
//!   seen (its `requests` counter), while some are in flight. The count of waiting calls
//!   is that number, at most the requests in flight; a request that started in the
//!   second before the endpoint last answered is missed, never one that was answered.
//! - **TCP**: bytes sent to the endpoint that no bytes from it followed (on any of its
//!   streams: bytes from the endpoint show it alive), while a stream is open. Sending
//!   notes the time only when nothing was waiting, receiving clears it: a load per
//!   chunk, and a store only when the state changes. An idle stream (nothing sent) is
//!   not waiting.
//!
//! Work waiting for longer than the threshold marks the endpoint stalled: an
//! `endpoint-stalled` event (again every [`REMIND`] while it lasts) and the
//! `upstream_endpoints_stalled` gauge. Its next progress ends it with an
//! `endpoint-recovered` event. The thresholds come from the policy's timeouts
//! ([`thresholds`]).

use std::time::Duration;

use crate::resilience::Resilience;

/// How often the check looks.
pub const TICK: Duration = Duration::from_secs(1);
/// A stall still going is reported again this often.
pub const REMIND: Duration = Duration::from_secs(60);

const HTTP_MIN: Duration = Duration::from_secs(1);
const HTTP_MAX: Duration = Duration::from_secs(10);
const TCP_FACTOR: u32 = 4;
const TCP_MAX: Duration = Duration::from_secs(30);

/// After how long waiting work is a stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub http: Duration,
    pub tcp: Duration,
}

/// The stall thresholds of a policy.
///
/// HTTP: half the time an attempt may wait for its response head (the per-try timeout,
/// lowered by the request timeout when that is shorter and not 0), between 1 s and 10 s;
/// 7.5 s with the defaults (15 s). Half, so that the stall is reported while the calls
/// are still waiting rather than when they time out, and a caller whose own timeout is
/// shorter than the policy's (it gives up and leaves no outcome) is still covered.
///
/// TCP: a stream has no timeout to go by; four times the HTTP threshold, at most 30 s
/// (30 s with the defaults), to leave room for protocols whose answer legitimately
/// takes a while (a blocking pop, a long poll).
pub fn thresholds(res: &Resilience) -> Thresholds {
    let request = res.policy.timeouts.request;
    let wait = if request.is_zero() {
        res.per_try_timeout
    } else {
        res.per_try_timeout.min(request)
    };
    let http = (wait / 2).clamp(HTTP_MIN, HTTP_MAX);
    Thresholds {
        http,
        tcp: (http * TCP_FACTOR).min(TCP_MAX),
    }
}

/// What the check reads from one endpoint (times in ms on
/// [`crate::resilience::outlier::now_ms`]'s clock, 0: never).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub now_ms: u64,
    pub progress_ms: u64,
    /// Since when bytes sent on TCP streams wait for an answer (0: none wait).
    pub unanswered_ms: u64,
    /// Requests ever started on the endpoint.
    pub requests: u64,
    pub in_flight: u32,
}

/// What changed at one look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Stalled (or still stalled, a reminder).
    Stalled(Stall),
    /// Progress after a stall that began `stalled_ms` ago.
    Recovered { stalled_ms: u64 },
}

/// A stall as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    /// HTTP/gRPC calls waiting for a response head.
    pub waiting_calls: u64,
    /// TCP streams open, when some sent bytes that got no answer.
    pub waiting_streams: Option<u32>,
    /// For at least this long (ms).
    pub waiting_ms: u64,
    /// Since the endpoint last made progress (ms); `None`: never, as far as this
    /// sidecar saw.
    pub silent_ms: Option<u64>,
    /// A reminder of a stall already reported.
    pub reminder: bool,
}

impl Stall {
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.waiting_calls > 0 {
            parts.push(format!(
                "{} call{} waiting for a response head",
                self.waiting_calls,
                if self.waiting_calls == 1 { "" } else { "s" }
            ));
        }
        if let Some(streams) = self.waiting_streams {
            parts.push(format!(
                "{streams} open TCP stream{} sent bytes that got no answer",
                if streams == 1 { "" } else { "s" }
            ));
        }
        let silent = match self.silent_ms {
            Some(ms) => format!("nothing from it for {}", seconds(ms)),
            None => "nothing from it yet".to_string(),
        };
        format!(
            "{} for at least {}; {silent}{}",
            parts.join(", "),
            seconds(self.waiting_ms),
            if self.reminder {
                " (still stalled)"
            } else {
                ""
            }
        )
    }
}

pub fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// One endpoint's state between looks.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The last progress seen.
    progress_ms: u64,
    /// The requests counter when it was seen.
    baseline: u64,
    /// When waiting HTTP work was first seen since then.
    http_since: Option<u64>,
    /// Stalled since (the start of the waiting), and when last reported.
    stalled: Option<(u64, u64)>,
}

impl Tracker {
    /// A tracker for an endpoint first seen with `sample`: the requests started before
    /// count as seen, unless the endpoint never made progress (then none of them was
    /// answered, and the check may have started after the first calls).
    pub fn new(sample: &Sample) -> Self {
        Tracker {
            progress_ms: sample.progress_ms,
            baseline: if sample.progress_ms == 0 {
                0
            } else {
                sample.requests
            },
            ..Tracker::default()
        }
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.is_some()
    }

    pub fn observe(&mut self, s: &Sample, limits: Thresholds) -> Option<Change> {
        if s.progress_ms != self.progress_ms {
            self.progress_ms = s.progress_ms;
            self.baseline = s.requests;
            self.http_since = None;
            return self.stalled.take().map(|(since, _)| Change::Recovered {
                stalled_ms: s.now_ms.saturating_sub(since),
            });
        }
        let calls = match s.in_flight {
            0 => 0,
            n => s.requests.saturating_sub(self.baseline).min(u64::from(n)),
        };
        if calls > 0 {
            self.http_since.get_or_insert(s.now_ms);
        } else {
            self.http_since = None;
        }
        let over = |since: u64, limit: Duration| {
            s.now_ms.saturating_sub(since) >= limit.as_millis() as u64
        };
        let http = self.http_since.filter(|&t| over(t, limits.http));
        let tcp =
            Some(s.unanswered_ms).filter(|&t| s.in_flight > 0 && t != 0 && over(t, limits.tcp));
        let began = match (http, tcp) {
            (None, None) => return None,
            (a, b) => a.into_iter().chain(b).min().unwrap_or(s.now_ms),
        };
        let reminder = match self.stalled {
            None => false,
            Some((_, reported)) if s.now_ms - reported >= REMIND.as_millis() as u64 => true,
            Some(_) => return None,
        };
        let since = self.stalled.map_or(began, |(since, _)| since);
        self.stalled = Some((since, s.now_ms));
        Some(Change::Stalled(Stall {
            waiting_calls: if http.is_some() { calls } else { 0 },
            waiting_streams: tcp.map(|_| s.in_flight),
            waiting_ms: s.now_ms - began,
            silent_ms: (s.progress_ms != 0).then(|| s.now_ms.saturating_sub(s.progress_ms)),
            reminder,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Thresholds = Thresholds {
        http: Duration::from_secs(5),
        tcp: Duration::from_secs(20),
    };

    fn at(now_s: u64, progress_ms: u64, requests: u64, in_flight: u32) -> Sample {
        Sample {
            now_ms: now_s * 1000,
            progress_ms,
            unanswered_ms: 0,
            requests,
            in_flight,
        }
    }

    #[test]
    fn calls_waiting_past_the_threshold_stall_and_an_answer_recovers() {
        let mut t = Tracker::new(&at(0, 500, 10, 0));
        // Three new requests, nothing back: waiting from t=1.
        assert_eq!(t.observe(&at(1, 500, 13, 3), LIMITS), None);
        assert_eq!(t.observe(&at(5, 500, 13, 3), LIMITS), None);
        let Some(Change::Stalled(stall)) = t.observe(&at(6, 500, 14, 4), LIMITS) else {
            panic!("no stall");
        };
        assert_eq!(stall.waiting_calls, 4);
        assert_eq!(stall.waiting_ms, 5000);
        assert_eq!(stall.silent_ms, Some(5500));
        assert!(!stall.reminder);
        assert!(
            stall.describe().starts_with(
                "4 calls waiting for a response head for at least 5.0s; nothing from it for 5.5s"
            ),
            "{}",
            stall.describe()
        );
        // Reported once, then reminded after REMIND.
        assert_eq!(t.observe(&at(7, 500, 14, 4), LIMITS), None);
        let Some(Change::Stalled(again)) = t.observe(&at(66, 500, 14, 4), LIMITS) else {
            panic!("no reminder");
        };
        assert!(again.reminder);
        // It answers: recovered, once.
        assert_eq!(
            t.observe(&at(70, 69_000, 15, 1), LIMITS),
            Some(Change::Recovered { stalled_ms: 69_000 })
        );
        assert!(!t.is_stalled());
        assert_eq!(t.observe(&at(71, 69_000, 15, 1), LIMITS), None);
    }

    #[test]
    fn an_endpoint_first_seen_with_calls_and_no_progress_counts_them() {
        let mut t = Tracker::new(&at(3, 0, 2, 2));
        assert_eq!(t.observe(&at(4, 0, 2, 2), LIMITS), None);
        let Some(Change::Stalled(stall)) = t.observe(&at(9, 0, 2, 2), LIMITS) else {
            panic!("no stall");
        };
        assert_eq!((stall.waiting_calls, stall.silent_ms), (2, None));
    }

    #[test]
    fn answered_requests_and_long_streams_are_not_waiting() {
        // A request answered (its body streams on for minutes): in flight, nothing new
        // started since the answer.
        let mut t = Tracker::new(&at(0, 0, 0, 0));
        assert_eq!(t.observe(&at(1, 900, 1, 1), LIMITS), None);
        for s in 2..100 {
            assert_eq!(t.observe(&at(s, 900, 1, 1), LIMITS), None, "t={s}");
        }
        // Requests that keep being answered are progress.
        for s in 100..120 {
            assert_eq!(t.observe(&at(s, s * 1000 - 10, s, 2), LIMITS), None);
        }
        // Requests started and gone (the client gave up) with none in flight: no stall.
        for s in 120..140 {
            assert_eq!(t.observe(&at(s, 119_000, 150, 0), LIMITS), None);
        }
    }

    #[test]
    fn tcp_bytes_sent_without_answer_stall_after_the_tcp_threshold() {
        let mut t = Tracker::new(&at(0, 100, 1, 1));
        let tcp = |now_s: u64, unanswered_ms: u64| Sample {
            unanswered_ms,
            ..at(now_s, 100, 1, 1)
        };
        // An idle stream: nothing waits for an answer.
        assert_eq!(t.observe(&tcp(1, 0), LIMITS), None);
        assert_eq!(t.observe(&tcp(30, 0), LIMITS), None);
        // Bytes sent, nothing back.
        assert_eq!(t.observe(&tcp(31, 30_500), LIMITS), None);
        assert_eq!(t.observe(&tcp(50, 30_500), LIMITS), None);
        let Some(Change::Stalled(stall)) = t.observe(&tcp(51, 30_500), LIMITS) else {
            panic!("no stall");
        };
        assert_eq!(stall.waiting_ms, 20_500);
        assert_eq!((stall.waiting_calls, stall.waiting_streams), (0, Some(1)));
        assert!(stall.describe().contains("1 open TCP stream sent bytes"));
    }

    #[test]
    fn thresholds_follow_the_policy_timeouts() {
        let config = crate::config::UpstreamConfig::new("u", Vec::new());
        let mut policy = malla_core::Policy::default();
        let of = |p: &malla_core::Policy| {
            thresholds(&Resilience::compile(
                p.clone(),
                crate::resilience::PolicySource::Defaults,
                &config,
            ))
        };
        assert_eq!(
            of(&policy),
            Thresholds {
                http: Duration::from_millis(7500),
                tcp: Duration::from_secs(30)
            }
        );
        policy.timeouts.per_try = Some(Duration::from_secs(1));
        assert_eq!(
            of(&policy),
            Thresholds {
                http: Duration::from_secs(1),
                tcp: Duration::from_secs(4)
            }
        );
        policy.timeouts.per_try = Some(Duration::from_secs(60));
        policy.timeouts.request = Duration::ZERO;
        assert_eq!(of(&policy).http, Duration::from_secs(10));
        policy.timeouts.request = Duration::from_secs(4);
        assert_eq!(of(&policy).http, Duration::from_secs(2));
    }
}
