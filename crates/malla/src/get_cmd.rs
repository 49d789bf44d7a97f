//! kubectl's verbs over malla's resources: `malla get KIND [NAME]`, `malla describe
//! service NAME`, `malla delete KIND NAME`, `malla annotate service NAME KEY=VALUE... KEY-`.
//!
//! Every reading verb takes the same `-o table|wide|json|yaml` (policies also `toml`), and
//! every verb the same `--control` and `--request-timeout`.

use std::time::SystemTime;

use anyhow::bail;
use serde_json::{json, Value};

use crate::{
    authz_cmd,
    client::{Client, ControlArg},
    output::{outln, rows, text},
    policy_cmd::{self, PolicyOutput},
    registry_cmd::{self, encode, show, Common, InstancesArgs, ServiceArgs, ServicesArgs},
};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    malla get services\n  \
    malla get instances shipping-quote -l env=prod -o wide\n  \
    malla get service shipping-quote -o yaml\n  \
    malla get policy shipping-quote -o toml > shipping.toml\n  \
    malla get authorizations -o wide\n  \
    malla get proxies")]
pub struct GetArgs {
    #[command(subcommand)]
    what: GetWhat,
}

#[derive(clap::Subcommand)]
enum GetWhat {
    /// Every service: instances, how many serve, its health check.
    Services(ServicesArgs),
    /// One service, as `get services` shows it.
    Service(ServiceArgs),
    /// The instances of a service, optionally filtered by a label selector.
    Instances(InstancesArgs),
    /// Every resilience policy, with its version.
    Policies {
        /// How to print: table, wide, json, yaml (the API's answer) or toml (what `malla
        /// apply -f` takes back).
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: PolicyOutput,
        #[command(flatten)]
        control: ControlArg,
    },
    /// The resilience policy of one service.
    Policy {
        /// The service.
        name: String,
        /// How to print: table, wide, json, yaml (the API's answer) or toml (what `malla
        /// apply -f` takes back).
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: PolicyOutput,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Every authorization policy: its default, mode, rules and version.
    Authorizations {
        /// How to print: table, wide (rule counts by action, callers named), json, yaml
        /// (the API's answer) or toml (what `malla apply -f` takes back).
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: PolicyOutput,
        #[command(flatten)]
        control: ControlArg,
    },
    /// The authorization policy of one service: who may call it, and what.
    Authorization {
        /// The service whose inbound calls the policy decides.
        name: String,
        /// How to print: table, wide (rule counts by action, callers named), json, yaml
        /// (the API's answer) or toml (what `malla apply -f` takes back).
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: PolicyOutput,
        #[command(flatten)]
        control: ControlArg,
    },
    /// The sidecars connected to the control plane: what they registered, their version,
    /// when last seen, how many watches they hold.
    Proxies(ProxiesArgs),
}

#[derive(clap::Args)]
pub struct ProxiesArgs {
    #[command(flatten)]
    common: Common,
}

pub fn get(args: GetArgs) -> anyhow::Result<()> {
    match args.what {
        GetWhat::Services(args) => registry_cmd::services(args),
        GetWhat::Service(args) => registry_cmd::service(args),
        GetWhat::Instances(args) => registry_cmd::instances(args),
        GetWhat::Policies { output, control } => policy_cmd::get_policies(output, &control),
        GetWhat::Policy {
            name,
            output,
            control,
        } => policy_cmd::get_policy(&name, output, &control),
        GetWhat::Authorizations { output, control } => {
            authz_cmd::get_authorizations(output, &control)
        }
        GetWhat::Authorization {
            name,
            output,
            control,
        } => authz_cmd::get_authorization(&name, output, &control),
        GetWhat::Proxies(args) => proxies(args),
    }
}

fn proxies(args: ProxiesArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.control)?;
    let v = client.get("/v1/proxies")?;
    let wide = args.common.output == registry_cmd::Output::Wide;
    let rows = rows(&v["proxies"], |p| {
        let mut row = vec![
            text(&p["address"]),
            text(&p["service"]),
            text(&p["instance"]),
            text(&p["version"]),
            age(&p["last_seen"]),
            text(&p["watches"]),
            age(&p["connected_since"]),
        ];
        if wide {
            row.push(text(&p["identity"]));
            row.push(text(&p["connected_since"]));
            row.push(text(&p["last_seen"]));
        }
        row
    });
    let mut headers = vec![
        "ADDRESS",
        "SERVICE",
        "INSTANCE",
        "VERSION",
        "LAST-SEEN",
        "WATCHES",
        "AGE",
    ];
    if wide {
        headers.extend(["IDENTITY", "CONNECTED-SINCE", "LAST-SEEN-AT"]);
    }
    show(&v, args.common.output, &headers, rows, "No proxies found.")
}

