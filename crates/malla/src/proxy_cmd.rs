//! `malla proxy`: the sidecar.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::Args;
use malla_proxy::{
    config::{
        AdminConfig, BalancerKind, ControlPlaneConfig, ListenerProtocol, OutboundConfig,
        UpstreamConfig,
    },
    ProxyConfig,
};

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    malla proxy --listen 127.0.0.1:4140 --upstream 127.0.0.1:8081,127.0.0.1:8082\n  \
    malla proxy --config proxy.toml\n  \
    malla proxy --config proxy.toml --control 127.0.0.1:7780 --control-ca trust-bundle.pem --service checkout --label env=prod\n\n\
    The quick form runs one HTTP listener (HTTP/1.1 and HTTP/2 prior knowledge, detected)\n\
    balancing over the endpoints with default policies. See docs/config.md for the file.\n\
    With --control, upstreams that list no endpoints are discovered from the control plane,\n\
    and --service registers this instance (the [inbound] listener) under a lease.\n\
    The control plane is reached over TLS (HOST:PORT, https://HOST:PORT), verified with\n\
    --control-ca (its DATA_DIR/trust-bundle.pem) until this sidecar holds a certificate;\n\
    http://HOST:PORT is plaintext.")]
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

    /// The control plane (`malla control`'s address; alone: 127.0.0.1:7780): HOST:PORT or
    /// https://HOST:PORT over TLS (see --control-ca), http://HOST:PORT in plaintext.
    /// Discovers the upstreams that list no endpoints, follows their policies, reports
    /// events, and registers this instance with --service.
    #[arg(
        long,
        value_name = "HOST:PORT",
        num_args = 0..=1,
        default_missing_value = DEFAULT_CONTROL
    )]
    control: Option<String>,

    /// The PEM trust bundle to verify the control plane with over TLS: the control plane's
    /// DATA_DIR/trust-bundle.pem ([control] ca_file; also MALLA_CONTROL_CA). Needed until
    /// this sidecar holds a certificate, whose bundle is used from then on.
    #[arg(long, value_name = "FILE")]
    control_ca: Option<PathBuf>,

    /// Register this instance as a member of SERVICE (with the control plane of --control
    /// or [control], else 127.0.0.1:7780).
    #[arg(long, value_name = "NAME")]
    service: Option<String>,

    /// The registered instance's id (default: SERVICE-HOSTNAME-PID).
    #[arg(long, value_name = "ID")]
    instance_id: Option<String>,

    /// A label of the registered instance, KEY=VALUE; repeat it, or separate pairs with
    /// commas.
    #[arg(
        long = "label",
        alias = "labels",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    label: Vec<String>,

    /// The address other sidecars reach this instance at (default: the [inbound] listener).
    #[arg(long, value_name = "IP:PORT")]
    register_address: Option<SocketAddr>,

    /// A file holding a join token for --service (`malla token create --service NAME`):
    /// the sidecar gets its service's certificate with it, then renews it by itself. The
    /// token can also come from MALLA_JOIN_TOKEN (never from a flag: ps shows flags).
    #[arg(long, value_name = "FILE")]
    join_token_file: Option<std::path::PathBuf>,

    /// Where the sidecar keeps its key (0600), certificate and trust bundle, so that a
    /// restart renews them without a new join token.
    #[arg(long, value_name = "DIR")]
    identity_dir: Option<std::path::PathBuf>,

    /// Worker threads (each with its own event loop); 0 = one per core.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// The control plane's one port (HTTP API and gRPC), as `malla control` serves it.
const DEFAULT_CONTROL: &str = "127.0.0.1:7780";

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
        // Validated below, once the flags have added to it.
        Some(path) => ProxyConfig::parse_file(path)?,
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
    apply_control_flags(args, &mut config)?;
    if let Some(path) = &args.control_ca {
        let control = config.control.as_mut().context(
            "--control-ca: no control plane to verify: add --control HOST:PORT or a [control] section",
        )?;
        control.ca_file = Some(path.clone());
    }
    apply_join_token_env(&mut config);
    apply_control_ca_env(&mut config, std::env::var_os("MALLA_CONTROL_CA"));
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

