//! The verbs of the real `malla` binary that talk to the control plane (`services`,
//! `instances`, `register`, `deregister`; `apply`, `get`, `delete`, `events`; `token create`,
//! `identity`) against a control plane started in-process on `127.0.0.1:0`, over TLS as a
//! user runs them: `--control HOST:PORT`, the control plane's trust bundle in
//! `MALLA_CA_FILE` ([`tls_env`]) and its operator token in `MALLA_TOKEN` ([`token_env`]).

// Test code: an `unwrap` here is an assertion.
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    io::Write as _,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{LazyLock, Mutex},
};

use malla_tests::control::{operator_token_at, TempDir, TestControl};
use serde_json::{json, Value};

/// Runs `malla ARGS...` (with `--control URL` appended when given); waits for it off the
/// runtime's threads.
async fn malla(args: &[&str], control: Option<&str>) -> Output {
    malla_with_stdin(args, control, "").await
}

/// The same, with `input` on its standard input.
async fn malla_with_stdin(args: &[&str], control: Option<&str>, input: &str) -> Output {
    malla_full(args, control, input, &[]).await
}

/// The same, with `env` set (the variables malla reads are otherwise removed).
async fn malla_env(args: &[&str], control: Option<&str>, env: &[(&str, &str)]) -> Output {
    malla_full(args, control, "", env).await
}

async fn malla_full(
    args: &[&str],
    control: Option<&str>,
    input: &str,
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_malla"));
    cmd.args(args)
        .env_remove("MALLA_CONTROL")
        .env_remove("MALLA_REQUEST_TIMEOUT")
        .env_remove("MALLA_LOG")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("MALLA_TOKEN")
        .env_remove("MALLA_TOKEN_FILE")
        .env_remove("MALLA_CA_FILE")
        .envs(token_env(args, control, env))
        .envs(tls_env(args, control, env))
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(url) = control {
        cmd.args(["--control", url]);
    }
    let input = input.to_string();
    let run = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        child.wait_with_output()
    });
    // Bounded: a CLI that hangs fails its test instead of hanging the suite.
    tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("malla did not exit within 120 s")
        .unwrap()
        .expect("run the malla binary")
}

/// The control plane a command talks to: named by `control`, a `--control` in `args` or
/// `MALLA_CONTROL` in `env`.
fn named_control<'a>(
    args: &[&'a str],
    control: Option<&'a str>,
    env: &[(&'a str, &'a str)],
) -> Option<&'a str> {
    control
        .or_else(|| {
            args.iter()
                .position(|a| *a == "--control")
                .and_then(|i| args.get(i + 1).copied())
        })
        .or_else(|| {
            env.iter()
                .find(|(k, _)| *k == "MALLA_CONTROL")
                .map(|(_, v)| *v)
        })
}

/// `HOST:PORT` of a `--control` value.
fn authority(url: &str) -> &str {
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
}

/// `MALLA_TOKEN` with the operator token of the test control plane the command talks to
/// ([`named_control`]), unless the test gives a token itself (a `--token*` flag or
/// `MALLA_TOKEN*` in `env`).
fn token_env(args: &[&str], control: Option<&str>, env: &[(&str, &str)]) -> Vec<(String, String)> {
    let given = args.iter().any(|a| a.starts_with("--token"))
        || env.iter().any(|(k, _)| k.starts_with("MALLA_TOKEN"));
    let token = named_control(args, control, env)
        .filter(|_| !given)
        .and_then(|url| authority(url).parse().ok())
        .and_then(operator_token_at);
    token
        .map(|t| vec![("MALLA_TOKEN".to_string(), t)])
        .unwrap_or_default()
}

/// The trust bundle of each test control plane a command was pointed at with [`tls_url`], by
/// its `HOST:PORT`.
static BUNDLES: LazyLock<Mutex<HashMap<String, PathBuf>>> = LazyLock::new(Default::default);

/// `control`'s address as a user gives it: `HOST:PORT`, TLS. Commands that name it are
/// given its trust bundle ([`tls_env`]).
fn tls_url(control: &TestControl) -> String {
    let addr = control.http_addr().to_string();
    BUNDLES
        .lock()
        .unwrap()
        .insert(addr.clone(), bundle_of(control));
    addr
}

/// `DATA_DIR/trust-bundle.pem` of a test control plane: what its clients verify it with.
fn bundle_of(control: &TestControl) -> PathBuf {
    control.trust_bundle_path()
}

