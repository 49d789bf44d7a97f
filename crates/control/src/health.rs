//! Active health checks: the control plane probes every instance of a service that has a
//! check configured, and flips the instance's recorded health after `healthy_threshold`
//! consecutive successes or `unhealthy_threshold` consecutive failures (so one lost packet
//! does not flap an instance). Three kinds:
//!
//! - `http`: `GET path` over HTTP/1.1; healthy when the status is `expect_status`
//!   (default 200).
//! - `tcp`: a TCP connection can be opened.
//! - `grpc`: the standard `grpc.health.v1.Health/Check` call; healthy when it answers
//!   `SERVING` for the configured service name (empty = the whole server).
//!
//! Each check runs under `timeout`; a timeout is a failure. A probe holds a bounded amount
//! of what the instance sends, however long the timeout: an `http` check reads the status
//! line and headers (hyper's limits) and never the body, a `grpc` check at most
//! [`MAX_GRPC_BODY`] bytes of body and [`MAX_GRPC_HEADERS`] of headers, so a broken or
//! hostile health endpoint that streams without end cannot grow the control plane's memory.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use malla_core::{Health, ServiceName};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpStream, task::JoinHandle};
use tracing::{debug, info};

use crate::{
    events::EventRing,
    registry::{Registry, View},
    store::Store,
};

/// A service's check. In JSON it is one flat object (`{"kind": "http", "path": "/healthz",
/// "interval": 5}`); it is read through [`wire::HealthCheck`] because serde cannot combine
/// `flatten` (of the kind's fields) with `deny_unknown_fields`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "wire::HealthCheck")]
pub struct HealthCheck {
    #[serde(flatten)]
    pub kind: CheckKind,
    #[serde(with = "seconds")]
    pub interval: Duration,
    #[serde(with = "seconds")]
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// The flat JSON form of a [`HealthCheck`], with every field of every kind.
mod wire {
    use std::time::Duration;

    use serde::Deserialize;

    use super::{defaults, seconds, CheckKind};

    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Kind {
        Http,
        Tcp,
        Grpc,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct HealthCheck {
        kind: Kind,
        path: Option<String>,
        expect_status: Option<u16>,
        service: Option<String>,
        #[serde(default = "defaults::interval", with = "seconds")]
        interval: Duration,
        #[serde(default = "defaults::timeout", with = "seconds")]
        timeout: Duration,
        #[serde(default = "defaults::threshold")]
        healthy_threshold: u32,
        #[serde(default = "defaults::threshold")]
        unhealthy_threshold: u32,
    }

    impl TryFrom<HealthCheck> for super::HealthCheck {
        type Error = String;

        fn try_from(w: HealthCheck) -> Result<Self, String> {
            let only =
                |field: &str, kind: &str| format!("`{field}` is a field of {kind} checks only");
            let kind = match w.kind {
                Kind::Http => {
                    if w.service.is_some() {
                        return Err(only("service", "grpc"));
                    }
                    CheckKind::Http {
                        path: w
                            .path
                            .ok_or("missing field `path`: an http check needs the path to GET")?,
                        expect_status: w.expect_status.unwrap_or_else(defaults::status),
                    }
                }
                Kind::Tcp | Kind::Grpc if w.path.is_some() => return Err(only("path", "http")),
                Kind::Tcp | Kind::Grpc if w.expect_status.is_some() => {
                    return Err(only("expect_status", "http"))
                }
                Kind::Tcp if w.service.is_some() => return Err(only("service", "grpc")),
                Kind::Tcp => CheckKind::Tcp,
                Kind::Grpc => CheckKind::Grpc {
                    service: w.service.unwrap_or_default(),
                },
            };
            Ok(super::HealthCheck {
                kind,
                interval: w.interval,
                timeout: w.timeout,
                healthy_threshold: w.healthy_threshold,
                unhealthy_threshold: w.unhealthy_threshold,
            })
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CheckKind {
    Http {
        path: String,
        #[serde(default = "defaults::status")]
        expect_status: u16,
    },
    Tcp,
    Grpc {
        #[serde(default)]
        service: String,
    },
}

mod defaults {
    use std::time::Duration;
    pub fn interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn threshold() -> u32 {
        2
    }
    pub fn status() -> u16 {
        200
    }
}

/// Durations in (fractional) seconds, the unit JSON clients expect.
mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(|_| {
            serde::de::Error::custom(format!("invalid duration {secs}: use seconds ≥ 0"))
        })
    }
}

impl HealthCheck {
    /// Checks what serde cannot; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(3600) {
            return Err("health_check.interval must be from 0.1 to 3600 seconds".into());
        }
        if self.timeout.is_zero() || self.timeout > self.interval.max(Duration::from_secs(1)) * 10 {
            return Err("health_check.timeout must be above 0 and at most 10 intervals".into());
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
            return Err("health_check thresholds must be at least 1".into());
        }
        if let CheckKind::Http {
            path,
            expect_status,
        } = &self.kind
        {
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return Err(format!(
                    "health_check.path {path:?} must start with '/' and contain no spaces"
                ));
            }
            if !(100..=599).contains(expect_status) {
                return Err("health_check.expect_status must be an HTTP status (100-599)".into());
            }
        }
        Ok(())
    }
}