/// `--control`, `--service` and the flags describing the registered instance.
fn apply_control_flags(args: &ProxyArgs, config: &mut ProxyConfig) -> anyhow::Result<()> {
    if let Some(url) = &args.control {
        // Checked here so that the error names the flag, not the section it fills.
        ControlPlaneConfig::new(url.clone())
            .endpoint()
            .map_err(|why| anyhow::anyhow!("--control {url:?}: {why}"))?;
        match &mut config.control {
            Some(control) => control.url = url.clone(),
            None => config.control = Some(ControlPlaneConfig::new(url.clone())),
        }
    }
    let registers = args.service.is_some()
        || args.instance_id.is_some()
        || !args.label.is_empty()
        || args.register_address.is_some()
        || args.join_token_file.is_some()
        || args.identity_dir.is_some();
    if !registers {
        return Ok(());
    }
    // Registering needs a control plane: the one named, else the default address.
    let control = config
        .control
        .get_or_insert_with(|| ControlPlaneConfig::new(DEFAULT_CONTROL));
    if let Some(service) = &args.service {
        control.service = Some(service.clone());
    }
    if let Some(id) = &args.instance_id {
        control.instance_id = Some(id.clone());
    }
    for pair in &args.label {
        let (k, v) = pair.split_once('=').with_context(|| {
            format!("--label {pair:?}: write KEY=VALUE (repeat --label, or separate pairs with commas), e.g. --label env=prod --label zone=eu-1")
        })?;
        control
            .labels
            .insert(k.trim().to_string(), v.trim().to_string());
    }
    if let Some(addr) = args.register_address {
        control.register_address = Some(addr);
    }
    if let Some(dir) = &args.identity_dir {
        control.identity_dir = Some(dir.clone());
    }
    if let Some(path) = &args.join_token_file {
        control.join_token_file = Some(path.clone());
        control.join_token = None;
    }
    Ok(())
}

/// `MALLA_JOIN_TOKEN` for a sidecar that registers and has no token of its own set.
fn apply_join_token_env(config: &mut ProxyConfig) {
    let Some(token) = std::env::var("MALLA_JOIN_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    else {
        return;
    };
    if let Some(control) = config.control.as_mut() {
        if control.service.is_some()
            && control.join_token.is_none()
            && control.join_token_file.is_none()
        {
            control.join_token = Some(token);
        }
    }
}