/// `MALLA_CA_FILE` with the trust bundle of the test control plane the command talks to
/// over TLS ([`named_control`], not `http://`), unless the test gives a CA file itself
/// (`--ca-file` or `MALLA_CA_FILE` in `env`). A bundle that is gone is another test's, whose
/// control plane had the port before (its directory is removed when it is dropped).
fn tls_env(args: &[&str], control: Option<&str>, env: &[(&str, &str)]) -> Vec<(String, String)> {
    let given = args.contains(&"--ca-file") || env.iter().any(|(k, _)| *k == "MALLA_CA_FILE");
    let bundle = named_control(args, control, env)
        .filter(|url| !given && !url.starts_with("http://"))
        .and_then(|url| BUNDLES.lock().unwrap().get(authority(url)).cloned())
        .filter(|bundle| bundle.exists());
    bundle
        .map(|b| vec![("MALLA_CA_FILE".to_string(), b.display().to_string())])
        .unwrap_or_default()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

async fn seeded() -> TestControl {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    for (id, port, env) in [
        ("o-1", 8081, "prod"),
        ("o-2", 8082, "dev"),
        ("o-3", 8083, "prod"),
    ] {
        api.register(
            "orders",
            id,
            &json!({"address": "127.0.0.1", "port": port, "labels": {"env": env}}),
        )
        .await;
    }
    control
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_as_json_and_table() {
    let control = seeded().await;
    let url = tls_url(&control);
    let out = malla(&["services", "-o", "json"], Some(&url)).await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON on stdout");
    assert_eq!(
        v["services"],
        json!([{"name": "orders", "instances": 3, "serving": 3, "health_check": null,
                "annotations": {}}])
    );

    let out = malla(&["services"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "INSTANCES", "SERVING", "HEALTH-CHECK"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["orders", "3", "3", "-"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_a_selector() {
    let control = seeded().await;
    let url = tls_url(&control);
    let out = malla(
        &[
            "instances",
            "orders",
            "--selector",
            "env in (prod)",
            "-o",
            "table",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "ADDRESS", "PROTOCOL", "HEALTH", "LABELS"],
        "{text}"
    );
    let rows: Vec<Vec<&str>> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["o-1", "127.0.0.1:8081", "http", "unknown", "env=prod"],
            ["o-3", "127.0.0.1:8083", "http", "unknown", "env=prod"]
        ],
        "{text}"
    );
    // Columns line up: every row's second column starts where the header's does.
    let column = lines[0].find("ADDRESS").unwrap();
    assert!(
        lines[1..].iter().all(|l| l[column..].starts_with("127.")),
        "{text}"
    );

    let out = malla(
        &[
            "instances",
            "orders",
            "-l",
            "env!=prod",
            "--serving",
            "-o",
            "json",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["selector"], "env!=prod");
    assert_eq!(v["instances"][0]["id"], "o-2");
    assert_eq!(v["instances"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_deregister() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let api = control.api();
    let out = malla(
        &[
            "register",
            "orders",
            "--id",
            "o-9",
            "--address",
            "127.0.0.1",
            "--port",
            "9009",
            "--protocol",
            "grpc",
            "--label",
            "env=prod",
            "--label",
            "zone=eu-1",
            "--ttl",
            "120",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).starts_with("registered o-9 of orders (lease "),
        "{}",
        stdout(&out)
    );
    let instance = &api.instances("orders", "").await[0];
    for (field, value) in [
        ("id", json!("o-9")),
        ("service", json!("orders")),
        ("address", json!("127.0.0.1")),
        ("port", json!(9009)),
        ("protocol", json!("grpc")),
        ("health", json!("unknown")),
        ("labels", json!({"env": "prod", "zone": "eu-1"})),
        ("annotations", json!({})),
    ] {
        assert_eq!(instance[field], value, "{field}: {instance}");
    }
    assert_eq!(instance["lease"]["ttl_seconds"], 120, "{instance}");

    let out = malla(
        &[
            "register",
            "orders",
            "--id",
            "o-10",
            "--address",
            "::1",
            "--port",
            "9010",
            "-o",
            "json",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["ttl_seconds"], 30);
    assert!(v["lease"].as_u64().is_some(), "{v}");

    let out = malla(&["deregister", "orders", "o-9"], Some(&url)).await;
    assert_exit(&out, 0);
    assert_eq!(stdout(&out).trim(), "deregistered o-9 of orders");
    assert_eq!(api.instance_ids("orders", "").await, ["o-10"]);

    // Deregistering what is not there: the control plane's message, exit 1.
    let out = malla(&["deregister", "orders", "o-9"], Some(&url)).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("instance o-9 of service orders not found (HTTP 404)"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_do() {
    let control = seeded().await;
    let url = tls_url(&control);

    // Nothing listens there: that is the news, before any CA file is looked for.
    let dead = malla_tests::peers::dead_addr().to_string();
    for args in [
        &["services"][..],
        &["instances", "orders"],
        &["deregister", "orders", "o-1"],
        &[
            "register",
            "orders",
            "--id",
            "x",
            "--address",
            "127.0.0.1",
            "--port",
            "1",
        ],
    ] {
        let out = malla(args, Some(&dead)).await;
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(
            err.contains(&format!("cannot reach the control plane at {dead}"))
                && err.contains("start it with `malla control`"),
            "{args:?}: {err}"
        );
        assert!(stdout(&out).is_empty(), "{args:?}");
    }

    // A bad selector: the parser's message with the position.
    let out = malla(
        &["instances", "orders", "--selector", "env in prod"],
        Some(&url),
    )
    .await;
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains("invalid selector \"env in prod\" at position 7")
            && err.contains("(HTTP 400)"),
        "{err}"
    );

    // Refused input: the control plane's message.
    let out = malla(
        &[
            "register",
            "orders",
            "--id",
            "x",
            "--address",
            "127.0.0.1",
            "--port",
            "80",
            "--label",
            "env=no way",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("invalid value \"no way\" for label \"env\""),
        "{}",
        stderr(&out)
    );
    let out = malla(
        &[
            "register",
            "orders",
            "--id",
            "x",
            "--address",
            "127.0.0.1",
            "--port",
            "80",
            "--label",
            "env",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("expected KEY=VALUE"),
        "{}",
        stderr(&out)
    );
    let out = malla(&["instances", "Orders"], Some(&url)).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("invalid service name \"Orders\""),
        "{}",
        stderr(&out)
    );

    // Usage errors are clap's: exit 2, with the usage.
    for args in [
        &["instances"][..],
        &[
            "register",
            "orders",
            "--id",
            "x",
            "--address",
            "127.0.0.1",
            "--port",
            "many",
        ],
        &[
            "register",
            "orders",
            "--id",
            "x",
            "--address",
            "here",
            "--port",
            "80",
        ],
        &["services", "-o", "xml"],
        &["nonsense"],
    ] {
        let out = malla(args, Some(&url)).await;
        assert_exit(&out, 2);
        let err = stderr(&out);
        assert!(
            err.starts_with("error: ") && err.contains("--help"),
            "{args:?}: {err}"
        );
    }
    let out = malla(&["services", "--control", "ftp://x"], None).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("--control \"ftp://x\": ftp:// is not a way to reach the control plane; give HOST:PORT or https://HOST:PORT (TLS), or http://HOST:PORT (plaintext)"),
        "{}",
        stderr(&out)
    );

    // The control plane did not mind.
    assert_eq!(control.api().instance_ids("orders", "").await.len(), 3);
}

/// Writes `text` to `dir/name`; returns the path.
fn file(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

const GOOD: &str = r#"
[[policy]]
service = "shipping-quote"
[policy.retries]
max_attempts = 2
[policy.timeouts]
request = "2s"

[[policy]]
service = "billing"
[policy.outlier]
consecutive_failures = 3
mode = "audit"
[[policy.rate_limit]]
path_prefix = "/quotes"
requests_per_second = 100
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_checks_every_file_first_and_applies_nothing_on_a_problem() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let dir = TempDir::new("cli-apply-bad");
    let good = file(&dir, "good.toml", GOOD);
    let bad = file(
        &dir,
        "bad.toml",
        "[[policy]]\nservice = \"orders\"\n[policy.retries]\nmax_attempts = 0\n\n[[policy]]\n[policy.outlier]\nbase_ejection_time = \"10m\"\nmax_ejection_time = \"1m\"\n",
    );
    let broken = file(&dir, "broken.toml", "[[policy]\n");
    let out = malla(
        &["apply", "-f", &good, "-f", &bad, "-f", &broken],
        Some(&url),
    )
    .await;
    assert_exit(&out, 1);
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    // Every problem, located, then the verdict.
    assert_eq!(lines.len(), 5, "{err}");
    assert_eq!(
        lines[0],
        format!("{bad}:4:1: policy[0].retries.max_attempts: 0 is not between 1 and 10")
    );
    assert!(
        lines[1].starts_with(&format!("{bad}:6:1: policy[1].service: missing")),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "{bad}:8:1: policy[1].outlier.base_ejection_time: "
        )),
        "{err}"
    );
    assert!(lines[3].starts_with(&format!("{broken}:1:")), "{err}");
    assert_eq!(lines[4], "error: 4 problems found; nothing was applied");
    assert!(stdout(&out).is_empty());
    // Nothing was applied, not even the good file.
    assert_eq!(
        control.api().get("/v1/policies").await.ok()["policies"],
        json!([])
    );

    // The same service twice across files is a problem too; a missing file as well.
    let again = file(&dir, "again.toml", "[[policy]]\nservice = \"billing\"\n");
    let missing = dir.path().join("missing.toml");
    let out = malla(
        &[
            "apply",
            "-f",
            &good,
            "-f",
            &again,
            "-f",
            &missing.to_string_lossy(),
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{again}:2:1: policy[0].service: \"billing\" has a policy in {good} too"
        )),
        "{err}"
    );
    assert!(err.contains("missing.toml: cannot read"), "{err}");
    assert_eq!(
        control.api().get("/v1/policies").await.ok()["policies"],
        json!([])
    );

    // Usage: -f is required.
    let out = malla(&["apply"], Some(&url)).await;
    assert_exit(&out, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_round_trip_and_delete() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let dir = TempDir::new("cli-apply");
    let good = file(&dir, "mesh.toml", GOOD);

    let out = malla(&["apply", "-f", &good], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let version = |line: &str| -> u64 {
        line.rsplit_once("(version ")
            .and_then(|(_, v)| v.trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("no version in {line:?}"))
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("policy/shipping-quote created (version "),
        "{text}"
    );
    assert!(
        lines[1].starts_with("policy/billing created (version "),
        "{text}"
    );
    let v1 = version(lines[0]);

    // Again: unchanged, same version. Changed: configured, a higher version.
    let out = malla(&["apply", "-f", &good], Some(&url)).await;
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out).lines().next().unwrap(),
        format!("policy/shipping-quote unchanged (version {v1})")
    );
    let changed = file(
        &dir,
        "changed.toml",
        "[[policy]]\nservice = \"shipping-quote\"\n[policy.retries]\nmax_attempts = 4\n",
    );
    let out = malla(&["apply", "-f", &changed], Some(&url)).await;
    assert_exit(&out, 0);
    let line = stdout(&out);
    assert!(
        line.starts_with("policy/shipping-quote configured (version "),
        "{line}"
    );
    let v2 = version(line.trim());
    assert!(v2 > v1, "{v2} > {v1}");

    // The table.
    let out = malla(&["get", "policies"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "SERVICE",
            "VERSION",
            "RETRIES",
            "TIMEOUT",
            "OUTLIER",
            "LIMITS",
            "RATE-LIMITS",
            "FAULTS"
        ],
        "{text}"
    );
    assert_eq!(rows[1][0], "billing", "{text}");
    assert_eq!(
        &rows[1][2..],
        ["3", "attempts", "15s", "3", "failures", "(audit)", "4096", "requests", "1", "0"],
        "{text}"
    );
    assert_eq!(rows[2][0], "shipping-quote", "{text}");
    assert_eq!(rows[2][1], v2.to_string(), "{text}");

    // JSON: the API's answer.
    let out = malla(&["get", "policy", "billing", "-o", "json"], Some(&url)).await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["policy"]["rate_limit"][0]["path_prefix"], "/quotes");

    // TOML goes back in as it came out: unchanged, through a file and through stdin.
    let out = malla(&["get", "policies", "-o", "toml"], Some(&url)).await;
    assert_exit(&out, 0);
    let toml_text = stdout(&out);
    assert!(
        toml_text.starts_with("# policy/billing version "),
        "{toml_text}"
    );
    let exported = file(&dir, "exported.toml", &toml_text);
    let out = malla(&["apply", "-f", &exported], Some(&url)).await;
    assert_exit(&out, 0);
    let billing = control.api().get("/v1/policies/billing").await.ok()["version"].clone();
    assert_eq!(
        stdout(&out),
        format!(
            "policy/billing unchanged (version {billing})\npolicy/shipping-quote unchanged (version {v2})\n"
        )
    );
    let out = malla(
        &["get", "policy", "shipping-quote", "-o", "toml"],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    let one = stdout(&out);
    assert!(
        one.contains("[[policy]]") && one.contains("max_attempts = 4"),
        "{one}"
    );
    let out = malla_with_stdin(&["apply", "-f", "-"], Some(&url), &one).await;
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out).trim(),
        format!("policy/shipping-quote unchanged (version {v2})")
    );
    // A problem on stdin is reported as <stdin>.
    let out = malla_with_stdin(
        &["apply", "-f", "-"],
        Some(&url),
        "[[policy]]\nservice = \"x\"\n[policy.retries]\nmax_attempts = 11\n",
    )
    .await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).starts_with("<stdin>:4:1: policy[0].retries.max_attempts: "),
        "{}",
        stderr(&out)
    );

    // Delete; then it is not found.
    let out = malla(&["delete", "policy", "shipping-quote"], Some(&url)).await;
    assert_exit(&out, 0);
    assert_eq!(stdout(&out).trim(), "policy/shipping-quote deleted");
    for args in [
        &["get", "policy", "shipping-quote"][..],
        &["delete", "policy", "shipping-quote"],
    ] {
        let out = malla(args, Some(&url)).await;
        assert_exit(&out, 1);
        assert!(
            stderr(&out).contains("no policy for service shipping-quote (HTTP 404)"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = malla(&["get", "policies", "-o", "json"], Some(&url)).await;
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["policies"].as_array().unwrap().len(), 1);

    // Usage errors: exit 2.
    for args in [
        &["get", "policy"][..],
        &["get", "policies", "-o", "xml"],
        &["delete", "policies"],
        &["get"],
    ] {
        let out = malla(args, Some(&url)).await;
        assert_exit(&out, 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_as_table_and_json() {
    use malla_control::events::{ReportedEvent, Reporter};

    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let event = |service: &str, kind: &str, at_ms: u64| ReportedEvent {
        seq: 0,
        at_ms,
        received_at_ms: at_ms,
        reporter: Reporter {
            service: Some("frontend".into()),
            instance_id: Some("frontend-1".into()),
        },
        service: Some(service.into()),
        upstream: service.into(),
        endpoint: Some("127.0.0.1:9".parse().unwrap()),
        kind: kind.into(),
        audit: kind == "limit-hit",
        count: 1,
        detail: "5 consecutive failures".into(),
    };
    control.events().push(vec![
        event("shipping-quote", "ejected", 1_700_000_000_000),
        event("billing", "limit-hit", 1_700_000_001_000),
        event("shipping-quote", "half-open", 1_700_000_002_000),
    ]);

    let out = malla(&["events"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TIME", "SERVICE", "UPSTREAM", "ENDPOINT", "KIND", "COUNT", "REPORTER", "DETAIL"]
    );
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[1].starts_with("2023-11-14T22:13:20.000Z  shipping-quote"),
        "{text}"
    );
    assert!(lines[2].contains("limit-hit (audit)"), "{text}");
    assert!(
        lines[3].contains("half-open") && lines[3].contains("frontend-1"),
        "{text}"
    );

    let out = malla(
        &[
            "events",
            "--service",
            "shipping-quote",
            "--limit",
            "1",
            "-o",
            "json",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["kind"], "half-open");

    let out = malla(&["events", "--limit", "0"], Some(&url)).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("limit 0 is out of range"),
        "{}",
        stderr(&out)
    );
}

/// Runs `malla ARGS... --control URL` with its stdout a pipe whose reader is closed before
/// the first write (what `| head -0` does; `| head -2` does it after two lines): every
/// write fails with EPIPE.
async fn malla_into_closed_pipe(args: &[&str], control: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_malla"));
    cmd.args(args)
        .args(["--control", control])
        .env_remove("MALLA_CONTROL")
        .env_remove("MALLA_LOG")
        .env_remove("RUST_LOG")
        .env_remove("MALLA_TOKEN_FILE")
        .env_remove("MALLA_CA_FILE")
        .envs(token_env(args, Some(control), &[]))
        .envs(tls_env(args, Some(control), &[]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn()?;
        drop(child.stdout.take());
        child.wait_with_output()
    })
    .await
    .unwrap()
    .expect("run the malla binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly() {
    let control = seeded().await;
    let url = tls_url(&control);
    for args in [
        &["services"][..],
        &["services", "-o", "json"],
        &["instances", "orders"],
        &["get", "policies"],
        &["events"],
    ] {
        let out = malla_into_closed_pipe(args, &url).await;
        // Exit 0 and no complaint, as `ls | head` (not 101 and "Broken pipe").
        assert_exit(&out, 0);
        let err = stderr(&out);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe") && !err.contains("error"),
            "{args:?}: {err}"
        );
    }
}

/// A TCP listener that accepts connections and never answers; it holds them until dropped.
struct SilentServer {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentServer {
    fn start() -> SilentServer {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        });
        SilentServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_control_plane_times_out_with_a_clear_error() {
    let silent = SilentServer::start();
    let addr = silent.addr.to_string();
    let out = malla(
        &["services", "--request-timeout", "1s"],
        Some(&format!("http://{addr}")),
    )
    .await;
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "the control plane at http://{addr} did not answer within 1s (--request-timeout)"
        )) && err.contains("allow more time with --request-timeout"),
        "{err}"
    );
    // From the environment too, and for every verb; over TLS, a handshake the server
    // never answers is bounded the same way.
    let ca = TestControl::start_without_dns().await;
    let bundle = bundle_of(&ca).display().to_string();
    for args in [
        &["instances", "orders"][..],
        &["get", "policies"],
        &["events"],
        &["deregister", "orders", "o-1"],
    ] {
        let out = malla_env(
            args,
            Some(&addr),
            &[
                ("MALLA_REQUEST_TIMEOUT", "300ms"),
                ("MALLA_CA_FILE", &bundle),
            ],
        )
        .await;
        assert_exit(&out, 1);
        assert!(
            stderr(&out).contains("did not answer within 300ms"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // A bad duration is a usage error naming the flag.
    let out = malla(&["services", "--request-timeout", "soon"], Some(&addr)).await;
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("--request-timeout"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_takes_host_port_and_errors_name_what_was_typed() {
    let control = seeded().await;
    let host_port = tls_url(&control);
    // HOST:PORT, from the flag and from the environment.
    let out = malla(&["services", "-o", "json"], Some(&host_port)).await;
    assert_exit(&out, 0);
    let out = malla_env(
        &["services", "-o", "json"],
        None,
        &[("MALLA_CONTROL", &host_port)],
    )
    .await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["services"][0]["name"], "orders");

    // A bad value: the error names the flag, or the variable when it came from there.
    let out = malla(&["services"], Some("nowhere")).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(
            "--control \"nowhere\": expected HOST:PORT, https://HOST:PORT or http://HOST:PORT"
        ),
        "{}",
        stderr(&out)
    );
    let out = malla_env(&["services"], None, &[("MALLA_CONTROL", "nowhere")]).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("MALLA_CONTROL \"nowhere\": expected HOST:PORT"),
        "{}",
        stderr(&out)
    );
    let dead = malla_tests::peers::dead_addr().to_string();
    let out = malla_env(&["services"], None, &[("MALLA_CONTROL", &dead)]).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!("cannot reach the control plane at {dead}"))
            && stderr(&out).contains("point MALLA_CONTROL at it"),
        "{}",
        stderr(&out)
    );
}

/// TLS to the control plane: verified with the CA file given (`--ca-file`,
/// `MALLA_CA_FILE`), `https://` the same as `HOST:PORT`; another control plane's bundle,
/// none, a file that is not a bundle and a server that does not speak TLS are refused with
/// what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_with_the_ca_file_given() {
    let control = seeded().await;
    let addr = control.http_addr().to_string();
    let bundle = bundle_of(&control).display().to_string();
    let https = format!("https://{addr}");
    for (args, env) in [
        (vec!["--control", &addr, "--ca-file", &bundle], vec![]),
        (vec!["--control", &https, "--ca-file", &bundle], vec![]),
        (
            vec!["--control", &addr],
            vec![("MALLA_CA_FILE", bundle.as_str())],
        ),
        (
            vec![],
            vec![
                ("MALLA_CONTROL", addr.as_str()),
                ("MALLA_CA_FILE", bundle.as_str()),
            ],
        ),
    ] {
        let mut all = vec!["get", "services", "-o", "json"];
        all.extend(&args);
        let out = malla_env(&all, None, &env).await;
        assert_exit(&out, 0);
        let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(v["services"][0]["name"], "orders", "{args:?} {env:?}");
    }

    // Another control plane's bundle: its CA did not issue this one's certificate.
    let other = TestControl::start_without_dns().await;
    let wrong = bundle_of(&other).display().to_string();
    let refusal = format!(
        "error: the TLS connection to the control plane at {addr} failed: the control plane's certificate is not from the CA in {wrong}: pass the control plane's DATA_DIR/trust-bundle.pem with --ca-file (or MALLA_CA_FILE)"
    );
    for (args, env) in [
        (vec!["--ca-file", wrong.as_str()], vec![]),
        (vec![], vec![("MALLA_CA_FILE", wrong.as_str())]),
    ] {
        let mut all = vec!["get", "services", "--control", &addr];
        all.extend(&args);
        let out = malla_env(&all, None, &env).await;
        assert_exit(&out, 1);
        assert_eq!(stderr(&out).trim(), refusal, "{args:?} {env:?}");
    }
    // --ca-file wins over MALLA_CA_FILE.
    let out = malla_env(
        &["get", "services", "--control", &addr, "--ca-file", &bundle],
        None,
        &[("MALLA_CA_FILE", &wrong)],
    )
    .await;
    assert_exit(&out, 0);

    // No CA file: here (the crate's directory) is no ./malla-data.
    let out = malla_env(&["get", "services", "--control", &addr], None, &[]).await;
    assert_exit(&out, 1);
    let said = stderr(&out);
    for what in [
        &format!("no CA to verify the control plane at {addr} with"),
        "no ./malla-data/trust-bundle.pem here",
        "--ca-file FILE or MALLA_CA_FILE",
        "DATA_DIR/trust-bundle.pem",
    ] {
        assert!(said.contains(what), "{what:?} not in {said}");
    }

    // A file that is not a bundle, and one that is not there.
    let dir = TempDir::new("cli-ca-file");
    let junk = file(&dir, "junk.pem", "not a certificate\n");
    let out = malla(&["get", "services", "--ca-file", &junk], Some(&addr)).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!("the CA file {junk} (--ca-file or MALLA_CA_FILE)")),
        "{}",
        stderr(&out)
    );
    let out = malla(
        &["get", "services", "--ca-file", "/nonexistent/ca.pem"],
        Some(&addr),
    )
    .await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("cannot read the CA file /nonexistent/ca.pem"),
        "{}",
        stderr(&out)
    );

    // A sidecar of the mesh, whose certificate is from the same CA, is not the control
    // plane.
    let sidecar = malla_tests::mesh::server(
        &control,
        "orders",
        malla_tests::peers::dead_addr(),
        malla_proxy::config::ListenerProtocol::Auto,
        malla_proxy::config::MtlsMode::Strict,
    )
    .await;
    let impostor = sidecar.inbound().to_string();
    let out = malla(&["get", "services", "--ca-file", &bundle], Some(&impostor)).await;
    assert_exit(&out, 1);
    let said = stderr(&out);
    assert!(
        said.contains(&format!(
            "the TLS connection to the control plane at {impostor} failed: the server is not the control plane: its certificate is from the CA in {bundle} but does not prove the control plane's identity (spiffe://DOMAIN/control)"
        )),
        "{said}"
    );
    drop(sidecar);

    // A server that answers in plaintext is not taken for the control plane.
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut stream, _)) = plain.accept().await {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let out = malla(
        &["get", "services", "--ca-file", &bundle],
        Some(&plain_addr),
    )
    .await;
    server.abort();
    assert_exit(&out, 1);
    let said = stderr(&out);
    assert!(
        said.contains(&format!(
            "the TLS connection to the control plane at {plain_addr} failed: the server did not answer in TLS"
        )) && said.contains("http://HOST:PORT"),
        "{said}"
    );
}

