//! The policy verbs: `malla apply -f` (resilience and authorization policies), `malla get
//! policies` / `get policy NAME`, `malla delete policy NAME`, and `malla events`.
//!
//! `apply` checks every file completely before it writes anything: a document with a
//! problem anywhere applies nothing, and every problem is printed at once, located the
//! way a compiler does (`FILE:LINE:COL: field: message`), so one run shows everything to
//! fix. The control plane checks again (the same checks) when each policy arrives.

use std::{
    io::Read as _,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _};
use malla_core::{
    authz::AuthorizationPolicy,
    policy::{document, Policy},
};
use serde::Serialize;
use serde_json::Value;

use crate::{
    client::{Client, ControlArg},
    output::{errln, out, outln, print_json, rows, text},
    registry_cmd::{encode, show, Common, Output},
};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    malla apply -f mesh.toml\n  \
    malla apply -f shipping.toml -f billing.toml\n  \
    malla get policy shipping-quote -o toml | malla apply -f -\n\n\
    A file holds [[policy]] and [[authorization]] tables, each naming its `service`:\n\n  \
    [[policy]]\n  \
    service = \"shipping-quote\"\n  \
    [policy.retries]\n  \
    max_attempts = 2\n\n  \
    [[authorization]]\n  \
    service = \"payments\"\n  \
    default = \"deny\"\n  \
    [[authorization.rule]]\n  \
    action = \"allow\"\n  \
    from = [\"checkout\"]\n\n\
    Every file is checked before anything is applied; problems are printed as\n\
    FILE:LINE:COL: field: message and nothing is applied. See docs/resilience.md and\n\
    docs/authorization.md.")]
pub struct ApplyArgs {
    /// A TOML file of [[policy]] and [[authorization]] tables; `-` reads standard input.
    /// Repeat for several.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    files: Vec<String>,
    #[command(flatten)]
    control: ControlArg,
}

/// How `get policies` and `get policy` print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyOutput {
    /// A summary, for people.
    #[default]
    Table,
    /// The summary with more columns.
    Wide,
    /// The API's answer, for scripts.
    Json,
    /// The API's answer as YAML.
    Yaml,
    /// A document `malla apply -f` takes back.
    Toml,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    malla events\n  \
    malla events --service shipping-quote --kind ejected --limit 20\n\n\
    Kinds: ejected, half-open, closed, ejection-skipped, panic-entered, panic-left,\n\
    limit-hit, retry-budget-exhausted, rate-limited.")]
pub struct EventsArgs {
    /// Only events about calls to this service, or reported by its sidecars.
    #[arg(long)]
    service: Option<String>,
    /// Only events of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// At most this many (the newest), 1-10000.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    common: Common,
}

/// One file's text, with the name its problems are reported under.
struct Source {
    name: String,
    text: String,
}

fn read_sources(files: &[String]) -> Vec<Result<Source, String>> {
    let mut stdin_read = false;
    files
        .iter()
        .map(|file| {
            if file == "-" {
                if stdin_read {
                    return Err("-: standard input can be read only once".to_string());
                }
                stdin_read = true;
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|e| format!("-: cannot read standard input: {e}"))?;
                return Ok(Source {
                    name: "<stdin>".into(),
                    text,
                });
            }
            std::fs::read_to_string(file)
                .map(|text| Source {
                    name: file.clone(),
                    text,
                })
                .map_err(|e| format!("{file}: cannot read: {e}"))
        })
        .collect()
}

/// Where the `service` of the `index`-th `[[kind]]` is written in `text` (1-based line
/// and column).
fn locate_service(text: &str, kind: &str, index: usize) -> Option<(usize, usize)> {
    use malla_core::policy::unknown::{toml_line_col, FieldPath, Segment};
    let path = FieldPath(vec![
        Segment::Key(kind.into()),
        Segment::Index(index),
        Segment::Key("service".into()),
    ]);
    toml_line_col(text, &path)
}

/// Where some `service = "NAME"` is written in `text`; `(0, 0)` when nowhere.
fn locate_any_service(text: &str, service: &str) -> (usize, usize) {
    let quoted = format!("\"{service}\"");
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("service") && trimmed.contains(&quoted) {
            return (i + 1, line.len() - trimmed.len() + 1);
        }
    }
    (0, 0)
}

