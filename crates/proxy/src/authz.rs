//! Authorization at this sidecar's inbound side: the policy of its own service in force,
//! and the one decision the inbound data path asks for, per request (HTTP/1, HTTP/2,
//! gRPC) or per connection (TCP): [`Authorizer::check`].
//!
//! The destination decides: a policy says who may call a service, so the sidecars of that
//! service hold it, following it from the control plane ([`crate::discovery`], only when
//! the sidecar registers a service). A caller's sidecar could not be trusted to decide for
//! the callee anyway.
//!
//! # State
//!
//! The compiled policy sits in an `ArcSwap`: the data path reads it without a lock, the
//! watch swaps a new one in whole, and a request already deciding keeps the one it loaded.
//! Without a policy (none written yet, or deleted) everything is allowed, the documented
//! default: a mesh that has not written a policy behaves as before authorization existed.
//! A policy the sidecar cannot use is refused by the watch and the one in force stays.
//!
//! # mTLS mode
//!
//! The same watch brings the mesh's mTLS mode with every policy; the authorizer holds it
//! (an atomic) beside the policy, and [`Authorizer::mtls`] gives the inbound side the mode
//! the control plane puts in force: the policy's `mtls` if it sets one, else the mesh's;
//! `None` before the control plane's first answer ([`crate::inbound`] decides what that
//! means, and what wins over it).
//!
//! # Reporting
//!
//! While a policy is in force every decision is counted,
//! `malla_proxy_inbound_authz_decisions_total{decision, source, protocol}`, `decision`
//! being `allow`, `deny` or `audit_deny` (audit mode: it would deny, it lets through). The
//! `source` label is the caller's SPIFFE ID: only certificates of the mesh's CA prove one,
//! and the CA issues one identity per service, so the label takes at most one value per
//! service in the mesh, plus `unauthenticated` for plaintext callers. As a safety net
//! against a CA that issues more than that, past [`MAX_SOURCES`] identities the rest are
//! counted as `other`. A denial (enforced or audited) is logged at info with the caller,
//! the method and path or the gRPC method, the rule and the policy version; at most
//! [`DENIAL_LOGS_PER_SECOND`] lines a second, so a flood of denied calls cannot flood the
//! log, the next line counting the ones left out.

pub mod invariants;
mod request;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering},
        Arc, OnceLock,
    },
};

use arc_swap::{ArcSwap, ArcSwapOption};
use malla_core::{
    authz::{Action, CompiledPolicy, PeerMtls, Request, L7},
    ServiceName, SpiffeId,
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde_json::json;
use tracing::info;

pub use self::request::{is_grpc, normalize_path, Call, HttpVersion, Inbound, Protocol};
use crate::{
    config::MtlsSource,
    metrics::{AuthzDecisionLabels, Metrics},
};

/// Callers counted under their own `source` label; past this, `other`.
pub const MAX_SOURCES: usize = 1024;
/// Denials logged a second at most.
pub const DENIAL_LOGS_PER_SECOND: u32 = 10;

/// What a check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    Deny,
    /// The policy would deny, but it is in audit mode: let through, logged and counted.
    AuditDeny,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Allow, Outcome::Deny, Outcome::AuditDeny];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::AuditDeny => "audit_deny",
        }
    }
}

/// What decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// No policy is in force: everything is allowed.
    NoPolicy,
    /// No rule matched: the policy's `default`.
    Default,
    /// This rule (its index in the policy's `rule` list).
    Rule(usize),
}

/// The answer to one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub by: DecidedBy,
    /// The version of the policy that decided; `None` without a policy.
    pub version: Option<u64>,
}

impl Verdict {
    /// The verdict without a policy (also what to use where there is no [`Authorizer`]).
    pub const NO_POLICY: Verdict = Verdict {
        outcome: Outcome::Allow,
        by: DecidedBy::NoPolicy,
        version: None,
    };

    /// Whether the call goes through (allowed, or denied in audit mode only).
    pub fn allowed(&self) -> bool {
        self.outcome != Outcome::Deny
    }

    /// Whether the policy would have denied, in audit mode.
    pub fn audit(&self) -> bool {
        self.outcome == Outcome::AuditDeny
    }
}

/// `denied by rule[2] of authorization policy version 14`, for logs and error bodies.
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.outcome {
            Outcome::Allow => "allowed",
            Outcome::Deny => "denied",
            Outcome::AuditDeny => "would be denied (audit)",
        };
        match (self.by, self.version) {
            (DecidedBy::Rule(i), Some(v)) => {
                write!(f, "{what} by rule[{i}] of authorization policy version {v}")
            }
            (_, Some(v)) => write!(
                f,
                "{what} by the default of authorization policy version {v}"
            ),
            _ => write!(f, "{what}: no authorization policy"),
        }
    }
}

struct InForce {
    version: u64,
    policy: CompiledPolicy,
}

