//! Resilience policy: how callers of a service time out, retry, break circuits, limit,
//! fail over and inject faults.
//!
//! A [`Policy`] is a resource: written in TOML (`[[policy]]` tables, see [`document`]),
//! applied with `malla apply -f`, stored and versioned by the control plane and streamed to
//! every sidecar that calls the service. A sidecar's own `[upstream.policy]` table uses the
//! same schema without `service`. Every field has a default, and the defaults are meant to
//! be safe and useful on their own: consecutive-failure ejection on, idempotent requests
//! retried within a budget, bounded timeouts (`docs/resilience.md` lists them).
//!
//! Values are checked while they are read (so a TOML error points at the value), and
//! [`Policy::validate`] checks what spans fields (a base above its maximum). The types
//! do not refuse fields they do not know: each reader decides what one means (an error in
//! an operator's document, a field from a newer control plane at a sidecar), told by
//! [`unknown::deserialize`].

pub mod condition;
pub mod document;
pub mod unknown;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use condition::{Conditions, Outcome};

use crate::{duration, selector::Selector, service::is_dns_label};

/// The response header a sidecar adds when the failure it returns is not its own
/// instance's but an upstream's further along (no endpoints, upstream refused or reset):
/// a caller's outlier detector must not eject a healthy instance that only relayed it.
/// Its value names the upstream that failed.
pub const RELAYED_FAILURE_HEADER: &str = "malla-relayed-failure";
/// The remaining time budget of a plain HTTP request, in milliseconds; each hop lowers it
/// by the time it spent, and gRPC's `grpc-timeout` is honoured and lowered the same way.
pub const TIMEOUT_HEADER: &str = "malla-timeout-ms";
/// Names the service limit or rate limit that rejected a request.
pub const LIMIT_HEADER: &str = "malla-limit";
/// The most `retries.max_replay_bytes` may be: 1 MiB. A sidecar holds up to that much of
/// every request that may be retried (an HTTP/1 `Content-Length` body is read in full
/// first), so the bound caps what a policy can make it hold: with the default
/// `limits.max_requests` (4096) in flight, at most 4 GiB in the worst case, and 256 MiB at
/// the default of 64 KiB. It is Envoy's default buffer limit (`per_connection_buffer_limit_bytes`,
/// which `per_request_buffer_limit_bytes` falls back to, 1 MiB): above it Envoy does not
/// retry either. Larger bodies (uploads) are better not replayed by a proxy at all.
pub const MAX_REPLAY_BYTES: u64 = 1024 * 1024;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Policy {
    /// The service whose callers follow this policy (required in a resource, absent in a
    /// sidecar's `[upstream.policy]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default)]
    pub outlier: Outlier,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, rename = "rate_limit", skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimit>,
    #[serde(default, rename = "fault", skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub failover: Failover,
}

/// Whether a breaker, limit or rate limit acts, or only counts what it would have done.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    /// Count and report (metrics, events) without acting: for tuning before enforcing.
    Audit,
}

