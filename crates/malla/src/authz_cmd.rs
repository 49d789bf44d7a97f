//! The authorization policy verbs: `malla get authorizations` / `get authorization NAME`,
//! `malla delete authorization NAME`; `malla apply -f` applies them beside resilience
//! policies (`policy_cmd`), and `malla describe service` summarises one
//! ([`describe_line`]).

use anyhow::{anyhow, Context as _};
use malla_core::authz::AuthorizationPolicy;
use serde::Serialize;
use serde_json::Value;

use crate::{
    client::{Client, ControlArg},
    output::{errln, out, outln, print_json, rows, text},
    policy_cmd::PolicyOutput,
    registry_cmd::{encode, show, Output},
};

/// `get authorizations`.
pub fn get_authorizations(output: PolicyOutput, control: &ControlArg) -> anyhow::Result<()> {
    let client = Client::new(control)?;
    let v = client.get("/v1/authorizations")?;
    let list = v["authorizations"].as_array().cloned().unwrap_or_default();
    print(&v, &list, output)
}

/// `get authorization NAME`.
pub fn get_authorization(
    name: &str,
    output: PolicyOutput,
    control: &ControlArg,
) -> anyhow::Result<()> {
    let client = Client::new(control)?;
    let v = client.get(&format!("/v1/authorizations/{}", encode(name)))?;
    print(&v, std::slice::from_ref(&v), output)
}

/// `delete authorization NAME`.
pub fn delete_authorization(name: &str, control: &ControlArg) -> anyhow::Result<()> {
    let client = Client::new(control)?;
    client.delete(&format!("/v1/authorizations/{}", encode(name)))?;
    outln!("authorization/{name} deleted")?;
    Ok(())
}

/// Prints `list` (`[{service, version, authorization}]`); `answer` is what the API said.
fn print(answer: &Value, list: &[Value], output: PolicyOutput) -> anyhow::Result<()> {
    let mut headers = vec!["SERVICE", "DEFAULT", "MODE", "RULES", "VERSION"];
    if output == PolicyOutput::Wide {
        headers.extend(["MTLS", "ALLOW", "DENY", "FROM"]);
    }
    let table = |rows| {
        show(
            answer,
            Output::Table,
            &headers,
            rows,
            "No authorization policies found.",
        )
    };
    match output {
        PolicyOutput::Json => print_json(answer)?,
        PolicyOutput::Yaml => crate::yaml::print(answer)?,
        PolicyOutput::Toml => {
            if list.is_empty() {
                errln!("No authorization policies found.");
            }
            out!("{}", to_toml(list)?)?
        }
        PolicyOutput::Table => table(rows(&Value::Array(list.to_vec()), summary))?,
        PolicyOutput::Wide => table(rows(&Value::Array(list.to_vec()), |a| {
            let mut row = summary(a);
            // The service's own mTLS mode, or the mesh's (`malla identity` shows it).
            row.push(
                a["authorization"]["mtls"]
                    .as_str()
                    .unwrap_or("mesh")
                    .to_string(),
            );
            let rules = a["authorization"]["rule"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let count = |action: &str| {
                rules
                    .iter()
                    .filter(|r| r["action"] == action)
                    .count()
                    .to_string()
            };
            row.push(count("allow"));
            row.push(count("deny"));
            let mut from: Vec<String> = Vec::new();
            for f in rules.iter().filter_map(|r| r["from"].as_array()).flatten() {
                let f = text(f);
                if !from.contains(&f) {
                    from.push(f);
                }
            }
            row.push(if from.is_empty() {
                "-".into()
            } else {
                from.join(",")
            });
            row
        }))?,
    }
    Ok(())
}

/// One table row: service, default, mode, rules, version.
fn summary(a: &Value) -> Vec<String> {
    let spec = &a["authorization"];
    vec![
        text(&a["service"]),
        spec["default"].as_str().unwrap_or("allow").to_string(),
        spec["mode"].as_str().unwrap_or("enforce").to_string(),
        spec["rule"].as_array().map_or(0, Vec::len).to_string(),
        text(&a["version"]),
    ]
}

/// `default deny, 3 rules (enforce), version 12`, or `<none>`, for `describe service`.
pub fn describe_line(a: &Value) -> String {
    if a.is_null() {
        return "<none> (no authorization policy: every caller is let through)".into();
    }
    let s = summary(a);
    let rules = a["authorization"]["rule"].as_array().map_or(0, Vec::len);
    let mtls = a["authorization"]["mtls"]
        .as_str()
        .map_or_else(String::new, |m| format!(", mtls {m}"));
    format!(
        "default {}, {rules} rule{} ({}){mtls}, version {}",
        s[1],
        if rules == 1 { "" } else { "s" },
        s[2],
        s[4]
    )
}

/// A document of `[[authorization]]` tables that `malla apply -f` takes back, each
/// preceded by a comment with its version.
fn to_toml(list: &[Value]) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Document<'a> {
        authorization: [&'a AuthorizationPolicy; 1],
    }
    let mut out = String::new();
    for (i, item) in list.iter().enumerate() {
        let policy: AuthorizationPolicy = serde_json::from_value(item["authorization"].clone())
            .context(
                "the control plane answered an authorization policy this CLI cannot read (is it newer?)",
            )?;
        let table = toml::to_string(&Document {
            authorization: [&policy],
        })
        .map_err(|e| anyhow!("cannot write the authorization policy as TOML: {e}"))?;
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "# authorization/{} version {}\n",
            text(&item["service"]),
            text(&item["version"])
        ));
        out.push_str(&table);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn summaries_and_the_describe_line() {
        let a = json!({"service": "payments", "version": 12, "authorization": {
            "service": "payments", "default": "deny", "mode": "audit",
            "rule": [{"action": "allow", "from": ["checkout"]}, {"action": "deny", "ports": [9000]},
                     {"action": "allow", "from": ["checkout", "*"]}]}});
        assert_eq!(super::summary(&a), ["payments", "deny", "audit", "3", "12"]);
        assert_eq!(
            super::describe_line(&a),
            "default deny, 3 rules (audit), version 12"
        );
        assert!(super::describe_line(&serde_json::Value::Null).starts_with("<none>"));
        let strict = json!({"service": "ledger", "version": 3, "authorization": {
            "service": "ledger", "mtls": "strict"}});
        assert_eq!(
            super::describe_line(&strict),
            "default allow, 0 rules (enforce), mtls strict, version 3"
        );
        let toml = super::to_toml(std::slice::from_ref(&strict)).unwrap();
        assert!(toml.contains("mtls = \"strict\""), "{toml}");
        let toml = super::to_toml(std::slice::from_ref(&a)).unwrap();
        assert!(
            toml.starts_with("# authorization/payments version 12\n[[authorization]]\n"),
            "{toml}"
        );
        let back = malla_core::policy::document::parse_resources(&toml, "x.toml").unwrap();
        assert_eq!(back.authorizations.len(), 1);
        assert_eq!(back.authorizations[0].rules.len(), 3);
    }
}
