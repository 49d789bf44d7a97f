//! The proxy's configuration: what it listens on and where it sends traffic.
//!
//! A configuration comes from a TOML file (`malla proxy --config FILE`), from the quick
//! command-line form (`--listen ADDR --upstream A,B`), or both (flags add to the file).
//! Every field has a documented default (see `docs/config.md`); [`ProxyConfig::validate`]
//! reports *all* problems at once, each naming the field and the bad value.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path, time::Duration};

use malla_core::{policy::unknown, service::is_dns_label};
use serde::{Deserialize, Serialize};

/// The whole configuration of one `malla proxy` process.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Worker threads, each running its own single-threaded runtime with its own
    /// `SO_REUSEPORT` listeners. `0` means one per available core.
    #[serde(default)]
    pub workers: usize,

    /// How long a draining proxy (SIGTERM) waits for open connections before it exits.
    #[serde(default = "defaults::drain_timeout", with = "malla_core::duration")]
    pub drain_timeout: Duration,

    /// Upstream services, each a named set of endpoints with a balancer.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,

    /// Outbound listeners, each bound to one upstream.
    #[serde(default, rename = "outbound")]
    pub outbound: Vec<OutboundConfig>,

    /// A listener that routes HTTP requests by `Host` / `:authority` to upstreams.
    #[serde(default)]
    pub http_proxy: Option<HttpProxyConfig>,

    /// The listener that receives traffic for the local application.
    #[serde(default)]
    pub inbound: Option<InboundConfig>,

    /// The admin listener: `/live`, `/ready`, `/metrics`, `/config`.
    #[serde(default)]
    pub admin: Option<AdminConfig>,

    /// Limits that protect the proxy from its clients.
    #[serde(default)]
    pub limits: Limits,

    /// The control plane: registers this proxy's instance and discovers the endpoints of
    /// upstreams that list none (see [`crate::discovery`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlPlaneConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// Static endpoints, `HOST:PORT` (IP literals or resolvable names, resolved at start).
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub balancer: BalancerKind,
    #[serde(default = "defaults::connect_timeout", with = "malla_core::duration")]
    pub connect_timeout: Duration,
    /// Longest wait for the response head after the request was sent. `0s` disables it.
    #[serde(default = "defaults::response_timeout", with = "malla_core::duration")]
    pub response_timeout: Duration,
    /// How long an unused pooled connection to an endpoint is kept.
    #[serde(default = "defaults::idle_timeout", with = "malla_core::duration")]
    pub idle_timeout: Duration,
    /// HTTP/1 connections kept idle per endpoint and worker.
    #[serde(default = "defaults::max_idle_per_endpoint")]
    pub max_idle_per_endpoint: usize,
    /// Concurrent streams this proxy opens on its one HTTP/2 connection per endpoint.
    #[serde(default = "defaults::h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
    /// Discovered upstreams: the registry service whose instances are the endpoints
    /// (default: the upstream's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Discovered upstreams: only the instances whose labels match this selector
    /// (`env=prod,zone in (eu-1,eu-2)`); default: every instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The resilience policy of calls to this upstream when the control plane has none
    /// for its service (`[upstream.policy]`, the schema of `malla apply`, without
    /// `service`); default: the documented defaults (docs/resilience.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<malla_core::Policy>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BalancerKind {
    /// Power of two random choices over peak-EWMA latency × in-flight requests.
    #[default]
    P2cEwma,
    RoundRobin,
    LeastRequest,
}

impl fmt::Display for BalancerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BalancerKind::P2cEwma => "p2c-ewma",
            BalancerKind::RoundRobin => "round-robin",
            BalancerKind::LeastRequest => "least-request",
        })
    }
}

