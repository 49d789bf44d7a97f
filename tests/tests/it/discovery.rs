//! Sidecars driven by the control plane: a proxy whose upstream lists no endpoints
//! discovers them over the gRPC Watch API, follows registrations, deregistrations and
//! health, registers its own instance, and rides out a control-plane restart under live
//! traffic without failing a request.
//!
//! Everything is in-process: the control plane (`malla_control::server::Control`, its
//! store in a fresh temporary directory), HTTP/1 echo peers registered directly in its
//! registry, and the proxy (`TestProxy`) with a `[control]` section pointing at the
//! control plane's gRPC address over TLS, verified with its data directory's trust bundle
//! (a sidecar that registers joins with a join token of its service, as deployed).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use http::Version;
use malla_control::{
    registry::Registration,
    server::{Control, ControlConfig, DnsSettings},
};
use malla_core::{Health, Labels, ServiceName};
use malla_proxy::config::{BalancerKind, ControlPlaneConfig, ListenerProtocol};
use malla_tests::{
    assert_eventually,
    client::{self, within, Http1},
    control::TempDir,
    identity::{join_token_from, over_tls_at},
    peers::HttpPeer,
    proxy::{admin, TestProxy},
    BoxError,
};

pub(crate) fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A control plane over `dir` with its gRPC API on `grpc_addr` (port 0: any). Binding an
/// address that a stopped control plane just released is retried briefly.
pub(crate) async fn start_control(dir: &Path, grpc_addr: SocketAddr) -> Control {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let config = ControlConfig {
            data_dir: dir.to_path_buf(),
            http_addr: any_port(),
            grpc_addr,
            dns_addr: None,
            dns: DnsSettings::default(),
            identity: Default::default(),
            tls_names: Vec::new(),
        };
        match Control::start(config).await {
            Ok(control) => return control,
            Err(e) if attempt < 50 => {
                eprintln!("control plane start attempt {attempt}: {e:#}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the control plane did not start: {e:#}"),
        }
    }
}