/// This sidecar's authorization state, shared by every worker. Get it from the proxy's
/// shared state: `shared.discovery.as_deref().and_then(|d| d.authorizer())` (`None`: the
/// sidecar registers no service, so no policy can apply: allow everything).
pub struct Authorizer {
    service: ServiceName,
    in_force: ArcSwapOption<InForce>,
    /// The mesh's mTLS mode the control plane last sent: [`NO_ANSWER`] until its first
    /// answer, then [`mesh_code`] of it.
    mesh_mtls: AtomicU8,
    counters: Counters,
    denial_logs: LogBudget,
}

/// [`Authorizer::mesh_mtls`] before the control plane has answered.
const NO_ANSWER: u8 = 0;

fn mesh_code(mode: PeerMtls) -> u8 {
    match mode {
        PeerMtls::Permissive => 1,
        PeerMtls::Strict => 2,
    }
}

impl Authorizer {
    pub fn new(service: ServiceName, metrics: &Metrics) -> Self {
        Authorizer {
            service,
            in_force: ArcSwapOption::empty(),
            mesh_mtls: AtomicU8::new(NO_ANSWER),
            counters: Counters::new(metrics.authz_decisions()),
            denial_logs: LogBudget::default(),
        }
    }

    /// The mTLS mode the control plane puts in force for this service, and from where: the
    /// policy's `mtls` ([`MtlsSource::Service`]), else the mesh's ([`MtlsSource::Mesh`]).
    /// `None` before the control plane's first answer. Lock-free: read per connection.
    pub fn mtls(&self) -> Option<(PeerMtls, MtlsSource)> {
        if let Some(mode) = self
            .in_force
            .load()
            .as_deref()
            .and_then(|f| f.policy.policy().mtls)
        {
            return Some((mode, MtlsSource::Service));
        }
        self.mesh_mtls().map(|mode| (mode, MtlsSource::Mesh))
    }

    /// Puts the mesh's mTLS mode in force, as the control plane said it (with every
    /// policy state, and before the policy it came with).
    pub fn set_mesh_mtls(&self, mode: PeerMtls) {
        self.mesh_mtls.store(mesh_code(mode), Ordering::Release);
    }

    /// The mesh's mTLS mode the control plane last said, if it has answered.
    pub fn mesh_mtls(&self) -> Option<PeerMtls> {
        match self.mesh_mtls.load(Ordering::Acquire) {
            1 => Some(PeerMtls::Permissive),
            2 => Some(PeerMtls::Strict),
            _ => None,
        }
    }

    /// The service whose inbound calls this decides.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// Decides one call; counts it and logs a denial (see the module's notes). Lock-free
    /// but for the first call of a new caller identity.
    pub fn check(&self, call: &Inbound<'_>) -> Verdict {
        let guard = self.in_force.load();
        let Some(in_force) = guard.as_deref() else {
            return Verdict::NO_POLICY;
        };
        let path;
        let l7 = match call.call {
            Call::Http {
                method,
                target,
                grpc,
                ..
            } => {
                path = normalize_path(target);
                Some(L7 {
                    method,
                    path: &path,
                    grpc,
                })
            }
            Call::Tcp => None,
        };
        let decision = in_force.policy.decide(&Request {
            source: call.source,
            port: call.port,
            l7,
        });
        let outcome = match (decision.action, decision.enforced) {
            (Action::Allow, _) => Outcome::Allow,
            (Action::Deny, true) => Outcome::Deny,
            (Action::Deny, false) => Outcome::AuditDeny,
        };
        let verdict = Verdict {
            outcome,
            by: decision.rule.map_or(DecidedBy::Default, DecidedBy::Rule),
            version: Some(in_force.version),
        };
        let protocol = call.protocol();
        self.counters.count(outcome, call.source, protocol);
        if outcome != Outcome::Allow {
            if let Some(left_out) = self.denial_logs.admit() {
                log_denial(call, l7.as_ref(), protocol, &verdict, left_out);
            }
        }
        verdict
    }

    /// Puts a policy in force (`None`: none, allow everything), as version `version`. The
    /// watch calls it with each state from the control plane; tests may too.
    pub fn set(&self, version: u64, policy: Option<CompiledPolicy>) {
        self.in_force
            .store(policy.map(|policy| Arc::new(InForce { version, policy })));
    }

    /// The version of the policy in force, if any.
    pub fn version(&self) -> Option<u64> {
        self.in_force.load().as_ref().map(|f| f.version)
    }