/// What a listener expects its clients to speak.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerProtocol {
    /// Detect per connection: HTTP/1, the HTTP/2 preface, else opaque TCP.
    #[default]
    Auto,
    /// HTTP/1 or HTTP/2 (prior knowledge), detected; anything else gets `400`.
    Http,
    /// Opaque TCP, never inspected.
    Tcp,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    pub listen: SocketAddr,
    pub upstream: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpProxyConfig {
    pub listen: SocketAddr,
    /// Explicit host → upstream routes. A `Host` that matches no route is looked up as an
    /// upstream name (port and a trailing `.` ignored).
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub host: String,
    pub upstream: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    pub listen: SocketAddr,
    /// The local application, `HOST:PORT`.
    pub forward_to: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Mutual TLS from other sidecars, once this sidecar has a certificate (a join token
    /// for its service): `permissive` (mTLS and plaintext both accepted), `strict`
    /// (plaintext refused) or `off`. Set, it overrides the control plane's mode; left out,
    /// the mode is the control plane's (the service's authorization policy's `mtls`, else
    /// the mesh's `--mtls-mode`), or `permissive` without a control plane to follow
    /// ([`crate::inbound`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
}

/// Whether an inbound listener takes mTLS, plaintext, or both.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
    Off,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Permissive => "permissive",
            MtlsMode::Strict => "strict",
            MtlsMode::Off => "off",
        }
    }
}

/// Where the inbound mTLS mode in force comes from (the inbound module's notes, docs/identity.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsSource {
    /// `[inbound] mtls` in this sidecar's configuration.
    Local,
    /// The `mtls` of the service's authorization policy.
    Service,
    /// The mesh's mode (`malla control --mtls-mode`).
    Mesh,
    /// No word from a control plane (none followed, or no answer yet).
    Default,
}

impl MtlsSource {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsSource::Local => "local",
            MtlsSource::Service => "service",
            MtlsSource::Mesh => "mesh",
            MtlsSource::Default => "default",
        }
    }
}

impl From<malla_core::authz::PeerMtls> for MtlsMode {
    fn from(mode: malla_core::authz::PeerMtls) -> Self {
        match mode {
            malla_core::authz::PeerMtls::Permissive => MtlsMode::Permissive,
            malla_core::authz::PeerMtls::Strict => MtlsMode::Strict,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// The `[control]` section: where the control plane is and what this proxy registers.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// The control plane, `HOST:PORT` or `https://HOST:PORT` (TLS), or `http://HOST:PORT`
    /// (plaintext, which the control plane will stop accepting): its one port serves the
    /// HTTP API and gRPC (`malla control --http-addr`; `--grpc-addr` still serves gRPC);
    /// default `127.0.0.1:7780`.
    #[serde(default = "defaults::control_url")]
    pub url: String,
    /// Register this proxy's instance as a member of this service; without it the proxy
    /// only discovers its upstreams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The instance id; default `SERVICE-HOSTNAME-PID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Labels of the registered instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The address other sidecars reach this instance at; default: the `[inbound]`
    /// listener's (which must then not be a wildcard address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register_address: Option<SocketAddr>,
    /// Lease time to live (whole seconds, 1s to 1h); heartbeats go every third of it.
    #[serde(default = "defaults::lease_ttl", with = "malla_core::duration")]
    pub lease_ttl: Duration,
    /// TCP connect to the control plane.
    #[serde(default = "defaults::connect_timeout", with = "malla_core::duration")]
    pub connect_timeout: Duration,
    /// A join token for `service` (`malla token create --service NAME`): with it the
    /// sidecar gets its service's certificate from the control plane's CA and renews it.
    /// Prefer `MALLA_JOIN_TOKEN` or `join_token_file` to writing it here. Never printed.
    #[serde(default, skip_serializing)]
    pub join_token: Option<String>,
    /// A file holding the join token (read at start; surrounding whitespace ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token_file: Option<std::path::PathBuf>,
    /// Where the sidecar keeps its key (0600), certificate and trust bundle, so that a
    /// restart renews with them instead of needing a new join token. Without it they live
    /// in memory only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_dir: Option<std::path::PathBuf>,
    /// The PEM trust bundle to verify the control plane with over TLS (the control plane's
    /// `DATA_DIR/trust-bundle.pem`), until this sidecar holds a certificate: from then on
    /// the bundle that came with it, which follows root rotations. Needed with TLS unless
    /// `identity_dir` keeps a certificate (`--control-ca`, `MALLA_CONTROL_CA`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
}

/// How a sidecar reaches its control plane: [`ControlPlaneConfig::target`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlTarget {
    /// `HOST:PORT`.
    pub authority: String,
    /// TLS (`HOST:PORT`, `https://`), or plaintext (`http://`).
    pub tls: bool,
}

impl ControlTarget {
    /// The URI of the channel: `https://HOST:PORT` or `http://HOST:PORT`.
    pub fn uri(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

impl ControlPlaneConfig {
    pub fn new(url: impl Into<String>) -> Self {
        ControlPlaneConfig {
            url: url.into(),
            service: None,
            instance_id: None,
            labels: BTreeMap::new(),
            register_address: None,
            lease_ttl: defaults::lease_ttl(),
            connect_timeout: defaults::connect_timeout(),
            join_token: None,
            join_token_file: None,
            identity_dir: None,
            ca_file: None,
        }
    }

    /// The join token: `join_token`, or read from `join_token_file`.
    pub fn join_token(&self) -> Result<Option<String>, String> {
        if let Some(token) = &self.join_token {
            return Ok(Some(token.trim().to_string()));
        }
        let Some(path) = &self.join_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "control.join_token_file {}: cannot read: {e}",
                path.display()
            )
        })?;
        match text.trim() {
            "" => Err(format!(
                "control.join_token_file {}: the file is empty",
                path.display()
            )),
            token => Ok(Some(token.to_string())),
        }
    }

