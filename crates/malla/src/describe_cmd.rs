//! `malla describe service NAME`: everything about one service on one page, as
//! `kubectl describe` prints it: its settings and annotations, each instance with its
//! lease, age and who registered it, the resilience policy its callers follow, the
//! authorization policy that decides who may call it, its health
//! history (the control plane's checks flipping an instance) and its recent events, newest
//! last.
//!
//! It reads `GET /v1/services/{name}`, which gathers all of it in one answer.

use serde_json::Value;

use crate::{
    client::{Client, ControlArg},
    get_cmd::age,
    output::{align, outln, print_json, text},
    policy_cmd::{summary, time},
    registry_cmd::{encode, endpoint, pairs, Output},
};

#[derive(clap::Args)]
#[command(after_help = "Example:\n  malla describe service shipping-quote")]
pub struct DescribeArgs {
    #[command(subcommand)]
    what: DescribeWhat,
}

#[derive(clap::Subcommand)]
enum DescribeWhat {
    /// A service: settings, annotations, instances (lease, TTL, age, registered by,
    /// health), policy, authorization policy and recent events.
    Service {
        /// The service.
        name: String,
        /// How to print: table (the description; wide is the same), json or yaml (the API's
        /// answer).
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        control: ControlArg,
    },
}

pub fn describe(args: DescribeArgs) -> anyhow::Result<()> {
    let DescribeWhat::Service {
        name,
        output,
        control,
    } = args.what;
    let client = Client::new(&control)?;
    let v = client.get(&format!("/v1/services/{}", encode(&name)))?;
    match output {
        Output::Json => print_json(&v)?,
        Output::Yaml => crate::yaml::print(&v)?,
        Output::Table | Output::Wide => outln!("{}", render(&v).trim_end())?,
    }
    Ok(())
}

/// The description of one service answer (`GET /v1/services/{name}`).
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("Name:          {}", text(&v["name"])));
    line(format!("Revision:      {}", text(&v["revision"])));
    annotations(&v["spec"]["annotations"], "Annotations:   ", &mut line);
    line(format!(
        "Health check:  {}",
        health_check(&v["spec"]["health_check"])
    ));

    let instances = v["instances"].as_array().cloned().unwrap_or_default();
    let serving = instances
        .iter()
        .filter(|i| i["health"] != "unhealthy")
        .count();
    line(format!(
        "Instances:     {} ({serving} serving)",
        instances.len()
    ));
    if !instances.is_empty() {
        let mut rows = vec![[
            "ID",
            "ADDRESS",
            "PROTOCOL",
            "HEALTH",
            "LEASE",
            "TTL",
            "REMAINING",
            "AGE",
            "REGISTERED-BY",
            "LABELS",
        ]
        .map(String::from)
        .to_vec()];
        for i in &instances {
            let l = &i["lease"];
            rows.push(vec![
                text(&i["id"]),
                endpoint(&i["address"], &i["port"]),
                text(&i["protocol"]),
                text(&i["health"]),
                if l.is_null() {
                    "static".into()
                } else {
                    text(&l["id"])
                },
                if l.is_null() {
                    "-".into()
                } else {
                    format!("{}s", text(&l["ttl_seconds"]))
                },
                l["remaining_seconds"]
                    .as_f64()
                    .map_or_else(|| "-".into(), |s| format!("{s:.1}s")),
                age(&i["registered_at"]),
                text(&i["registered_by"]),
                pairs(&i["labels"]),
            ]);
        }
        for r in align(&rows) {
            line(format!("  {r}"));
        }
        for i in &instances {
            if i["annotations"].as_object().is_some_and(|a| !a.is_empty()) {
                let prefix = format!("  {} annotations: ", text(&i["id"]));
                annotations(&i["annotations"], &prefix, &mut line);
            }
        }
    }

    let policy = &v["policy"];
    if policy.is_null() {
        line("Policy:        <none> (callers use their local policy or the defaults)".into());
    } else {
        let s = summary(policy);
        line(format!(
            "Policy:        version {}: retries {}, timeout {}, outlier {}, limits {}, {} rate limit(s), {} fault(s)",
            s[1], s[2], s[3], s[4], s[5], s[6], s[7]
        ));
    }

    line(format!(
        "Authorization: {}",
        crate::authz_cmd::describe_line(&v["authorization"])
    ));

    // The health history (the control plane's checks flipping an instance; each detail
    // names the instance) apart from the other events, so that neither repeats the other.
    let (flips, events): (Vec<Value>, Vec<Value>) = v["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .partition(|e| e["kind"] == "health-changed");
    if flips.is_empty() {
        line("Health history: <none>".into());
    } else {
        line("Health history: (newest last)".into());
        let rows: Vec<Vec<String>> = flips
            .iter()
            .map(|e| vec![time(&e["at_ms"]), text(&e["detail"])])
            .collect();
        for r in align(&rows) {
            line(format!("  {r}"));
        }
    }
    if events.is_empty() {
        line("Events:        <none>".into());
    } else {
        line("Events:        (newest last)".into());
        let mut rows = vec![["TIME", "KIND", "ENDPOINT", "COUNT", "REPORTER", "DETAIL"]
            .map(String::from)
            .to_vec()];
        for e in &events {
            let reporter = e["reporter"]["instance_id"]
                .as_str()
                .or(e["reporter"]["service"].as_str())
                .unwrap_or("control plane")
                .to_string();
            rows.push(vec![
                time(&e["at_ms"]),
                text(&e["kind"]),
                text(&e["endpoint"]),
                text(&e["count"]),
                reporter,
                text(&e["detail"]),
            ]);
        }
        for r in align(&rows) {
            line(format!("  {r}"));
        }
    }
    out
}

