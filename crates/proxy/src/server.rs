//! Processes, threads and listeners: how a proxy starts, serves and drains.
//!
//! `workers` threads each run a single-threaded tokio runtime with their own
//! `SO_REUSEPORT` copy of every listener, so the kernel spreads connections across them
//! and a connection never migrates between threads (no work stealing, no cross-core
//! wake-ups on the hot path). The admin listener runs on a thread of its own so that a
//! scrape or a `/config` dump never delays a request.
//!
//! Draining (SIGTERM, or [`ProxyHandle::drain`]): listeners close at once, `/ready` turns
//! 503, idle connections close, HTTP/1 connections close after their current response,
//! HTTP/2 connections get a GOAWAY and finish their streams, TCP streams run to their end;
//! whatever is still open after `drain_timeout` is cut.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
};

use anyhow::Context as _;
use bytes::BytesMut;
use malla_core::Labels;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tracing::{debug, info, warn};

use crate::{
    admin,
    config::{ListenerProtocol, MtlsMode, ProxyConfig},
    detect::{self, Detected},
    discovery::{Discovery, DiscoveryStatus, DEREGISTER_TIMEOUT},
    http1, http2, inbound,
    listener::{normalize_host, Direction, ListenerCtx, Shared, Target},
    metrics::Metrics,
    resilience::events::EventLog,
    stream::Stream,
    tcp,
    tls::MeshTls,
    upstream::Upstream,
};

/// The addresses the proxy actually bound (ports resolved when `:0` was asked for).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Bound {
    pub outbound: Vec<SocketAddr>,
    pub http_proxy: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// A running proxy.
pub struct ProxyHandle {
    bound: Bound,
    shared: Arc<Shared>,
    workers: Vec<thread::JoinHandle<()>>,
    admin: Option<thread::JoinHandle<()>>,
    resilience: Option<thread::JoinHandle<()>>,
    discovery: Option<Discovery>,
}

impl ProxyHandle {
    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    /// The upstream of that name, e.g. to change its endpoints live.
    pub fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.shared.upstreams.get(name).cloned()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Resilience events not yet sent to the control plane.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.shared.events
    }

    /// The control-plane client's state (`None` without a `[control]` section).
    pub fn discovery(&self) -> Option<&DiscoveryStatus> {
        self.shared.discovery.as_deref()
    }

    /// Starts draining: `/ready` turns 503, the instance is deregistered from the control
    /// plane (waiting at most [`DEREGISTER_TIMEOUT`], so callers stop choosing it first),
    /// then listeners close and connections finish their work.
    pub fn drain(&self) {
        if !self.shared.draining.swap(true, Ordering::SeqCst) {
            info!("draining");
            if let Some(discovery) = &self.discovery {
                discovery.deregister(DEREGISTER_TIMEOUT);
            }
            self.shared.drain_tx.send_replace(true);
        }
    }

    /// Drains and waits until every worker has finished (at most `drain_timeout`).
    pub async fn shutdown(self) {
        // Draining may wait for the deregistration: off the caller's runtime threads.
        let _ = tokio::task::spawn_blocking(move || {
            self.drain();
            self.join();
        })
        .await;
    }

    /// Blocks until the proxy has drained (after [`Self::drain`]).
    pub fn join(self) {
        for w in self.workers {
            let _ = w.join();
        }
        self.shared.stopped_tx.send_replace(true);
        if let Some(a) = self.admin {
            let _ = a.join();
        }
        if let Some(r) = self.resilience {
            let _ = r.join();
        }
        if let Some(d) = self.discovery {
            d.join();
        }
    }
}