    /// The policy in force for `/config`: version, mode, default, how many rules.
    pub fn to_json(&self) -> serde_json::Value {
        let in_force = self.in_force.load();
        let policy = in_force.as_deref().map(|f| {
            let p = f.policy.policy();
            let mut policy = json!({
                "version": f.version,
                "mode": p.mode.as_str(),
                "default": p.default.as_str(),
                "rules": p.rules.len(),
            });
            // Only when set, as in the policy itself (the mode in force is `inbound_mtls`).
            if let Some(mtls) = p.mtls {
                policy["mtls"] = json!(mtls.as_str());
            }
            policy
        });
        json!({"service": self.service, "policy": policy})
    }
}

fn log_denial(
    call: &Inbound<'_>,
    l7: Option<&L7<'_>>,
    protocol: Protocol,
    verdict: &Verdict,
    left_out: u64,
) {
    let caller = call
        .source
        .map_or_else(|| "unauthenticated".to_string(), ToString::to_string);
    let rule = match verdict.by {
        DecidedBy::Rule(i) => format!("rule[{i}]"),
        _ => "default".to_string(),
    };
    let (method, path) = match l7 {
        Some(l7) if l7.grpc => ("", l7.path.trim_start_matches('/')),
        Some(l7) => (l7.method, l7.path),
        None => ("", ""),
    };
    let version = verdict.version.unwrap_or(0);
    let port = call.port;
    let protocol = protocol.as_str();
    if verdict.audit() {
        info!(%caller, protocol, port, method, path, rule, version, left_out, "authorization would deny this call (audit mode: let through)");
    } else {
        info!(%caller, protocol, port, method, path, rule, version, left_out, "authorization denied a call");
    }
}

/// The decision counters of one caller, created on first use so that only the decisions
/// that happened show.
struct SourceCounters {
    label: String,
    cells: [OnceLock<Counter>; Outcome::ALL.len() * Protocol::ALL.len()],
}

impl SourceCounters {
    fn new(label: String) -> Self {
        SourceCounters {
            label,
            cells: Default::default(),
        }
    }

    fn inc(&self, family: &Family<AuthzDecisionLabels, Counter>, o: Outcome, p: Protocol) {
        let o_index = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0);
        let p_index = Protocol::ALL.iter().position(|x| *x == p).unwrap_or(0);
        self.cells[o_index * Protocol::ALL.len() + p_index]
            .get_or_init(|| {
                family
                    .get_or_create(&AuthzDecisionLabels {
                        decision: o.as_str(),
                        source: self.label.clone(),
                        protocol: p.as_str(),
                    })
                    .clone()
            })
            .inc();
    }
}

/// The handles of every caller seen, read lock-free: a new caller copies the map (rare:
/// callers are services).
struct Counters {
    family: Family<AuthzDecisionLabels, Counter>,
    unauthenticated: SourceCounters,
    other: SourceCounters,
    by_source: ArcSwap<HashMap<SpiffeId, Arc<SourceCounters>>>,
}

impl Counters {
    fn new(family: Family<AuthzDecisionLabels, Counter>) -> Self {
        Counters {
            family,
            unauthenticated: SourceCounters::new("unauthenticated".into()),
            other: SourceCounters::new("other".into()),
            by_source: ArcSwap::default(),
        }
    }

    fn count(&self, outcome: Outcome, source: Option<&SpiffeId>, protocol: Protocol) {
        let Some(id) = source else {
            self.unauthenticated.inc(&self.family, outcome, protocol);
            return;
        };
        if let Some(counters) = self.by_source.load().get(id) {
            counters.inc(&self.family, outcome, protocol);
            return;
        }
        let mut known = None;
        self.by_source.rcu(|map| {
            if map.contains_key(id) || map.len() >= MAX_SOURCES {
                known = map.get(id).cloned();
                return Arc::clone(map);
            }
            let counters = Arc::new(SourceCounters::new(id.to_string()));
            known = Some(counters.clone());
            let mut next = HashMap::clone(map);
            next.insert(id.clone(), counters);
            Arc::new(next)
        });
        match known {
            Some(counters) => counters.inc(&self.family, outcome, protocol),
            None => self.other.inc(&self.family, outcome, protocol),
        }
    }
}

/// At most [`DENIAL_LOGS_PER_SECOND`] lines a second; approximate under races, which is
/// all a log budget needs.
struct LogBudget {
    start: tokio::time::Instant,
    /// The second (since `start`) the count is for.
    second: AtomicU64,
    used: AtomicU32,
    left_out: AtomicU64,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget {
            start: tokio::time::Instant::now(),
            second: AtomicU64::new(0),
            used: AtomicU32::new(0),
            left_out: AtomicU64::new(0),
        }
    }
}

impl LogBudget {
    /// `Some(lines left out since the last one)` when a line may be written now.
    fn admit(&self) -> Option<u64> {
        let now = self.start.elapsed().as_secs();
        if self.second.load(Ordering::Relaxed) != now
            && self.second.swap(now, Ordering::Relaxed) != now
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < DENIAL_LOGS_PER_SECOND {
            Some(self.left_out.swap(0, Ordering::Relaxed))
        } else {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}
