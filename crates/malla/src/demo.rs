//! `malla demo`: what already works, in one command and with nothing to install.
//!
//! Starts a control plane (embedded store in a temporary directory, its CA created there),
//! three instances of a demo `shipping-quote` service (the third one slow), each behind a
//! sidecar of its own, and a client sidecar (service `demo-client`) that discovers them
//! through the control plane's watch API. Every sidecar joins the mesh with a single-use
//! join token of its service, gets its certificate, and only then registers; the
//! instances' sidecars take mutual TLS only (`mtls = strict`), so every hop between
//! sidecars is mTLS. The demo sends traffic through the client sidecar over HTTP/1.1 and
//! HTTP/2 and prints where it went (P2C over peak-EWMA steers away from the slow instance
//! without being told), then shows it was secured: each sidecar's SPIFFE ID, the mTLS
//! connections and their key exchange group as the sidecars counted them, the caller's
//! identity as the instance saw it (`malla-client-id`), a plaintext request refused. Then
//! it stops the slow instance's sidecar (which deregisters it) and starts a new instance
//! behind a new sidecar, and shows the traffic follow. Then resilience: a policy applied to
//! the control plane reaches the client sidecar, one instance starts answering 500 to
//! everything, and the clients see no error (retries within the budget) while its circuit
//! breaker ejects it; when it heals, a half-open probe brings it back. Then it keeps the
//! mesh running for `curl`, the CLI and `dig` until Ctrl-C (or exits at once with
//! `--exit`).
//!
//! Nothing registers an instance directly: each sidecar registers its own, with the
//! labels the demo gives it, as `malla proxy --service` does. The sidecars reach the
//! control plane over TLS, verified with the trust bundle it keeps in its data directory
//! (`malla proxy --control-ca`), and the control plane, as `malla control` does, serves no
//! plaintext.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU16, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use malla_control::{
    server::{Control, ControlConfig, DnsSettings},
    serving::ServeSettings,
};
use malla_core::ServiceName;
use malla_proxy::{
    config::{
        AdminConfig, ControlPlaneConfig, InboundConfig, ListenerProtocol, MtlsMode, OutboundConfig,
        UpstreamConfig,
    },
    identity::{IdentityState, Svid},
    ProxyConfig, ProxyHandle,
};
use tokio::{
    net::TcpListener,
    task::{AbortHandle, JoinSet},
    time::Instant,
};

/// The demo service, and the service of the client's sidecar.
const SERVICE: &str = "shipping-quote";
const CLIENT: &str = "demo-client";
/// What the client's sidecar registers: it has no inbound listener, and nobody calls
/// `demo-client` (port 9 is discard). A sidecar registers to get its certificate.
const CLIENT_REGISTERED: &str = "127.0.0.1:9";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The control plane's HTTP API (what `malla services` talks to).
    #[arg(long, default_value = "127.0.0.1:7780")]
    control_http: SocketAddr,
    /// The control plane's gRPC API (what the sidecars watch).
    #[arg(long, default_value = "127.0.0.1:7781")]
    control_grpc: SocketAddr,
    /// The control plane's DNS.
    #[arg(long, default_value = "127.0.0.1:7753")]
    dns: SocketAddr,
    /// Where the client sidecar's outbound listener for `shipping-quote` listens.
    #[arg(long, default_value = "127.0.0.1:4140")]
    listen: SocketAddr,
    /// The client sidecar's admin listener.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
    /// Requests sent per protocol in the traffic phase.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Added latency of the slow instance, in milliseconds.
    #[arg(long, default_value_t = 25)]
    slow_ms: u64,
    /// Exit after the traffic report instead of serving until Ctrl-C.
    #[arg(long)]
    exit: bool,
}

/// One demo instance: the application, and the sidecar in front of it.
struct Instance {
    name: &'static str,
    /// Its sidecar's inbound listener: the address it registered, what callers reach.
    addr: SocketAddr,
    /// The application, which only its sidecar calls.
    app: SocketAddr,
    sidecar: ProxyHandle,
    served: Arc<AtomicU64>,
    /// The status it answers with (200 unless the demo breaks it).
    status: Arc<AtomicU16>,
    /// The application's accept loop.
    server: AbortHandle,
}

