//! The operator token and the TLS trust bundle end to end, with the real binary:
//!
//! - `malla control` creates the token at its first start and prints it once (not again on
//!   a restart), the CLI reads it from `./malla-data` on the control plane's machine or
//!   takes `--token`, `--token-file`, `MALLA_TOKEN`; a CLI call without it (or with a wrong
//!   one) fails with what to do; and `malla operator-token rotate` replaces it.
//! - The CLI reaches `malla control` over TLS (`--control HOST:PORT`) verified with
//!   `./malla-data/trust-bundle.pem` next to the data directory, or the bundle given with
//!   `--ca-file` or `MALLA_CA_FILE`; without one, or with another control plane's, it is
//!   refused with what to do; `http://` is refused by the control plane, which serves no
//!   plaintext.

// Test code: an `unwrap` here is an assertion.
#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use malla_tests::{
    control::{api::Api, TempDir},
    eventually,
};

/// A `malla control` process; killed when dropped.
struct ControlProcess {
    child: Child,
    /// `HOST:PORT`, what `--control` is given (TLS).
    url: String,
    /// `DATA_DIR/trust-bundle.pem`.
    bundle: String,
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Starts `malla control --data-dir DATA` with its stderr into `log`, and waits until it
/// is ready.
async fn start(data: &Path, log: &Path) -> ControlProcess {
    for _attempt in 0..5 {
        let http = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_malla"))
            .arg("control")
            .arg("--data-dir")
            .arg(data)
            .args(["--addr", &http.to_string()])
            .args(["--grpc-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0"])
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start malla control");
        let mut process = ControlProcess {
            child,
            url: http.to_string(),
            bundle: data.join("trust-bundle.pem").display().to_string(),
        };
        for _ in 0..eventually::TRIES {
            // Over TLS, with the bundle it writes before its APIs listen.
            if let Ok(reply) = Api::new(http)
                .with_credentials_of(data)
                .try_request(http::Method::GET, "/ready", bytes::Bytes::new())
                .await
            {
                if reply.status == 200 {
                    return process;
                }
            }
            if process.child.try_wait().unwrap().is_some() {
                break;
            }
            eventually::pause().await;
        }
    }
    panic!("malla control never became ready on {}", data.display());
}

/// Runs `malla ARGS...` in `dir` with `env` (the token variables otherwise removed).
async fn malla(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_malla"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("MALLA_CONTROL")
        .env_remove("MALLA_TOKEN")
        .env_remove("MALLA_TOKEN_FILE")
        .env_remove("MALLA_CA_FILE")
        .env_remove("MALLA_LOG")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    let run = tokio::task::spawn_blocking(move || cmd.output());
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("malla did not exit within 60 s")
        .unwrap()
        .expect("run the malla binary")
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_printed_once_read_by_the_cli_required_and_rotated() {
    // The control plane's machine: a working directory holding ./malla-data, the default
    // data directory; and somewhere else without one.
    let home = TempDir::new("operator-home");
    let elsewhere = TempDir::new("operator-elsewhere");
    let data = home.path().join("malla-data");
    let file = data.join("operator.token");
    let log = home.path().join("control.log");

    let mut control = start(&data, &log).await;
    let url = control.url.clone();
    // Elsewhere, the CLI is given the control plane's trust bundle: this test is the token's.
    let ca = [("MALLA_CA_FILE", control.bundle.clone())];
    let ca: Vec<(&str, &str)> = ca.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(token.starts_with("malla_op_"), "{token}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is mode 600");
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(
        printed.contains(&token) && printed.contains(&file.display().to_string()),
        "the first start prints the token and where it is kept:\n{printed}"
    );
    assert!(printed.contains("--token") && printed.contains("MALLA_TOKEN"));

    // On the control plane's machine, next to ./malla-data: no step.
    let out = malla(home.path(), &["get", "services", "--control", &url], &[]).await;
    assert_exit(&out, 0);

    // Elsewhere, without a token: refused with what to do.
    let out = malla(
        elsewhere.path(),
        &["get", "services", "--control", &url],
        &ca,
    )
    .await;
    assert_exit(&out, 1);
    let said = stderr(&out);
    for what in [
        "requires the operator token and none was given",
        "--token",
        "MALLA_TOKEN",
        "--token-file",
        "DATA_DIR/operator.token",
        "`malla control` printed it at its first start",
    ] {
        assert!(said.contains(what), "{what:?} not in {said}");
    }

    // A wrong one names where it came from.
    let wrong = format!("malla_op_{}", "0".repeat(64));
    let out = malla(
        elsewhere.path(),
        &["get", "services", "--control", &url, "--token", &wrong],
        &ca,
    )
    .await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("refused the operator token from --token"),
        "{}",
        stderr(&out)
    );

    // --token, MALLA_TOKEN, --token-file and MALLA_TOKEN_FILE all work.
    let file_arg = file.display().to_string();
    for (args, env) in [
        (vec!["--token", token.as_str()], vec![]),
        (vec![], vec![("MALLA_TOKEN", token.as_str())]),
        (vec!["--token-file", file_arg.as_str()], vec![]),
        (vec![], vec![("MALLA_TOKEN_FILE", file_arg.as_str())]),
    ] {
        let mut all = vec!["get", "services", "--control", &url];
        all.extend(args);
        let env: Vec<(&str, &str)> = env.into_iter().chain(ca.iter().copied()).collect();
        let out = malla(elsewhere.path(), &all, &env).await;
        assert_exit(&out, 0);
    }
    let out = malla(
        elsewhere.path(),
        &[
            "get",
            "services",
            "--control",
            &url,
            "--token-file",
            "/nonexistent/token",
        ],
        &ca,
    )
    .await;
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("cannot read the operator token from /nonexistent/token"));

