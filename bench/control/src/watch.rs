//! Watch fan-out: one registration at a time, timed from just before the registration call
//! until each of N watchers holds the new instance.
//!
//! - [`over_grpc`]: a real `malla control` process; N `malla.registry.v1.Registry/Watch`
//!   streams from tonic clients over TLS, 125 per HTTP/2 connection; registrations over
//!   gRPC on a connection of their own, as the operator (as `malla register` would; a
//!   sidecar proves its certificate instead).
//! - [`in_process`]: the control plane in this process; N receivers of
//!   `Registry::subscribe()`, registrations through `Registry::register`: the registry's
//!   fan-out alone, the floor the wire adds to.
//!
//! Each watcher notes when each registration reached it; a registration counts as delivered
//! when every watcher has it (or after [`DELIVERY_TIMEOUT`], which the report shows as
//! missed). The first registration warms up every stream and is not reported.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use malla_api::{pb, RegistryClient};
use malla_control::registry::Registration;
use malla_core::{Labels, ServiceName};
use malla_tests::control::{tls, TestControl};
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
    time::Instant,
};
use tonic::transport::{Channel, Endpoint};

use crate::{process::ControlProcess, report::Fanout};

/// Streams per HTTP/2 connection.
const STREAMS_PER_CONNECTION: usize = 125;
/// How long one registration may take to reach every watcher.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
const SERVICE: &str = "fanout";

/// What every watcher shares with the driver.
struct Tally {
    watchers: usize,
    /// Per registration: how many watchers have it.
    counts: Vec<AtomicUsize>,
    /// Woken when a registration reached its last watcher.
    done: Notify,
    /// Watchers past their snapshot.
    ready: AtomicUsize,
    ready_notify: Notify,
}

impl Tally {
    fn new(watchers: usize, registrations: usize) -> Arc<Tally> {
        Arc::new(Tally {
            watchers,
            counts: (0..registrations).map(|_| AtomicUsize::new(0)).collect(),
            done: Notify::new(),
            ready: AtomicUsize::new(0),
            ready_notify: Notify::new(),
        })
    }

    /// A watcher saw the instance `id` (`r-K`: registration K) at `now`.
    fn saw(&self, seen: &mut [Option<Instant>], id: &str, now: Instant) {
        let Some(k) = id.strip_prefix("r-").and_then(|k| k.parse::<usize>().ok()) else {
            return;
        };
        let Some(slot) = seen.get_mut(k) else { return };
        if slot.is_none() {
            *slot = Some(now);
            if self.counts[k].fetch_add(1, Ordering::SeqCst) + 1 == self.watchers {
                self.done.notify_one();
            }
        }
    }

    fn is_ready(&self) {
        if self.ready.fetch_add(1, Ordering::SeqCst) + 1 == self.watchers {
            self.ready_notify.notify_one();
        }
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.ready.load(Ordering::SeqCst) < self.watchers {
            tokio::time::timeout_at(deadline, self.ready_notify.notified())
                .await
                .with_context(|| {
                    format!(
                        "only {} of {} watchers got their snapshot in 60 s",
                        self.ready.load(Ordering::SeqCst),
                        self.watchers
                    )
                })?;
        }
        Ok(())
    }

