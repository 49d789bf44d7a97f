//! The registry's reading and removing verbs: `malla get services`, `get instances
//! SERVICE`, `get service NAME`, `delete service NAME`, and the older forms scripts use
//! (`malla services`, `malla instances SERVICE`, `malla deregister SERVICE ID`).
//!
//! Each prints a table by default (`-o wide` adds columns), or the API's answer with
//! `-o json` or `-o yaml`, and exits 1 with the control plane's error message when a call
//! fails. An empty table says so on stderr, as kubectl does.

use std::net::IpAddr;

use anyhow::bail;
use serde_json::{Map, Value};

use crate::{
    client::{Client, ControlArg},
    output::{errln, outln, print_json, print_table, rows, text},
};

/// How a reading verb prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Columns for people.
    #[default]
    Table,
    /// The table with more columns (labels, annotations...).
    Wide,
    /// The API's answer, for scripts.
    Json,
    /// The API's answer as YAML.
    Yaml,
}

/// What every registry verb takes: where the control plane is, and how to print.
#[derive(clap::Args)]
pub struct Common {
    #[command(flatten)]
    pub control: ControlArg,
    /// How to print: table, wide (more columns), json or yaml (the API's answer).
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(clap::Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  malla get instances shipping-quote\n  malla get instances shipping-quote --selector 'env=prod,zone in (eu-1,eu-2)' -o json"
)]
pub struct InstancesArgs {
    /// The service.
    pub service: String,
    /// A label selector: `env=prod`, `env!=dev`, `zone in (a,b)`, `zone notin (c)`, `canary`, `!canary`, comma-separated.
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    /// Only instances that receive traffic (not unhealthy).
    #[arg(long)]
    pub serving: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args)]
pub struct ServiceArgs {
    /// The service.
    pub name: String,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args)]
pub struct DeregisterArgs {
    /// The service.
    service: String,
    /// The instance id.
    id: String,
    #[command(flatten)]
    common: Common,
}

/// The table, or the answer as JSON or YAML; `empty` is said on stderr when the table has
/// no rows.
pub fn show(
    answer: &Value,
    output: Output,
    headers: &[&str],
    rows: Vec<Vec<String>>,
    empty: &str,
) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(answer)?,
        Output::Yaml => crate::yaml::print(answer)?,
        Output::Table | Output::Wide => {
            if rows.is_empty() {
                errln!("{empty}");
            } else {
                print_table(headers, rows)?;
            }
        }
    }
    Ok(())
}

pub fn services(args: ServicesArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.control)?;
    let v = client.get("/v1/services")?;
    let wide = args.common.output == Output::Wide;
    let rows = rows(&v["services"], |s| {
        let mut row = vec![
            text(&s["name"]),
            text(&s["instances"]),
            text(&s["serving"]),
            s["health_check"]["kind"]
                .as_str()
                .unwrap_or("-")
                .to_string(),
        ];
        if wide {
            row.push(pairs(&s["annotations"]));
        }
        row
    });
    let mut headers = vec!["NAME", "INSTANCES", "SERVING", "HEALTH-CHECK"];
    if wide {
        headers.push("ANNOTATIONS");
    }
    show(&v, args.common.output, &headers, rows, "No services found.")
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
    let wide = args.common.output == Output::Wide;
    let rows = rows(&v["instances"], |i| {
        let mut row = vec![
            text(&i["id"]),
            endpoint(&i["address"], &i["port"]),
            text(&i["protocol"]),
            text(&i["health"]),
            pairs(&i["labels"]),
        ];
        if wide {
            row.push(lease(&i["lease"]));
            row.push(text(&i["registered_by"]));
            row.push(pairs(&i["annotations"]));
        }
        row
    });
    let mut headers = vec!["ID", "ADDRESS", "PROTOCOL", "HEALTH", "LABELS"];
    if wide {
        headers.extend(["LEASE", "REGISTERED-BY", "ANNOTATIONS"]);
    }
    let empty = match &args.selector {
        Some(s) => format!("No instances of {} match {s:?}.", args.service),
        None => format!("No instances of {} found.", args.service),
    };
    show(&v, args.common.output, &headers, rows, &empty)
}

/// `get service NAME`: one row, as `get services` prints it.
pub fn service(args: ServiceArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.control)?;
    let v = client.get(&format!("/v1/services/{}", encode(&args.name)))?;
    let instances = v["instances"].as_array().map_or(0, Vec::len);
    let serving = v["instances"].as_array().map_or(0, |a| {
        a.iter()
            .filter(|i| i["health"] != "unhealthy" && i["health"] != "draining")
            .count()
    });
    let mut row = vec![
        text(&v["name"]),
        instances.to_string(),
        serving.to_string(),
        v["spec"]["health_check"]["kind"]
            .as_str()
            .unwrap_or("-")
            .to_string(),
    ];
    let mut headers = vec!["NAME", "INSTANCES", "SERVING", "HEALTH-CHECK"];
    if args.common.output == Output::Wide {
        headers.push("ANNOTATIONS");
        row.push(pairs(&v["spec"]["annotations"]));
    }
    show(&v, args.common.output, &headers, vec![row], "")
}

/// `delete service NAME`: the service, its spec and all its instances.
pub fn delete_service(name: &str, control: &ControlArg) -> anyhow::Result<()> {
    let client = Client::new(control)?;
    let v = client.delete(&format!("/v1/services/{}", encode(name)))?;
    match v["instances_removed"].as_u64() {
        Some(n) => outln!(
            "service/{name} deleted ({n} instance{} removed)",
            if n == 1 { "" } else { "s" }
        )?,
        None => outln!("service/{name} deleted")?,
    }
    Ok(())
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
        Output::Yaml => crate::yaml::print(&v)?,
        Output::Table | Output::Wide => outln!("deregistered {} of {}", args.id, args.service)?,
    }
    Ok(())
}

/// `ADDRESS:PORT`, with an IPv6 address in brackets (`[fd00::5]:8080`), as a URL has it.
pub fn endpoint(address: &Value, port: &Value) -> String {
    let address = text(address);
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{address}]:{}", text(port)),
        _ => format!("{address}:{}", text(port)),
    }
}

/// `k=v,k=v` from a JSON object of strings; `-` when empty.
pub fn pairs(map: &Value) -> String {
    let joined = map
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_string)
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    if joined.is_empty() {
        "-".into()
    } else {
        joined
    }
}

/// An instance's lease: `ID (TTLs)`, `static` when it has none.
pub fn lease(lease: &Value) -> String {
    if lease.is_null() {
        "static".into()
    } else {
        format!("{} ({}s)", text(&lease["id"]), text(&lease["ttl_seconds"]))
    }
}

/// Reads repeated `KEY=VALUE` flags into a JSON object; `flag` names them in errors.
pub fn key_values(flag: &str, items: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut map = Map::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            bail!("{flag} {item:?}: expected KEY=VALUE");
        };
        if k.is_empty() {
            bail!("{flag} {item:?}: the key is empty; expected KEY=VALUE");
        }
        map.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(map)
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
