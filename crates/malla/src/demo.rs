//! `malla demo`: what already works, in one command and with nothing to install.
//!
//! Starts a control plane (embedded store in a temporary directory), three instances of a
//! demo `shipping-quote` service registered in it (the third one slow), and a sidecar that
//! discovers them through the control plane's watch API. It sends traffic through the
//! sidecar over HTTP/1.1 and HTTP/2 and prints where it went (P2C over peak-EWMA steers
//! away from the slow instance without being told), then deregisters the slow instance and
//! registers a new one, and shows the traffic follow. Then resilience: a policy applied to
//! the control plane reaches the sidecar, one instance starts answering 500 to everything,
//! and the clients see no error (retries within the budget) while its circuit breaker
//! ejects it; when it heals, a half-open probe brings it back. Then it keeps the mesh
//! running for `curl`, the CLI and `dig` until Ctrl-C (or exits at once with `--exit`).

use std::{
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
    registry::Registration,
    server::{Control, ControlConfig, DnsSettings},
};
use malla_core::{InstanceProtocol, Labels, ServiceName};
use malla_proxy::{
    config::{AdminConfig, ControlPlaneConfig, ListenerProtocol, OutboundConfig, UpstreamConfig},
    ProxyConfig,
};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The control plane's HTTP API (what `malla services` talks to).
    #[arg(long, default_value = "127.0.0.1:7780")]
    control_http: SocketAddr,
    /// The control plane's gRPC API (what the sidecar watches).
    #[arg(long, default_value = "127.0.0.1:7781")]
    control_grpc: SocketAddr,
    /// The control plane's DNS.
    #[arg(long, default_value = "127.0.0.1:7753")]
    dns: SocketAddr,
    /// Where the sidecar's outbound listener for `shipping-quote` listens.
    #[arg(long, default_value = "127.0.0.1:4140")]
    listen: SocketAddr,
    /// The sidecar's admin listener.
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

