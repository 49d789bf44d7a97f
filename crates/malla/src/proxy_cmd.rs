//! `malla proxy`: the sidecar.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::Args;
use malla_proxy::{
    config::{AdminConfig, BalancerKind, ListenerProtocol, OutboundConfig, UpstreamConfig},
    ProxyConfig,
};

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    malla proxy --listen 127.0.0.1:4140 --upstream 127.0.0.1:8081,127.0.0.1:8082\n  \
    malla proxy --config proxy.toml\n\n\
    The quick form runs one HTTP listener (HTTP/1.1 and HTTP/2 prior knowledge, detected)\n\
    balancing over the endpoints with default policies. See docs/config.md for the file.")]
pub struct ProxyArgs {
    /// A TOML configuration file; the flags below add to it.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,

    /// Quick form: an HTTP listener on HOST:PORT forwarding to --upstream.
    #[arg(long, value_name = "HOST:PORT", requires = "upstream")]
    listen: Option<SocketAddr>,

    /// Quick form: the endpoints behind --listen, comma-separated HOST:PORT.
    #[arg(
        long,
        value_name = "HOST:PORT[,HOST:PORT...]",
        value_delimiter = ',',
        requires = "listen"
    )]
    upstream: Vec<String>,

    /// Quick form: what the --listen listener accepts.
    #[arg(long, value_enum, default_value = "http", requires = "listen")]
    protocol: ProtocolArg,

    /// Quick form: how requests are spread over --upstream.
    #[arg(long, value_enum, default_value = "p2c-ewma", requires = "listen")]
    balancer: BalancerArg,

    /// The admin listener (/live, /ready, /metrics, /config).
    #[arg(long, value_name = "HOST:PORT")]
    admin: Option<SocketAddr>,

    /// Worker threads (each with its own event loop); 0 = one per core.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProtocolArg {
    Auto,
    Http,
    Tcp,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BalancerArg {
    P2cEwma,
    RoundRobin,
    LeastRequest,
}

fn proxy_config(args: &ProxyArgs) -> anyhow::Result<ProxyConfig> {
    let mut config = match &args.config {
        Some(path) => ProxyConfig::from_file(path)?,
        None => ProxyConfig::default(),
    };
    if let Some(listen) = args.listen {
        let name = "upstream";
        anyhow::ensure!(
            config.upstreams.iter().all(|u| u.name != name),
            "--listen/--upstream define an upstream named {name:?}, which the file defines too"
        );
        let mut upstream = UpstreamConfig::new(name, args.upstream.clone());
        upstream.balancer = match args.balancer {
            BalancerArg::P2cEwma => BalancerKind::P2cEwma,
            BalancerArg::RoundRobin => BalancerKind::RoundRobin,
            BalancerArg::LeastRequest => BalancerKind::LeastRequest,
        };
        config.upstreams.push(upstream);
        config.outbound.push(OutboundConfig {
            listen,
            upstream: name.to_string(),
            protocol: match args.protocol {
                ProtocolArg::Auto => ListenerProtocol::Auto,
                ProtocolArg::Http => ListenerProtocol::Http,
                ProtocolArg::Tcp => ListenerProtocol::Tcp,
            },
        });
    }
    if let Some(admin) = args.admin {
        config.admin = Some(AdminConfig { listen: admin });
    }
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    let source = args
        .config
        .as_ref()
        .map_or("command-line flags".to_string(), |p| {
            p.display().to_string()
        });
    config.validate(&source)?;
    Ok(config)
}

pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let config = proxy_config(&args)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let proxy = malla_proxy::start(config)?;
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal runtime")?;
    signals.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        anyhow::Ok(())
    })?;
    proxy.drain();
    proxy.join();
    tracing::info!("stopped");
    Ok(())
}
