//! `malla demo`: what already works, in one command and with nothing to install.
//!
//! Starts three instances of a demo `shipping-quote` service (the third one slow) and a
//! sidecar proxy in front of them, sends traffic through the sidecar over HTTP/1.1 and
//! HTTP/2, and prints where it went: P2C over peak-EWMA steers away from the slow instance
//! without being told. Then it keeps the mesh running for `curl` until Ctrl-C (or exits at
//! once with `--exit`).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
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
use malla_proxy::{
    config::{AdminConfig, ListenerProtocol, OutboundConfig, UpstreamConfig},
    ProxyConfig,
};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};

#[derive(clap::Args)]
pub struct DemoArgs {
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
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    println!("malla demo: three instances of shipping-quote behind one sidecar\n");
    let mut instances = Vec::new();
    for (name, delay) in [
        ("quote-a", 0),
        ("quote-b", 0),
        ("quote-c (slow)", args.slow_ms),
    ] {
        instances.push(start_instance(name, Duration::from_millis(delay)).await?);
    }
    for i in &instances {
        println!("  instance {:<15} http://{}", i.name, i.addr);
    }

    let mut upstream = UpstreamConfig::new(
        "shipping-quote",
        instances.iter().map(|i| i.addr.to_string()).collect(),
    );
    upstream.connect_timeout = Duration::from_millis(500);
    let config = ProxyConfig {
        workers: 1,
        upstreams: vec![upstream],
        outbound: vec![OutboundConfig {
            listen: args.listen,
            upstream: "shipping-quote".into(),
            protocol: ListenerProtocol::Auto,
        }],
        admin: Some(AdminConfig { listen: args.admin }),
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
    println!("  sidecar  outbound        http://{sidecar}  (HTTP/1.1, HTTP/2, TCP: detected)");
    println!("  sidecar  admin           http://{admin}/metrics  /config  /ready\n");

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
    println!(
        "P2C over peak-EWMA latency sends little to the slow instance: no configuration needed.\n"
    );
    if args.exit {
        proxy.shutdown().await;
        return Ok(());
    }
    println!("The mesh keeps running. Try:");
    println!("  curl -i http://{sidecar}/quote");
    println!("  curl --http2-prior-knowledge -i http://{sidecar}/quote");
    println!("  curl -s http://{admin}/metrics | grep malla_proxy_responses_total");
    println!("Ctrl-C stops it.");
    tokio::signal::ctrl_c().await?;
    println!("\ndraining...");
    proxy.shutdown().await;
    Ok(())
}

async fn start_instance(name: &'static str, delay: Duration) -> anyhow::Result<Instance> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let counter = counter.clone();
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
    Ok(Instance { name, addr, served })
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