impl Mode {
    pub fn enforces(self) -> bool {
        self == Mode::Enforce
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Timeouts {
    /// TCP connect to an endpoint; default: the upstream's `connect_timeout` (1s).
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub connect: Option<Duration>,
    /// One attempt's wait for the response head after its request was sent; default: the
    /// upstream's `response_timeout` (15s).
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try: Option<Duration>,
    /// The whole call, every attempt and backoff included, until the response head,
    /// counted from when the request has been received (for a body still streaming, from
    /// its end); default 15s, Envoy's route timeout. `0s`: no bound beyond the per-try
    /// timeouts. An incoming `grpc-timeout` or `malla-timeout-ms` lowers it, never raises
    /// it.
    #[serde(default = "defaults::request_timeout", with = "duration")]
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: None,
            per_try: None,
            request: defaults::request_timeout(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Retries {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Tries in all, the first included (1 to 10).
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// What deserves another try. A request that never reached an endpoint (connect
    /// failure) is retried whatever its method; the others only when idempotent, unless
    /// `non_idempotent`. gRPC calls are retried on the gRPC statuses listed, as gRPC's own
    /// retry policy does.
    #[serde(default = "defaults::retry_on")]
    pub on: Conditions,
    /// Retry non-idempotent methods (POST, PATCH, ...) on the listed conditions too.
    #[serde(default)]
    pub non_idempotent: bool,
    /// Backoff before retry n: a random time up to `min(backoff_max, backoff_base × 2^n)`.
    #[serde(default = "defaults::backoff_base", with = "duration")]
    pub backoff_base: Duration,
    #[serde(default = "defaults::backoff_max", with = "duration")]
    pub backoff_max: Duration,
    /// Retries may add at most this fraction of the requests of the last `budget_window`…
    #[serde(default = "defaults::budget_ratio")]
    pub budget_ratio: f64,
    /// …plus this many retries per second, so that a quiet service can still retry.
    #[serde(default = "defaults::budget_min_per_second")]
    pub budget_min_per_second: u32,
    #[serde(default = "defaults::budget_window", with = "duration")]
    pub budget_window: Duration,
    /// Request bodies up to this size are kept so that they can be sent again; a larger
    /// body makes its request ineligible for retries after its first byte left.
    #[serde(default = "defaults::max_replay_bytes")]
    pub max_replay_bytes: u64,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            enabled: true,
            max_attempts: defaults::max_attempts(),
            on: defaults::retry_on(),
            non_idempotent: false,
            backoff_base: defaults::backoff_base(),
            backoff_max: defaults::backoff_max(),
            budget_ratio: defaults::budget_ratio(),
            budget_min_per_second: defaults::budget_min_per_second(),
            budget_window: defaults::budget_window(),
            max_replay_bytes: defaults::max_replay_bytes(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Outlier {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    #[serde(default)]
    pub mode: Mode,
    /// Eject an endpoint after this many failures in a row (0: never on this ground).
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// What counts as a failure of the endpoint.
    #[serde(default = "defaults::failure_on")]
    pub failure_on: Conditions,
    /// The first ejection lasts this long; each ejection in a row doubles it, up to
    /// `max_ejection_time`.
    #[serde(default = "defaults::base_ejection_time", with = "duration")]
    pub base_ejection_time: Duration,
    #[serde(default = "defaults::max_ejection_time", with = "duration")]
    pub max_ejection_time: Duration,
    /// At most this share of the endpoints is ejected at once (at least one is always
    /// allowed), so the breaker never empties a service.
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: Percent,
    /// How often success rates and latencies are compared across endpoints.
    #[serde(default = "defaults::interval", with = "duration")]
    pub interval: Duration,
    #[serde(default)]
    pub success_rate: SuccessRate,
    #[serde(default)]
    pub latency: LatencyOutlier,
    /// When fewer than this share of endpoints is available, balance over all of them:
    /// a service that ejected most of itself is more likely sick as a whole.
    #[serde(default = "defaults::panic_threshold")]
    pub panic_threshold: Percent,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            enabled: true,
            mode: Mode::Enforce,
            consecutive_failures: defaults::consecutive_failures(),
            failure_on: defaults::failure_on(),
            base_ejection_time: defaults::base_ejection_time(),
            max_ejection_time: defaults::max_ejection_time(),
            max_ejection_percent: defaults::max_ejection_percent(),
            interval: defaults::interval(),
            success_rate: SuccessRate::default(),
            latency: LatencyOutlier::default(),
            panic_threshold: defaults::panic_threshold(),
        }
    }
}

/// Ejects an endpoint whose success rate over the last interval is below
/// `mean - stdev_factor × stdev` of its peers' (Envoy's success-rate detector).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct SuccessRate {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Endpoints with at least `min_requests` in the interval needed for a comparison.
    #[serde(default = "defaults::min_hosts")]
    pub min_hosts: u32,
    #[serde(default = "defaults::min_requests")]
    pub min_requests: u32,
    #[serde(default = "defaults::stdev_factor")]
    pub stdev_factor: f64,
}

impl Default for SuccessRate {
    fn default() -> Self {
        SuccessRate {
            enabled: true,
            min_hosts: defaults::min_hosts(),
            min_requests: defaults::min_requests(),
            stdev_factor: defaults::stdev_factor(),
        }
    }
}

/// Ejects an endpoint whose mean latency over the last interval is more than `factor`
/// times the median of its peers' (off by default: P2C-EWMA already steers load away
/// from slow endpoints; this takes them out entirely).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct LatencyOutlier {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "defaults::latency_factor")]
    pub factor: f64,
    #[serde(default = "defaults::min_hosts")]
    pub min_hosts: u32,
    #[serde(default = "defaults::min_requests")]
    pub min_requests: u32,
}

impl Default for LatencyOutlier {
    fn default() -> Self {
        LatencyOutlier {
            enabled: false,
            factor: defaults::latency_factor(),
            min_hosts: defaults::min_hosts(),
            min_requests: defaults::min_requests(),
        }
    }
}

/// Per-upstream service limits: over one, a call fails fast with 503 and `malla-limit`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Limits {
    #[serde(default)]
    pub mode: Mode,
    /// Open connections to all endpoints of the upstream.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    /// Requests waiting for a connection or an HTTP/2 stream slot.
    #[serde(default = "defaults::max_pending")]
    pub max_pending_requests: u32,
    /// Requests in flight.
    #[serde(default = "defaults::max_requests")]
    pub max_requests: u32,
    /// Retries in flight (on top of the retry budget).
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            mode: Mode::Enforce,
            max_connections: defaults::max_connections(),
            max_pending_requests: defaults::max_pending(),
            max_requests: defaults::max_requests(),
            max_retries: defaults::max_retries(),
        }
    }
}

