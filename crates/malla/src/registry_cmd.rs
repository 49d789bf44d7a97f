//! The registry verbs: `malla services`, `instances`, `register`, `deregister`.
//!
//! Each prints a table by default or the API's JSON with `--output json`, and exits 1 with
//! the control plane's error message when a call fails.

use std::{net::IpAddr, time::Duration};

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::{
    client::{Client, ControlArg},
    output::{outln, print_json, print_table, rows, text},
};

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// What every registry verb takes: where the control plane is, and how to print.
#[derive(clap::Args)]
struct Common {
    #[command(flatten)]
    control: ControlArg,
    /// `table` for people, `json` (the API's answer) for scripts.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

#[derive(clap::Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  malla instances shipping-quote\n  malla instances shipping-quote --selector 'env=prod,zone in (eu-1,eu-2)' -o json"
)]
pub struct InstancesArgs {
    /// The service.
    service: String,
    /// A label selector: `env=prod`, `env!=dev`, `zone in (a,b)`, `zone notin (c)`, `canary`, `!canary`, comma-separated.
    #[arg(long, short = 'l')]
    selector: Option<String>,
    /// Only instances that receive traffic (not unhealthy).
    #[arg(long)]
    serving: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  malla register shipping-quote --id quote-1 --address 127.0.0.1 --port 8081 --label env=prod --label zone=eu-1"
)]
pub struct RegisterArgs {
    /// The service.
    service: String,
    /// Instance id, unique within the service.
    #[arg(long)]
    id: String,
    #[arg(long)]
    address: IpAddr,
    #[arg(long)]
    port: u16,
    /// http, http2, grpc or tcp.
    #[arg(long, default_value = "http")]
    protocol: String,
    /// A label KEY=VALUE; repeat for several.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Lease TTL in seconds: without heartbeats the instance leaves after this time.
    #[arg(long, default_value_t = 30)]
    ttl: u64,
    /// Keep sending heartbeats until Ctrl-C, then deregister.
    #[arg(long)]
    keep_alive: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
pub struct DeregisterArgs {
    service: String,
    id: String,
    #[command(flatten)]
    common: Common,
}

pub fn services(args: ServicesArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.control)?;
    let v = client.get("/v1/services")?;
    match args.common.output {
        Output::Json => print_json(&v)?,
        Output::Table => {
            let rows = rows(&v["services"], |s| {
                vec![
                    text(&s["name"]),
                    text(&s["instances"]),
                    text(&s["serving"]),
                    s["health_check"]["kind"]
                        .as_str()
                        .unwrap_or("-")
                        .to_string(),
                ]
            });
            print_table(&["NAME", "INSTANCES", "SERVING", "HEALTH-CHECK"], rows)?;
        }
    }
    Ok(())
}

pub fn instances(args: InstancesArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.control)?;
    let mut path = format!("/v1/services/{}/instances", encode(&args.service));
    let mut query = Vec::new();
    if let Some(s) = &args.selector {
        query.push(format!("selector={}", encode(s)));
    }
    if args.serving {
        query.push("serving=true".to_string());
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let v = client.get(&path)?;
    match args.common.output {
        Output::Json => print_json(&v)?,
        Output::Table => {
            let rows = rows(&v["instances"], |i| {
                let labels = i["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                vec![
                    text(&i["id"]),
                    format!("{}:{}", text(&i["address"]), text(&i["port"])),
                    text(&i["protocol"]),
                    text(&i["health"]),
                    if labels.is_empty() {
                        "-".into()
                    } else {
                        labels
                    },
                ]
            });
            print_table(&["ID", "ADDRESS", "PROTOCOL", "HEALTH", "LABELS"], rows)?;
        }
    }
    Ok(())
}

pub fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.control)?;
    let mut labels = serde_json::Map::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))?;
        labels.insert(k.to_string(), Value::String(v.to_string()));
    }
    let body = json!({
        "address": args.address,
        "port": args.port,
        "protocol": args.protocol,
        "labels": labels,
        "ttl_seconds": args.ttl,
    });
    let path = format!(
        "/v1/services/{}/instances/{}",
        encode(&args.service),
        encode(&args.id)
    );
    let v = client.put(&path, &body)?;
    match args.common.output {
        Output::Json => print_json(&v)?,
        Output::Table => outln!(
            "registered {} of {} (lease {}, ttl {}s, revision {})",
            args.id,
            args.service,
            text(&v["lease"]),
            text(&v["ttl_seconds"]),
            text(&v["revision"])
        )?,
    }
    if args.keep_alive {
        let lease = v["lease"].as_u64().context("the answer has no lease id")?;
        keep_alive(&client, lease, Duration::from_secs(args.ttl))?;
        client.delete(&path)?;
        outln!("deregistered {} of {}", args.id, args.service)?;
    }
    Ok(())
}

/// Heartbeats every third of the TTL until Ctrl-C, on the client's own runtime, with one
/// Ctrl-C listener for the whole loop (so a Ctrl-C during a heartbeat is not missed).
fn keep_alive(client: &Client, lease: u64, ttl: Duration) -> anyhow::Result<()> {
    let interval = (ttl / 3).max(Duration::from_millis(300));
    outln!("sending heartbeats every {interval:?}; Ctrl-C deregisters")?;
    let path = format!("/v1/leases/{lease}/keepalive");
    client.block_on(async {
        let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
        let mut ticks = tokio::time::interval(interval);
        ticks.tick().await; // the first tick is immediate; registration just renewed it
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return Ok(()),
                _ = ticks.tick() => {
                    client.request(http::Method::PUT, &path, Some(&json!({}))).await?;
                }
            }
        }
    })
}

pub fn deregister(args: DeregisterArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.control)?;
    let path = format!(
        "/v1/services/{}/instances/{}",
        encode(&args.service),
        encode(&args.id)
    );
    let v = client.delete(&path)?;
    match args.common.output {
        Output::Json => print_json(&v)?,
        Output::Table => outln!("deregistered {} of {}", args.id, args.service)?,
    }
    Ok(())
}

/// Percent-encodes a path segment or query value.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
