//! Authorization policies: who may call a service, and what.
//!
//! One policy per destination service, applied like resilience policies (`malla apply -f`):
//!
//! ```toml
//! [[authorization]]
//! service = "payments"      # whose inbound traffic this decides
//! default = "deny"          # when no rule matches: "allow" (the default) or "deny"
//! mode = "enforce"          # or "audit": decide, log and count, let everything through
//! mtls = "strict"           # optional: plaintext callers refused (or "permissive");
//!                           # left out, the mesh's mode applies (`malla control --mtls-mode`)
//!
//! [[authorization.rule]]
//! action = "allow"
//! from = ["checkout"]       # services of this trust domain, SPIFFE IDs, or "*"
//! methods = ["POST"]
//! paths = ["/v1/charges", "/v1/refunds/*"]
//!
//! [[authorization.rule]]
//! action = "deny"
//! grpc = ["payments.v1.Admin/*"]
//! ```
//!
//! # Decision
//!
//! A **deny** rule that matches denies, whatever else matches (deny wins). Otherwise an
//! **allow** rule that matches allows. Otherwise the policy's `default` decides. A rule
//! matches when every condition it sets holds (an absent condition holds for everything);
//! within a condition, any listed value may match.
//!
//! - `from`: the caller's identity, proved by its mTLS certificate. A service name means
//!   `spiffe://TRUST_DOMAIN/svc/NAME` in this mesh's trust domain; a full SPIFFE ID matches
//!   itself; `*` matches any authenticated caller. A caller without an identity (plaintext,
//!   in permissive mode) matches only rules without `from`.
//! - `ports`: the destination port of the connection.
//! - `methods`: HTTP methods, exact and case-sensitive (`GET`).
//! - `paths`: the request path without its query; exact, or a prefix when it ends in `*`
//!   (`/v1/refunds/*` matches `/v1/refunds/7`; `/*` matches every path).
//! - `grpc`: `package.Service/Method`, `package.Service/*` (every method) or `*`; holds only
//!   for gRPC requests.
//!
//! TCP connections have no method, path or gRPC method: a rule that sets any of those never
//! *allows* TCP, but a deny rule still *denies* TCP when its other conditions hold (its HTTP
//! conditions are dropped, so that it errs on the side of denying, as Istio does).
//!
//! # mTLS mode
//!
//! `mtls` ([`PeerMtls`]) is not a rule: it says whether the service's sidecars take
//! plaintext callers at all (`permissive`, for migration) or only callers that prove an
//! identity with mTLS (`strict`), before any rule is read. Left out, the mesh's default
//! applies (`malla control --mtls-mode`, itself `permissive` by default); a sidecar's own
//! `[inbound] mtls` overrides both. `mode = "audit"` does not soften it: audit is about the
//! rules. See docs/identity.md.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{
    identity::{SpiffeId, TrustDomain},
    policy::{FieldError, Mode},
    ServiceName,
};

/// Most rules in one policy; more is a sign the policy should be split.
pub const MAX_RULES: usize = 256;
/// Most values in one condition.
pub const MAX_VALUES: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub service: String,
    #[serde(default)]
    pub default: Action,
    #[serde(default)]
    pub mode: Mode,
    /// Whether the service's sidecars refuse plaintext callers; `None`: the mesh's mode.
    /// Left out of the JSON when `None`, so that sidecars of earlier versions (which refuse
    /// a policy with a field they do not know) still read policies that do not set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// Whether a service's sidecars take plaintext callers: a service's `mtls` in its
/// authorization policy, or the mesh's default (`malla control --mtls-mode`).
///
/// `permissive` (the mesh's default, as in Istio, for migration): mTLS callers and
/// plaintext ones. `strict`: plaintext connections are closed; only callers that prove an
/// identity of the mesh get in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerMtls {
    #[default]
    Permissive,
    Strict,
}

impl PeerMtls {
    /// The values, as written.
    pub const VALUES: [&'static str; 2] = ["strict", "permissive"];

    pub fn as_str(self) -> &'static str {
        match self {
            PeerMtls::Permissive => "permissive",
            PeerMtls::Strict => "strict",
        }
    }