/// Builds the proxy from its configuration, binds every listener, and starts serving.
pub fn start(config: ProxyConfig) -> anyhow::Result<ProxyHandle> {
    config
        .validate("configuration")
        .map_err(anyhow::Error::new)?;
    let metrics = Arc::new(Metrics::new());
    let discovery = DiscoveryStatus::new(&config, &metrics)?.map(Arc::new);
    let events = Arc::new(EventLog::default());
    // This sidecar's locality: the labels it registers with.
    let local = config
        .control
        .as_ref()
        .and_then(|c| Labels::try_from(c.labels.clone()).ok())
        .unwrap_or_default();
    // This sidecar's mTLS, both ways, when it has an identity: it calls the endpoints
    // whose sidecars accept mTLS with it, and its inbound listener answers with it.
    let mesh_tls = discovery
        .as_ref()
        .and_then(|d| d.identity())
        .map(|identity| Arc::new(MeshTls::new(identity.clone())));
    let mut upstreams = HashMap::new();
    for u in &config.upstreams {
        upstreams.insert(
            u.name.clone(),
            Arc::new(
                Upstream::new(u.clone(), metrics.clone(), local.clone(), events.clone())?
                    .with_mesh_tls(mesh_tls.clone()),
            ),
        );
    }
    let routes = config
        .http_proxy
        .iter()
        .flat_map(|p| &p.routes)
        .filter_map(|r| {
            let upstream = upstreams.get(&r.upstream)?.clone();
            Some((normalize_host(r.host.as_bytes()), upstream))
        })
        .collect();
    let inbound = match &config.inbound {
        Some(inb) => Some(Arc::new(Upstream::new(
            inbound::upstream_config(&inb.forward_to),
            metrics.clone(),
            local,
            events.clone(),
        )?)),
        None => None,
    };
    let (drain_tx, _) = watch::channel(false);
    let (stopped_tx, _) = watch::channel(false);
    let inbound_tls = mesh_tls.filter(|_| {
        config
            .inbound
            .as_ref()
            .is_some_and(|inbound| inbound.mtls != Some(MtlsMode::Off))
    });
    let shared = Arc::new(Shared {
        upstreams,
        routes,
        metrics,
        inbound_tls,
        discovery,
        events,
        draining: AtomicBool::new(false),
        drain_tx,
        stopped_tx,
        config,
    });

    let resilience = {
        let upstreams: Vec<_> = shared.upstreams.values().cloned().collect();
        let runtime = thread_runtime("resilience")?;
        let mut stopped = shared.stopped_signal();
        thread::Builder::new()
            .name("malla-resilience".into())
            .spawn(move || {
                runtime.block_on(async move {
                    for u in upstreams {
                        tokio::spawn(u.clone().watch_stalls());
                        tokio::spawn(u.maintain());
                    }
                    let _ = stopped.wait_for(|s| *s).await;
                })
            })?
    };

    // Listener specs: (name, address, protocol, target).
    let mut specs = Vec::new();
    for (i, o) in shared.config.outbound.iter().enumerate() {
        let upstream = shared.upstreams[&o.upstream].clone();
        specs.push((
            format!("outbound-{i}"),
            o.listen,
            o.protocol,
            Target::Fixed(upstream),
        ));
    }
    if let Some(p) = &shared.config.http_proxy {
        specs.push((
            "http-proxy".to_string(),
            p.listen,
            ListenerProtocol::Http,
            Target::ByHost,
        ));
    }
    if let (Some(inb), Some(up)) = (&shared.config.inbound, inbound) {
        specs.push((
            "inbound".to_string(),
            inb.listen,
            inb.protocol,
            Target::Fixed(up),
        ));
    }

    let workers = match shared.config.workers {
        0 => thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    // Bind every listener once per worker, all sharing one port through SO_REUSEPORT.
    // The first bind resolves a `:0` port; the other workers bind to the same port.
    let mut per_worker: Vec<Vec<(Arc<ListenerCtx>, std::net::TcpListener)>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Bound::default();
    for (name, addr, protocol, target) in specs {
        let first =
            bind_reuseport(addr).with_context(|| format!("cannot listen on {addr} ({name})"))?;
        let actual = first.local_addr()?;
        match name.as_str() {
            "http-proxy" => bound.http_proxy = Some(actual),
            "inbound" => bound.inbound = Some(actual),
            _ => bound.outbound.push(actual),
        }
        let direction = if name == "inbound" {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let authorizer = match direction {
            Direction::Inbound => shared
                .discovery
                .as_deref()
                .and_then(|d| d.authorizer().cloned()),
            Direction::Outbound => None,
        };
        let ctx = Arc::new(ListenerCtx {
            direction,
            port: actual.port(),
            authorizer,
            metrics_http1: shared.metrics.listener(&name, "http1"),
            metrics_http2: shared.metrics.listener(&name, "http2"),
            metrics_tcp: shared.metrics.listener(&name, "tcp"),
            name,
            protocol,
            target,
            shared: shared.clone(),
        });
        per_worker[0].push((ctx.clone(), first));
        for w in per_worker.iter_mut().skip(1) {
            w.push((ctx.clone(), bind_reuseport(actual)?));
        }
        info!(listener = %ctx.name, addr = %actual, protocol = ?protocol, "listening");
    }

    let admin = match shared.config.admin.clone() {
        Some(a) => {
            let listener = std::net::TcpListener::bind(a.listen)
                .with_context(|| format!("cannot listen on {} (admin)", a.listen))?;
            listener.set_nonblocking(true)?;
            bound.admin = Some(listener.local_addr()?);
            info!(addr = %listener.local_addr()?, "admin listening");
            let shared = shared.clone();
            let runtime = thread_runtime("admin")?;
            Some(
                thread::Builder::new()
                    .name("malla-admin".into())
                    .spawn(move || admin::run(runtime, listener, shared))?,
            )
        }
        None => None,
    };

    // The control-plane client, once the inbound address it registers is known.
    let discovery = Discovery::start(shared.clone(), &bound)?;

    let mut threads = Vec::with_capacity(workers);
    for (i, listeners) in per_worker.into_iter().enumerate() {
        let shared = shared.clone();
        let runtime = thread_runtime("worker")?;
        threads.push(
            thread::Builder::new()
                .name(format!("malla-worker-{i}"))
                .spawn(move || run_worker(runtime, listeners, shared))?,
        );
    }
    Ok(ProxyHandle {
        bound,
        shared,
        workers: threads,
        admin,
        resilience: Some(resilience),
        discovery,
    })
}

fn bind_reuseport(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A single-threaded runtime for one proxy thread, built before the thread starts so a
/// failure is reported by [`start`].
pub(crate) fn thread_runtime(what: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .with_context(|| format!("cannot start the {what} runtime"))
}

fn run_worker(
    runtime: tokio::runtime::Runtime,
    listeners: Vec<(Arc<ListenerCtx>, std::net::TcpListener)>,
    shared: Arc<Shared>,
) {
    runtime.block_on(async move {
        // This worker's idle upstream HTTP/1 connections, closed when they expire.
        let sweep = tokio::spawn(http1::pool::sweep_forever());
        // Each connection holds a clone of `open`; when all are dropped, `closed` ends.
        let (open, mut closed) = mpsc::channel::<()>(1);
        let mut accept_loops = Vec::new();
        for (ctx, std_listener) in listeners {
            let listener = match TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, listener = %ctx.name, "cannot register listener");
                    continue;
                }
            };
            accept_loops.push(tokio::spawn(accept_loop(listener, ctx, open.clone())));
        }
        drop(open);
        for a in accept_loops {
            let _ = a.await;
        }
        let timeout = shared.config.drain_timeout;
        if tokio::time::timeout(timeout, closed.recv()).await.is_err() {
            warn!(
                ?timeout,
                "drain timeout: closing the connections still open"
            );
        }
        sweep.abort();
    });
}