/// `MALLA_CONTROL_CA` for a sidecar that has a control plane and no `ca_file` of its own
/// set (`--control-ca` or the file's).
fn apply_control_ca_env(config: &mut ProxyConfig, value: Option<std::ffi::OsString>) {
    let Some(path) = value.filter(|v| !v.is_empty()) else {
        return;
    };
    if let Some(control) = config.control.as_mut() {
        if control.ca_file.is_none() {
            control.ca_file = Some(PathBuf::from(path));
        }
    }
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: ProxyArgs,
    }

    fn config(argv: &[&str]) -> anyhow::Result<ProxyConfig> {
        let cmd = Cmd::try_parse_from(std::iter::once("proxy").chain(argv.iter().copied()))?;
        proxy_config(&cmd.args)
    }

    #[test]
    fn the_quick_form_is_unchanged() {
        let c = config(&[
            "--listen",
            "127.0.0.1:4140",
            "--upstream",
            "127.0.0.1:1,127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(c.upstreams[0].endpoints, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(c.control, None);
    }

    #[test]
    fn control_flags_fill_the_control_section() {
        let c = config(&[
            "--listen",
            "127.0.0.1:4140",
            "--upstream",
            "127.0.0.1:1",
            "--control",
            "127.0.0.1:7781",
            "--control-ca",
            "/var/lib/malla/trust-bundle.pem",
            "--service",
            "checkout",
            "--instance-id",
            "checkout-1",
            "--label",
            "env=prod,zone=eu-1",
            "--label",
            "tier=web",
            "--register-address",
            "10.0.0.5:4143",
        ])
        .unwrap();
        let control = c.control.unwrap();
        assert_eq!(control.url, "127.0.0.1:7781");
        assert_eq!(
            control.ca_file.as_deref(),
            Some(std::path::Path::new("/var/lib/malla/trust-bundle.pem"))
        );
        assert_eq!(control.service.as_deref(), Some("checkout"));
        assert_eq!(control.instance_id.as_deref(), Some("checkout-1"));
        assert_eq!(control.labels["env"], "prod");
        assert_eq!(control.labels["zone"], "eu-1");
        assert_eq!(control.labels["tier"], "web");
        assert_eq!(
            control.register_address,
            Some("10.0.0.5:4143".parse().unwrap())
        );
    }

    #[test]
    fn instance_flags_use_the_default_control_plane_and_registering_needs_an_address() {
        let quick = ["--listen", "127.0.0.1:4140", "--upstream", "127.0.0.1:1"];
        let err = config(&[&quick[..], &["--service", "checkout"]].concat()).unwrap_err();
        assert!(err.to_string().contains("--register-address"), "{err:#}");
        let c = config(
            &[
                &quick[..],
                &[
                    "--service",
                    "checkout",
                    "--register-address",
                    "10.0.0.5:4143",
                    "--control-ca",
                    "ca.pem",
                ],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(c.control.unwrap().url, "127.0.0.1:7780");
        let err =
            config(&[&quick[..], &["--control", "c:7781", "--label", "env"]].concat()).unwrap_err();
        assert!(
            err.to_string().contains("--label \"env\": write KEY=VALUE"),
            "{err}"
        );
    }

    #[test]
    fn control_takes_host_port_or_a_url_and_alone_means_the_default_port() {
        let quick = [
            "--listen",
            "127.0.0.1:4140",
            "--upstream",
            "127.0.0.1:1",
            "--control-ca",
            "ca.pem",
        ];
        for (flag, url) in [
            ("10.0.0.1:7780", "10.0.0.1:7780"),
            ("https://10.0.0.1:7780", "https://10.0.0.1:7780"),
            ("http://10.0.0.1:7781", "http://10.0.0.1:7781"),
        ] {
            let c = config(&[&quick[..], &["--control", flag]].concat()).unwrap();
            assert_eq!(c.control.unwrap().url, url);
        }
        let c = config(&[&quick[..], &["--control"]].concat()).unwrap();
        assert_eq!(c.control.unwrap().url, "127.0.0.1:7780");
        let c = config(&[
            "--control",
            "--listen",
            "127.0.0.1:4140",
            "--upstream",
            "127.0.0.1:1",
            "--control-ca",
            "ca.pem",
        ])
        .unwrap();
        assert_eq!(c.control.unwrap().url, "127.0.0.1:7780");
        // A bad address names the flag.
        let err = config(&[&quick[..], &["--control", "ftp://c:1"]].concat()).unwrap_err();
        assert!(
            err.to_string().starts_with("--control \"ftp://c:1\": "),
            "{err}"
        );
        let err = config(&[&quick[..], &["--control", "c"]].concat()).unwrap_err();
        assert!(err.to_string().starts_with("--control \"c\": "), "{err}");
    }

    #[test]
    fn tls_needs_the_control_planes_bundle_and_plaintext_does_not() {
        let quick = ["--listen", "127.0.0.1:4140", "--upstream", "127.0.0.1:1"];
        let err = config(&[&quick[..], &["--control", "10.0.0.1:7780"]].concat()).unwrap_err();
        let err = format!("{err:#}");
        for way in [
            "--control-ca",
            "MALLA_CONTROL_CA",
            "ca_file",
            "trust-bundle.pem",
        ] {
            assert!(err.contains(way), "{way}: {err}");
        }
        let c = config(&[&quick[..], &["--control", "http://10.0.0.1:7780"]].concat()).unwrap();
        assert_eq!(c.control.unwrap().ca_file, None);
        // --control-ca verifies a control plane: one must be named.
        let err = config(&[&quick[..], &["--control-ca", "ca.pem"]].concat()).unwrap_err();
        assert!(err.to_string().contains("--control HOST:PORT"), "{err}");
        // With --service, the default control plane.
        let c = config(
            &[
                &quick[..],
                &[
                    "--service",
                    "checkout",
                    "--register-address",
                    "10.0.0.5:4143",
                    "--control-ca",
                    "ca.pem",
                ],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            c.control.unwrap().ca_file.as_deref(),
            Some(std::path::Path::new("ca.pem"))
        );
    }

    #[test]
    fn malla_control_ca_fills_in_what_no_flag_or_file_set() {
        let mut config = ProxyConfig::default();
        apply_control_ca_env(&mut config, Some("env.pem".into()));
        assert_eq!(config.control, None, "no control plane: nothing to verify");
        config.control = Some(ControlPlaneConfig::new("10.0.0.1:7780"));
        apply_control_ca_env(&mut config, Some("".into()));
        assert_eq!(config.control.as_ref().unwrap().ca_file, None);
        apply_control_ca_env(&mut config, Some("env.pem".into()));
        let ca = |c: &ProxyConfig| c.control.as_ref().unwrap().ca_file.clone();
        assert_eq!(ca(&config), Some(PathBuf::from("env.pem")));
        apply_control_ca_env(&mut config, Some("other.pem".into()));
        assert_eq!(
            ca(&config),
            Some(PathBuf::from("env.pem")),
            "the flag or file wins"
        );
    }

    #[test]
    fn labels_is_a_hidden_alias_of_label() {
        let c = config(&[
            "--listen",
            "127.0.0.1:4140",
            "--upstream",
            "127.0.0.1:1",
            "--control",
            "http://c:7780",
            "--labels",
            "env=prod,zone=eu-1",
            "--register-address",
            "10.0.0.5:4143",
            "--service",
            "checkout",
        ])
        .unwrap();
        assert_eq!(c.control.unwrap().labels.len(), 2);
        let help = Cmd::command().render_long_help().to_string();
        assert!(help.contains("--label <KEY=VALUE>"), "{help}");
        assert!(!help.contains("--labels"), "{help}");
    }

    #[test]
    fn every_flag_has_help() {
        let cmd = Cmd::command();
        let missing: Vec<_> = cmd
            .get_arguments()
            .filter(|a| !a.is_hide_set() && a.get_help().is_none())
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }
}