fn service(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

/// Registers `peer` as instance `id` of `service` (30 s lease: it outlives every test).
pub(crate) async fn register(
    control: &Control,
    name: &str,
    id: &str,
    peer: &HttpPeer,
    labels: &[(&str, &str)],
) {
    let mut l = Labels::new();
    for (k, v) in labels {
        l.insert(k, v).unwrap();
    }
    control
        .registry
        .register(
            &service(name),
            id,
            Registration {
                mtls: false,
                address: peer.addr().ip(),
                port: peer.addr().port(),
                protocol: Default::default(),
                labels: l,
                is_static: false,
                annotations: Default::default(),
                ttl_seconds: Some(30),
            },
        )
        .await
        .unwrap();
}

/// `[control]` of a sidecar of `service` that joins `control` (over `dir`) with a fresh
/// join token, reaching it at `addr` over TLS.
pub(crate) async fn joining(
    control: &Control,
    dir: &Path,
    addr: SocketAddr,
    service: &str,
) -> ControlPlaneConfig {
    ControlPlaneConfig {
        service: Some(service.into()),
        join_token: Some(join_token_from(&control.identity, service).await),
        ..over_tls_at(addr, dir)
    }
}

/// A proxy with an outbound listener for the upstream `echo`, discovered from the control
/// plane as `control` says (`change` adjusts the upstream and the `[control]` section).
///
/// The upstream balances round robin, so which peers a test's sequential requests reach
/// depends on the discovered membership alone (P2C-EWMA sends a sequential client's every
/// request to the fastest peer).
pub(crate) fn discovering_proxy(
    control: ControlPlaneConfig,
    change: impl FnOnce(&mut malla_proxy::ProxyConfig),
) -> TestProxy {
    TestProxy::builder()
        .upstream("echo", &[])
        .balancer(BalancerKind::RoundRobin)
        .outbound("echo")
        .admin()
        .config(|c| {
            c.control = Some(control);
            change(c);
        })
        .start()
}

/// One request through the proxy on a new connection: the answering peer's name.
async fn request(addr: SocketAddr) -> Result<String, BoxError> {
    let mut conn = Http1::connect(addr).await?;
    let response = within(
        "request",
        conn.send(client::get(Version::HTTP_11, "echo", "/")),
    )
    .await?;
    let collected = client::collect(response).await?;
    if collected.status != 200 {
        return Err(format!("status {}: {}", collected.status, collected.text()).into());
    }
    Ok(collected.header("x-peer").unwrap_or_default().to_string())
}

/// Sends `n` requests; every one must succeed.
async fn send(addr: SocketAddr, n: usize) {
    for i in 0..n {
        if let Err(e) = request(addr).await {
            panic!("request {i} failed: {e}");
        }
    }
}

fn endpoint_count(proxy: &TestProxy) -> usize {
    proxy.upstream("echo").endpoints().len()
}

fn metric(proxy: &TestProxy, name: &str) -> f64 {
    admin::metric(&proxy.metrics_text(), name, &[("upstream", "echo")]).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_registrations_deregistrations_and_health() {
    let dir = TempDir::new("discovery");
    let control = start_control(dir.path(), any_port()).await;
    let (a, b, c) = (
        HttpPeer::http1("a"),
        HttpPeer::http1("b"),
        HttpPeer::http1("c"),
    );
    register(&control, "echo", "a", &a, &[]).await;
    register(&control, "echo", "b", &b, &[]).await;

    let proxy = discovering_proxy(over_tls_at(control.grpc_addr, dir.path()), |_| {});
    assert_eventually!(
        endpoint_count(&proxy) == 2,
        "the proxy never discovered a and b"
    );
    // Ready once the first snapshot arrived.
    assert_eventually!(admin::status(proxy.admin(), "/ready").await == 200);
    let out = proxy.outbound();
    send(out, 20).await;
    assert!(a.state().requests() > 0 && b.state().requests() > 0);

    // A new registration receives traffic.
    register(&control, "echo", "c", &c, &[]).await;
    assert_eventually!(
        request(out).await.unwrap() == "c",
        "the new instance c never received a request"
    );

    // A deregistered instance stops receiving traffic.
    control
        .registry
        .deregister(&service("echo"), "a")
        .await
        .unwrap();
    assert_eventually!(endpoint_count(&proxy) == 2, "a was never removed");
    let before = a.state().requests();
    send(out, 20).await;
    assert_eq!(
        a.state().requests(),
        before,
        "a received traffic after deregistering"
    );

    // An unhealthy instance is kept out (listed, flagged: one of two available is not
    // below the panic threshold), and comes back when healthy.
    control
        .registry
        .set_health(&service("echo"), "b", Health::Unhealthy)
        .await
        .unwrap();
    assert_eventually!(
        proxy
            .upstream("echo")
            .endpoints()
            .iter()
            .any(|e| e.control_unhealthy()),
        "unhealthy b was never flagged"
    );
    let before = b.state().requests();
    send(out, 20).await;
    assert_eq!(b.state().requests(), before, "unhealthy b received traffic");
    control
        .registry
        .set_health(&service("echo"), "b", Health::Healthy)
        .await
        .unwrap();
    assert_eventually!(
        request(out).await.unwrap() == "b",
        "b never received traffic again once healthy"
    );

    // The state is visible: /config and metrics.
    let config = admin::config(proxy.admin()).await;
    let upstream = &config["upstreams"][0];
    let discovery = &upstream["discovery"];
    assert_eq!(discovery["connected"], true, "{discovery}");
    assert_eq!(discovery["service"], "echo");
    assert_eq!(discovery["instances"], 2, "{discovery}");
    assert_eq!(discovery["serving"], 2, "{discovery}");
    assert_eq!(
        discovery["revision"].as_u64().unwrap(),
        control.registry.view().revision,
        "{discovery}"
    );
    assert!(discovery["last_update_age_seconds"].as_f64().unwrap() < 10.0);
    assert_eq!(config["control"]["url"], control.grpc_addr.to_string());
    assert_eq!(metric(&proxy, "malla_proxy_control_connected"), 1.0);
    assert_eq!(
        metric(&proxy, "malla_proxy_control_revision") as u64,
        control.registry.view().revision
    );
    let text = admin::metrics(proxy.admin()).await;
    assert!(
        text.contains("malla_proxy_control_last_update_age_seconds{upstream=\"echo\"}"),
        "{text}"
    );

    proxy.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_choose_instances_and_relabelling_moves_them() {
    let dir = TempDir::new("discovery-selector");
    let control = start_control(dir.path(), any_port()).await;
    let (prod, dev) = (HttpPeer::http1("prod"), HttpPeer::http1("dev"));
    register(&control, "quote", "p", &prod, &[("env", "prod")]).await;
    register(&control, "quote", "d", &dev, &[("env", "dev")]).await;

    // The upstream's name differs from the service it discovers.
    let proxy = discovering_proxy(over_tls_at(control.grpc_addr, dir.path()), |c| {
        c.upstreams[0].service = Some("quote".into());
        c.upstreams[0].selector = Some("env=prod".into());
    });
    assert_eventually!(
        endpoint_count(&proxy) == 1,
        "the proxy never discovered prod"
    );
    send(proxy.outbound(), 10).await;
    assert_eq!(dev.state().requests(), 0, "dev does not match env=prod");

    register(&control, "quote", "d", &dev, &[("env", "prod")]).await;
    assert_eventually!(
        request(proxy.outbound()).await.unwrap() == "dev",
        "relabelled dev never received traffic"
    );
    register(&control, "quote", "p", &prod, &[("env", "staging")]).await;
    assert_eventually!(endpoint_count(&proxy) == 1, "relabelled prod never left");
    let before = prod.state().requests();
    send(proxy.outbound(), 10).await;
    assert_eq!(prod.state().requests(), before);

    proxy.stop().await;
    control.stop().await;
}

/// Requests sent one after another until stopped; counts successes and failures.
struct Traffic {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Traffic {
        let (ok, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let task = tokio::spawn({
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            async move {
                let mut errors = Vec::new();
                // Bounded: at most 20,000 requests (a few seconds' worth here).
                for _ in 0..20_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match request(addr).await {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            errors.push(e.to_string());
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
                errors
            }
        });
        Traffic {
            ok,
            failed,
            stop,
            task,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops and returns (successes, failure messages).
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = within("the traffic task", self.task).await.unwrap();
        assert_eq!(self.failed.load(Ordering::SeqCst) as usize, errors.len());
        (self.ok.load(Ordering::SeqCst), errors)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_under_live_traffic_fails_no_request() {
    let dir = TempDir::new("discovery-restart");
    let control = start_control(dir.path(), any_port()).await;
    let grpc_addr = control.grpc_addr;
    let (a, b, app) = (
        HttpPeer::http1("a"),
        HttpPeer::http1("b"),
        HttpPeer::http1("app"),
    );
    register(&control, "echo", "a", &a, &[]).await;
    register(&control, "echo", "b", &b, &[]).await;

    // The sidecar also registers its own instance (its inbound listener, in front of `app`)
    // with a short lease, so heartbeats run during the restart.
    let joined = joining(&control, dir.path(), grpc_addr, "frontend").await;
    let proxy = discovering_proxy(joined, |c| {
        c.inbound = Some(malla_proxy::config::InboundConfig {
            listen: any_port(),
            forward_to: app.addr().to_string(),
            protocol: ListenerProtocol::Auto,
            mtls: Default::default(),
        });
        let control = c.control.as_mut().unwrap();
        control.instance_id = Some("frontend-1".into());
        control.labels.insert("env".into(), "test".into());
        control.lease_ttl = Duration::from_secs(3);
    });
    assert_eventually!(
        endpoint_count(&proxy) == 2,
        "the proxy never discovered a and b"
    );
    let frontend = service("frontend");
    assert_eventually!(
        control
            .registry
            .instances(&frontend, &Default::default())
            .is_some_and(|(_, i)| i.len() == 1),
        "the sidecar never registered itself"
    );
    let (_, me) = control
        .registry
        .instances(&frontend, &Default::default())
        .unwrap();
    assert_eq!(me[0].socket_addr(), proxy.inbound());
    assert_eq!(me[0].labels.get("env"), Some("test"));

    let traffic = Traffic::start(proxy.outbound());
    assert_eventually!(traffic.ok() >= 20, "no traffic flows");

    // Kill the control plane; the sidecar notices and keeps serving.
    control.stop().await;
    assert_eventually!(
        metric(&proxy, "malla_proxy_control_connected") == 0.0,
        "the sidecar never noticed the control plane was gone"
    );
    let during = traffic.ok();
    assert_eventually!(
        traffic.ok() >= during + 20,
        "traffic stopped while the control plane was down"
    );
    assert_eq!(
        endpoint_count(&proxy),
        2,
        "the last known endpoints must stay"
    );

    // Back on the same data directory and the same gRPC port.
    let control = start_control(dir.path(), grpc_addr).await;
    assert_eq!(control.grpc_addr, grpc_addr);
    assert_eventually!(
        metric(&proxy, "malla_proxy_control_connected") == 1.0,
        "the sidecar never reconnected"
    );
    assert!(metric(&proxy, "malla_proxy_control_reconnects_total") >= 1.0);
    let after = traffic.ok();
    assert_eventually!(
        traffic.ok() >= after + 20,
        "traffic stopped after the restart"
    );
    let (ok, errors) = traffic.finish().await;
    assert!(
        errors.is_empty(),
        "{} of {} requests failed: {:?}",
        errors.len(),
        ok + errors.len() as u64,
        &errors[..errors.len().min(5)]
    );

    // The leases were resumed: every instance is still registered, and the sidecar's
    // heartbeats renew its lease without registering again.
    let view = control.registry.view();
    let ids: Vec<&String> = view.services[&service("echo")].instances.keys().collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(view.services[&frontend]
        .instances
        .contains_key("frontend-1"));
    let config = admin::config(proxy.admin()).await;
    let registration = &config["control"]["registration"];
    assert_eq!(registration["registered"], true, "{registration}");
    assert_eq!(registration["registrations"], 1, "{registration}");
    assert_eq!(config["upstreams"][0]["discovery"]["connected"], true);

    // Draining deregisters the sidecar first.
    proxy.stop().await;
    assert!(
        control
            .registry
            .instances(&frontend, &Default::default())
            .is_none_or(|(_, i)| i.is_empty()),
        "the drained sidecar is still registered"
    );
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_drops_instances_that_left_while_disconnected() {
    let dir = TempDir::new("discovery-resync");
    let control = start_control(dir.path(), any_port()).await;
    let grpc_addr = control.grpc_addr;
    let (a, b) = (HttpPeer::http1("a"), HttpPeer::http1("b"));
    register(&control, "echo", "a", &a, &[]).await;
    register(&control, "echo", "b", &b, &[]).await;
    let proxy = discovering_proxy(over_tls_at(grpc_addr, dir.path()), |_| {});
    assert_eventually!(
        endpoint_count(&proxy) == 2,
        "the proxy never discovered a and b"
    );
    control.stop().await;
    assert_eventually!(metric(&proxy, "malla_proxy_control_connected") == 0.0);

    // While the sidecar cannot reach it (another port), b leaves the registry.
    let elsewhere = start_control(dir.path(), any_port()).await;
    elsewhere
        .registry
        .deregister(&service("echo"), "b")
        .await
        .unwrap();
    elsewhere.stop().await;
    assert_eq!(endpoint_count(&proxy), 2, "nothing told the sidecar yet");

    // Back where the sidecar looks: the snapshot replaces the set and b is gone.
    let control = start_control(dir.path(), grpc_addr).await;
    assert_eventually!(endpoint_count(&proxy) == 1, "b survived the resync");
    assert_eq!(proxy.upstream("echo").endpoints()[0].addr, a.addr());
    let before = b.state().requests();
    send(proxy.outbound(), 10).await;
    assert_eq!(b.state().requests(), before);

    proxy.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_control_plane_is_retried_and_reported() {
    // The sidecar has the control plane's trust bundle, and nothing listens where it
    // looks (a port just released).
    let dir = TempDir::new("discovery-unreachable");
    start_control(dir.path(), any_port()).await.stop().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = discovering_proxy(over_tls_at(closed, dir.path()), |_| {});
    let config = admin::config(proxy.admin()).await;
    assert_eq!(config["upstreams"][0]["discovery"]["connected"], false);
    assert_eventually!(
        admin::config(proxy.admin()).await["upstreams"][0]["discovery"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Unavailable")),
        "no error reported"
    );
    // Requests meanwhile get the proxy's own answer (no endpoints), not a hang, and the
    // sidecar does not claim to be ready before it knows any endpoint.
    let err = request(proxy.outbound()).await.unwrap_err().to_string();
    assert!(err.contains("503"), "{err}");
    let (status, body) = admin::get(proxy.admin(), "/ready").await.unwrap();
    assert_eq!(status, 503);
    assert!(
        body.contains("waiting for the control plane's first endpoints of: echo"),
        "{body}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_registered_again() {
    let dir = TempDir::new("discovery-lease");
    let control = start_control(dir.path(), any_port()).await;
    let app = HttpPeer::http1("app");
    // No [inbound]: the address to register is given.
    let joined = joining(&control, dir.path(), control.grpc_addr, "worker").await;
    let proxy = discovering_proxy(joined, |c| {
        let control = c.control.as_mut().unwrap();
        control.instance_id = Some("worker-1".into());
        control.register_address = Some(app.addr());
        control.lease_ttl = Duration::from_secs(3);
    });
    let worker = service("worker");
    let registered = |control: &Control| {
        control
            .registry
            .instances(&worker, &Default::default())
            .is_some_and(|(_, i)| i.len() == 1 && i[0].socket_addr() == app.addr())
    };
    assert_eventually!(registered(&control), "the sidecar never registered");

    // The instance is removed behind the sidecar's back (its lease is revoked): the next
    // heartbeat learns it (NOT_FOUND) and the sidecar registers again.
    control
        .registry
        .deregister(&worker, "worker-1")
        .await
        .unwrap();
    assert!(!registered(&control));
    assert_eventually!(registered(&control), "the sidecar never registered again");
    assert_eventually!(
        admin::metric(
            &proxy.metrics_text(),
            "malla_proxy_control_registrations_total",
            &[]
        ) == Some(2.0)
    );
    assert_eq!(
        admin::metric(&proxy.metrics_text(), "malla_proxy_control_registered", &[]),
        Some(1.0)
    );
    proxy.stop().await;
    assert!(
        !registered(&control),
        "the drained sidecar is still registered"
    );
    control.stop().await;
}