    /// The URL as a channel endpoint: `https://HOST:PORT` or `http://HOST:PORT`.
    pub fn endpoint(&self) -> Result<String, String> {
        self.target().map(|t| t.uri())
    }

    /// Where the control plane is and whether TLS reaches it: `HOST:PORT` and
    /// `https://HOST:PORT` mean TLS, `http://HOST:PORT` plaintext.
    pub fn target(&self) -> Result<ControlTarget, String> {
        let url = if self.url.contains("://") {
            self.url.clone()
        } else {
            format!("https://{}", self.url)
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{e}; write HOST:PORT, for example 127.0.0.1:7780"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(
                    "use HOST:PORT or https://HOST:PORT (TLS), or http://HOST:PORT (plaintext), for example 127.0.0.1:7780"
                        .into(),
                )
            }
        };
        let authority = uri
            .authority()
            .ok_or("no HOST:PORT; write for example 127.0.0.1:7780")?;
        if authority.port_u16().is_none() {
            return Err("no port; the control plane listens on 7780 by default (HOST:7780)".into());
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err("the address must have no path: write HOST:PORT".into());
        }
        Ok(ControlTarget {
            authority: authority.to_string(),
            tls,
        })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest HTTP/1 request or response head (request line + headers), in bytes.
    #[serde(default = "defaults::max_head_bytes")]
    pub max_head_bytes: usize,
    /// Most header fields in one HTTP/1 head.
    #[serde(default = "defaults::max_headers")]
    pub max_headers: usize,
    /// A client that sent part of a request head must finish it within this time.
    #[serde(default = "defaults::head_timeout", with = "malla_core::duration")]
    pub head_timeout: Duration,
    /// An idle keep-alive client connection is closed after this time (HTTP/2: GOAWAY
    /// once no stream has been at work for between one and two of it).
    #[serde(
        default = "defaults::client_idle_timeout",
        with = "malla_core::duration"
    )]
    pub client_idle_timeout: Duration,
    /// How long an `auto` listener waits for a client's first bytes before treating the
    /// connection as opaque TCP (server-speaks-first protocols).
    #[serde(default = "defaults::detect_timeout", with = "malla_core::duration")]
    pub detect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: defaults::max_head_bytes(),
            max_headers: defaults::max_headers(),
            head_timeout: defaults::head_timeout(),
            client_idle_timeout: defaults::client_idle_timeout(),
            detect_timeout: defaults::detect_timeout(),
        }
    }
}