/// A local token bucket: over the rate, calls get 429 with `retry-after`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct RateLimit {
    /// Only requests whose path starts with this (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    pub requests_per_second: f64,
    /// Requests allowed in a burst above the rate (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default)]
    pub mode: Mode,
}

/// Chaos: delay or abort a share of the calls.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub delay_percent: Percent,
    #[serde(default, with = "duration")]
    pub delay: Duration,
    #[serde(default)]
    pub abort_percent: Percent,
    /// The status of an aborted call (gRPC callers get the matching `grpc-status`).
    #[serde(default = "defaults::abort_status")]
    pub abort_status: u16,
}

/// Locality and priority aware endpoint selection.
///
/// Each endpoint gets a priority level from how far it is from this sidecar: the labels in
/// `locality` are compared broadest first (`region`, then `zone`), and each one that
/// differs moves the endpoint one level down; endpoints that do not match `prefer` come
/// after all of those that do. Traffic goes to the best level while enough of it is
/// available and spills over proportionally when not: a level with a share `h` of its
/// endpoints available takes `min(1, h × overprovisioning_factor)` of what reaches it
/// (Envoy's priority levels).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Failover {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    #[serde(default = "defaults::locality")]
    pub locality: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer: Option<Selector>,
    #[serde(default = "defaults::overprovisioning_factor")]
    pub overprovisioning_factor: f64,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            enabled: true,
            locality: defaults::locality(),
            prefer: None,
            overprovisioning_factor: defaults::overprovisioning_factor(),
        }
    }
}

/// A percentage, 0 to 100.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, PartialOrd)]
pub struct Percent(f64);

impl Percent {
    pub fn new(value: f64) -> Result<Self, String> {
        if (0.0..=100.0).contains(&value) {
            Ok(Percent(value))
        } else {
            Err(format!("{value} is not a percentage between 0 and 100"))
        }
    }