    /// Whether plaintext callers are refused.
    pub fn is_strict(self) -> bool {
        self == PeerMtls::Strict
    }
}

impl fmt::Display for PeerMtls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value that is not an mTLS mode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown mTLS mode {0:?}: use `strict` or `permissive`")]
pub struct UnknownPeerMtls(pub String);

impl std::str::FromStr for PeerMtls {
    type Err = UnknownPeerMtls;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(PeerMtls::Strict),
            "permissive" => Ok(PeerMtls::Permissive),
            _ => Err(UnknownPeerMtls(s.to_string())),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Vec<String>>,
}

impl Rule {
    fn has_l7(&self) -> bool {
        self.methods.is_some() || self.paths.is_some() || self.grpc.is_some()
    }
}

/// What a request (or a TCP connection) looks like to authorization.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The caller's proved identity; `None` when it proved none (plaintext).
    pub source: Option<&'a SpiffeId>,
    pub port: u16,
    pub l7: Option<L7<'a>>,
}

/// The HTTP part of a request; absent for TCP.
#[derive(Clone, Copy, Debug)]
pub struct L7<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// Whether it is a gRPC call (its path is then `/package.Service/Method`).
    pub grpc: bool,
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What the policy decides.
    pub action: Action,
    /// The rule that decided (its index), or `None` for the default.
    pub rule: Option<usize>,
    /// Whether the decision is enforced (`mode = "enforce"`); in audit mode a deny is
    /// reported and the request goes through.
    pub enforced: bool,
}

impl Decision {
    /// Whether the request goes through.
    pub fn lets_through(&self) -> bool {
        self.action == Action::Allow || !self.enforced
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some(i) => write!(f, "{} by rule[{i}]", self.action.as_str())?,
            None => write!(f, "{} by default", self.action.as_str())?,
        }
        if !self.enforced {
            f.write_str(" (audit)")?;
        }
        Ok(())
    }
}

/// A policy ready to decide: its `from` entries resolved against the trust domain.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    policy: AuthorizationPolicy,
    /// Per rule, its sources (`None`: no `from`).
    sources: Vec<Option<Vec<Source>>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Any,
    Id(SpiffeId),
}

impl AuthorizationPolicy {
    /// Every problem, with the field it is in (`rule[2].paths[0]`).
    pub fn validate(&self) -> Vec<FieldError> {
        let mut problems = Vec::new();
        let mut problem = |field: String, message: String| {
            problems.push(FieldError { field, message });
        };
        if let Err(e) = ServiceName::new(&self.service) {
            problem("service".into(), e.to_string());
        }
        if self.rules.len() > MAX_RULES {
            problem(
                "rule".into(),
                format!(
                    "{} rules; at most {MAX_RULES}: split the policy by caller or route",
                    self.rules.len()
                ),
            );
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let lists: [(&str, Option<usize>); 5] = [
                ("from", rule.from.as_ref().map(Vec::len)),
                ("ports", rule.ports.as_ref().map(Vec::len)),
                ("methods", rule.methods.as_ref().map(Vec::len)),
                ("paths", rule.paths.as_ref().map(Vec::len)),
                ("grpc", rule.grpc.as_ref().map(Vec::len)),
            ];
            for (name, len) in lists {
                match len {
                    Some(0) => problem(
                        format!("rule[{i}].{name}"),
                        "an empty list matches nothing: remove the condition to match everything, or list values".into(),
                    ),
                    Some(n) if n > MAX_VALUES => problem(
                        format!("rule[{i}].{name}"),
                        format!("{n} values; at most {MAX_VALUES}"),
                    ),
                    _ => {}
                }
            }
            for (j, from) in rule.from.iter().flatten().enumerate() {
                if let Err(why) = parse_source(from, None) {
                    problem(format!("rule[{i}].from[{j}]"), why);
                }
            }
            for (j, port) in rule.ports.iter().flatten().enumerate() {
                if *port == 0 {
                    problem(
                        format!("rule[{i}].ports[{j}]"),
                        "port 0 is no port: use 1-65535".into(),
                    );
                }
            }
            for (j, method) in rule.methods.iter().flatten().enumerate() {
                if method.is_empty()
                    || !method
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                {
                    problem(
                        format!("rule[{i}].methods[{j}]"),
                        format!("{method:?} is not an HTTP method (a token such as GET or POST)"),
                    );
                }
            }
            for (j, path) in rule.paths.iter().flatten().enumerate() {
                if let Err(why) = check_path(path) {
                    problem(format!("rule[{i}].paths[{j}]"), why);
                }
            }
            for (j, grpc) in rule.grpc.iter().flatten().enumerate() {
                if let Err(why) = check_grpc(grpc) {
                    problem(format!("rule[{i}].grpc[{j}]"), why);
                }
            }
        }
        problems
    }