    // Rotation: the new token alone on stdout, in the file, the old one refused.
    let out = malla(
        elsewhere.path(),
        &[
            "operator-token",
            "rotate",
            "--control",
            &url,
            "--token",
            &token,
        ],
        &ca,
    )
    .await;
    assert_exit(&out, 0);
    let new = stdout(&out).trim().to_string();
    assert!(new.starts_with("malla_op_") && new != token, "{new}");
    assert!(
        stderr(&out).contains("the old one is refused"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), new);
    let out = malla(
        elsewhere.path(),
        &["get", "services", "--control", &url, "--token", &token],
        &ca,
    )
    .await;
    assert_exit(&out, 1);
    // Next to the data directory, the CLI follows the file.
    let out = malla(
        home.path(),
        &["operator-token", "rotate", "--control", &url, "-o", "json"],
        &[],
    )
    .await;
    assert_exit(&out, 0);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let newest = answer["token"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), newest);

    // A restart reads the token back and does not print it again.
    control.child.kill().unwrap();
    control.child.wait().unwrap();
    drop(control);
    let log_again = home.path().join("control-again.log");
    let control = start(&data, &log_again).await;
    let printed = std::fs::read_to_string(&log_again).unwrap();
    assert!(
        !printed.contains("malla_op_") && !printed.contains("shown this once"),
        "a later start does not print the token:\n{printed}"
    );
    let out = malla(
        elsewhere.path(),
        &[
            "get",
            "services",
            "--control",
            &control.url,
            "--token",
            &newest,
        ],
        &ca,
    )
    .await;
    assert_exit(&out, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_verifies_the_control_plane_with_its_trust_bundle() {
    let home = TempDir::new("tls-home");
    let elsewhere = TempDir::new("tls-elsewhere");
    let data = home.path().join("malla-data");
    let control = start(&data, &home.path().join("control.log")).await;
    let url = control.url.clone();
    let token = std::fs::read_to_string(data.join("operator.token")).unwrap();
    let token = token.trim();
    let pem = std::fs::read_to_string(&control.bundle).unwrap();
    assert!(pem.contains("-----BEGIN CERTIFICATE-----"), "{pem}");

    // Next to ./malla-data: its trust-bundle.pem and operator.token, nothing to pass; by
    // default (no --control) too, with https:// and with -o json.
    let out = malla(home.path(), &["get", "services", "--control", &url], &[]).await;
    assert_exit(&out, 0);
    let https = format!("https://{url}");
    let out = malla(
        home.path(),
        &["get", "services", "-o", "json"],
        &[("MALLA_CONTROL", &https)],
    )
    .await;
    assert_exit(&out, 0);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(answer["services"].is_array(), "{answer}");

    // Elsewhere: no bundle, refused with what to pass.
    let out = malla(
        elsewhere.path(),
        &["get", "services", "--control", &url, "--token", token],
        &[],
    )
    .await;
    assert_exit(&out, 1);
    let said = stderr(&out);
    for what in [
        format!("no CA to verify the control plane at {url} with"),
        "--ca-file FILE or MALLA_CA_FILE".into(),
        "DATA_DIR/trust-bundle.pem".into(),
    ] {
        assert!(said.contains(&what), "{what:?} not in {said}");
    }
    // --ca-file and MALLA_CA_FILE.
    let bundle = control.bundle.as_str();
    for (args, env) in [
        (vec!["--ca-file", bundle], vec![]),
        (vec![], vec![("MALLA_CA_FILE", bundle)]),
    ] {
        let mut all = vec!["get", "services", "--control", &url, "--token", token];
        all.extend(args);
        let out = malla(elsewhere.path(), &all, &env).await;
        assert_exit(&out, 0);
    }
    // `register --keep-alive` over TLS: registered, a heartbeat, SIGTERM deregisters.
    let agent = Command::new(env!("CARGO_BIN_EXE_malla"))
        .args([
            "register",
            "orders",
            "--id",
            "o-1",
            "--address",
            "127.0.0.1",
        ])
        .args([
            "--port",
            "8081",
            "--ttl",
            "1",
            "--keep-alive",
            "--control",
            &url,
        ])
        .current_dir(home.path())
        .env_remove("MALLA_CONTROL")
        .env_remove("MALLA_TOKEN")
        .env_remove("MALLA_TOKEN_FILE")
        .env_remove("MALLA_CA_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let agent = KillOnDrop(Some(agent));
    let api = Api::new(url.parse().unwrap()).with_credentials_of(&data);
    malla_tests::assert_eventually!(api.instance_ids("orders", "").await == ["o-1"]);
    // Longer than the TTL: renewed by heartbeats over TLS.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(api.instance_ids("orders", "").await, ["o-1"]);
    let pid = agent.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || agent.wait())
        .await
        .unwrap();
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("SIGTERM: deregistered o-1 of orders"),
        "{}",
        stdout(&out)
    );
    assert!(api.instance_ids("orders", "").await.is_empty());

    // Another control plane's bundle: refused, saying so. Its own ./malla-data next to
    // the CLI does not stand in for the bundle given.
    let other_home = TempDir::new("tls-other");
    let other_data = other_home.path().join("malla-data");
    let other = start(&other_data, &other_home.path().join("control.log")).await;
    for (dir, args, env) in [
        (
            elsewhere.path(),
            vec!["--ca-file", other.bundle.as_str()],
            vec![],
        ),
        (
            elsewhere.path(),
            vec![],
            vec![("MALLA_CA_FILE", other.bundle.as_str())],
        ),
        (
            home.path(),
            vec!["--ca-file", other.bundle.as_str()],
            vec![],
        ),
    ] {
        let mut all = vec!["get", "services", "--control", &url, "--token", token];
        all.extend(args);
        let out = malla(dir, &all, &env).await;
        assert_exit(&out, 1);
        assert_eq!(
            stderr(&out).trim(),
            format!(
                "error: the TLS connection to the control plane at {url} failed: the control plane's certificate is not from the CA in {}: pass the control plane's DATA_DIR/trust-bundle.pem with --ca-file (or MALLA_CA_FILE)",
                other.bundle
            )
        );
    }
    // The other control plane's own directory verifies it, and not the first one.
    let out = malla(
        other_home.path(),
        &["get", "services", "--control", &other.url],
        &[],
    )
    .await;
    assert_exit(&out, 0);
    let out = malla(
        other_home.path(),
        &["get", "services", "--control", &url, "--token", token],
        &[],
    )
    .await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(
            "the control plane's certificate is not from the CA in malla-data/trust-bundle.pem (the default data directory of `malla control`)"
        ),
        "{}",
        stderr(&out)
    );

    // Plaintext: refused by the control plane, which says what to do.
    let out = malla(
        home.path(),
        &["get", "services", "--control", &format!("http://{url}")],
        &[],
    )
    .await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("--ca-file or MALLA_CA_FILE"),
        "{}",
        stderr(&out)
    );
}

/// A child process, killed when dropped unless waited for.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn wait(mut self) -> Output {
        let child = self.0.take().expect("not waited for yet");
        child.wait_with_output().unwrap()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