    pub fn value(self) -> f64 {
        self.0
    }

    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Percent::new(f64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A problem [`Policy::validate`] found: the dotted field path and what is wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl Policy {
    /// Checks what spans fields or bounds a number; every problem, not only the first.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, field: &str, message: String| {
            if !ok {
                errors.push(FieldError {
                    field: field.to_string(),
                    message,
                });
            }
        };
        if let Some(service) = &self.service {
            check(
                is_dns_label(service),
                "service",
                format!("{service:?} is not a service name: use 1-63 lowercase letters, digits and '-', starting with a letter"),
            );
        }
        let r = &self.retries;
        check(
            (1..=10).contains(&r.max_attempts),
            "retries.max_attempts",
            format!("{} is not between 1 and 10", r.max_attempts),
        );
        check(
            r.backoff_base <= r.backoff_max,
            "retries.backoff_base",
            format!(
                "{} is above retries.backoff_max ({})",
                humantime::format_duration(r.backoff_base),
                humantime::format_duration(r.backoff_max)
            ),
        );
        check(
            (0.0..=10.0).contains(&r.budget_ratio),
            "retries.budget_ratio",
            format!(
                "{} is not between 0 and 10 (0.2 lets retries add 20% to the load)",
                r.budget_ratio
            ),
        );
        check(
            r.max_replay_bytes <= MAX_REPLAY_BYTES,
            "retries.max_replay_bytes",
            format!(
                "{} is above {MAX_REPLAY_BYTES} (1 MiB), the most a sidecar keeps of a request to send it again",
                r.max_replay_bytes
            ),
        );
        check(
            !r.budget_window.is_zero(),
            "retries.budget_window",
            "must be longer than 0s".into(),
        );
        let o = &self.outlier;
        check(
            !o.base_ejection_time.is_zero(),
            "outlier.base_ejection_time",
            "must be longer than 0s".into(),
        );
        check(
            o.base_ejection_time <= o.max_ejection_time,
            "outlier.base_ejection_time",
            format!(
                "{} is above outlier.max_ejection_time ({})",
                humantime::format_duration(o.base_ejection_time),
                humantime::format_duration(o.max_ejection_time)
            ),
        );
        check(
            !o.interval.is_zero(),
            "outlier.interval",
            "must be longer than 0s".into(),
        );
        check(
            o.success_rate.stdev_factor > 0.0,
            "outlier.success_rate.stdev_factor",
            format!(
                "{} must be above 0 (1.9 is usual)",
                o.success_rate.stdev_factor
            ),
        );
        check(
            o.latency.factor > 1.0,
            "outlier.latency.factor",
            format!(
                "{} must be above 1 (3 ejects endpoints three times slower than the median)",
                o.latency.factor
            ),
        );
        for (i, limit) in self.rate_limits.iter().enumerate() {
            check(
                limit.requests_per_second > 0.0 && limit.requests_per_second.is_finite(),
                &format!("rate_limit[{i}].requests_per_second"),
                format!("{} must be above 0", limit.requests_per_second),
            );
            check(
                limit.burst != Some(0),
                &format!("rate_limit[{i}].burst"),
                "must be at least 1".into(),
            );
            if let Some(prefix) = &limit.path_prefix {
                check(
                    prefix.starts_with('/'),
                    &format!("rate_limit[{i}].path_prefix"),
                    format!("{prefix:?} must start with '/'"),
                );
            }
        }
        for (i, fault) in self.faults.iter().enumerate() {
            check(
                (200..=599).contains(&fault.abort_status),
                &format!("fault[{i}].abort_status"),
                format!("{} is not between 200 and 599", fault.abort_status),
            );
            check(
                fault.delay_percent.value() == 0.0 || !fault.delay.is_zero(),
                &format!("fault[{i}].delay"),
                "delay_percent is set but delay is 0s".into(),
            );
            if let Some(prefix) = &fault.path_prefix {
                check(
                    prefix.starts_with('/'),
                    &format!("fault[{i}].path_prefix"),
                    format!("{prefix:?} must start with '/'"),
                );
            }
        }
        let f = &self.failover;
        check(
            f.overprovisioning_factor >= 1.0 && f.overprovisioning_factor <= 10.0,
            "failover.overprovisioning_factor",
            format!(
                "{} is not between 1 and 10 (1.4 is usual)",
                f.overprovisioning_factor
            ),
        );
        for (i, key) in f.locality.iter().enumerate() {
            check(
                crate::labels::validate_key(key).is_ok(),
                &format!("failover.locality[{i}]"),
                format!("{key:?} is not a label key"),
            );
        }
        errors
    }
}