/// Defaults, one function per field so serde and the docs agree.
pub mod defaults {
    use std::time::Duration;

    /// The control plane's one port (HTTP API and gRPC).
    pub fn control_url() -> String {
        "127.0.0.1:7780".to_string()
    }

    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn response_timeout() -> Duration {
        Duration::from_secs(15)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_idle_per_endpoint() -> usize {
        256
    }
    pub fn h2_max_concurrent_streams() -> u32 {
        1024
    }
    pub fn max_head_bytes() -> usize {
        64 * 1024
    }
    pub fn max_headers() -> usize {
        100
    }
    pub fn head_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn client_idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn detect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn lease_ttl() -> Duration {
        Duration::from_secs(10)
    }
}

impl UpstreamConfig {
    /// An upstream with default policies over the given endpoints.
    pub fn new(name: impl Into<String>, endpoints: Vec<String>) -> Self {
        UpstreamConfig {
            name: name.into(),
            endpoints,
            balancer: BalancerKind::default(),
            connect_timeout: defaults::connect_timeout(),
            response_timeout: defaults::response_timeout(),
            idle_timeout: defaults::idle_timeout(),
            max_idle_per_endpoint: defaults::max_idle_per_endpoint(),
            h2_max_concurrent_streams: defaults::h2_max_concurrent_streams(),
            service: None,
            selector: None,
            policy: None,
        }
    }

    /// Whether the endpoints come from the control plane: a proxy with a `[control]`
    /// section discovers every upstream that lists no static endpoints.
    pub fn is_discovered(&self, control: bool) -> bool {
        control && self.endpoints.is_empty()
    }

