//! # malla-bench-control
//!
//! The control plane's benchmark (run it with `bench/control/run`, see
//! `bench/control/README.md`):
//!
//! 1. **Watch fan-out**: the time from just before a registration call until each of N
//!    watchers (N = 100 and 1,000) holds the new instance, over the real gRPC Watch API of a
//!    real `malla control` process, with tonic clients multiplexed over a few HTTP/2
//!    connections; plus the same through the registry's in-process broadcast, which is the
//!    floor the wire adds to. Reported per event (every watcher's latency) and for the last
//!    watcher of each registration.
//! 2. **A 10,000-instance registry**: the control plane's RSS, the size of a full snapshot
//!    (`GET /v1/services/S/instances`), and DNS queries per second against the real server
//!    for a name with 10 instances and one with 10,000 (a truncated UDP answer).
//!
//! 3. **Write cost against the number of services**: registrations per second and their
//!    p50 / p99, with 10 services present and with 10,000 (flat is the goal).
//!
//! It prints a markdown section and, with `--docs FILE`, writes it into FILE between
//! `<!-- bench:control:start -->` and `<!-- bench:control:end -->`. Nothing here asserts a
//! time: numbers are measured and written, and the goal (p99 under 100 ms for 1,000
//! watchers) is reported as met or not.

// A benchmark reports on stdout.
#![allow(clippy::print_stdout)]

mod dns;
mod process;
mod report;
mod scale;
mod services;
mod watch;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "malla control plane benchmark: watch fan-out, 10k instances, DNS qps")]
struct Args {
    /// The malla binary (`cargo build --release -p malla`).
    #[arg(long, default_value = "target/release/malla")]
    malla: PathBuf,
    /// Watcher counts for the fan-out measurement.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    watchers: Vec<usize>,
    /// Registrations timed per watcher count.
    #[arg(long, default_value_t = 50)]
    registrations: usize,
    /// Instances of the large service.
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Service counts for the write-cost measurement.
    #[arg(long, value_delimiter = ',', default_value = "10,10000")]
    services: Vec<usize>,
    /// Registrations timed per service count (a quarter of them again one at a time).
    #[arg(long, default_value_t = 4_000)]
    service_registrations: usize,
    /// Seconds of DNS load per name.
    #[arg(long, default_value_t = 2.0)]
    dns_seconds: f64,
    /// A shorter run (10 registrations, 1,000 instances, 0.5 s of DNS); docs are left alone.
    #[arg(long)]
    quick: bool,
    /// Run only these parts (`fanout`, `services`, `scale`); all when not given.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the section into this markdown file, between the bench:control markers.
    #[arg(long)]
    docs: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.registrations = args.registrations.min(10);
        args.instances = args.instances.min(1_000);
        args.dns_seconds = args.dns_seconds.min(0.5);
        args.services = vec![10, 1_000];
        args.service_registrations = args.service_registrations.min(400);
        args.docs = None;
    }
    anyhow::ensure!(
        args.malla.is_file(),
        "{} not found: build it with `cargo build --release -p malla` (bench/control/run does)",
        args.malla.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let results = runtime.block_on(run(&args))?;
    let section = report::markdown(&results, &machine());
    println!("{section}");
    if let Some(path) = &args.docs {
        report::write_docs(path, &section)?;
        println!(
            "written to {} (between the bench:control markers)",
            path.display()
        );
    }
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<report::Results> {
    let mut results = report::Results::default();
    let part = |name: &str| args.only.is_empty() || args.only.iter().any(|p| p == name);
    for &n in args.watchers.iter().filter(|_| part("fanout")) {
        eprintln!(
            "fan-out to {n} watchers over gRPC ({} registrations)",
            args.registrations
        );
        results
            .fanout
            .push(watch::over_grpc(&args.malla, n, args.registrations).await?);
        eprintln!(
            "fan-out to {n} watchers in-process ({} registrations)",
            args.registrations
        );
        results
            .fanout
            .push(watch::in_process(n, args.registrations).await?);
    }
    if part("services") {
        eprintln!("write cost with {:?} services", args.services);
        results.services =
            Some(services::run(&args.malla, &args.services, args.service_registrations).await?);
    }
    if part("scale") {
        eprintln!("registry with {} instances", args.instances);
        results.scale = Some(scale::run(&args.malla, args.instances, args.dns_seconds).await?);
    }
    Ok(results)
}

/// One line about where this ran: date, CPUs, kernel, git commit.
fn machine() -> String {
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "{} UTC, {cores} × {cpu}, Linux {}, malla {}",
        run("date", &["-u", "+%Y-%m-%d %H:%M"]),
        run("uname", &["-r"]),
        run("git", &["describe", "--always", "--dirty"]),
    )
}