    /// Resolves the policy for deciding in `domain`; it must have validated.
    pub fn compile(&self, domain: &TrustDomain) -> Result<CompiledPolicy, Vec<FieldError>> {
        let problems = self.validate();
        if !problems.is_empty() {
            return Err(problems);
        }
        let sources = self
            .rules
            .iter()
            .map(|rule| {
                rule.from.as_ref().map(|from| {
                    from.iter()
                        .filter_map(|f| parse_source(f, Some(domain)).ok())
                        .collect()
                })
            })
            .collect();
        Ok(CompiledPolicy {
            policy: self.clone(),
            sources,
        })
    }
}

fn parse_source(from: &str, domain: Option<&TrustDomain>) -> Result<Source, String> {
    if from == "*" {
        return Ok(Source::Any);
    }
    if from.starts_with("spiffe://") {
        return SpiffeId::parse(from)
            .map(Source::Id)
            .map_err(|e| e.to_string());
    }
    let service = ServiceName::new(from).map_err(|e| {
        format!("{e}; or write a full SPIFFE ID (spiffe://DOMAIN/svc/NAME), or \"*\" for any authenticated caller")
    })?;
    Ok(match domain {
        Some(domain) => Source::Id(SpiffeId::for_service(domain, &service)),
        // Validation only: any domain does.
        None => Source::Any,
    })
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!(
            "{path:?} must start with '/' (a prefix ends with '*': \"/v1/*\")"
        ));
    }
    if path.contains('?') || path.contains('#') {
        return Err(format!(
            "{path:?}: paths match without the query; remove '?...'"
        ));
    }
    // Not by byte: a path may end in any character (`/café`).
    if path.strip_suffix('*').unwrap_or(path).contains('*') {
        return Err(format!(
            "{path:?}: '*' may only end a path, as a prefix match"
        ));
    }
    Ok(())
}

