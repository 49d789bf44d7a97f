//! `malla register`: put an instance in the registry, under a lease (`--ttl`), kept alive
//! by heartbeats with `--keep-alive`, or `--static` (no lease: it stays until
//! `malla deregister`).
//!
//! With `--keep-alive` the process is the instance's agent, and it must outlive what a
//! sidecar outlives: a control plane that restarts or is briefly unreachable is retried
//! with bounded, jittered backoff (saying so on stderr), and a lease the control plane no
//! longer knows (`404 lease_not_found`: it expired during the outage, or was revoked) is
//! replaced by registering again. It deregisters on SIGINT (Ctrl-C) and SIGTERM (service
//! managers, `kill`) alike.

use std::{net::IpAddr, time::Duration};

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::{
    client::{CallError, Client},
    output::{errln, outln, print_json, text},
    registry_cmd::{encode, key_values, Common, Output},
};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    malla register shipping-quote --id quote-1 --address 127.0.0.1 --port 8081 --label env=prod --label zone=eu-1\n  \
    malla register shipping-quote --id quote-1 --address 127.0.0.1 --port 8081 --ttl 10 --keep-alive\n  \
    malla register geo-api --id vendor-1 --address 203.0.113.7 --port 443 --static --annotation owner=vendors@example.com\n\n\
    With --keep-alive, heartbeats go every third of the TTL; an unreachable control plane is\n\
    retried with backoff, a lost lease is replaced by registering again, and Ctrl-C or\n\
    SIGTERM deregisters the instance.")]
pub struct RegisterArgs {
    /// The service.
    service: String,
    /// Instance id, unique within the service.
    #[arg(long)]
    id: String,
    /// The IP address callers reach the instance at (IPv4 or IPv6).
    #[arg(long)]
    address: IpAddr,
    /// The port callers reach the instance at.
    #[arg(long)]
    port: u16,
    /// http, http2, grpc or tcp.
    #[arg(long, default_value = "http")]
    protocol: String,
    /// A label KEY=VALUE (selectable); repeat, or separate with commas.
    #[arg(
        long = "label",
        visible_alias = "labels",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    labels: Vec<String>,
    /// An annotation KEY=VALUE (free UTF-8 text, not selectable: a display name, an owner,
    /// a runbook link); repeat for several.
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    annotations: Vec<String>,
    /// Lease TTL in seconds: without heartbeats the instance leaves after this time.
    #[arg(long, default_value_t = 30, conflicts_with = "static_")]
    ttl: u64,
    /// No lease and no TTL: the instance stays until `malla deregister` (an external
    /// endpoint with no agent to send heartbeats).
    #[arg(long = "static", id = "static_", conflicts_with = "keep_alive")]
    static_: bool,
    /// Stay running, sending heartbeats (and registering again when the lease is lost),
    /// until Ctrl-C or SIGTERM, then deregister.
    #[arg(long)]
    keep_alive: bool,
    #[command(flatten)]
    common: Common,
}

pub fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.common.control)?;
    let labels = key_values("--label", &args.labels)?;
    let annotations = key_values("--annotation", &args.annotations)?;
    let mut body = json!({
        "address": args.address,
        "port": args.port,
        "protocol": args.protocol,
        "labels": labels,
    });
    if !annotations.is_empty() {
        body["annotations"] = Value::Object(annotations);
    }
    if args.static_ {
        body["static"] = Value::Bool(true);
    } else {
        body["ttl_seconds"] = json!(args.ttl);
    }
    let path = format!(
        "/v1/services/{}/instances/{}",
        encode(&args.service),
        encode(&args.id)
    );
    let v = client.put(&path, &body)?;
    match args.common.output {
        Output::Json => print_json(&v)?,
        Output::Yaml => crate::yaml::print(&v)?,
        Output::Table | Output::Wide => {
            // A static instance has no lease: `static: true` (and lease 0, etcd's "none").
            if v["static"] == true || v["lease"].is_null() || v["lease"] == 0 {
                outln!(
                    "registered {} of {} (static: no lease, stays until deregistered; revision {})",
                    args.id,
                    args.service,
                    text(&v["revision"])
                )?
            } else {
                outln!(
                    "registered {} of {} (lease {}, ttl {}s, revision {})",
                    args.id,
                    args.service,
                    text(&v["lease"]),
                    text(&v["ttl_seconds"]),
                    text(&v["revision"])
                )?
            }
        }
    }
    if !args.keep_alive {
        return Ok(());
    }
    let lease = v["lease"].as_u64().context("the answer has no lease id")?;
    let agent = Agent {
        client: &client,
        path: &path,
        body: &body,
        interval: heartbeat_interval(Duration::from_secs(args.ttl)),
        ttl: Duration::from_secs(args.ttl),
    };
    let signal = client.block_on(agent.run(lease))?;
    match client.delete(&path) {
        Ok(_) => {}
        // Already gone (expired, or deregistered by someone else): nothing to undo.
        Err(e)
            if e.downcast_ref::<CallError>()
                .is_some_and(|e| e.code() == Some("not_found")) => {}
        Err(e) => {
            return Err(e.context(format!(
                "{signal}: could not deregister {} of {}; it leaves when its lease expires (within {}s)",
                args.id, args.service, args.ttl
            )))
        }
    }
    outln!("{signal}: deregistered {} of {}", args.id, args.service)?;
    Ok(())
}

