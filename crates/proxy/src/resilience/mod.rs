//! Resilience: what keeps one instance's failure from becoming everyone's outage.
//!
//! An upstream runs on one [`Policy`] at a time (`malla_core::policy`): the control
//! plane's policy for its service when there is one, else the `[upstream.policy]` table of
//! the proxy's own configuration, else the documented defaults. A new policy is swapped in
//! whole, lock-free for readers, without touching connections or the state the policy
//! governs (ejections, budgets and limits keep counting across versions).
//!
//! The pieces, each in its own module, in the order a request meets them:
//!
//! ```text
//! deadline (grpc-timeout / malla-timeout-ms, request timeout) -> fault injection
//!   -> rate limit -> service limits -> pick (locality levels, outlier ejections, panic)
//!   -> attempt (per-try timeout) -> classify -> outlier detector
//!   -> retry? (conditions, idempotency, budget, backoff, replayable body)
//! ```
//!
//! Every state change is a metric and an [`events::Event`] for the control plane. Off the
//! request path, [`stall`] reports endpoints that leave calls waiting and answer nothing.

pub mod budget;
pub mod deadline;
pub mod events;
pub mod fault;
pub mod limits;
pub mod locality;
pub mod outlier;
pub mod rate;
pub mod stall;

use std::{sync::Arc, time::Duration};

use malla_core::policy::Policy;
use serde::Serialize;

use crate::config::UpstreamConfig;

/// Where the policy in force came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "source")]
pub enum PolicySource {
    Defaults,
    /// The `[upstream.policy]` table of this proxy's configuration.
    Local,
    /// The control plane's policy resource, at this version (store revision).
    ControlPlane {
        version: u64,
    },
}

/// A policy compiled for the hot path: what the request path reads per request.
#[derive(Debug)]
pub struct Resilience {
    pub policy: Policy,
    pub source: PolicySource,
    pub connect_timeout: Duration,
    pub per_try_timeout: Duration,
    /// Tries per request, the first included: 1 when retries are off.
    pub max_attempts: u32,
    pub rate_limits: Vec<rate::RateLimiter>,
    pub faults: Vec<fault::FaultRule>,
}

impl Resilience {
    pub fn compile(policy: Policy, source: PolicySource, upstream: &UpstreamConfig) -> Arc<Self> {
        Arc::new(Resilience {
            connect_timeout: policy.timeouts.connect.unwrap_or(upstream.connect_timeout),
            per_try_timeout: policy.timeouts.per_try.unwrap_or(upstream.response_timeout),
            max_attempts: if policy.retries.enabled {
                policy.retries.max_attempts.max(1)
            } else {
                1
            },
            rate_limits: policy
                .rate_limits
                .iter()
                .map(rate::RateLimiter::new)
                .collect(),
            faults: policy.faults.iter().map(fault::FaultRule::new).collect(),
            policy,
            source,
        })
    }

    /// The policy an upstream starts with: its local table, else the defaults.
    pub fn initial(upstream: &UpstreamConfig) -> Arc<Self> {
        match &upstream.policy {
            Some(p) => Self::compile(p.clone(), PolicySource::Local, upstream),
            None => Self::compile(Policy::default(), PolicySource::Defaults, upstream),
        }
    }
}