/// A `malla` process running in the background, its stdout and stderr collected as they
/// come. Killed when dropped, if still running.
struct Background {
    child: std::process::Child,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Background {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Background {
        let mut child = Command::new(env!("CARGO_BIN_EXE_malla"))
            .args(args)
            .env_remove("MALLA_CONTROL")
            .env_remove("MALLA_REQUEST_TIMEOUT")
            .env_remove("MALLA_LOG")
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .env_remove("MALLA_TOKEN")
            .env_remove("MALLA_TOKEN_FILE")
            .env_remove("MALLA_CA_FILE")
            .env_remove("MALLA_CONTROL_CA")
            .envs(token_env(args, None, env))
            .envs(tls_env(args, None, env))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the malla binary");
        let collect = |mut from: Box<dyn std::io::Read + Send>| {
            let into = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
            let to = into.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    to.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            into
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Background {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded) until `what` holds of (stdout, stderr).
    async fn wait_for(&self, description: &str, what: impl Fn(&str, &str) -> bool) {
        for _ in 0..600 {
            if what(&self.stdout(), &self.stderr()) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "{description}: not seen within 60 s\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
    }

    /// Sends `signal` (`TERM`, `INT`) with kill(1).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits (bounded) for the exit; its code.
    async fn exit_code(&mut self) -> Option<i32> {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the collecting threads read what is left.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                return status.code();
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "malla did not exit within 60 s\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_carry_no_colour() {
    let dir = TempDir::new("cli-logs");
    let data = dir.path().join("data");
    let mut control = Background::start(
        &[
            "control",
            "--data-dir",
            &data.to_string_lossy(),
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--dns-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    control
        .wait_for("the ready log line", |_, err| {
            err.contains("control plane ready")
        })
        .await;
    control.signal("TERM");
    assert_eq!(control.exit_code().await, Some(0), "{}", control.stderr());
    let logs = control.stderr();
    // Its stderr is a pipe and NO_COLOR is unset: plain text all the same.
    assert!(logs.contains("INFO"), "{logs}");
    assert!(!logs.contains("\x1b["), "{logs:?}");
}

/// `register --keep-alive` outlives a lost lease and a control-plane outage, and
/// deregisters on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_survives_a_control_plane_restart_and_deregisters_on_sigterm() {
    use malla_control::store::Store as _;

    let mut control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let mut agent = Background::start(
        &[
            "register",
            "orders",
            "--id",
            "k-1",
            "--address",
            "127.0.0.1",
            "--port",
            "9001",
            "--ttl",
            "3",
            "--keep-alive",
            "--request-timeout",
            "1s",
            "--control",
            &url,
        ],
        &[],
    );
    agent
        .wait_for("the registration", |out, _| {
            out.contains("registered k-1 of orders")
        })
        .await;
    let api = control.api();
    assert_eq!(api.instance_ids("orders", "").await, ["k-1"]);

    // The lease is revoked behind its back (as when it expired): the next heartbeat hears
    // 404 lease_not_found, and the agent registers again.
    let lease = api.instances("orders", "").await[0]["lease"]["id"]
        .as_u64()
        .or_else(|| {
            agent
                .stdout()
                .split("(lease ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .and_then(|s| s.parse().ok())
        })
        .expect("the lease id");
    control
        .registry()
        .store()
        .revoke_lease(lease)
        .await
        .unwrap();
    agent
        .wait_for("registering again", |_, err| {
            err.contains("registered again")
        })
        .await;
    malla_tests::assert_eventually!(api.instance_ids("orders", "").await == ["k-1"]);

    // The control plane goes away for longer than a heartbeat interval (1 s) and than the
    // TTL, then comes back on the same data directory and port.
    control.stop().await;
    agent
        .wait_for("the outage reported", |_, err| {
            err.contains("cannot reach the control plane")
        })
        .await;
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "{}",
        agent.stderr()
    );
    control.start_again().await;
    assert_eq!(
        tls_url(&control),
        url,
        "the control plane came back on another port"
    );
    agent
        .wait_for("the recovery reported", |_, err| {
            err.contains("the control plane answers again")
        })
        .await;
    let api = control.api();
    malla_tests::assert_eventually!(api.instance_ids("orders", "").await == ["k-1"]);

    // SIGTERM: deregistered, exit 0.
    agent.signal("TERM");
    assert_eq!(agent.exit_code().await, Some(0), "{}", agent.stderr());
    assert!(
        agent
            .stdout()
            .contains("SIGTERM: deregistered k-1 of orders"),
        "{}",
        agent.stdout()
    );
    assert!(api.instance_ids("orders", "").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_lists_every_problem_of_a_file() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let dir = TempDir::new("cli-apply-all");
    // A wrong type, an unknown field and a bad duration, in three policies.
    let bad = file(
        &dir,
        "bad.toml",
        "[[policy]]\nservice = \"a\"\n[policy.retries]\nmax_attempts = \"two\"\n\n\
         [[policy]]\nservice = \"b\"\n[policy.outlier]\nconsecutive_failurez = 3\n\n\
         [[policy]]\nservice = \"c\"\n[policy.timeouts]\nrequest = \"soon\"\n",
    );
    let out = malla(&["apply", "-f", &bad], Some(&url)).await;
    assert_exit(&out, 1);
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(
        lines[0].starts_with(&format!("{bad}:4:16: policy[0].retries.max_attempts: ")),
        "{err}"
    );
    assert_eq!(
        lines[1],
        format!("{bad}:9:1: policy[1].outlier.consecutive_failurez: unknown field `consecutive_failurez`")
    );
    assert!(
        lines[2].starts_with(&format!(
            "{bad}:14:11: policy[2].timeouts.request: invalid duration"
        )),
        "{err}"
    );
    assert_eq!(lines[3], "error: 3 problems found; nothing was applied");
    assert_eq!(
        control.api().get("/v1/policies").await.ok()["policies"],
        json!([])
    );
}

/// Whether `yaml` (malla's `-o yaml`) reads, with an independent YAML parser (Python's),
/// as the same data as `json` (its `-o json`), but for what changes between two calls
/// (a lease's time left).
fn same_data_as_yaml(json: &str, yaml: &str) {
    let dir = TempDir::new("cli-yaml");
    let j = file(&dir, "a.json", json);
    let y = file(&dir, "a.yaml", yaml);
    let python = std::env::var("MALLA_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             def steady(v):\n\
             \x20   if isinstance(v, dict):\n\
             \x20       return {k: steady(x) for k, x in v.items() if k not in VOLATILE}\n\
             \x20   if isinstance(v, list):\n\
             \x20       return [steady(x) for x in v]\n\
             \x20   return v\n\
             VOLATILE = {'remaining_seconds', 'last_seen'}\n\
             j = steady(json.load(open(sys.argv[1], encoding='utf-8')))\n\
             y = steady(yaml.safe_load(open(sys.argv[2], encoding='utf-8')))\n\
             sys.exit(0 if j == y else 'differ: %r != %r' % (j, y))",
            &j,
            &y,
        ])
        .output()
        .expect("run python3 (with the yaml module: apt-get install python3-yaml)");
    assert!(
        out.status.success(),
        "{}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_verbs_and_output_formats() {
    let control = seeded().await;
    let url = tls_url(&control);
    let api = control.api();
    api.register(
        "edge",
        "e-1",
        &json!({"address": "fd00::5", "port": 8080, "labels": {"tier": "yes", "v": "1.5", "on": "true", "n": "007"}}),
    )
    .await;
    let dir = TempDir::new("cli-verbs");
    let policy = file(&dir, "p.toml", GOOD);
    assert_exit(&malla(&["apply", "-f", &policy], Some(&url)).await, 0);

    // The old verbs and the new ones print the same.
    for (old, new) in [
        (&["services"][..], &["get", "services"][..]),
        (&["instances", "orders"], &["get", "instances", "orders"]),
    ] {
        let a = malla(old, Some(&url)).await;
        let b = malla(new, Some(&url)).await;
        assert_exit(&a, 0);
        assert_exit(&b, 0);
        assert_eq!(stdout(&a), stdout(&b), "{old:?} vs {new:?}");
    }

    // IPv6 endpoints in brackets.
    let out = malla(&["get", "instances", "edge"], Some(&url)).await;
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("[fd00::5]:8080"), "{}", stdout(&out));

    // `get service NAME`: one row.
    let out = malla(&["get", "service", "orders"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["orders", "3", "3", "-"]
    );

    // -o wide adds columns.
    let out = malla(&["get", "instances", "orders", "-o", "wide"], Some(&url)).await;
    assert_exit(&out, 0);
    let header = stdout(&out).lines().next().unwrap().to_string();
    for column in ["ID", "LABELS", "LEASE", "REGISTERED-BY", "ANNOTATIONS"] {
        assert!(header.contains(column), "{header}");
    }
    let out = malla(&["get", "services", "-o", "wide"], Some(&url)).await;
    assert!(stdout(&out).contains("ANNOTATIONS"), "{}", stdout(&out));
    let out = malla(&["get", "policies", "-o", "wide"], Some(&url)).await;
    assert!(stdout(&out).contains("RETRY-ON"), "{}", stdout(&out));

    // -o yaml reads back (with another parser) as the same data as -o json.
    for args in [
        &["get", "services"][..],
        &["get", "service", "orders"],
        &["get", "instances", "edge"],
        &["get", "instances", "orders", "-l", "env=prod"],
        &["get", "policies"],
        &["get", "policy", "billing"],
        &["events"],
    ] {
        let json_out = malla(&[args, &["-o", "json"]].concat(), Some(&url)).await;
        let yaml_out = malla(&[args, &["-o", "yaml"]].concat(), Some(&url)).await;
        assert_exit(&json_out, 0);
        assert_exit(&yaml_out, 0);
        same_data_as_yaml(&stdout(&json_out), &stdout(&yaml_out));
    }

    // `delete service NAME`: the service and its instances.
    let out = malla(&["delete", "service", "edge"], Some(&url)).await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).starts_with("service/edge deleted"),
        "{}",
        stdout(&out)
    );
    assert!(api.instance_ids("edge", "").await.is_empty());
    let out = malla(&["delete", "service", "edge"], Some(&url)).await;
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("(HTTP 404)"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_result_says_so() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let cases: [(&[&str], &str); 7] = [
        (&["get", "services"], "No services found."),
        (&["get", "proxies"], "No proxies found."),
        (&["services"], "No services found."),
        (&["get", "policies"], "No policies found."),
        (&["events"], "No events found."),
        (
            &["get", "instances", "lonely"],
            "No instances of lonely found.",
        ),
        (
            &["get", "instances", "lonely", "-l", "env=prod"],
            "No instances of lonely match \"env=prod\".",
        ),
    ];
    for (args, says) in cases {
        if args.contains(&"lonely") {
            api_service(&control, "lonely").await;
        }
        let out = malla(args, Some(&url)).await;
        assert_exit(&out, 0);
        assert_eq!(stdout(&out), "", "{args:?}");
        assert_eq!(stderr(&out).trim(), says, "{args:?}");
        // JSON is the answer, empty list and all, and nothing on stderr.
        let out = malla(&[args, &["-o", "json"]].concat(), Some(&url)).await;
        assert_exit(&out, 0);
        assert!(serde_json::from_str::<Value>(&stdout(&out)).is_ok());
        assert_eq!(stderr(&out), "", "{args:?}");
    }
}

/// Makes `name` a service with no instances.
async fn api_service(control: &TestControl, name: &str) {
    let reply = control
        .api()
        .put(&format!("/v1/services/{name}"), &json!({}))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply);
}

/// `register --static` and `--annotation`, `annotate service`, and `describe service`
/// from the control plane's `GET /v1/services/{name}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_instances_annotations_and_describe() {
    let control = seeded().await;
    let url = tls_url(&control);
    let api = control.api();

    // A static external endpoint with UTF-8 annotations: no lease.
    let out = malla(
        &[
            "register",
            "orders",
            "--id",
            "vendor",
            "--address",
            "203.0.113.7",
            "--port",
            "443",
            "--protocol",
            "tcp",
            "--static",
            "--annotation",
            "owner=Equipo de Envíos",
            "--annotation",
            "runbook=https://runbooks.example/orders#vendor",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).starts_with("registered vendor of orders (static"),
        "{}",
        stdout(&out)
    );
    let vendor = api
        .instances("orders", "")
        .await
        .into_iter()
        .find(|i| i["id"] == "vendor")
        .expect("the static instance");
    assert_eq!(vendor["lease"], Value::Null, "{vendor}");
    assert_eq!(vendor["annotations"]["owner"], "Equipo de Envíos");
    // --static with --keep-alive or --ttl: a usage error.
    for extra in [&["--keep-alive"][..], &["--ttl", "5"]] {
        let args = [
            &[
                "register",
                "orders",
                "--id",
                "x",
                "--address",
                "127.0.0.1",
                "--port",
                "1",
                "--static",
            ][..],
            extra,
        ]
        .concat();
        assert_exit(&malla(&args, Some(&url)).await, 2);
    }

    // annotate service: set, then remove.
    let out = malla(
        &[
            "annotate",
            "service",
            "orders",
            "display-name=Cotización de Envío",
            "team=logistics",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    let out = malla(&["annotate", "service", "orders", "team-"], Some(&url)).await;
    assert_exit(&out, 0);
    let spec = api.get("/v1/services/orders").await.ok()["spec"].clone();
    assert_eq!(
        spec["annotations"],
        json!({"display-name": "Cotización de Envío"})
    );
    let out = malla(&["annotate", "service", "orders", "nope-"], Some(&url)).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("no annotation \"nope\""),
        "{}",
        stderr(&out)
    );

    // describe: settings, annotations, instances with lease and who registered them.
    let out = malla(&["describe", "service", "orders"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    for expected in [
        "Name:          orders",
        "Annotations:   display-name=Cotización de Envío",
        "Instances:     4 (4 serving)",
        "REGISTERED-BY",
        "vendor annotations: owner=Equipo de Envíos",
        "Policy:        <none>",
    ] {
        assert!(text.contains(expected), "{expected:?} in\n{text}");
    }
    let vendor_row = text
        .lines()
        .find(|l| l.contains("203.0.113.7:443"))
        .unwrap();
    assert!(vendor_row.contains("static"), "{text}");
    let o1 = text.lines().find(|l| l.contains("127.0.0.1:8081")).unwrap();
    assert!(
        o1.contains("30s") && o1.contains("http 127.0.0.1:"),
        "{text}"
    );
    // JSON and YAML are the API's answer.
    let json_out = malla(&["describe", "service", "orders", "-o", "json"], Some(&url)).await;
    let yaml_out = malla(&["describe", "service", "orders", "-o", "yaml"], Some(&url)).await;
    assert_exit(&json_out, 0);
    let v: Value = serde_json::from_str(&stdout(&json_out)).unwrap();
    assert_eq!(v["name"], "orders");
    same_data_as_yaml(&stdout(&json_out), &stdout(&yaml_out));
    // -o wide shows annotations in get.
    let out = malla(&["get", "services", "-o", "wide"], Some(&url)).await;
    assert!(
        stdout(&out).contains("display-name=Cotización de Envío"),
        "{}",
        stdout(&out)
    );
    // Not found: the control plane's message.
    let out = malla(&["describe", "service", "nothing"], Some(&url)).await;
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("(HTTP 404)"), "{}", stderr(&out));
}

/// `get proxies`: a sidecar connected to the control plane is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_sidecars_are_listed() {
    let control = seeded().await;
    let url = tls_url(&control);
    let dir = TempDir::new("cli-proxies");
    let config = file(
        &dir,
        "sidecar.toml",
        "[[upstream]]\nname = \"orders\"\n[[outbound]]\nlisten = \"127.0.0.1:0\"\nupstream = \"orders\"\n",
    );
    let _sidecar = Background::start(
        &[
            "proxy",
            "--config",
            &config,
            "--control",
            &control.http_addr().to_string(),
            "--control-ca",
            &bundle_of(&control).display().to_string(),
        ],
        &[],
    );
    let mut listed = Value::Null;
    for _ in 0..300 {
        let out = malla(&["get", "proxies", "-o", "json"], Some(&url)).await;
        assert_exit(&out, 0);
        listed = serde_json::from_str(&stdout(&out)).unwrap();
        if listed["proxies"].as_array().is_some_and(|p| !p.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        listed["proxies"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let out = malla(&["get", "proxies"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "ADDRESS",
            "SERVICE",
            "INSTANCE",
            "VERSION",
            "LAST-SEEN",
            "WATCHES",
            "AGE"
        ],
        "{text}"
    );
    assert!(lines[1].starts_with("127.0.0.1:"), "{text}");
    assert!(
        lines[1].contains(&text_of(&listed["proxies"][0]["version"])),
        "{text}"
    );
}

fn text_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// `describe service` shows the health history the control plane's checks wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_the_health_history() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let api = control.api();
    let dead = malla_tests::peers::dead_addr();
    api.register(
        "flaky",
        "f-1",
        &json!({"address": dead.ip().to_string(), "port": dead.port()}),
    )
    .await;
    api.put_service(
        "flaky",
        &json!({"health_check": {"kind": "tcp", "interval": 1, "timeout": 1,
                                 "unhealthy_threshold": 1}}),
    )
    .await;
    malla_tests::assert_eventually!(
        api.health("flaky", "f-1").await.as_deref() == Some("unhealthy")
    );
    let mut text = String::new();
    for _ in 0..100 {
        let out = malla(&["describe", "service", "flaky"], Some(&url)).await;
        assert_exit(&out, 0);
        text = stdout(&out);
        if text.contains("Health history: (newest last)") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(text.contains("Health history: (newest last)"), "{text}");
    assert!(text.contains("Health check:  tcp every 1s"), "{text}");
    assert!(text.contains("Instances:     1 (0 serving)"), "{text}");
    let history = text
        .lines()
        .skip_while(|l| !l.starts_with("Health history:"))
        .nth(1)
        .unwrap_or_default();
    assert!(history.contains(&dead.to_string()), "{text}");
}

/// Ctrl-C (SIGINT) deregisters as SIGTERM does; a static instance is never touched by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_deregisters_on_sigint() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let mut agent = Background::start(
        &[
            "register",
            "orders",
            "--id",
            "k-2",
            "--address",
            "127.0.0.1",
            "--port",
            "9002",
            "--keep-alive",
            "--control",
            &url,
        ],
        &[],
    );
    agent
        .wait_for("the registration", |out, _| {
            out.contains("registered k-2 of orders")
        })
        .await;
    agent
        .wait_for("the heartbeat notice", |_, err| {
            err.contains("sending heartbeats every 10s")
        })
        .await;
    agent.signal("INT");
    assert_eq!(agent.exit_code().await, Some(0), "{}", agent.stderr());
    assert!(
        agent
            .stdout()
            .contains("SIGINT: deregistered k-2 of orders"),
        "{}",
        agent.stdout()
    );
    assert!(control.api().instance_ids("orders", "").await.is_empty());
}

/// `malla token create`: the token alone on stdout (for `TOKEN=$(...)`), what it grants on
/// stderr; `-o json` and `-o yaml` give the API's answer; bad names and TTLs are the
/// control plane's refusals, exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_prints_the_token_alone() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);

    let out = malla(&["token", "create", "--service", "checkout"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].starts_with("malla_join_"), "{text}");
    assert_eq!(lines[0].len(), "malla_join_".len() + 64, "{text}");
    let err = stderr(&out);
    assert!(
        err.contains(
            "join token for checkout (identity spiffe://malla.local/svc/checkout), valid until "
        ) && err.contains("shown once"),
        "{err}"
    );
    // The token works: a certificate for an openssl CSR over HTTP.
    let dir = TempDir::new("cli-token");
    let made = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "key.pem",
            "-subj",
            "/CN=checkout",
            "-out",
            "csr.pem",
        ])
        .current_dir(dir.path())
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let csr = std::fs::read_to_string(dir.path().join("csr.pem")).unwrap();
    let issued = control
        .api()
        .request(
            http::Method::POST,
            "/v1/certificates",
            json!({"service": "checkout", "csr": csr, "join_token": lines[0]}).to_string(),
        )
        .await
        .ok();
    assert_eq!(issued["spiffe_id"], "spiffe://malla.local/svc/checkout");

    let out = malla(
        &[
            "token",
            "create",
            "--service",
            "checkout",
            "--ttl",
            "10m",
            "-o",
            "json",
        ],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON on stdout");
    assert!(
        v["token"].as_str().unwrap().starts_with("malla_join_"),
        "{v}"
    );
    assert_eq!(v["service"], "checkout");
    assert_eq!(v["spiffe_id"], "spiffe://malla.local/svc/checkout");
    assert_eq!(v["ttl_seconds"], 600);
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'), "{v}");
    let out = malla(
        &["token", "create", "--service", "checkout", "-o", "yaml"],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    let yaml = stdout(&out);
    assert!(
        yaml.contains("token: malla_join_") && yaml.contains("ttl_seconds: 3600"),
        "{yaml}"
    );

    // Refusals.
    let out = malla(
        &["token", "create", "--service", "Cotización de Envío"],
        Some(&url),
    )
    .await;
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains("invalid service name \"Cotización de Envío\"")
            && err.contains("try \"cotizacion-de-envio\""),
        "{err}"
    );
    assert!(stdout(&out).is_empty());
    for ttl in ["5s", "31d"] {
        let out = malla(
            &["token", "create", "--service", "checkout", "--ttl", ttl],
            Some(&url),
        )
        .await;
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(
            err.contains("ttl must be from 10s to 2592000s (30 days)"),
            "{ttl}: {err}"
        );
        assert!(stdout(&out).is_empty());
    }
    let out = malla(
        &["token", "create", "--service", "checkout", "--ttl", "soon"],
        Some(&url),
    )
    .await;
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("ttl \"soon\""), "{}", stderr(&out));
    // Usage: --service is required.
    let out = malla(&["token", "create"], Some(&url)).await;
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("--service"), "{}", stderr(&out));
    // A control plane that is not there.
    let dead = format!("http://{}", malla_tests::peers::dead_addr());
    let out = malla(&["token", "create", "--service", "checkout"], Some(&dead)).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("cannot reach the control plane"),
        "{}",
        stderr(&out)
    );
}

/// `malla identity`: the trust domain, the identities' shape, the certificate TTL;
/// `--bundle`: the root as PEM, which openssl reads; `-o json`: the API's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_shows_the_trust_domain_and_the_bundle() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);

