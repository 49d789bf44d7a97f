//! `malla control`: the control plane.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use malla_control::server::{Control, ControlConfig, DnsSettings};

#[derive(clap::Args)]
#[command(after_help = "Example:\n  malla control --data-dir /var/lib/malla\n\n\
    The CLI verbs (malla services, instances, register...) find it through --control or MALLA_CONTROL.")]
pub struct ControlArgs {
    /// Where the embedded store keeps its file (created if missing).
    #[arg(long, value_name = "DIR", default_value = "malla-data")]
    data_dir: PathBuf,
    /// The HTTP/JSON API (CLI, dashboard, clients outside the mesh).
    #[arg(long, value_name = "HOST:PORT", default_value = malla_control::server::DEFAULT_HTTP_ADDR)]
    http_addr: SocketAddr,
    /// The gRPC API for sidecars (`malla proxy --control`): register, heartbeat, watch.
    #[arg(long, value_name = "HOST:PORT", default_value = malla_control::server::DEFAULT_GRPC_ADDR)]
    grpc_addr: SocketAddr,
    /// DNS (UDP and TCP): `SERVICE.svc.malla.` and label filters; see docs/dns.md.
    #[arg(long, value_name = "HOST:PORT", default_value = malla_control::server::DEFAULT_DNS_ADDR)]
    dns_addr: SocketAddr,
}

pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let control = Control::start(ControlConfig {
            data_dir: args.data_dir,
            http_addr: args.http_addr,
            grpc_addr: args.grpc_addr,
            dns_addr: Some(args.dns_addr),
            dns: DnsSettings::default(),
        })
        .await?;
        tracing::info!(http = %control.http_addr, grpc = %control.grpc_addr, "control plane ready");
        // SIGTERM (service managers, `kill`) and SIGINT (Ctrl-C) both stop it cleanly: the
        // APIs close, watch streams end with UNAVAILABLE so sidecars reconnect, the store
        // is closed.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            r = tokio::signal::ctrl_c() => { r?; tracing::info!("SIGINT: stopping") }
        }
        control.stop().await;
        anyhow::Ok(())
    })
}