/// One demo instance and what it served.
struct Instance {
    name: &'static str,
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    /// The status it answers with (200 unless the demo breaks it).
    status: Arc<AtomicU16>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    println!("malla demo: a control plane, three instances of shipping-quote, one sidecar\n");
    let data_dir = std::env::temp_dir().join(format!("malla-demo-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(data_dir.clone());
    let control = Control::start(ControlConfig {
        data_dir: data_dir.clone(),
        http_addr: args.control_http,
        grpc_addr: args.control_grpc,
        dns_addr: Some(args.dns),
        dns: DnsSettings::default(),
        identity: Default::default(),
    })
    .await
    .context("cannot start the control plane; pick other ports with --control-http, --control-grpc and --dns")?;
    let dns = control.dns_addr.context("DNS address")?;
    println!(
        "  control plane   http://{}  (malla services, malla instances)",
        control.http_addr
    );
    println!(
        "                  grpc://{}  (sidecars)   dns {dns}",
        control.grpc_addr
    );

    let mut instances = Vec::new();
    for (name, zone, delay) in [
        ("quote-a", "eu-1", 0),
        ("quote-b", "eu-2", 0),
        ("quote-c", "eu-1", args.slow_ms),
    ] {
        let instance = start_instance(name, Duration::from_millis(delay)).await?;
        register(&control, &instance, zone).await?;
        let slow = if delay > 0 { "  (slow)" } else { "" };
        println!(
            "  instance        {:<8} http://{}  zone={zone}{slow}",
            instance.name, instance.addr
        );
        instances.push(instance);
    }

    // The sidecar knows no endpoint: it learns them from the control plane.
    let mut upstream = UpstreamConfig::new("shipping-quote", Vec::new());
    upstream.connect_timeout = Duration::from_millis(500);
    let config = ProxyConfig {
        upstreams: vec![upstream],
        outbound: vec![OutboundConfig {
            listen: args.listen,
            upstream: "shipping-quote".into(),
            protocol: ListenerProtocol::Auto,
        }],
        admin: Some(AdminConfig { listen: args.admin }),
        control: Some(ControlPlaneConfig::new(format!(
            "http://{}",
            control.grpc_addr
        ))),
        ..ProxyConfig::default()
    };
    let proxy = malla_proxy::start(config).with_context(|| {
        format!(
            "cannot start the sidecar; is something else on {} or {}? pick other ports with --listen/--admin",
            args.listen, args.admin
        )
    })?;
    let sidecar = proxy.bound().outbound[0];
    let admin = proxy.bound().admin.context("admin listener")?;
    println!("  sidecar         http://{sidecar}  (HTTP/1.1, HTTP/2, TCP: detected)");
    println!("  sidecar admin   http://{admin}/metrics  /config  /ready\n");
    let upstream = proxy
        .upstream("shipping-quote")
        .context("the demo upstream")?;
    let started = Instant::now();
    wait_for(|| upstream.endpoints().len() == instances.len()).await?;
    println!(
        "The sidecar discovered {} endpoints through the control plane in {:.0} ms.\n",
        instances.len(),
        started.elapsed().as_secs_f64() * 1e3
    );

    for h2 in [false, true] {
        let proto = if h2 { "HTTP/2" } else { "HTTP/1.1" };
        let before: Vec<u64> = instances
            .iter()
            .map(|i| i.served.load(Ordering::Relaxed))
            .collect();
        let started = Instant::now();
        let (ok, failed) = send_traffic(sidecar, args.requests, h2).await;
        let elapsed = started.elapsed();
        println!(
            "{proto}: {ok} ok, {failed} failed, {:.0} req/s through the sidecar (16 concurrent)",
            ok as f64 / elapsed.as_secs_f64()
        );
        report(&instances, &before, ok);
    }
    println!(
        "P2C over peak-EWMA latency sends little to the slow instance: no configuration needed.\n"
    );

    // Take the slow instance out and bring a new one in: the sidecar follows the registry.
    control
        .registry
        .deregister(&service_name()?, "quote-c")
        .await
        .context("deregister quote-c")?;
    let d = start_instance("quote-d", Duration::ZERO).await?;
    let registered = Instant::now();
    register(&control, &d, "eu-2").await?;
    let (gone, new) = (instances[2].addr, d.addr);
    wait_for(|| {
        let endpoints = upstream.endpoints();
        endpoints.iter().any(|e| e.addr == new) && endpoints.iter().all(|e| e.addr != gone)
    })
    .await?;
    println!(
        "Deregistered quote-c and registered quote-d: the sidecar had the change {:.0} ms later.",
        registered.elapsed().as_secs_f64() * 1e3
    );
    instances[2] = d;
    let before: Vec<u64> = instances
        .iter()
        .map(|i| i.served.load(Ordering::Relaxed))
        .collect();
    let (ok, failed) = send_traffic(sidecar, args.requests, false).await;
    println!("HTTP/1.1: {ok} ok, {failed} failed");
    report(&instances, &before, ok);

    resilience(&control, &proxy, &instances, sidecar, args.requests).await?;

    if args.exit {
        proxy.shutdown().await;
        control.stop().await;
        return Ok(());
    }
    let ctl = control.http_addr;
    println!("The mesh keeps running. Try:");
    println!("  curl -i http://{sidecar}/quote");
    println!("  curl --http2-prior-knowledge -i http://{sidecar}/quote");
    println!("  malla services --control http://{ctl}");
    println!("  malla get policies --control http://{ctl}");
    println!("  malla events --control http://{ctl}");
    println!("  malla instances shipping-quote --selector zone=eu-2 --control http://{ctl}");
    println!(
        "  dig @{} -p {} +short eu-2.zone.shipping-quote.svc.malla",
        dns.ip(),
        dns.port()
    );
    println!("  curl -s http://{admin}/metrics | grep malla_proxy_responses_total");
    println!("Ctrl-C stops it.");
    tokio::signal::ctrl_c().await?;
    println!("\ndraining...");
    proxy.shutdown().await;
    control.stop().await;
    Ok(())
}

/// A policy through the control plane, then one instance failing and healing.
async fn resilience(
    control: &Control,
    proxy: &malla_proxy::ProxyHandle,
    instances: &[Instance],
    sidecar: SocketAddr,
    requests: u64,
) -> anyhow::Result<()> {
    let upstream = proxy
        .upstream("shipping-quote")
        .context("the demo upstream")?;
    let policy: malla_core::Policy = toml::from_str(
        r#"
        service = "shipping-quote"
        [outlier]
        consecutive_failures = 3
        base_ejection_time = "1s"
        "#,
    )?;
    let applied = control.policies.put(&service_name()?, policy).await?;
    wait_for(|| upstream.state()["policy"]["source"]["source"] == "control-plane").await?;
    println!(
        "Applied a policy for shipping-quote (version {}): the sidecar runs on it (see /config).",
        applied.version
    );

    let broken = &instances[1];
    broken.status.store(500, Ordering::Relaxed);
    let before: Vec<u64> = instances
        .iter()
        .map(|i| i.served.load(Ordering::Relaxed))
        .collect();
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
    println!("The events the control plane received from the sidecar (malla events):");
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

fn service_name() -> anyhow::Result<ServiceName> {
    Ok(ServiceName::new("shipping-quote")?)
}

/// Registers a demo instance with a lease long enough for a demo session.
async fn register(control: &Control, instance: &Instance, zone: &str) -> anyhow::Result<()> {
    let mut labels = Labels::new();
    labels.insert("zone", zone)?;
    labels.insert("env", "demo")?;
    control
        .registry
        .register(
            &service_name()?,
            instance.name,
            Registration {
                address: instance.addr.ip(),
                port: instance.addr.port(),
                protocol: InstanceProtocol::Http,
                labels,
                ttl_seconds: Some(3600),
                is_static: false,
                annotations: Default::default(),
                mtls: false,
            },
        )
        .await
        .with_context(|| format!("register {}", instance.name))?;
    Ok(())
}

/// Polls `done` every 10 ms for at most 5 s.
async fn wait_for(mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..500 {
        if done() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the sidecar did not catch up with the control plane within 5 s")
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

async fn start_instance(name: &'static str, delay: Duration) -> anyhow::Result<Instance> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served = Arc::new(AtomicU64::new(0));
    let status = Arc::new(AtomicU16::new(200));
    let counter = served.clone();
    let answer = status.clone();
    tokio::spawn(async move {
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
                        let body = format!(
                            "{{\"service\":\"shipping-quote\",\"instance\":\"{name}\",\"path\":\"{}\",\"price_eur\":12.5}}\n",
                            req.uri().path()
                        );
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .header("x-instance", name)
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
    Ok(Instance {
        name,
        addr,
        served,
        status,
    })
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
                    .header("host", "shipping-quote")
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
