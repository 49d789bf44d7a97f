//! `malla control`: the control plane.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use malla_control::{
    server::{Control, ControlConfig, DnsSettings, IdentitySettings},
    serving::{ServeSettings, DEFAULT_MAX_CONNECTIONS},
};

#[derive(clap::Args)]
#[command(after_help = "Example:\n  malla control --data-dir /var/lib/malla\n\n\
    The CLI verbs (malla services, instances, register...) and sidecars (malla proxy --control)\n\
    find it at --addr: the HTTP/JSON API and the gRPC API share that one port.")]
pub struct ControlArgs {
    /// Where the embedded store keeps its file (created if missing).
    #[arg(long, value_name = "DIR", default_value = "malla-data")]
    data_dir: PathBuf,
    /// The APIs: HTTP/JSON (CLI, dashboard, clients outside the mesh) and gRPC (sidecars)
    /// on one port, told apart by each request's content type.
    #[arg(
        long = "addr",
        visible_alias = "http-addr",
        value_name = "HOST:PORT",
        default_value = malla_control::server::DEFAULT_HTTP_ADDR
    )]
    addr: SocketAddr,
    /// A second port serving the same APIs: the gRPC port of earlier versions, kept so
    /// sidecars configured with it still connect.
    #[arg(long, value_name = "HOST:PORT", default_value = malla_control::server::DEFAULT_GRPC_ADDR)]
    grpc_addr: SocketAddr,
    /// DNS (UDP and TCP): `SERVICE.svc.malla.` and label filters; see docs/dns.md.
    #[arg(long, value_name = "HOST:PORT", default_value = malla_control::server::DEFAULT_DNS_ADDR)]
    dns_addr: SocketAddr,
    /// Most connections open at once over both ports; beyond it new connections are closed
    /// at once (and logged). Keep `ulimit -n` above it.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// How long a client has to send a request's head (and an idle HTTP/1 connection to
    /// send its next request) before its connection is closed, e.g. `10s`.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = head_timeout)]
    head_timeout: Duration,
    /// The SPIFFE trust domain of the mesh's identities: spiffe://DOMAIN/svc/SERVICE.
    #[arg(long, value_name = "DOMAIN", default_value = malla_control::server::DEFAULT_TRUST_DOMAIN)]
    trust_domain: malla_core::TrustDomain,
    /// How long the certificates the CA issues are valid, e.g. `24h`; sidecars renew them
    /// at about 70 % of it.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = cert_ttl)]
    cert_ttl: Duration,
    /// The CA's certificate (PEM): a root, or an intermediate followed by its chain up to
    /// the root. Without it the control plane creates a root in DATA_DIR/ca at first start.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert (PEM; keep it mode 600).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The mesh's mTLS mode: `permissive` (sidecars take plaintext callers too, for
    /// migration) or `strict` (they refuse them). A service's authorization policy may set
    /// its own (`mtls = "strict"`), and a sidecar's `[inbound] mtls` overrides both; sent to
    /// the sidecars as they follow their policy, so no sidecar restarts. See
    /// docs/identity.md.
    #[arg(long, value_name = "MODE", default_value = "permissive")]
    mtls_mode: malla_core::authz::PeerMtls,
    /// A DNS name or IP address the API's TLS certificate names besides localhost, this
    /// host's name, loopback and --addr/--grpc-addr, for clients that check a host name
    /// (curl, Prometheus) and reach the control plane by it; repeat for several. malla's
    /// sidecars and CLI check the control plane's SPIFFE ID and need none.
    #[arg(long = "tls-san", value_name = "NAME", value_parser = tls_san)]
    tls_sans: Vec<String>,
    /// Also serve clients that do not speak TLS (sidecars of earlier versions, configured
    /// with an http:// URL) while they are moved over; without it they are answered with
    /// what to do. Plaintext exposes the operator token and join tokens on the network.
    #[arg(long)]
    allow_plaintext: bool,
}

fn tls_san(s: &str) -> Result<String, String> {
    if s.parse::<std::net::IpAddr>().is_ok()
        || malla_control::serving::tls::is_dns_name(&s.to_ascii_lowercase())
    {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is neither an IP address nor a DNS name (letters, digits, '-', '.', an optional leading '*.')"
        ))
    }
}

/// The operator token, at the first start only: the one time it is printed.
fn show_operator_token(token: &str, file: &std::path::Path, addr: SocketAddr) {
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    // stderr, beside the logs (a service manager keeps it in its journal); shown once.
    eprintln!(
        "\nThe operator token of this control plane's HTTP API (shown this once):\n\n    {token}\n\n\
         It is kept in {} (mode 600). The CLI reads it there by itself when run on this\n\
         machine in the directory that holds ./malla-data (the default --data-dir); otherwise\n\
         give it with --token or MALLA_TOKEN (or --token-file / MALLA_TOKEN_FILE), and to curl\n\
         as -H \"Authorization: Bearer $MALLA_TOKEN\" (curl --cacert DATA_DIR/trust-bundle.pem https://{addr}/v1/...).\n\
         Replace it with `malla operator-token rotate`.\n",
        file.display()
    );
}

fn cert_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 24h, 90m)"))?;
    if d < Duration::from_secs(60) || d > Duration::from_secs(90 * 24 * 3600) {
        return Err(format!("{s} is out of range: use 1m to 90d"));
    }
    Ok(d)
}

fn head_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 10s, 1m)"))?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err(format!("{s} is out of range: use 100ms to 1h"));
    }
    Ok(d)
}

pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let control = Control::start_with(
            ControlConfig {
                data_dir: args.data_dir,
                http_addr: args.addr,
                grpc_addr: args.grpc_addr,
                dns_addr: Some(args.dns_addr),
                dns: DnsSettings::default(),
                identity: IdentitySettings {
                    trust_domain: args.trust_domain,
                    cert_ttl: args.cert_ttl,
                    ca_files: args.ca_cert.zip(args.ca_key),
                    mtls_mode: args.mtls_mode,
                },
                tls_names: args.tls_sans,
            },
            ServeSettings {
                head_timeout: args.head_timeout,
                max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
                allow_plaintext: args.allow_plaintext,
            },
        )
        .await?;
        if let Some(token) = &control.created_operator_token {
            show_operator_token(token, control.operator.path(), control.http_addr);
        }
        tracing::info!(addr = %control.http_addr, grpc_addr = %control.grpc_addr, "control plane ready");
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