/// `KEY=VALUE` lines, the first after `prefix`, the others aligned under it.
fn annotations(map: &Value, prefix: &str, line: &mut impl FnMut(String)) {
    let items: Vec<String> = map
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_string)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if items.is_empty() {
        line(format!("{prefix}<none>"));
        return;
    }
    let indent = " ".repeat(prefix.chars().count());
    for (n, item) in items.into_iter().enumerate() {
        line(format!("{}{item}", if n == 0 { prefix } else { &indent }));
    }
}

/// `http /healthz every 5s (timeout 1s, 2 up / 3 down)`, `<none>`.
fn health_check(check: &Value) -> String {
    if check.is_null() {
        return "<none> (instances are trusted while their leases live)".into();
    }
    let mut s = text(&check["kind"]);
    if let Some(path) = check["path"].as_str() {
        s.push_str(&format!(" {path}"));
    }
    // Seconds, whole or not (the API writes 1.0); Rust prints 1.0 as 1.
    let seconds = |v: &Value| v.as_f64().map_or_else(|| text(v), |s| s.to_string());
    s.push_str(&format!(
        " every {}s (timeout {}s, {} up / {} down)",
        seconds(&check["interval"]),
        seconds(&check["timeout"]),
        text(&check["healthy_threshold"]),
        text(&check["unhealthy_threshold"])
    ));
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// The description of an answer shaped as the contract of `GET /v1/services/{name}`.
    #[test]
    fn a_service_is_described_from_its_answer() {
        let answer = json!({
            "revision": 42,
            "name": "shipping-quote",
            "spec": {
                "health_check": {"kind": "http", "path": "/healthz", "interval": 5, "timeout": 1,
                                 "healthy_threshold": 2, "unhealthy_threshold": 3},
                "annotations": {"display-name": "Cotización de Envío", "owner": "logistics"}
            },
            "instances": [
                {"id": "q-1", "service": "shipping-quote", "address": "fd00::5", "port": 8080,
                 "protocol": "http", "labels": {"env": "prod"}, "health": "healthy",
                 "annotations": {"runbook": "https://runbooks.example/q"},
                 "registered_at": "2026-01-01T00:00:00Z", "registered_by": "http 127.0.0.1:51234",
                 "lease": {"id": 7, "ttl_seconds": 30, "remaining_seconds": 21.5}},
                {"id": "vendor", "service": "shipping-quote", "address": "203.0.113.7", "port": 443,
                 "protocol": "tcp", "labels": {}, "health": "unhealthy", "annotations": {},
                 "registered_at": "2026-01-01T00:00:00Z", "registered_by": "grpc 127.0.0.1:40000",
                 "lease": null}
            ],
            "policy": {"service": "shipping-quote", "version": 3, "policy": {
                "retries": {"enabled": true, "max_attempts": 2},
                "timeouts": {"request": "2s"},
                "outlier": {"enabled": true, "consecutive_failures": 5, "mode": "enforce"},
                "limits": {"max_requests": 100, "mode": "enforce"}}},
            "authorization": {"service": "shipping-quote", "version": 4, "authorization": {
                "service": "shipping-quote", "default": "deny", "mode": "enforce",
                "rule": [{"action": "allow", "from": ["checkout"]}]}},
            "events": [
                {"seq": 1, "at_ms": 1_700_000_000_000u64, "kind": "health-changed", "service": "shipping-quote",
                 "endpoint": "203.0.113.7:443", "count": 1, "reporter": {"service": null, "instance_id": null},
                 "detail": "healthy -> unhealthy (3 failed checks)"},
                {"seq": 2, "at_ms": 1_700_000_001_000u64, "kind": "ejected", "service": "shipping-quote",
                 "endpoint": "203.0.113.7:443", "count": 1,
                 "reporter": {"service": "checkout", "instance_id": "checkout-1"},
                 "detail": "5 consecutive failures"}
            ]
        });
        let text = super::render(&answer);
        for expected in [
            "Name:          shipping-quote",
            "Annotations:   display-name=Cotización de Envío",
            "               owner=logistics",
            "Health check:  http /healthz every 5s (timeout 1s, 2 up / 3 down)",
            "Instances:     2 (1 serving)",
            "[fd00::5]:8080",
            "http 127.0.0.1:51234",
            "21.5s",
            "q-1 annotations: runbook=https://runbooks.example/q",
            "Policy:        version 3: retries 2 attempts, timeout 2s",
            "Authorization: default deny, 1 rule (enforce), version 4",
            "Health history: (newest last)",
            "Events:        (newest last)",
            "checkout-1",
            "5 consecutive failures",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
        // A health flip is in the history, not again among the events.
        assert_eq!(
            text.matches("healthy -> unhealthy (3 failed checks)")
                .count(),
            1,
            "{text}"
        );
        assert!(!text.contains("health-changed"), "{text}");
        // The static instance: no lease, no TTL.
        let vendor = text.lines().find(|l| l.contains("vendor")).unwrap();
        let cells: Vec<&str> = vendor.split_whitespace().collect();
        assert_eq!(
            &cells[..7],
            [
                "vendor",
                "203.0.113.7:443",
                "tcp",
                "unhealthy",
                "static",
                "-",
                "-"
            ]
        );
        // Columns line up under their headers.
        let header = text.lines().find(|l| l.contains("REGISTERED-BY")).unwrap();
        let row = text
            .lines()
            .find(|l| l.contains("q-1") && l.contains("8080"))
            .unwrap();
        let at = header.find("REGISTERED-BY").unwrap();
        assert_eq!(
            row.chars()
                .skip(header[..at].chars().count())
                .take(4)
                .collect::<String>(),
            "http"
        );

        // Nothing but a name: every part says so.
        let bare = super::render(
            &json!({"name": "x", "revision": 1, "spec": {}, "instances": [],
                                         "policy": null, "events": []}),
        );
        for expected in [
            "Annotations:   <none>",
            "Health check:  <none>",
            "Instances:     0 (0 serving)",
            "Policy:        <none>",
            "Authorization: <none>",
            "Health history: <none>",
            "Events:        <none>",
        ] {
            assert!(bare.contains(expected), "{expected:?} in\n{bare}");
        }
    }
}