impl Instance {
    /// Stops the sidecar (it deregisters the instance first), then the application.
    async fn stop(self) {
        self.sidecar.shutdown().await;
        self.server.abort();
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    println!(
        "malla demo: a control plane, three instances of shipping-quote behind sidecars, a client sidecar, all mTLS\n"
    );
    let data_dir = std::env::temp_dir().join(format!("malla-demo-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(data_dir.clone());
    let serving = ServeSettings {
        allow_plaintext: false,
        ..ServeSettings::default()
    };
    let control = Control::start_with(
        ControlConfig {
        data_dir: data_dir.clone(),
        http_addr: args.control_http,
        grpc_addr: args.control_grpc,
        dns_addr: Some(args.dns),
        dns: DnsSettings::default(),
        identity: Default::default(),
        tls_names: Vec::new(),
    },
        serving,
    )
    .await
    .context("cannot start the control plane; pick other ports with --control-http, --control-grpc and --dns")?;
    let dns = control.dns_addr.context("DNS address")?;
    println!(
        "  control plane   https://{}  (malla services, malla instances)",
        control.http_addr
    );
    println!(
        "                  https://{}  (gRPC: sidecars, and their certificates)   dns {dns}",
        control.grpc_addr
    );

    let mut instances = Vec::new();
    for (name, zone, delay) in [
        ("quote-a", "eu-1", 0),
        ("quote-b", "eu-2", 0),
        ("quote-c", "eu-1", args.slow_ms),
    ] {
        let instance = start_instance(&control, name, zone, Duration::from_millis(delay)).await?;
        let slow = if delay > 0 { "  (slow)" } else { "" };
        println!(
            "  instance        {:<8} sidecar {} (mTLS only) -> app http://{}  zone={zone}{slow}",
            instance.name, instance.addr, instance.app
        );
        instances.push(instance);
    }

    // The client's sidecar knows no endpoint: it learns them from the control plane.
    let mut upstream = UpstreamConfig::new(SERVICE, Vec::new());
    upstream.connect_timeout = Duration::from_millis(500);
    let config = ProxyConfig {
        upstreams: vec![upstream],
        outbound: vec![OutboundConfig {
            listen: args.listen,
            upstream: SERVICE.into(),
            protocol: ListenerProtocol::Auto,
        }],
        admin: Some(AdminConfig { listen: args.admin }),
        control: Some(ControlPlaneConfig {
            service: Some(CLIENT.into()),
            instance_id: Some(CLIENT.into()),
            register_address: Some(CLIENT_REGISTERED.parse()?),
            join_token: Some(join_token(&control, CLIENT).await?),
            ..control_plane(&control)
        }),
        ..ProxyConfig::default()
    };
    let started = Instant::now();
    let proxy = malla_proxy::start(config).with_context(|| {
        format!(
            "cannot start the client sidecar; is something else on {} or {}? pick other ports with --listen/--admin",
            args.listen, args.admin
        )
    })?;
    let sidecar = proxy.bound().outbound[0];
    let admin = proxy.bound().admin.context("admin listener")?;
    println!("  client sidecar  http://{sidecar}  (HTTP/1.1, HTTP/2, TCP: detected)");
    println!("  its admin       http://{admin}/metrics  /config  /ready\n");
    let upstream = proxy.upstream(SERVICE).context("the demo upstream")?;
    // Without its certificate it would call in plaintext, which the instances refuse.
    let client_svid = certificate(&proxy, CLIENT).await?;
    wait_for(|| upstream.endpoints().len() == instances.len()).await?;
    println!(
        "Every sidecar joined the mesh with a join token and got its certificate; the instances' sidecars registered\n\
         them, and the client's sidecar discovered the {} endpoints through the control plane {:.0} ms after it started.\n",
        instances.len(),
        started.elapsed().as_secs_f64() * 1e3
    );

    for h2 in [false, true] {
        let proto = if h2 { "HTTP/2" } else { "HTTP/1.1" };
        let before = served(&instances);
        let started = Instant::now();
        let (ok, failed) = send_traffic(sidecar, args.requests, h2).await;
        let elapsed = started.elapsed();
        println!(
            "{proto}: {ok} ok, {failed} failed, {:.0} req/s through the sidecars (16 concurrent)",
            ok as f64 / elapsed.as_secs_f64()
        );
        report(&instances, &before, ok);
    }
    println!(
        "P2C over peak-EWMA latency sends little to the slow instance: no configuration needed.\n"
    );

    secured(&proxy, &client_svid, &instances, sidecar).await?;

    // Take the slow instance out and bring a new one in: the client's sidecar follows the
    // registry, which the instances' sidecars keep.
    let old = instances.remove(2);
    let (old_name, gone) = (old.name, old.addr);
    old.stop().await;
    let started = Instant::now();
    let d = start_instance(&control, "quote-d", "eu-2", Duration::ZERO).await?;
    let new = d.addr;
    wait_for(|| {
        let endpoints = upstream.endpoints();
        endpoints.iter().any(|e| e.addr == new) && endpoints.iter().all(|e| e.addr != gone)
    })
    .await?;
    println!(
        "Stopped {old_name}'s sidecar (it deregistered {old_name}) and started quote-d behind a new one: its certificate,\n\
         its registration and the client's sidecar sending to it {:.0} ms after it started.",
        started.elapsed().as_secs_f64() * 1e3
    );
    instances.insert(2, d);
    let before = served(&instances);
    let (ok, failed) = send_traffic(sidecar, args.requests, false).await;
    println!("HTTP/1.1: {ok} ok, {failed} failed");
    report(&instances, &before, ok);

    resilience(&control, &proxy, &instances, sidecar, args.requests).await?;

    if !args.exit {
        let ctl = control.http_addr;
        let a = instances[0].addr;
        println!("The mesh keeps running. Try:");
        // The CLI talks to the control plane's API over TLS, verified with its trust
        // bundle, with its operator token: both made at this start in the demo's data
        // directory (not the ./malla-data the CLI looks in).
        println!(
            "  export MALLA_TOKEN_FILE={} MALLA_CA_FILE={}",
            data_dir.join("operator.token").display(),
            control.trust_bundle_path().display()
        );
        println!("  curl -i http://{sidecar}/quote");
        println!("  curl --http2-prior-knowledge -i http://{sidecar}/quote");
        println!("  curl -i http://{a}/quote    (plaintext to quote-a's sidecar: refused)");
        println!("  malla services --control {ctl}");
        println!("  malla get policies --control {ctl}");
        println!("  malla events --control {ctl}");
        println!("  malla instances shipping-quote --selector zone=eu-2 --control {ctl}");
        println!(
            "  curl --cacert $MALLA_CA_FILE -H \"Authorization: Bearer $(cat $MALLA_TOKEN_FILE)\" https://{ctl}/v1/services"
        );
        println!(
            "  dig @{} -p {} +short eu-2.zone.shipping-quote.svc.malla",
            dns.ip(),
            dns.port()
        );
        println!("  curl -s http://{admin}/metrics | grep malla_proxy_responses_total");
        println!(
            "  curl -s http://{admin}/metrics | grep malla_proxy_outbound_connections_by_security"
        );
        println!("  curl -s http://{admin}/config    (control.identity: the client sidecar's certificate)");
        println!("Ctrl-C stops it.");
        tokio::signal::ctrl_c().await?;
        println!("\ndraining...");
    }
    proxy.shutdown().await;
    let mut stopping = JoinSet::new();
    for instance in instances {
        stopping.spawn(instance.stop());
    }
    while stopping.join_next().await.is_some() {}
    control.stop().await;
    Ok(())
}

/// The section that shows the traffic was secured: the identities, the connections as the
/// sidecars counted them, the caller as an instance saw it, and plaintext refused.
async fn secured(
    proxy: &ProxyHandle,
    client: &Svid,
    instances: &[Instance],
    sidecar: SocketAddr,
) -> anyhow::Result<()> {
    println!("Secured, with nothing to set up. Each sidecar holds its service's identity, certified by the control plane's CA:");
    println!("  {CLIENT:<15} {}", client.spiffe_id);
    for i in instances {
        let svid = certificate(&i.sidecar, SERVICE).await?;
        println!("  {:<15} {}", i.name, svid.spiffe_id);
    }
    let outbound = connections(&[proxy], "outbound");
    let sidecars: Vec<&ProxyHandle> = instances.iter().map(|i| &i.sidecar).collect();
    let inbound = connections(&sidecars, "inbound");
    println!(
        "  connections the client's sidecar opened to the instances: {}",
        describe(&outbound)
    );
    println!(
        "  connections the instances' sidecars accepted:             {}",
        describe(&inbound)
    );

    // The caller's identity reaches the application: the demo app echoes it.
    let mut h1 = h1_connect(sidecar).await?;
    let response = h1
        .send_request(
            Request::get("/quote")
                .header("host", SERVICE)
                .body(Empty::new())?,
        )
        .await?;
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
            .to_string()
    };
    println!(
        "  {} saw its caller as malla-client-id: {}",
        header("x-instance"),
        header("x-caller")
    );

    // Plaintext straight to an instance's sidecar, past the client's: closed unanswered.
    let a = &instances[0];
    let answered = match h1_connect(a.addr).await {
        Ok(mut s) => s
            .send_request(
                Request::get("/quote")
                    .header("host", SERVICE)
                    .body(Empty::new())?,
            )
            .await
            .ok()
            .map(|r| r.status()),
        Err(_) => None,
    };
    let refused: u64 = connections(&[&a.sidecar], "inbound")
        .iter()
        .filter(|((security, _), _)| security == "plaintext-refused")
        .map(|(_, n)| n)
        .sum();
    match answered {
        None => println!(
            "  a plaintext request straight to {}'s sidecar: closed unanswered (its plaintext-refused count: {refused})\n",
            a.name
        ),
        Some(status) => println!(
            "  a plaintext request straight to {}'s sidecar: answered {status}\n",
            a.name
        ),
    }
    Ok(())
}

/// A single-use join token for `service`, as `malla token create --service` makes one.
async fn join_token(control: &Control, service: &str) -> anyhow::Result<String> {
    Ok(control
        .identity
        .tokens
        .create(&ServiceName::new(service)?, None)
        .await
        .with_context(|| format!("a join token for {service}"))?
        .token)
}

/// The sidecar's certificate, waiting at most 5 s for the CA's answer.
async fn certificate(proxy: &ProxyHandle, service: &str) -> anyhow::Result<Arc<Svid>> {
    let state: Arc<IdentityState> = proxy
        .discovery()
        .and_then(|d| d.identity())
        .cloned()
        .context("the sidecar has no identity configured")?;
    let _ = tokio::time::timeout(Duration::from_secs(5), state.issued()).await;
    state.current().with_context(|| {
        format!(
            "a sidecar of {service} got no certificate within 5 s: {}",
            state.to_json()["last_error"]
        )
    })
}

/// `malla_proxy_{direction}_connections_by_security_total` of `proxies`, summed by
/// (security, group).
fn connections(proxies: &[&ProxyHandle], direction: &str) -> BTreeMap<(String, String), u64> {
    let name = format!("malla_proxy_{direction}_connections_by_security_total{{");
    let mut counts = BTreeMap::new();
    for proxy in proxies {
        for line in proxy.metrics().encode().lines() {
            let Some(rest) = line.strip_prefix(&name) else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let label = |key: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\""))
                    .map(|v| v.trim_end_matches('"').to_string())
                    .unwrap_or_default()
            };
            let n = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
            *counts
                .entry((label("security"), label("group")))
                .or_default() += n;
        }
    }
    counts
}