    let out = malla(&["identity"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let fields: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(field("Trust domain"), "malla.local", "{text}");
    assert_eq!(field("Identities"), "spiffe://malla.local/svc/SERVICE");
    assert_eq!(field("Certificate TTL"), "24h", "{text}");

    let out = malla(&["identity", "--bundle"], Some(&url)).await;
    assert_exit(&out, 0);
    let bundle = stdout(&out);
    assert!(
        bundle.starts_with("-----BEGIN CERTIFICATE-----"),
        "{bundle}"
    );
    let dir = TempDir::new("cli-identity");
    let path = file(&dir, "bundle.pem", &bundle);
    let openssl = Command::new("openssl")
        .args([
            "x509",
            "-in",
            &path,
            "-noout",
            "-subject",
            "-ext",
            "basicConstraints",
        ])
        .output()
        .expect("run openssl (apt-get install openssl)");
    let parsed = String::from_utf8_lossy(&openssl.stdout);
    assert!(
        openssl.status.success(),
        "{}",
        String::from_utf8_lossy(&openssl.stderr)
    );
    assert!(
        parsed.contains("malla root CA malla.local") && parsed.contains("CA:TRUE"),
        "{parsed}"
    );
    // The same root the data directory holds.
    let root = std::fs::read_to_string(control.data_dir().join("ca/root.crt")).unwrap();
    assert_eq!(
        bundle.replace("\r\n", "\n").trim(),
        root.replace("\r\n", "\n").trim()
    );

    let out = malla(&["identity", "-o", "json"], Some(&url)).await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON on stdout");
    assert_eq!(v["trust_domain"], "malla.local");
    assert_eq!(v["cert_ttl_seconds"], 86400);
    assert_eq!(v["trust_bundle_pem"].as_str(), Some(bundle.as_str()));
}

/// `malla identity rotate`: the plan, printed; `malla identity` then shows both roots, what
/// each is and the phase; `--bundle` holds both. A second rotation, an overlap shorter than
/// the certificate TTL and an operator's CA are refused with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_rotate_starts_a_root_rotation_that_identity_shows() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);

    let out = malla(&["identity", "rotate", "--overlap", "1h"], Some(&url)).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("overlap 1h is shorter than the certificate TTL (1day)"),
        "{}",
        stderr(&out)
    );

