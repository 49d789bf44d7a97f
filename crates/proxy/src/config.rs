//! The proxy's configuration: what it listens on and where it sends traffic.
//!
//! A configuration comes from a TOML file (`malla proxy --config FILE`), from the quick
//! command-line form (`--listen ADDR --upstream A,B`), or both (flags add to the file).
//! Every field has a documented default (see `docs/config.md`); [`ProxyConfig::validate`]
//! reports *all* problems at once, each naming the field and the bad value.

use std::{fmt, net::SocketAddr, path::Path, time::Duration};

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
    #[serde(default = "defaults::drain_timeout", with = "duration")]
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
    #[serde(default = "defaults::connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Longest wait for the response head after the request was sent. `0s` disables it.
    #[serde(default = "defaults::response_timeout", with = "duration")]
    pub response_timeout: Duration,
    /// How long an unused pooled connection to an endpoint is kept.
    #[serde(default = "defaults::idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// HTTP/1 connections kept idle per endpoint and worker.
    #[serde(default = "defaults::max_idle_per_endpoint")]
    pub max_idle_per_endpoint: usize,
    /// Concurrent streams this proxy opens on its one HTTP/2 connection per endpoint.
    #[serde(default = "defaults::h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
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
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
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
    #[serde(default = "defaults::head_timeout", with = "duration")]
    pub head_timeout: Duration,
    /// An idle keep-alive client connection is closed after this time.
    #[serde(default = "defaults::client_idle_timeout", with = "duration")]
    pub client_idle_timeout: Duration,
    /// How long an `auto` listener waits for a client's first bytes before treating the
    /// connection as opaque TCP (server-speaks-first protocols).
    #[serde(default = "defaults::detect_timeout", with = "duration")]
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
        }
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
    /// Parses a TOML document; `source_name` (usually the file path) names it in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let config: ProxyConfig = toml::from_str(text).map_err(|e| ConfigError {
            source_name: source_name.to_string(),
            problems: vec![e.to_string().trim_end().to_string()],
        })?;
        config.validate(source_name)?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Self::from_toml(&text, &name)
    }

    /// Checks what serde cannot: references between sections, names, limits.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            if !valid_name(&u.name) {
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

/// Service and upstream names: DNS-label shaped, so they can appear in hosts and metrics.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !name.ends_with('-')
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

/// Durations as human strings: `"250ms"`, `"1s"`, `"2m"`.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write for example \"250ms\", \"1s\" or \"2m\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses_with_defaults() {
        let c = ProxyConfig::from_toml(
            r#"
            workers = 1
            [[upstream]]
            name = "shipping-quote"
            endpoints = ["127.0.0.1:8081", "localhost:8082"]
            balancer = "round-robin"
            connect_timeout = "250ms"

            [[outbound]]
            listen = "127.0.0.1:4140"
            upstream = "shipping-quote"

            [http_proxy]
            listen = "127.0.0.1:4141"
            [[http_proxy.route]]
            host = "quote.example"
            upstream = "shipping-quote"

            [inbound]
            listen = "127.0.0.1:4143"
            forward_to = "127.0.0.1:8080"

            [admin]
            listen = "127.0.0.1:9901"
            "#,
            "test.toml",
        )
        .unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.balancer, BalancerKind::RoundRobin);
        assert_eq!(u.connect_timeout, Duration::from_millis(250));
        assert_eq!(u.response_timeout, defaults::response_timeout());
        assert_eq!(c.outbound[0].protocol, ListenerProtocol::Auto);
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let err = ProxyConfig::from_toml("workers = 1\n[[upstream]]\nname = \n", "mesh.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mesh.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_rejected() {
        let err = ProxyConfig::from_toml("[[upstream]]\nname = \"a\"\nendpionts = []\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("endpionts"), "{err}");
        let err = ProxyConfig::from_toml(
            "[[upstream]]\nname = \"a\"\nconnect_timeout = \"soon\"\n",
            "x.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("invalid duration \"soon\""), "{err}");
    }

    #[test]
    fn all_semantic_problems_are_reported_together() {
        let err = ProxyConfig::from_toml(
            r#"
            [[upstream]]
            name = "Bad_Name"
            endpoints = ["nowhere", "127.0.0.1:0"]
            [[upstream]]
            name = "Bad_Name"
            [[outbound]]
            listen = "127.0.0.1:1"
            upstream = "missing"
            "#,
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 6, "{err}");
        let text = err.to_string();
        assert!(text.contains("upstream[0].name \"Bad_Name\""), "{text}");
        assert!(text.contains("outbound[0].upstream \"missing\""), "{text}");
        assert!(text.contains("endpoints[1]"), "{text}");
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(valid_name("shipping-quote"));
        assert!(valid_name("a1"));
        assert!(!valid_name(""));
        assert!(!valid_name("1a"));
        assert!(!valid_name("a-"));
        assert!(!valid_name("A"));
        assert!(!valid_name(&"a".repeat(64)));
    }
}