/// The most of a gRPC health answer's body a probe reads: a `HealthCheckResponse` is 7
/// bytes with its frame prefix; anything near this is not a health answer.
pub const MAX_GRPC_BODY: usize = 4 * 1024;
/// The most of a gRPC health answer's headers (and trailers) a probe accepts.
pub const MAX_GRPC_HEADERS: u32 = 16 * 1024;
/// The HTTP/2 flow-control window a gRPC probe grants the instance: what it may send
/// before the probe reads it.
const GRPC_WINDOW: u32 = 16 * 1024;

/// Runs one probe; `Ok` = healthy, `Err` = why not.
pub async fn probe(kind: &CheckKind, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_inner(kind, addr)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn probe_inner(kind: &CheckKind, addr: SocketAddr) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Http {
            path,
            expect_status,
        } => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("http: {e}"))?;
            // The connection ends with the probe: the body is never read, and whatever the
            // instance goes on sending is not either.
            let _conn = AbortOnDrop(tokio::spawn(conn));
            let req = http::Request::get(path.as_str())
                .header(http::header::HOST, addr.to_string())
                .header(http::header::USER_AGENT, "malla-health-check")
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("http: {e}"))?;
            if resp.status().as_u16() == *expect_status {
                Ok(())
            } else {
                Err(format!(
                    "status {} (expected {expect_status})",
                    resp.status().as_u16()
                ))
            }
        }
        CheckKind::Grpc { service } => grpc_health(stream, addr, service).await,
    }
}

/// `grpc.health.v1.Health/Check`. The two messages have one field each, so they are
/// encoded here by hand rather than pulling code generation into the control plane.
async fn grpc_health(stream: TcpStream, addr: SocketAddr, service: &str) -> Result<(), String> {
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .max_header_list_size(MAX_GRPC_HEADERS)
        .initial_stream_window_size(GRPC_WINDOW)
        .initial_connection_window_size(GRPC_WINDOW)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("grpc: {e}"))?;
    let _conn = AbortOnDrop(tokio::spawn(conn));
    // HealthCheckRequest { string service = 1; } in a gRPC length-prefixed frame.
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        push_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("grpc: {e}"))?;
    let header_status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.as_bytes().to_vec());
    let collected = Limited::new(resp.into_body(), MAX_GRPC_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                format!(
                    "grpc: the answer's body is over {MAX_GRPC_BODY} bytes: not a health answer"
                )
            } else {
                format!("grpc: {e}")
            }
        })?;
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.as_bytes().to_vec());
    let status = trailer_status.or(header_status).unwrap_or_default();
    if status != b"0" {
        return Err(format!("grpc-status {}", String::from_utf8_lossy(&status)));
    }
    // HealthCheckResponse { ServingStatus status = 1; } with SERVING = 1.
    let body = collected.to_bytes();
    let payload = body.get(5..).unwrap_or_default();
    match payload {
        [0x08, 1, ..] => Ok(()),
        [0x08, s, ..] => Err(format!("serving status {s} (1 = SERVING)")),
        _ => Err("serving status UNKNOWN".into()),
    }
}