    /// The registry service a discovered upstream follows.
    pub fn discovery_service(&self) -> &str {
        self.service.as_deref().unwrap_or(&self.name)
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            workers: 0,
            drain_timeout: defaults::drain_timeout(),
            upstreams: Vec::new(),
            outbound: Vec::new(),
            http_proxy: None,
            inbound: None,
            admin: None,
            limits: Limits::default(),
            control: None,
        }
    }
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration in {}:", self.source_name)?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl ProxyConfig {
    /// Parses and validates a TOML document; `source_name` (usually the file path) names it
    /// in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let config = Self::parse_toml(text, source_name)?;
        config.validate(source_name)?;
        Ok(config)
    }

    /// Parses a TOML document without [validating](Self::validate) it, for callers that
    /// add to it first (command-line flags) and validate the result.
    pub fn parse_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        };
        let toml_error = |e: toml::de::Error| fail(vec![e.to_string().trim_end().to_string()]);
        let de = toml::Deserializer::parse(text).map_err(toml_error)?;
        // The configuration's own tables refuse unknown fields; an `[upstream.policy]`
        // does not by itself (a sidecar accepts fields from a newer control plane), so
        // its unknown fields, typos here, are refused now.
        let (config, unknown): (Self, _) = unknown::deserialize(de).map_err(toml_error)?;
        if unknown.is_empty() {
            return Ok(config);
        }
        Err(fail(
            unknown
                .iter()
                .map(|path| {
                    let at = unknown::toml_line_col(text, path)
                        .map(|(line, column)| format!("line {line}, column {column}: "))
                        .unwrap_or_default();
                    format!("{at}{path}: {}", unknown::message(path))
                })
                .collect(),
        ))
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let config = Self::parse_file(path)?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Reads and parses a file without validating it (see [`Self::parse_toml`]).
    pub fn parse_file(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Self::parse_toml(&text, &name)
    }

    /// Checks what serde cannot: references between sections, names, limits.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            if !is_dns_label(&u.name) {
                problems.push(format!(
                    "upstream[{i}].name {:?}: use 1-63 lowercase letters, digits and '-', starting with a letter",
                    u.name
                ));
            }
            if !names.insert(u.name.as_str()) {
                problems.push(format!(
                    "upstream[{i}].name {:?} is defined twice; names must be unique",
                    u.name
                ));
            }
            for (j, e) in u.endpoints.iter().enumerate() {
                if let Err(why) = check_host_port(e) {
                    problems.push(format!("upstream[{i}].endpoints[{j}] {e:?}: {why}"));
                }
            }
            if u.connect_timeout.is_zero() {
                problems.push(format!(
                    "upstream[{i}].connect_timeout must be greater than 0s"
                ));
            }
            if u.h2_max_concurrent_streams == 0 {
                problems.push(format!(
                    "upstream[{i}].h2_max_concurrent_streams must be at least 1"
                ));
            }
            check_discovery(i, u, self.control.is_some(), &mut problems);
            if let Some(policy) = &u.policy {
                if policy.service.is_some() {
                    problems.push(format!(
                        "upstream[{i}].policy.service: a local policy applies to its upstream; remove `service`"
                    ));
                }
                for e in policy.validate() {
                    problems.push(format!("upstream[{i}].policy.{}: {}", e.field, e.message));
                }
            }
        }
        if let Some(control) = &self.control {
            check_control(control, self.inbound.as_ref(), &mut problems);
        }
        let known = |name: &str| self.upstreams.iter().any(|u| u.name == name);
        for (i, o) in self.outbound.iter().enumerate() {
            if !known(&o.upstream) {
                problems.push(format!(
                    "outbound[{i}].upstream {:?} names no [[upstream]]; define it or fix the name",
                    o.upstream
                ));
            }
        }
        if let Some(p) = &self.http_proxy {
            for (i, r) in p.routes.iter().enumerate() {
                if !known(&r.upstream) {
                    problems.push(format!(
                        "http_proxy.route[{i}].upstream {:?} names no [[upstream]]",
                        r.upstream
                    ));
                }
            }
        }
        if let Some(inb) = &self.inbound {
            if let Err(why) = check_host_port(&inb.forward_to) {
                problems.push(format!("inbound.forward_to {:?}: {why}", inb.forward_to));
            }
        }
        if self.limits.max_head_bytes < 1024 {
            problems.push("limits.max_head_bytes must be at least 1024".to_string());
        }
        if self.limits.max_headers == 0 {
            problems.push("limits.max_headers must be at least 1".to_string());
        }
        if self.outbound.is_empty() && self.http_proxy.is_none() && self.inbound.is_none() {
            problems.push(
                "no listener: add an [[outbound]], [http_proxy] or [inbound] section (or --listen)"
                    .to_string(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                source_name: source_name.to_string(),
                problems,
            })
        }
    }
}

/// The discovery keys of `upstream[i]`.
fn check_discovery(i: usize, u: &UpstreamConfig, control: bool, problems: &mut Vec<String>) {
    if let Some(service) = &u.service {
        if !is_dns_label(service) {
            problems.push(format!(
                "upstream[{i}].service {service:?}: use 1-63 lowercase letters, digits and '-', starting with a letter"
            ));
        }
    }
    if let Some(selector) = &u.selector {
        if let Err(e) = malla_core::Selector::parse(selector) {
            problems.push(format!("upstream[{i}].selector: {e}"));
        }
    }
    let keys = match (&u.service, &u.selector) {
        (Some(_), Some(_)) => "service and selector",
        (Some(_), None) => "service",
        (None, Some(_)) => "selector",
        (None, None) => return,
    };
    if !u.endpoints.is_empty() {
        problems.push(format!(
            "upstream[{i}] ({:?}) has both static endpoints and discovery keys ({keys}); \
             remove `endpoints` to discover the instances from the control plane, or remove {keys}",
            u.name
        ));
    } else if !control {
        problems.push(format!(
            "upstream[{i}].{} needs the control plane to discover instances: add a [control] \
             section (or --control HOST:PORT)",
            if u.service.is_some() {
                "service"
            } else {
                "selector"
            }
        ));
    }
}