/// Defaults, one function per field so serde and the docs agree.
pub mod defaults {
    use std::time::Duration;

    use super::{Conditions, Percent};

    pub fn yes() -> bool {
        true
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(15)
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn retry_on() -> Conditions {
        Conditions::parse(&[
            "connect-failure",
            "reset",
            "timeout",
            "5xx",
            "grpc-unavailable",
        ])
        .unwrap_or_default()
    }
    pub fn backoff_base() -> Duration {
        Duration::from_millis(25)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_millis(250)
    }
    pub fn budget_ratio() -> f64 {
        0.2
    }
    pub fn budget_min_per_second() -> u32 {
        10
    }
    pub fn budget_window() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_replay_bytes() -> u64 {
        64 * 1024
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn failure_on() -> Conditions {
        Conditions::parse(&[
            "connect-failure",
            "reset",
            "timeout",
            "5xx",
            "grpc-unavailable",
            "grpc-internal",
            "grpc-unknown",
            "grpc-data-loss",
        ])
        .unwrap_or_default()
    }
    pub fn base_ejection_time() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_ejection_time() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_ejection_percent() -> Percent {
        Percent(50.0)
    }
    pub fn interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn min_hosts() -> u32 {
        3
    }
    pub fn min_requests() -> u32 {
        20
    }
    pub fn stdev_factor() -> f64 {
        1.9
    }
    pub fn latency_factor() -> f64 {
        3.0
    }
    pub fn panic_threshold() -> Percent {
        Percent(50.0)
    }
    pub fn max_connections() -> u32 {
        4096
    }
    pub fn max_pending() -> u32 {
        1024
    }
    pub fn max_requests() -> u32 {
        4096
    }
    pub fn max_retries() -> u32 {
        256
    }
    pub fn abort_status() -> u16 {
        503
    }
    pub fn locality() -> Vec<String> {
        vec!["region".to_string(), "zone".to_string()]
    }
    pub fn overprovisioning_factor() -> f64 {
        1.4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_policy_is_the_documented_defaults() {
        let p: Policy = toml::from_str("").unwrap();
        assert!(p.retries.enabled && p.outlier.enabled);
        assert_eq!(p.retries.max_attempts, 3);
        assert!(p.retries.on.matches(Outcome::Status(500)));
        assert!(p.retries.on.matches(Outcome::Grpc(14)));
        assert_eq!(p.outlier.consecutive_failures, 5);
        assert!(p.validate().is_empty());
    }

    #[test]
    fn policies_round_trip_through_json() {
        let p: Policy = toml::from_str(
            r#"
            service = "shipping-quote"
            [retries]
            on = ["5xx", "grpc-unavailable"]
            [[fault]]
            abort_percent = 10
            "#,
        )
        .unwrap();
        let json = serde_json::to_string(&p).unwrap();
        let back: Policy = serde_json::from_str(&json).unwrap();
        assert_eq!(p, back);
    }

    #[test]
    fn max_replay_bytes_is_bounded() {
        let with = |n: u64| {
            let mut p = Policy::default();
            p.retries.max_replay_bytes = n;
            p.validate()
        };
        assert!(with(0).is_empty());
        assert!(with(MAX_REPLAY_BYTES).is_empty());
        assert_eq!(
            with(MAX_REPLAY_BYTES + 1),
            [FieldError {
                field: "retries.max_replay_bytes".into(),
                message: "1048577 is above 1048576 (1 MiB), the most a sidecar keeps of a request to send it again".into(),
            }]
        );
        assert_eq!(with(u64::MAX).len(), 1);
    }

    #[test]
    fn validate_names_every_bad_field() {
        let p: Policy = toml::from_str(
            r#"
            service = "Bad_Name"
            [retries]
            max_attempts = 0
            backoff_base = "1s"
            backoff_max = "10ms"
            [outlier]
            base_ejection_time = "10m"
            max_ejection_time = "1m"
            "#,
        )
        .unwrap();
        let fields: Vec<_> = p.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "service",
                "retries.max_attempts",
                "retries.backoff_base",
                "outlier.base_ejection_time"
            ]
        );
    }
}