/// `24 mTLS (X25519MLKEM768)`, and any connection secured otherwise.
fn describe(counts: &BTreeMap<(String, String), u64>) -> String {
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(
            |((security, group), n)| match (security.as_str(), group.as_str()) {
                ("mtls", "") => format!("{n} mTLS"),
                ("mtls", group) => format!("{n} mTLS (TLS 1.3, key exchange {group})"),
                (other, _) => format!("{n} {other}"),
            },
        )
        .collect();
    match parts.is_empty() {
        true => "none".into(),
        false => parts.join("; "),
    }
}

/// A policy through the control plane, then one instance failing and healing.
async fn resilience(
    control: &Control,
    proxy: &ProxyHandle,
    instances: &[Instance],
    sidecar: SocketAddr,
    requests: u64,
) -> anyhow::Result<()> {
    let upstream = proxy.upstream(SERVICE).context("the demo upstream")?;
    let policy: malla_core::Policy = toml::from_str(
        r#"
        service = "shipping-quote"
        [outlier]
        consecutive_failures = 3
        base_ejection_time = "1s"
        "#,
    )?;
    let applied = control
        .policies
        .put(&ServiceName::new(SERVICE)?, policy)
        .await?;
    wait_for(|| upstream.state()["policy"]["source"]["source"] == "control-plane").await?;
    println!(
        "Applied a policy for shipping-quote (version {}): the client's sidecar runs on it (see /config).",
        applied.version
    );

    let broken = &instances[1];
    broken.status.store(500, Ordering::Relaxed);
    let before = served(instances);
    let (ok, failed) = send_traffic(sidecar, requests, false).await;
    println!(
        "{} now answers 500 to everything. HTTP/1.1: {ok} ok, {failed} failed: its failures were retried on the others,",
        broken.name
    );
    println!("and its circuit breaker opened after 3 in a row:");
    report(instances, &before, ok);

    broken.status.store(200, Ordering::Relaxed);
    let healed = Instant::now();
    let addr = broken.addr;
    let mut closed = false;
    for _ in 0..100 {
        send_traffic(sidecar, 20, false).await;
        let state = upstream.state();
        closed = state["endpoints"].as_array().is_some_and(|eps| {
            eps.iter()
                .any(|e| e["address"] == addr.to_string() && e["breaker"] == "closed")
        });
        if closed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if closed {
        println!(
            "{} healed: a half-open probe closed its breaker {:.1} s later.",
            broken.name,
            healed.elapsed().as_secs_f64()
        );
    }
    // The sidecar reports its breakers' transitions to the control plane (`malla events`).
    let filter = malla_control::events::EventFilter::default();
    let about = |e: &malla_control::events::ReportedEvent| e.endpoint == Some(addr);
    for _ in 0..100 {
        if control
            .events
            .query(&filter, 100)
            .iter()
            .any(|e| about(e) && e.kind == "closed")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("The events the control plane received from the client's sidecar (malla events):");
    for e in control
        .events
        .query(&filter, 100)
        .iter()
        .filter(|e| about(e))
    {
        println!("  {:<10} {}", e.kind, e.detail);
    }
    println!();
    Ok(())
}

/// Starts an instance and its sidecar, which joins the mesh with a fresh join token of
/// `shipping-quote`, takes mTLS only, and registers the instance (with its labels) once
/// it holds its certificate.
async fn start_instance(
    control: &Control,
    name: &'static str,
    zone: &str,
    delay: Duration,
) -> anyhow::Result<Instance> {
    let (app, served, status, server) = start_app(name, delay).await?;
    let config = ProxyConfig {
        // One worker and a short drain: a demo instance serves little.
        workers: 1,
        drain_timeout: Duration::from_secs(1),
        inbound: Some(InboundConfig {
            listen: "127.0.0.1:0".parse()?,
            forward_to: app.to_string(),
            protocol: ListenerProtocol::Auto,
            mtls: Some(MtlsMode::Strict),
        }),
        control: Some(ControlPlaneConfig {
            service: Some(SERVICE.into()),
            instance_id: Some(name.into()),
            labels: BTreeMap::from([
                ("zone".to_string(), zone.to_string()),
                ("env".to_string(), "demo".to_string()),
            ]),
            join_token: Some(join_token(control, SERVICE).await?),
            ..control_plane(control)
        }),
        ..ProxyConfig::default()
    };
    let sidecar =
        malla_proxy::start(config).with_context(|| format!("cannot start {name}'s sidecar"))?;
    let addr = sidecar.bound().inbound.context("the inbound listener")?;
    certificate(&sidecar, SERVICE).await?;
    Ok(Instance {
        name,
        addr,
        app,
        sidecar,
        served,
        status,
        server,
    })
}

/// How a demo sidecar reaches the control plane: over TLS, verified with the trust bundle
/// the control plane keeps in its data directory (as `malla proxy --control-ca` would).
fn control_plane(control: &Control) -> ControlPlaneConfig {
    ControlPlaneConfig {
        ca_file: Some(control.trust_bundle_path().to_path_buf()),
        ..ControlPlaneConfig::new(control.grpc_addr.to_string())
    }
}

/// Polls `done` every 10 ms for at most 5 s.
async fn wait_for(mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..500 {
        if done() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the client's sidecar did not catch up with the control plane within 5 s")
}

fn served(instances: &[Instance]) -> Vec<u64> {
    instances
        .iter()
        .map(|i| i.served.load(Ordering::Relaxed))
        .collect()
}

fn report(instances: &[Instance], before: &[u64], ok: u64) {
    for (i, b) in instances.iter().zip(before) {
        let n = i.served.load(Ordering::Relaxed) - b;
        println!(
            "  {:<15} {:>6} requests  {:>5.1}%  {}",
            i.name,
            n,
            100.0 * n as f64 / ok.max(1) as f64,
            "#".repeat((40 * n / ok.max(1)) as usize)
        );
    }
    println!();
}

/// Removes the demo's data directory when the demo ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The demo application: answers a quote naming itself and the caller its sidecar saw
/// (`malla-client-id`), after `delay`. Returns its address, its served counter, its
/// status switch and its accept loop.
async fn start_app(
    name: &'static str,
    delay: Duration,
) -> anyhow::Result<(SocketAddr, Arc<AtomicU64>, Arc<AtomicU16>, AbortHandle)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served = Arc::new(AtomicU64::new(0));
    let status = Arc::new(AtomicU16::new(200));
    let counter = served.clone();
    let answer = status.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let counter = counter.clone();
                    let status = answer.load(Ordering::Relaxed);
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        counter.fetch_add(1, Ordering::Relaxed);
                        // Only this instance's sidecar can have set it (from the mTLS handshake).
                        let caller = req
                            .headers()
                            .get("malla-client-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let body = format!(
                            "{{\"service\":\"shipping-quote\",\"instance\":\"{name}\",\"path\":\"{}\",\"caller\":\"{caller}\",\"price_eur\":12.5}}\n",
                            req.uri().path()
                        );
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .header("x-instance", name)
                                .header("x-caller", caller)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap_or_default(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, served, status, server.abort_handle()))
}

/// Sends `total` GETs through the sidecar over 16 connections (HTTP/1.1) or 16 streams
/// on one connection (HTTP/2). Returns (ok, failed).
async fn send_traffic(sidecar: SocketAddr, total: u64, h2: bool) -> (u64, u64) {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    let h2_sender = if h2 {
        match h2_connect(sidecar).await {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("cannot open an HTTP/2 connection to the sidecar: {e}");
                return (0, total);
            }
        }
    } else {
        None
    };
    for _ in 0..16 {
        let next = next.clone();
        let h2_sender = h2_sender.clone();
        workers.spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            let mut h1 = None;
            while next.fetch_add(1, Ordering::Relaxed) < total {
                // HTTP/2 carries the authority in the URI, HTTP/1.1 in `Host`.
                let uri = if h2 {
                    "http://shipping-quote/quote"
                } else {
                    "/quote"
                };
                let req = Request::get(uri)
                    .header("host", SERVICE)
                    .body(Empty::<Bytes>::new())
                    .unwrap_or_default();
                let result = match &h2_sender {
                    Some(s) => {
                        let mut s: hyper::client::conn::http2::SendRequest<Empty<Bytes>> =
                            s.clone();
                        s.send_request(req).await.map_err(anyhow::Error::from)
                    }
                    None => {
                        if h1.is_none() {
                            h1 = h1_connect(sidecar).await.ok();
                        }
                        match h1.as_mut() {
                            Some(s) => s.send_request(req).await.map_err(anyhow::Error::from),
                            None => Err(anyhow::anyhow!("connect failed")),
                        }
                    }
                };
                match result {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await;
                        ok += 1;
                    }
                    _ => {
                        failed += 1;
                        h1 = None;
                    }
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(Ok((o, f))) = workers.join_next().await {
        ok += o;
        failed += f;
    }
    (ok, failed)
}

async fn h1_connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn h2_connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