fn check_grpc(grpc: &str) -> Result<(), String> {
    if grpc == "*" {
        return Ok(());
    }
    let ok = grpc.split_once('/').is_some_and(|(service, method)| {
        let ident = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        };
        ident(service) && (method == "*" || (ident(method) && !method.contains('.')))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{grpc:?}: write package.Service/Method, package.Service/* or *"
        ))
    }
}

impl CompiledPolicy {
    pub fn policy(&self) -> &AuthorizationPolicy {
        &self.policy
    }

    pub fn decide(&self, request: &Request<'_>) -> Decision {
        let enforced = self.policy.mode.enforces();
        let mut allowed_by = None;
        for (i, rule) in self.policy.rules.iter().enumerate() {
            let matches = self.matches(i, rule, request);
            match (rule.action, matches) {
                (Action::Deny, true) => {
                    return Decision {
                        action: Action::Deny,
                        rule: Some(i),
                        enforced,
                    }
                }
                (Action::Allow, true) if allowed_by.is_none() => allowed_by = Some(i),
                _ => {}
            }
        }
        match allowed_by {
            Some(i) => Decision {
                action: Action::Allow,
                rule: Some(i),
                enforced,
            },
            None => Decision {
                action: self.policy.default,
                rule: None,
                enforced,
            },
        }
    }

    fn matches(&self, i: usize, rule: &Rule, request: &Request<'_>) -> bool {
        if let Some(sources) = &self.sources[i] {
            let Some(source) = request.source else {
                return false;
            };
            if !sources.iter().any(|s| match s {
                Source::Any => true,
                Source::Id(id) => id == source,
            }) {
                return false;
            }
        }
        if let Some(ports) = &rule.ports {
            if !ports.contains(&request.port) {
                return false;
            }
        }
        let Some(l7) = request.l7 else {
            // TCP: an allow rule with HTTP conditions cannot hold; a deny rule's are dropped.
            return !rule.has_l7() || rule.action == Action::Deny;
        };
        if let Some(methods) = &rule.methods {
            if !methods.iter().any(|m| m == l7.method) {
                return false;
            }
        }
        if let Some(paths) = &rule.paths {
            if !paths.iter().any(|p| path_matches(p, l7.path)) {
                return false;
            }
        }
        if let Some(grpc) = &rule.grpc {
            if !l7.grpc || !grpc.iter().any(|g| grpc_matches(g, l7.path)) {
                return false;
            }
        }
        true
    }
}

fn path_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

/// `pattern` against a gRPC path `/package.Service/Method`.
fn grpc_matches(pattern: &str, path: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let Some(call) = path.strip_prefix('/') else {
        return false;
    };
    match pattern.strip_suffix("/*") {
        Some(service) => call
            .split_once('/')
            .is_some_and(|(s, m)| s == service && !m.is_empty() && !m.contains('/')),
        None => call == pattern,
    }
}

/// What must hold for any policy text: the checks behind the `authz_policy` fuzz target
/// (`fuzz/`) and an always-on test of mutated documents. Reading, validating, compiling
/// and deciding never panic; a decision names a rule that exists and whose action it is;
/// a compiled policy decides the same for the same request; a policy written back as TOML
/// (as `malla get authorization -o toml` does) reads back the same, its `mtls` included.
pub fn check_invariants(text: &[u8]) {
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(policy) = toml::from_str::<AuthorizationPolicy>(text) else {
        return;
    };
    let written = toml::to_string(&policy).expect("a policy read can be written back");
    let back: AuthorizationPolicy =
        toml::from_str(&written).expect("a policy written back can be read");
    assert_eq!(back, policy, "written back as\n{written}");
    if let Some(mtls) = policy.mtls {
        assert_eq!(
            mtls.as_str().parse(),
            Ok(mtls),
            "an mTLS mode reads as written"
        );
    }
    let domain = TrustDomain::new("malla.local").expect("a valid domain");
    let Ok(compiled) = policy.compile(&domain) else {
        assert!(
            !policy.validate().is_empty(),
            "compile refused a valid policy"
        );
        return;
    };
    let ids = [
        SpiffeId::parse("spiffe://malla.local/svc/checkout").expect("valid"),
        SpiffeId::parse("spiffe://other.example/svc/checkout").expect("valid"),
    ];
    let l7s = [
        None,
        Some(L7 {
            method: "GET",
            path: "/",
            grpc: false,
        }),
        Some(L7 {
            method: "POST",
            path: "/v1/charges",
            grpc: false,
        }),
        Some(L7 {
            method: "POST",
            path: "/payments.v1.Payments/Charge",
            grpc: true,
        }),
    ];
    for source in [None, Some(&ids[0]), Some(&ids[1])] {
        for port in [1u16, 80, 8080, 65535] {
            for l7 in l7s {
                let request = Request { source, port, l7 };
                let d = compiled.decide(&request);
                if let Some(i) = d.rule {
                    assert_eq!(
                        policy.rules[i].action, d.action,
                        "the deciding rule's action"
                    );
                } else {
                    assert_eq!(d.action, policy.default);
                }
                assert_eq!(d.enforced, policy.mode.enforces());
                assert_eq!(compiled.decide(&request), d, "deterministic");
            }
        }
    }
}

#[cfg(test)]
mod tests;