pub fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    // Everything is read and checked before anything is written.
    let mut problems = Vec::new();
    let mut policies: Vec<(String, Policy)> = Vec::new();
    let mut authorizations: Vec<(String, AuthorizationPolicy)> = Vec::new();
    for source in read_sources(&args.files) {
        let source = match source {
            Ok(s) => s,
            Err(problem) => {
                problems.push(problem);
                continue;
            }
        };
        match document::parse_resources(&source.text, &source.name) {
            Ok(parsed) => {
                for (i, policy) in parsed.policies.into_iter().enumerate() {
                    let service = policy.service.clone().unwrap_or_default();
                    if let Some((earlier, _)) = policies
                        .iter()
                        .find(|(_, p)| p.service.as_deref() == Some(service.as_str()))
                    {
                        let (line, column) = locate_service(&source.text, "policy", i)
                            .unwrap_or_else(|| locate_any_service(&source.text, &service));
                        problems.push(format!(
                            "{}:{line}:{column}: policy[{i}].service: {service:?} has a policy in {earlier} too; one per service",
                            source.name
                        ));
                        continue;
                    }
                    policies.push((source.name.clone(), policy));
                }
                for (i, authorization) in parsed.authorizations.into_iter().enumerate() {
                    let service = authorization.service.clone();
                    if let Some((earlier, _)) =
                        authorizations.iter().find(|(_, a)| a.service == service)
                    {
                        let (line, column) = locate_service(&source.text, "authorization", i)
                            .unwrap_or_else(|| locate_any_service(&source.text, &service));
                        problems.push(format!(
                            "{}:{line}:{column}: authorization[{i}].service: {service:?} has an authorization policy in {earlier} too; one per service",
                            source.name
                        ));
                        continue;
                    }
                    authorizations.push((source.name.clone(), authorization));
                }
            }
            Err(e) => problems.extend(e.to_string().lines().map(str::to_string)),
        }
    }
    if !problems.is_empty() {
        for p in &problems {
            errln!("{p}");
        }
        let n = problems.len();
        bail!(
            "{n} problem{} found; nothing was applied",
            if n == 1 { "" } else { "s" }
        );
    }

    let client = Client::new(&args.control)?;
    let mut failed = 0;
    let writes = policies
        .iter()
        .map(|(_, policy)| {
            let service = policy.service.clone().unwrap_or_default();
            let path = format!("/v1/policies/{}", encode(&service));
            (
                format!("policy/{service}"),
                path,
                serde_json::to_value(policy),
            )
        })
        .chain(authorizations.iter().map(|(_, authorization)| {
            let service = &authorization.service;
            let path = format!("/v1/authorizations/{}", encode(service));
            (
                format!("authorization/{service}"),
                path,
                serde_json::to_value(authorization),
            )
        }));
    for (name, path, body) in writes {
        match client.put(&path, &body?) {
            Ok(v) => {
                let what = if v["created"] == true {
                    "created"
                } else if v["unchanged"] == true {
                    "unchanged"
                } else {
                    "configured"
                };
                outln!("{name} {what} (version {})", text(&v["version"]))?;
            }
            Err(e) => {
                // Not reachable at all: the others will not fare better.
                if e.downcast_ref::<crate::client::CallError>()
                    .is_some_and(|e| e.is_outage())
                {
                    return Err(e);
                }
                errln!("{name}: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        let total = policies.len() + authorizations.len();
        bail!(
            "{failed} of {total} {} not applied (the others were)",
            if authorizations.is_empty() {
                "policies"
            } else {
                "resources"
            }
        );
    }
    Ok(())
}

/// `get policies`.
pub fn get_policies(output: PolicyOutput, control: &ControlArg) -> anyhow::Result<()> {
    let client = Client::new(control)?;
    let v = client.get("/v1/policies")?;
    let list = v["policies"].as_array().cloned().unwrap_or_default();
    print_policies(&v, &list, output)
}

/// `get policy NAME`.
pub fn get_policy(name: &str, output: PolicyOutput, control: &ControlArg) -> anyhow::Result<()> {
    let client = Client::new(control)?;
    let v = client.get(&format!("/v1/policies/{}", encode(name)))?;
    print_policies(&v, std::slice::from_ref(&v), output)
}

/// Prints `list` (`[{service, version, policy}]`); `answer` is what the API said.
fn print_policies(answer: &Value, list: &[Value], output: PolicyOutput) -> anyhow::Result<()> {
    let mut headers = vec![
        "SERVICE",
        "VERSION",
        "RETRIES",
        "TIMEOUT",
        "OUTLIER",
        "LIMITS",
        "RATE-LIMITS",
        "FAULTS",
    ];
    let wide = output == PolicyOutput::Wide;
    if wide {
        headers.extend(["PER-TRY", "RETRY-ON", "FAILOVER"]);
    }
    let table = |rows| show(answer, Output::Table, &headers, rows, "No policies found.");
    match output {
        PolicyOutput::Json => print_json(answer)?,
        PolicyOutput::Yaml => crate::yaml::print(answer)?,
        PolicyOutput::Toml => {
            if list.is_empty() {
                errln!("No policies found.");
            }
            out!("{}", to_toml(list)?)?
        }
        PolicyOutput::Table => table(rows(&Value::Array(list.to_vec()), summary))?,
        PolicyOutput::Wide => table(rows(&Value::Array(list.to_vec()), |p| {
            let mut row = summary(p);
            let spec = &p["policy"];
            row.push(text(&spec["timeouts"]["per_try"]));
            row.push(
                spec["retries"]["on"]
                    .as_array()
                    .map(|on| on.iter().map(text).collect::<Vec<_>>().join(","))
                    .unwrap_or_else(|| "-".into()),
            );
            row.push(if spec["failover"]["enabled"] == false {
                "off".into()
            } else {
                spec["failover"]["prefer"]
                    .as_str()
                    .map_or_else(|| "locality".into(), |p| format!("prefer {p}"))
            });
            row
        }))?,
    }
    Ok(())
}

/// One table row: what a person wants to see first.
pub fn summary(p: &Value) -> Vec<String> {
    let spec = &p["policy"];
    let retries = &spec["retries"];
    let outlier = &spec["outlier"];
    let count = |v: &Value| v.as_array().map_or(0, Vec::len).to_string();
    vec![
        text(&p["service"]),
        text(&p["version"]),
        if retries["enabled"] == false {
            "off".into()
        } else {
            format!("{} attempts", text(&retries["max_attempts"]))
        },
        match spec["timeouts"]["request"].as_str() {
            None | Some("0s") => "-".into(),
            Some(t) => t.to_string(),
        },
        if outlier["enabled"] == false {
            "off".into()
        } else {
            format!(
                "{} failures{}",
                text(&outlier["consecutive_failures"]),
                if outlier["mode"] == "audit" {
                    " (audit)"
                } else {
                    ""
                }
            )
        },
        format!(
            "{} requests{}",
            text(&spec["limits"]["max_requests"]),
            if spec["limits"]["mode"] == "audit" {
                " (audit)"
            } else {
                ""
            }
        ),
        count(&spec["rate_limit"]),
        count(&spec["fault"]),
    ]
}

/// A document of `[[policy]]` tables that `malla apply -f` takes back, each preceded by
/// a comment with its version.
fn to_toml(list: &[Value]) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Document<'a> {
        policy: [&'a Policy; 1],
    }
    let mut out = String::new();
    for (i, item) in list.iter().enumerate() {
        let policy: Policy = serde_json::from_value(item["policy"].clone())
            .context("the control plane answered a policy this CLI cannot read (is it newer?)")?;
        let table = toml::to_string(&Document { policy: [&policy] })
            .map_err(|e| anyhow!("cannot write the policy as TOML: {e}"))?;
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "# policy/{} version {}\n",
            text(&item["service"]),
            text(&item["version"])
        ));
        out.push_str(&table);
    }
    Ok(out)
}