/// A third of the TTL, so that two heartbeats may be lost before the lease expires.
fn heartbeat_interval(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(300))
}

/// The wait before retry `n` (1-based) after a failed call: exponential from 200 ms,
/// capped at the heartbeat interval (and 5 s) so that the instance is back soon after the
/// control plane is, with "equal jitter" (half fixed, half random) so that many agents
/// that lost the same control plane do not come back in step.
fn backoff(n: u32, interval: Duration) -> Duration {
    let cap = interval.min(Duration::from_secs(5));
    let exp = Duration::from_millis(200)
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(cap);
    let half = exp / 2;
    half + half.mul_f64(fastrand::f64())
}

struct Agent<'a> {
    client: &'a Client,
    path: &'a str,
    body: &'a Value,
    interval: Duration,
    ttl: Duration,
}

/// What one step of the loop did.
enum Step {
    Renewed,
    Registered(u64),
    LeaseLost,
    Failed(CallError),
}

impl Agent<'_> {
    /// Keeps the instance registered until SIGINT or SIGTERM; returns which one came.
    async fn run(&self, lease: u64) -> anyhow::Result<&'static str> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut stop = std::pin::pin!(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            }
        });
        errln!(
            "sending heartbeats every {}; Ctrl-C or SIGTERM deregisters",
            humantime::format_duration(self.interval)
        );
        let mut lease = Some(lease);
        let mut failures: u32 = 0;
        let mut wait = self.interval;
        loop {
            tokio::select! {
                signal = &mut stop => return Ok(signal),
                _ = tokio::time::sleep(wait) => {}
            }
            let step = tokio::select! {
                signal = &mut stop => return Ok(signal),
                step = self.step(lease) => step,
            };
            wait = match step {
                Step::Renewed | Step::Registered(_) => {
                    if failures > 0 {
                        errln!(
                            "the control plane answers again (after {failures} failed attempt{})",
                            if failures == 1 { "" } else { "s" }
                        );
                    }
                    if let Step::Registered(id) = step {
                        errln!("registered again (lease {id})");
                        lease = Some(id);
                    }
                    failures = 0;
                    self.interval
                }
                Step::LeaseLost => {
                    errln!(
                        "lease {} is gone (it expired or was revoked); registering again",
                        lease.map_or("-".to_string(), |l| l.to_string())
                    );
                    lease = None;
                    Duration::ZERO
                }
                Step::Failed(e) if e.is_outage() => {
                    failures += 1;
                    if failures == 1 {
                        errln!(
                            "{e}\nretrying with backoff; the instance leaves the registry if this lasts more than its TTL ({}s), and is registered again when the control plane is back",
                            self.ttl.as_secs()
                        );
                    }
                    backoff(failures, self.interval)
                }
                // A refusal (400...): retrying the same call will not change the answer.
                Step::Failed(e) => return Err(e.into()),
            };
        }
    }

    async fn step(&self, lease: Option<u64>) -> Step {
        match lease {
            Some(id) => {
                let path = format!("/v1/leases/{id}/keepalive");
                match self
                    .client
                    .request(http::Method::PUT, &path, Some(&json!({})))
                    .await
                {
                    Ok(_) => Step::Renewed,
                    Err(e) if e.code() == Some("lease_not_found") => Step::LeaseLost,
                    Err(e) => Step::Failed(e),
                }
            }
            None => match self
                .client
                .request(http::Method::PUT, self.path, Some(self.body))
                .await
            {
                Ok(v) => match v["lease"].as_u64() {
                    Some(id) => Step::Registered(id),
                    None => Step::Failed(CallError::Api {
                        status: http::StatusCode::OK,
                        code: String::new(),
                        message: format!("the registration's answer has no lease id: {v}"),
                    }),
                },
                Err(e) => Step::Failed(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_jittered_and_bounded() {
        let interval = Duration::from_secs(10);
        for n in 1..40 {
            let d = backoff(n, interval);
            let exp = Duration::from_millis(200)
                .saturating_mul(1 << (n - 1).min(16))
                .min(Duration::from_secs(5));
            assert!(d >= exp / 2 && d <= exp, "{n}: {d:?}");
        }
        // Never longer than a heartbeat interval.
        let short = Duration::from_millis(300);
        assert!((1..40).all(|n| backoff(n, short) <= short));
    }
}