/// How long ago an RFC 3339 time was, the way kubectl prints an age (`45s`, `12m`,
/// `3h`, `5d`); `-` when there is no time.
pub fn age(at: &Value) -> String {
    let Some(at) = at
        .as_str()
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
    else {
        return "-".into();
    };
    let secs = SystemTime::now()
        .duration_since(at)
        .map_or(0, |d| d.as_secs());
    match secs {
        0..120 => format!("{secs}s"),
        120..7_200 => format!("{}m", secs / 60),
        7_200..172_800 => format!("{}h", secs / 3_600),
        _ => format!("{}d", secs / 86_400),
    }
}

#[derive(clap::Args)]
pub struct DeleteArgs {
    #[command(subcommand)]
    what: DeleteWhat,
}

#[derive(clap::Subcommand)]
enum DeleteWhat {
    /// Delete a service: its settings and every instance, in one write.
    Service {
        /// The service.
        name: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Delete the policy of a service: its callers go back to their local policy or the
    /// defaults.
    Policy {
        /// The service.
        name: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Delete the authorization policy of a service: every caller is let through again.
    Authorization {
        /// The service.
        name: String,
        #[command(flatten)]
        control: ControlArg,
    },
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    match args.what {
        DeleteWhat::Service { name, control } => registry_cmd::delete_service(&name, &control),
        DeleteWhat::Policy { name, control } => policy_cmd::delete_policy(&name, &control),
        DeleteWhat::Authorization { name, control } => {
            authz_cmd::delete_authorization(&name, &control)
        }
    }
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    malla annotate service shipping-quote 'display-name=Cotización de Envío' owner=logistics\n  \
    malla annotate service shipping-quote owner-\n\n\
    KEY=VALUE sets an annotation, KEY- removes one; the service's health check is kept.")]
pub struct AnnotateArgs {
    #[command(subcommand)]
    what: AnnotateWhat,
}

#[derive(clap::Subcommand)]
enum AnnotateWhat {
    /// Set (KEY=VALUE) or remove (KEY-) annotations of a service.
    Service {
        /// The service.
        name: String,
        /// KEY=VALUE to set, KEY- to remove.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
        #[command(flatten)]
        control: ControlArg,
    },
}

pub fn annotate(args: AnnotateArgs) -> anyhow::Result<()> {
    let AnnotateWhat::Service {
        name,
        changes,
        control,
    } = args.what;
    let client = Client::new(&control)?;
    let path = format!("/v1/services/{}", encode(&name));
    let current = client.get(&path)?;
    let mut spec = match &current["spec"] {
        Value::Object(spec) => spec.clone(),
        _ => serde_json::Map::new(),
    };
    let mut annotations = match spec.get("annotations") {
        Some(Value::Object(a)) => a.clone(),
        _ => serde_json::Map::new(),
    };
    for change in &changes {
        if let Some((k, v)) = change.split_once('=') {
            if k.is_empty() {
                bail!("{change:?}: the key is empty; expected KEY=VALUE or KEY-");
            }
            annotations.insert(k.to_string(), Value::String(v.to_string()));
        } else if let Some(k) = change.strip_suffix('-').filter(|k| !k.is_empty()) {
            if annotations.remove(k).is_none() {
                bail!("{change:?}: service {name} has no annotation {k:?}");
            }
        } else {
            bail!("{change:?}: expected KEY=VALUE to set or KEY- to remove");
        }
    }
    spec.insert("annotations".into(), Value::Object(annotations));
    let v = client.put(&path, &json!(spec))?;
    outln!(
        "service/{name} annotated (revision {})",
        text(&v["revision"])
    )?;
    Ok(())
}