async fn accept_loop(listener: TcpListener, ctx: Arc<ListenerCtx>, open: mpsc::Sender<()>) {
    let mut drain = ctx.shared.drain_signal();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                let open = open.clone();
                tokio::spawn(async move {
                    serve_connection(stream, peer, ctx).await;
                    drop(open);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, listener = %ctx.name, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<ListenerCtx>) {
    let _ = stream.set_nodelay(true);
    let (mut stream, identity) = match (&ctx.direction, &ctx.shared.inbound_tls) {
        (Direction::Inbound, Some(tls)) => {
            match inbound::accept(stream, peer, &ctx.shared, tls).await {
                Some(accepted) => accepted,
                None => return,
            }
        }
        _ => (Stream::Plain(stream), None),
    };
    let mut buf = BytesMut::with_capacity(http1::READ_BUF);
    let limits = &ctx.shared.config.limits;
    let detected = match ctx.protocol {
        ListenerProtocol::Tcp => Detected::Tcp,
        ListenerProtocol::Auto | ListenerProtocol::Http => {
            match detect::detect(&mut stream, &mut buf, limits.detect_timeout, ctx.protocol).await {
                Ok(d) => d,
                Err(e) => {
                    debug!(error = %e, %peer, "connection closed during protocol detection");
                    return;
                }
            }
        }
    };
    match detected {
        Detected::Http1 => {
            let _conn = ctx.metrics_http1.track();
            http1::serve(stream, buf, peer, identity.as_ref(), &ctx).await;
        }
        Detected::Http2 => {
            let _conn = ctx.metrics_http2.track();
            http2::serve(stream, buf, peer, identity.as_ref(), &ctx).await;
        }
        Detected::Tcp => match ctx.tcp_upstream() {
            Some(upstream) => {
                if let Some(authorizer) = ctx.enforcing() {
                    let call = crate::authz::Inbound::tcp(identity.as_ref(), ctx.port);
                    if let Err(e) = inbound::authorize(authorizer, &call) {
                        debug!(%peer, error = %e, "tcp: connection closed");
                        return;
                    }
                }
                let _conn = ctx.metrics_tcp.track();
                tcp::proxy(stream, buf, upstream).await;
            }
            None => debug!(%peer, "non-HTTP client on the HTTP proxy listener; closing"),
        },
        Detected::Closed => {}
    }
}