    let out = malla(&["identity", "rotate"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.starts_with("root rotation started: the new root "),
        "{text}"
    );
    for what in [
        "the old one signs while sidecars renew",
        "the new root signs",
        "the old root leaves the trust bundle",
    ] {
        assert!(text.contains(what), "{what}: {text}");
    }
    assert!(stderr(&out).contains("malla identity"), "{}", stderr(&out));

    let out = malla(&["identity"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
            .to_string()
    };
    assert!(
        line("Rotation:").contains("announcing: both roots trusted, the old one signs until"),
        "{text}"
    );
    assert!(line("CA:").contains("made by malla"), "{text}");
    assert!(line("ROLE").contains("SHA-256"), "{text}");
    assert!(
        line("signing ").contains("malla root CA malla.local"),
        "{text}"
    );
    assert!(
        line("next ").contains("malla root CA malla.local 20"),
        "{text}"
    );

    let out = malla(&["identity", "--bundle"], Some(&url)).await;
    assert_eq!(stdout(&out).matches("BEGIN CERTIFICATE").count(), 2);
    let out = malla(&["identity", "-o", "json"], Some(&url)).await;
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON on stdout");
    assert_eq!(v["rotation"]["phase"], "announcing");
    assert_eq!(
        v["rotation"]["overlap_seconds"],
        24 * 3600 + 8640,
        "TTL + 10 %"
    );
    assert_eq!(v["roots"].as_array().unwrap().len(), 2);

    let out = malla(&["identity", "rotate"], Some(&url)).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("a root rotation is already under way (announcing"),
        "{}",
        stderr(&out)
    );

    // A control plane given the CA's files: not malla's to rotate.
    let files = TempDir::new("cli-operator-ca");
    for name in ["root.crt", "root.key"] {
        std::fs::copy(
            control.data_dir().join("ca").join(name),
            files.path().join(name),
        )
        .unwrap();
    }
    let theirs = TestControl::start_with_identity(malla_control::server::IdentitySettings {
        ca_files: Some((files.path().join("root.crt"), files.path().join("root.key"))),
        ..Default::default()
    })
    .await;
    let out = malla(&["identity", "rotate"], Some(&tls_url(&theirs))).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out)
            .contains("this CA is the operator's (--ca-cert, --ca-key): malla does not rotate it"),
        "{}",
        stderr(&out)
    );
    let out = malla(&["identity"], Some(&tls_url(&theirs))).await;
    assert!(
        stdout(&out).contains("CA:                the operator's"),
        "{}",
        stdout(&out)
    );
}