/// `delete policy NAME`.
pub fn delete_policy(name: &str, control: &ControlArg) -> anyhow::Result<()> {
    let client = Client::new(control)?;
    client.delete(&format!("/v1/policies/{}", encode(name)))?;
    outln!("policy/{name} deleted")?;
    Ok(())
}

pub fn events(args: EventsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.control)?;
    let mut query = vec![format!("limit={}", args.limit)];
    if let Some(s) = &args.service {
        query.push(format!("service={}", encode(s)));
    }
    if let Some(k) = &args.kind {
        query.push(format!("kind={}", encode(k)));
    }
    let v = client.get(&format!("/v1/events?{}", query.join("&")))?;
    let wide = args.common.output == Output::Wide;
    let rows = rows(&v["events"], |e| {
        let mut row = event_row(e);
        if wide {
            row.push(time(&e["received_at_ms"]));
            row.push(text(&e["seq"]));
        }
        row
    });
    let mut headers = EVENT_HEADERS.to_vec();
    if wide {
        headers.extend(["RECEIVED", "SEQ"]);
    }
    show(&v, args.common.output, &headers, rows, "No events found.")
}

pub const EVENT_HEADERS: [&str; 8] = [
    "TIME", "SERVICE", "UPSTREAM", "ENDPOINT", "KIND", "COUNT", "REPORTER", "DETAIL",
];

/// One event as a table row under [`EVENT_HEADERS`].
pub fn event_row(e: &Value) -> Vec<String> {
    let reporter = match (
        e["reporter"]["service"].as_str(),
        e["reporter"]["instance_id"].as_str(),
    ) {
        (_, Some(id)) => id.to_string(),
        (Some(service), None) => service.to_string(),
        (None, None) => "-".to_string(),
    };
    vec![
        time(&e["at_ms"]),
        text(&e["service"]),
        text(&e["upstream"]),
        text(&e["endpoint"]),
        if e["audit"] == true {
            format!("{} (audit)", text(&e["kind"]))
        } else {
            text(&e["kind"])
        },
        text(&e["count"]),
        reporter,
        text(&e["detail"]),
    ]
}

/// Milliseconds since the epoch as an RFC 3339 time (UTC, to the millisecond).
pub fn time(ms: &Value) -> String {
    ms.as_u64()
        .map(|ms| {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        })
        .unwrap_or_else(|| "-".into())
}