    /// Waits until registration `k` reached every watcher (false: timed out).
    async fn wait_delivered(&self, k: usize) -> bool {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        while self.counts[k].load(Ordering::SeqCst) < self.watchers {
            if tokio::time::timeout_at(deadline, self.done.notified())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}

/// Drives `registrations` + 1 registrations through `register` (the first warms up) and
/// collects what the watchers saw.
async fn drive<F, Fut>(
    mut register: F,
    tally: &Tally,
    stop: watch::Sender<bool>,
    watchers: Vec<JoinHandle<Vec<Option<Instant>>>>,
    mut fanout: Fanout,
) -> anyhow::Result<Fanout>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    tally.wait_ready().await?;
    let total = tally.counts.len();
    let mut started = Vec::with_capacity(total);
    for k in 0..total {
        let t0 = Instant::now();
        register(k).await?;
        fanout.register_call.push(t0.elapsed());
        started.push(t0);
        tally.wait_delivered(k).await;
        // Let the streams go quiet, so that registrations are timed one by one.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send_replace(true);
    let mut seen = Vec::with_capacity(watchers.len());
    for w in watchers {
        seen.push(w.await.context("a watcher panicked")?);
    }
    // Registration 0 warmed up the streams.
    fanout.register_call.remove(0);
    for k in 1..total {
        let mut last = Duration::ZERO;
        let mut complete = true;
        for s in &seen {
            match s[k] {
                Some(at) => {
                    let latency = at.saturating_duration_since(started[k]);
                    fanout.per_event.push(latency);
                    last = last.max(latency);
                }
                None => {
                    complete = false;
                    fanout.missed += 1;
                }
            }
        }
        if complete {
            fanout.last_watcher.push(last);
        }
    }
    Ok(fanout)
}

pub async fn over_grpc(
    malla: &Path,
    watchers: usize,
    registrations: usize,
) -> anyhow::Result<Fanout> {
    let control = ControlProcess::start(malla).await?;
    let bundle = control.trust_bundle();
    let connect = || async {
        let endpoint = Endpoint::from_shared(format!("http://{}", control.grpc))?.tcp_nodelay(true);
        tls::grpc_channel_from(endpoint, control.grpc, &bundle, None)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot connect to the gRPC API at {} over TLS: {e}",
                    control.grpc
                )
            })
    };
    let connections = watchers.div_ceil(STREAMS_PER_CONNECTION).max(1);
    let mut channels: Vec<Channel> = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect().await?);
    }
    let registrar = RegistryClient::new(tls::as_operator(
        connect().await?,
        &control.operator_token()?,
    ));

    let tally = Tally::new(watchers, registrations + 1);
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::with_capacity(watchers);
    for w in 0..watchers {
        let mut client = RegistryClient::new(channels[w % connections].clone());
        let (tally, mut stopped) = (tally.clone(), stopped.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = vec![None; tally.counts.len()];
            let request = pb::WatchRequest {
                service: SERVICE.into(),
                selector: String::new(),
            };
            let mut stream = match client.watch(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    eprintln!("watch refused: {status}");
                    return seen;
                }
            };
            let mut first = true;
            loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    _ = stopped.changed() => break,
                };
                let Ok(Some(message)) = message else { break };
                let now = Instant::now();
                let instances = match message.event {
                    Some(pb::watch_response::Event::Snapshot(s)) => s.instances,
                    Some(pb::watch_response::Event::Update(u)) => u.upserted,
                    None => Vec::new(),
                };
                for instance in &instances {
                    tally.saw(&mut seen, &instance.id, now);
                }
                if first {
                    first = false;
                    tally.is_ready();
                }
            }
            seen
        }));
    }
    let fanout = Fanout {
        path: "gRPC Watch, real process",
        watchers,
        connections,
        ..Fanout::default()
    };
    let result = drive(
        |k| {
            let request = pb::RegisterRequest {
                service: SERVICE.into(),
                id: format!("r-{k}"),
                address: "127.0.0.1".into(),
                port: 10_000 + u32::try_from(k).unwrap_or(0),
                ttl_seconds: 3600,
                ..Default::default()
            };
            let mut registrar = registrar.clone();
            async move {
                registrar
                    .register(request)
                    .await
                    .context("gRPC Register failed")?;
                Ok(())
            }
        },
        &tally,
        stop,
        tasks,
        fanout,
    )
    .await;
    drop(control);
    result
}

pub async fn in_process(watchers: usize, registrations: usize) -> anyhow::Result<Fanout> {
    let control = TestControl::start_without_dns().await;
    let registry = control.registry().clone();
    let tally = Tally::new(watchers, registrations + 1);
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        let (_, mut changes) = registry.subscribe();
        let (tally, mut stopped) = (tally.clone(), stopped.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = vec![None; tally.counts.len()];
            tally.is_ready();
            loop {
                let change = tokio::select! {
                    c = changes.recv() => c,
                    _ = stopped.changed() => break,
                };
                let Ok(change) = change else { break };
                if let Some(instance) = &change.after {
                    tally.saw(&mut seen, &instance.id, Instant::now());
                }
            }
            seen
        }));
    }
    let service = ServiceName::new(SERVICE)?;
    let fanout = Fanout {
        path: "registry broadcast, in-process",
        watchers,
        connections: 0,
        ..Fanout::default()
    };
    let result = drive(
        |k| {
            let (registry, service) = (registry.clone(), service.clone());
            async move {
                let registration = Registration {
                    address: [127, 0, 0, 1].into(),
                    port: 10_000 + u16::try_from(k % 50_000).unwrap_or(0),
                    protocol: Default::default(),
                    labels: Labels::new(),
                    ttl_seconds: Some(3600),
                    is_static: false,
                    annotations: Default::default(),
                    mtls: false,
                };
                registry
                    .register(&service, &format!("r-{k}"), registration)
                    .await?;
                Ok(())
            }
        },
        &tally,
        stop,
        tasks,
        fanout,
    )
    .await;
    drop(registry);
    let mut control = control;
    control.stop().await;
    result
}