const MIXED: &str = r#"
[[policy]]
service = "payments"
[policy.retries]
max_attempts = 2

[[authorization]]
service = "payments"
default = "deny"

[[authorization.rule]]
action = "allow"
from = ["checkout"]
methods = ["POST"]
paths = ["/v1/charges", "/v1/refunds/*"]

[[authorization.rule]]
action = "allow"
from = ["spiffe://other.example/svc/audit"]
methods = ["GET"]

[[authorization.rule]]
action = "deny"
grpc = ["payments.v1.Admin/*"]

[[authorization]]
service = "billing"
mode = "audit"
"#;

/// `apply -f` with `[[policy]]` and `[[authorization]]` in one file; `get
/// authorizations` / `get authorization NAME` in every output; `describe service`;
/// `delete authorization`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorizations_apply_get_describe_delete() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let dir = TempDir::new("cli-authz");
    let mixed = file(&dir, "mesh.toml", MIXED);

    let out = malla(&["apply", "-f", &mixed], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("policy/payments created (version "),
        "{text}"
    );
    assert!(
        lines[1].starts_with("authorization/payments created (version "),
        "{text}"
    );
    assert!(
        lines[2].starts_with("authorization/billing created (version "),
        "{text}"
    );
    let payments = control.api().get("/v1/authorizations/payments").await.ok();
    let version = payments["version"].as_u64().unwrap();
    assert_eq!(
        payments["authorization"]["rule"].as_array().unwrap().len(),
        3
    );

    // Again: unchanged, the same versions.
    let out = malla(&["apply", "-f", &mixed], Some(&url)).await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains(&format!(
            "authorization/payments unchanged (version {version})"
        )),
        "{}",
        stdout(&out)
    );

    // The table, sorted by service.
    let out = malla(&["get", "authorizations"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["SERVICE", "DEFAULT", "MODE", "RULES", "VERSION"]);
    assert_eq!(rows[1][..4], ["billing", "allow", "audit", "0"], "{text}");
    assert_eq!(
        rows[2],
        ["payments", "deny", "enforce", "3", &version.to_string()],
        "{text}"
    );
    let out = malla(&["get", "authorizations", "-o", "wide"], Some(&url)).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[5..], ["MTLS", "ALLOW", "DENY", "FROM"], "{text}");
    let row = text.lines().find(|l| l.starts_with("payments")).unwrap();
    assert!(
        row.ends_with("2      1     checkout,spiffe://other.example/svc/audit"),
        "{text}"
    );

    // One, as JSON and YAML (the API's answer) and TOML (applied back: unchanged).
    let out = malla(
        &["get", "authorization", "payments", "-o", "json"],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    let json_text = stdout(&out);
    let v: Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(v, payments);
    let out = malla(
        &["get", "authorization", "payments", "-o", "yaml"],
        Some(&url),
    )
    .await;
    assert_exit(&out, 0);
    same_data_as_yaml(&json_text, &stdout(&out));
    let out = malla(&["get", "authorizations", "-o", "toml"], Some(&url)).await;
    assert_exit(&out, 0);
    let toml_text = stdout(&out);
    assert!(
        toml_text.starts_with("# authorization/billing version "),
        "{toml_text}"
    );
    let out = malla_with_stdin(&["apply", "-f", "-"], Some(&url), &toml_text).await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).ends_with(&format!(
            "authorization/payments unchanged (version {version})\n"
        )),
        "{}",
        stdout(&out)
    );

    // describe service: the line, and <none> without one.
    control
        .api()
        .register(
            "payments",
            "p-1",
            &json!({"address": "127.0.0.1", "port": 8080}),
        )
        .await;
    api_service(&control, "ledger").await;
    let out = malla(&["describe", "service", "payments"], Some(&url)).await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains(&format!(
            "Authorization: default deny, 3 rules (enforce), version {version}\n"
        )),
        "{}",
        stdout(&out)
    );
    let out = malla(&["describe", "service", "ledger"], Some(&url)).await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("Authorization: <none>"),
        "{}",
        stdout(&out)
    );

    // Delete; then not found, exit 1.
    let out = malla(&["delete", "authorization", "payments"], Some(&url)).await;
    assert_exit(&out, 0);
    assert_eq!(stdout(&out).trim(), "authorization/payments deleted");
    for args in [
        &["get", "authorization", "payments"][..],
        &["delete", "authorization", "payments"],
    ] {
        let out = malla(args, Some(&url)).await;
        assert_exit(&out, 1);
        assert!(
            stderr(&out).contains("no authorization policy for service payments (HTTP 404)"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // The resilience policy of the same service is still there.
    control.api().get("/v1/policies/payments").await.ok();
    // An empty table says so.
    let out = malla(&["delete", "authorization", "billing"], Some(&url)).await;
    assert_exit(&out, 0);
    let out = malla(&["get", "authorizations"], Some(&url)).await;
    assert_exit(&out, 0);
    assert!(stdout(&out).is_empty());
    assert!(stderr(&out).contains("No authorization policies found."));
    // Usage errors: exit 2.
    for args in [
        &["get", "authorization"][..],
        &["get", "authorizations", "-o", "xml"],
        &["delete", "authorizations"],
    ] {
        let out = malla(args, Some(&url)).await;
        assert_exit(&out, 2);
    }
}

/// An invalid mixed file: every problem of either kind, located, in the order of the
/// text; exit 1 and nothing applied, not even the valid resources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_lists_every_problem_of_authorizations_and_applies_nothing() {
    let control = TestControl::start_without_dns().await;
    let url = tls_url(&control);
    let dir = TempDir::new("cli-authz-bad");
    let good = file(&dir, "good.toml", MIXED);
    let bad = file(
        &dir,
        "bad.toml",
        "[[authorization]]\nservice = \"orders\"\ndefault = \"maybe\"\n\n\
         [[authorization.rule]]\naction = \"allow\"\nfrom = [\"Check Out\"]\nports = [\"80\"]\nmethod = [\"GET\"]\n\n\
         [[policy]]\nservice = \"orders\"\n[policy.retries]\nmax_attempts = 0\n\n\
         [[authorization]]\nservice = \"orders\"\n\n\
         [[authorization]]\nservice = \"billing\"\n",
    );
    let out = malla(&["apply", "-f", &good, "-f", &bad], Some(&url)).await;
    assert_exit(&out, 1);
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    let expected = [
        format!("{bad}:3:11: authorization[0].default: "),
        format!("{bad}:7:9: authorization[0].rule[0].from[0]: invalid service name"),
        format!("{bad}:8:10: authorization[0].rule[0].ports: "),
        format!("{bad}:9:1: authorization[0].rule[0].method: unknown field `method`"),
        format!("{bad}:14:1: policy[0].retries.max_attempts: 0 is not between 1 and 10"),
        format!("{bad}:17:1: authorization[1].service: \"orders\" has an authorization policy earlier in this document"),
        "error: 6 problems found; nothing was applied".to_string(),
    ];
    assert_eq!(lines.len(), expected.len(), "{err}");
    for (line, expected) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(expected.as_str()),
            "{line:?} vs {expected:?}\n{err}"
        );
    }
    assert!(stdout(&out).is_empty());
    let api = control.api();
    assert_eq!(
        api.get("/v1/authorizations").await.ok()["authorizations"],
        json!([])
    );
    assert_eq!(api.get("/v1/policies").await.ok()["policies"], json!([]));

    // The same service in two files, each valid: a problem too, at the second's service.
    let again = file(
        &dir,
        "again.toml",
        "[[policy]]\nservice = \"orders\"\n\n[[authorization]]\nservice = \"billing\"\n",
    );
    let out = malla(&["apply", "-f", &good, "-f", &again], Some(&url)).await;
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "{again}:5:1: authorization[0].service: \"billing\" has an authorization policy in {good} too"
        )),
        "{err}"
    );
    assert_eq!(
        api.get("/v1/authorizations").await.ok()["authorizations"],
        json!([])
    );
}
