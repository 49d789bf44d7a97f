//! The registry verbs of the real `malla` binary (`services`, `instances`, `register`,
//! `deregister`) against a control plane started in-process on `127.0.0.1:0`.

// Test code: an `unwrap` here is an assertion.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use malla_tests::control::TestControl;
use serde_json::{json, Value};

/// Runs `malla ARGS...` (with `--control URL` appended when given); waits for it off the
/// runtime's threads.
async fn malla(args: &[&str], control: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_malla"));
    cmd.args(args)
        .env_remove("MALLA_CONTROL")
        .env_remove("MALLA_LOG")
        .env_remove("RUST_LOG");
    if let Some(url) = control {
        cmd.args(["--control", url]);
    }
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run the malla binary")
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
    let url = control.url();
    let out = malla(&["services", "-o", "json"], Some(&url)).await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON on stdout");
    assert_eq!(
        v["services"],
        json!([{"name": "orders", "instances": 3, "serving": 3, "health_check": null}])
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
    let url = control.url();
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
    let url = control.url();
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
    assert_eq!(
        *instance,
        json!({"id": "o-9", "service": "orders", "address": "127.0.0.1", "port": 9009,
               "protocol": "grpc", "health": "unknown",
               "labels": {"env": "prod", "zone": "eu-1"}})
    );

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
    let url = control.url();

    // Nothing listens there.
    let dead = format!("http://{}", malla_tests::peers::dead_addr());
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
        &["services", "-o", "yaml"],
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
        stderr(&out).contains("only http:// URLs"),
        "{}",
        stderr(&out)
    );

    // The control plane did not mind.
    assert_eq!(control.api().instance_ids("orders", "").await.len(), 3);
}