/// The `[control]` section; registration needs an address other sidecars can reach.
fn check_control(
    c: &ControlPlaneConfig,
    inbound: Option<&InboundConfig>,
    problems: &mut Vec<String>,
) {
    if let Err(why) = c.endpoint() {
        problems.push(format!("control.url {:?}: {why}", c.url));
    }
    if c.lease_ttl < Duration::from_secs(1)
        || c.lease_ttl > Duration::from_secs(3600)
        || c.lease_ttl.subsec_nanos() != 0
    {
        problems.push(format!(
            "control.lease_ttl {}: use whole seconds from \"1s\" to \"1h\"",
            humantime::format_duration(c.lease_ttl)
        ));
    }
    if c.connect_timeout.is_zero() {
        problems.push("control.connect_timeout must be greater than 0s".to_string());
    }
    if let Ok(target) = c.target() {
        let kept = c
            .identity_dir
            .as_deref()
            .is_some_and(|dir| crate::discovery::kept_bundle(dir).exists());
        if target.tls && c.ca_file.is_none() && !kept {
            problems.push(format!(
                "control.url {:?} is reached over TLS, which needs the roots to verify the \
                 control plane with: give --control-ca FILE, MALLA_CONTROL_CA=FILE or \
                 [control] ca_file, the control plane's DATA_DIR/trust-bundle.pem",
                c.url
            ));
        }
    }
    if c.join_token.is_some() && c.join_token_file.is_some() {
        problems.push(
            "control.join_token and control.join_token_file are both set: keep one".to_string(),
        );
    }
    if let Some(id) = &c.instance_id {
        if !malla_core::service::valid_instance_id(id) {
            problems.push(format!(
                "control.instance_id {id:?}: use 1-128 letters, digits, '.', '_', ':' or '-'"
            ));
        }
    }
    if let Err(e) = malla_core::Labels::try_from(c.labels.clone()) {
        problems.push(format!("control.labels: {e}"));
    }
    let Some(service) = &c.service else {
        for (key, set) in [
            ("instance_id", c.instance_id.is_some()),
            ("labels", !c.labels.is_empty()),
            ("register_address", c.register_address.is_some()),
            ("join_token", c.join_token.is_some()),
            ("join_token_file", c.join_token_file.is_some()),
            ("identity_dir", c.identity_dir.is_some()),
        ] {
            if set {
                problems.push(format!(
                    "control.{key} describes the registered instance, but control.service \
                     (--service) is not set: set it to register, or remove {key}"
                ));
            }
        }
        return;
    };
    if !is_dns_label(service) {
        problems.push(format!(
            "control.service {service:?}: use 1-63 lowercase letters, digits and '-', starting with a letter"
        ));
    }
    match (c.register_address, inbound) {
        (Some(addr), _) => {
            if addr.ip().is_unspecified() || addr.port() == 0 {
                problems.push(format!(
                    "control.register_address {addr}: give the IP and port other sidecars reach \
                     this one at (not a wildcard address, not port 0)"
                ));
            }
        }
        (None, Some(inb)) if inb.listen.ip().is_unspecified() => problems.push(format!(
            "control.service: the [inbound] listener {} is a wildcard address, which other \
             sidecars cannot call: set control.register_address (--register-address IP:PORT)",
            inb.listen
        )),
        (None, Some(_)) => {}
        (None, None) => problems.push(
            "control.service: registering needs the address other sidecars reach this \
             instance at: add an [inbound] listener or set control.register_address \
             (--register-address IP:PORT)"
                .to_string(),
        ),
    }
}

fn check_host_port(s: &str) -> Result<(), &'static str> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return match addr.port() {
            0 => Err("the port must be a number from 1 to 65535"),
            _ => Ok(()),
        };
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or("expected HOST:PORT, for example 127.0.0.1:8080")?;
    if host.is_empty() || host.contains(['[', ']', ' ', '/']) {
        return Err("expected HOST:PORT, for example 127.0.0.1:8080");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port must be a number from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests;