/// A probe's connection task, ended with the probe.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Keeps one probing task per checked instance, following the registry.
pub struct HealthChecker {
    task: JoinHandle<()>,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ProbeKey = (ServiceName, String);

impl HealthChecker {
    /// Starts checking; every health flip it records is also kept in `events` (kind
    /// [`HEALTH_CHANGED`]), where `GET /v1/events` and `malla describe service` show it.
    pub fn start<S: Store + Clone>(registry: Arc<Registry<S>>, events: Arc<EventRing>) -> Self {
        HealthChecker {
            task: tokio::spawn(supervise(registry, events)),
        }
    }
}

/// The event kind of a health flip decided by the control plane's checks.
pub const HEALTH_CHANGED: &str = "health-changed";

/// What a probing task checks; a change restarts it.
#[derive(Clone, PartialEq, Eq)]
struct Target {
    addr: SocketAddr,
    check: HealthCheck,
}

fn health_name(health: Health) -> &'static str {
    match health {
        Health::Unknown => "unknown",
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
    }
}

/// A probing task, aborted with its supervisor (a dropped `JoinHandle` would detach it).
struct Probe(JoinHandle<()>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows the registry and keeps the probes in line with it, incrementally: an instance
/// change reconciles that instance, a spec change that service, so the cost of a write
/// does not grow with the size of the registry. The whole registry is reconciled only at
/// start and after falling behind the change streams (which then may have lost changes).
///
/// Reconciling a service also repairs recorded health: an instance whose service has no
/// check is `unknown` (eligible for traffic), so a verdict left by a check that was since
/// removed, or recorded before a restart, is reset rather than kept for good. (A probe
/// records a verdict only while the spec it probes for is current, so no verdict lands
/// after the reset.)
async fn supervise<S: Store + Clone>(registry: Arc<Registry<S>>, events: Arc<EventRing>) {
    use tokio::sync::broadcast::error::RecvError;

    // Subscribe before reading the view: nothing falls between the two.
    let (_, mut changes) = registry.subscribe();
    let mut specs = registry.subscribe_specs();
    let mut probes = Probes {
        registry: registry.clone(),
        events,
        running: BTreeMap::new(),
    };
    probes.reconcile_all();
    loop {
        let lagged = tokio::select! {
            change = changes.recv() => match change {
                Ok(change) => {
                    let id = change.before.as_ref().or(change.after.as_ref()).map(|i| i.id.clone());
                    if let Some(id) = id {
                        probes.reconcile_instance(&registry.view(), &change.service, &id, false);
                    }
                    false
                }
                Err(RecvError::Lagged(_)) => true,
                Err(RecvError::Closed) => return,
            },
            spec = specs.recv() => match spec {
                Ok(service) => {
                    probes.reconcile_service(&registry.view(), &service);
                    false
                }
                Err(RecvError::Lagged(_)) => true,
                Err(RecvError::Closed) => return,
            },
        };
        if lagged {
            debug!("health checks fell behind the registry; reconciling every service");
            probes.reconcile_all();
        }
    }
}

/// The running probes, by instance.
struct Probes<S> {
    registry: Arc<Registry<S>>,
    events: Arc<EventRing>,
    running: BTreeMap<ProbeKey, (Target, Probe)>,
}

impl<S: Store + Clone> Probes<S> {
    fn reconcile_all(&mut self) {
        let view = self.registry.view();
        self.running
            .retain(|(service, _), _| view.services.contains_key(service));
        for name in view.services.keys() {
            self.reconcile_service(&view, name);
        }
    }

    fn reconcile_service(&mut self, view: &View, service: &ServiceName) {
        let state = view.services.get(service);
        // Probes of instances that are gone (all of them when the service is).
        let gone: Vec<ProbeKey> = self
            .running
            .range((service.clone(), String::new())..)
            .take_while(|((s, _), _)| s == service)
            .filter(|((_, id), _)| state.is_none_or(|st| !st.instances.contains_key(id)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            self.running.remove(&key);
        }
        if let Some(state) = state {
            for id in state.instances.keys() {
                self.reconcile_instance(view, service, id, true);
            }
        }
    }

    /// Starts, restarts or stops the instance's probe; with `repair`, also resets the
    /// recorded health of an instance whose service has no check.
    fn reconcile_instance(&mut self, view: &View, service: &ServiceName, id: &str, repair: bool) {
        let key = (service.clone(), id.to_string());
        let state = view.services.get(service);
        let Some(instance) = state.and_then(|s| s.instances.get(id)) else {
            self.running.remove(&key);
            return;
        };
        let Some(check) = state.and_then(|s| s.spec.health_check.as_ref()) else {
            self.running.remove(&key);
            if repair && instance.health != Health::Unknown {
                // Unchecked means `unknown`. The write may race a check added meanwhile:
                // its probe compares every verdict with the recorded health, so it puts
                // its own verdict back.
                let (registry, events) = (self.registry.clone(), self.events.clone());
                let (addr, was) = (instance.socket_addr(), instance.health);
                tokio::spawn(async move {
                    let (service, id) = key;
                    let reset = registry.set_health(&service, &id, Health::Unknown).await;
                    if let Err(e) = &reset {
                        debug!(%service, %id, error = %e, "resetting health failed");
                    }
                    if reset.is_ok_and(|changed| changed) {
                        info!(%service, %id, "health reset to unknown: the service has no check");
                        events.record_control(
                            HEALTH_CHANGED,
                            &service,
                            addr,
                            format!(
                                "instance {id} ({addr}): {} -> unknown: the service has no health check",
                                health_name(was)
                            ),
                        );
                    }
                });
            }
            return;
        };
        let target = Target {
            addr: instance.socket_addr(),
            check: check.clone(),
        };
        if self.running.get(&key).is_some_and(|(t, _)| *t == target) {
            return;
        }
        let task = tokio::spawn(probe_loop(
            self.registry.clone(),
            self.events.clone(),
            key.clone(),
            target.clone(),
        ));
        self.running.insert(key, (target, Probe(task)));
    }
}

async fn probe_loop<S: Store + Clone>(
    registry: Arc<Registry<S>>,
    events: Arc<EventRing>,
    key: ProbeKey,
    target: Target,
) {
    let (service, id) = key;
    let check = &target.check;
    let (mut ok_streak, mut fail_streak) = (0u32, 0u32);
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = probe(&check.kind, target.addr, check.timeout).await;
        crate::metrics::process().health_check(result.is_ok());
        let verdict = match &result {
            Ok(()) => {
                ok_streak += 1;
                fail_streak = 0;
                (ok_streak >= check.healthy_threshold).then_some(Health::Healthy)
            }
            Err(why) => {
                fail_streak += 1;
                ok_streak = 0;
                debug!(%service, %id, addr = %target.addr, reason = %why, "health check failed");
                (fail_streak >= check.unhealthy_threshold).then_some(Health::Unhealthy)
            }
        };
        let Some(health) = verdict else { continue };
        // Compared with what is recorded, not with what this task last wrote: anything
        // else that wrote the instance (a re-registration, a reset) is corrected too.
        // Only while the check this task runs is still the service's.
        let view = registry.view();
        let Some(state) = view.services.get(&service) else {
            continue;
        };
        if state.spec.health_check.as_ref() != Some(check) {
            continue;
        }
        let recorded = state.instances.get(&id).map(|i| i.health);
        let Some(was) = recorded.filter(|r| *r != health) else {
            continue;
        };
        let reason = match &result {
            Ok(()) => format!("{} consecutive checks passed", check.healthy_threshold),
            Err(why) => format!(
                "{} consecutive checks failed, the last: {why}",
                check.unhealthy_threshold
            ),
        };
        info!(%service, %id, addr = %target.addr, ?health, %reason, "instance health changed");
        match registry.set_health(&service, &id, health).await {
            Ok(false) => {}
            Ok(true) => events.record_control(
                HEALTH_CHANGED,
                &service,
                target.addr,
                format!(
                    "instance {id} ({}): {} -> {}: {reason}",
                    target.addr,
                    health_name(was),
                    health_name(health)
                ),
            ),
            Err(e) => debug!(%service, %id, error = %e, "recording health failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_one_flat_object() {
        let check: HealthCheck = serde_json::from_str(
            r#"{"kind": "http", "path": "/healthz", "interval": 0.5, "unhealthy_threshold": 3}"#,
        )
        .unwrap();
        assert_eq!(
            check.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                expect_status: 200
            }
        );
        assert_eq!(check.interval, Duration::from_millis(500));
        assert_eq!(check.timeout, Duration::from_secs(1));
        assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (2, 3));
        // What is written is read back (the store keeps specs as JSON).
        let again: HealthCheck =
            serde_json::from_str(&serde_json::to_string(&check).unwrap()).unwrap();
        assert_eq!(again, check);
        let grpc: HealthCheck = serde_json::from_str(r#"{"kind": "grpc"}"#).unwrap();
        assert_eq!(grpc.kind, CheckKind::Grpc { service: "".into() });
    }

    /// A body without end: counts what it hands out, and says when it is dropped.
    struct Endless {
        sent: Arc<std::sync::atomic::AtomicU64>,
        dropped: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl hyper::body::Body for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            self.sent
                .fetch_add(1024, std::sync::atomic::Ordering::Relaxed);
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                &[0; 1024],
            )))))
        }
    }

    impl Drop for Endless {
        fn drop(&mut self) {
            if let Some(tx) = self.dropped.take() {
                let _ = tx.send(());
            }
        }
    }

    const LONG: Duration = Duration::from_secs(30);

    /// A gRPC health endpoint that answers a body without end: the probe reads at most
    /// `MAX_GRPC_BODY` of it, fails at once (not at its timeout) and drops the call.
    #[tokio::test]
    async fn a_grpc_health_answer_without_end_is_cut_at_the_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel();
        let body = Arc::new(std::sync::Mutex::new(Some(Endless {
            sent: sent.clone(),
            dropped: Some(dropped_tx),
        })));
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(move |_req| {
                let body = body.lock().unwrap().take();
                async move {
                    let body = body.ok_or("one call only")?;
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)
                        .map_err(|e| e.to_string())
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let kind = CheckKind::Grpc {
            service: String::new(),
        };
        let error = probe(&kind, addr, LONG).await.unwrap_err();
        assert!(error.contains("body is over 4096 bytes"), "{error}");
        // The call was dropped: the endpoint's body with it, having handed out a bounded
        // amount (the flow-control window, not what it could send in 30 s).
        tokio::time::timeout(LONG, dropped_rx)
            .await
            .expect("the probe never dropped the call")
            .unwrap();
        let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sent < 1024 * 1024, "{sent} bytes handed out");
        server.abort();
    }

    /// An HTTP health endpoint that answers 200 and then a body without end: the probe
    /// takes the status, never reads the body, and closes the connection.
    #[tokio::test]
    async fn an_http_health_answer_without_end_is_not_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0 && head.len() < 64 * 1024, "no request head");
                head.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            let mut chunk = b"400\r\n".to_vec();
            chunk.extend_from_slice(&[b'x'; 1024]);
            chunk.extend_from_slice(b"\r\n");
            let mut written = 0u64;
            // Until the prober closes the connection.
            while stream.write_all(&chunk).await.is_ok() {
                written += chunk.len() as u64;
            }
            written
        });
        let kind = CheckKind::Http {
            path: "/healthz".into(),
            expect_status: 200,
        };
        assert_eq!(probe(&kind, addr, LONG).await, Ok(()));
        let written = tokio::time::timeout(LONG, peer)
            .await
            .expect("the probe never closed the connection")
            .unwrap();
        // What the socket buffers took, at most.
        assert!(written < 64 * 1024 * 1024, "{written} bytes written");
    }

    #[test]
    fn json_refuses_unknown_and_misplaced_fields() {
        for (json, says) in [
            (r#"{"kind": "tcp", "colour": 1}"#, "unknown field `colour`"),
            (r#"{"kind": "icmp"}"#, "unknown variant `icmp`"),
            (r#"{"kind": "http"}"#, "missing field `path`"),
            (
                r#"{"kind": "tcp", "path": "/"}"#,
                "`path` is a field of http checks only",
            ),
            (
                r#"{"kind": "http", "path": "/", "service": "a"}"#,
                "`service`",
            ),
            (r#"{"path": "/"}"#, "missing field `kind`"),
        ] {
            let e = serde_json::from_str::<HealthCheck>(json).unwrap_err();
            assert!(e.to_string().contains(says), "{json}: {e}");
        }
    }
}
