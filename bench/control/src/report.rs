//! Percentiles, the markdown section, and writing it into docs/benchmarks.md.

use std::{path::Path, time::Duration};

use anyhow::Context as _;

use crate::scale::Scale;

pub const START: &str = "<!-- bench:control:start -->";
pub const END: &str = "<!-- bench:control:end -->";
/// The goal: a registration reaches 1,000 watchers within this at p99.
const GOAL_P99: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, Default)]
pub struct Fanout {
    pub path: &'static str,
    pub watchers: usize,
    /// HTTP/2 connections the watch streams share (0: in-process).
    pub connections: usize,
    /// Every (registration, watcher) latency.
    pub per_event: Vec<Duration>,
    /// Per registration: the latency of its last watcher.
    pub last_watcher: Vec<Duration>,
    /// How long the registration call took to answer.
    pub register_call: Vec<Duration>,
    /// (registration, watcher) pairs not delivered within the timeout.
    pub missed: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Results {
    pub fanout: Vec<Fanout>,
    pub scale: Option<Scale>,
    pub services: Option<crate::services::Services>,
}

/// The `p`-th percentile (nearest rank) of `samples`.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.1}")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn markdown(results: &Results, machine: &str) -> String {
    let mut md = String::new();
    md.push_str("## Control plane\n\n");
    md.push_str(&format!(
        "Measured by `bench/control/run` on {machine}. One `malla control` (release build) and \
         the benchmark's clients share the machine's cores.\n\n"
    ));
    if !results.fanout.is_empty() {
        md.push_str(
            "**Watch fan-out.** One registration at a time; latency from just before the \
             registration call until a watcher holds the new instance. *Per event*: every \
             watcher's latency; *last watcher*: per registration, the latency of the slowest \
             watcher. Over gRPC, the watchers are `Registry/Watch` streams of tonic clients \
             (125 per HTTP/2 connection) and registrations are gRPC `Register` calls; \
             in-process, they are receivers of `Registry::subscribe()` and calls of \
             `Registry::register` (the registry's fan-out alone, without the wire).\n\n",
        );
        md.push_str(
            "| watchers | path | HTTP/2 conns | registrations | per event p50 / p99 (ms) | last watcher p50 / p99 / max (ms) | register call p50 (ms) | missed |\n\
             |---:|---|---:|---:|---|---|---:|---:|\n",
        );
        for f in &results.fanout {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} / {} | {} / {} / {} | {} | {} |\n",
                thousands(f.watchers),
                f.path,
                if f.connections == 0 {
                    "—".to_string()
                } else {
                    f.connections.to_string()
                },
                f.register_call.len(),
                ms(percentile(&f.per_event, 50.0)),
                ms(percentile(&f.per_event, 99.0)),
                ms(percentile(&f.last_watcher, 50.0)),
                ms(percentile(&f.last_watcher, 99.0)),
                ms(percentile(&f.last_watcher, 100.0)),
                ms(percentile(&f.register_call, 50.0)),
                f.missed,
            ));
        }
    }
    if let Some(f) = results
        .fanout
        .iter()
        .find(|f| f.watchers == 1000 && f.connections > 0)
    {
        let p99 = percentile(&f.last_watcher, 99.0);
        let met = p99 < GOAL_P99 && f.missed == 0;
        md.push_str(&format!(
            "\nGoal (the issue): a registration reaches 1,000 gRPC watchers within 100 ms at \
             p99. **{}**: last-watcher p99 {} ms{}. For scale, PERF.md's etcd 3.4 on this kind \
             of machine, measured at the wire: 1,000 watchers, last watcher p50 8–13 / p99 \
             27–43 ms.\n",
            if met { "Met" } else { "Not met" },
            ms(p99),
            if f.missed > 0 {
                format!(", {} deliveries missed", f.missed)
            } else {
                String::new()
            }
        ));
    }
    if let Some(s) = &results.services {
        md.push_str(
            "\n**Write cost against the number of services.** A fresh `malla control`; \
             services `fill-N` with one instance each fill the registry to the count shown, \
             then new instances of one more service are registered over the HTTP API, 64 in \
             flight (rate, and every call's latency), then a quarter as many one at a time. \
             Flat across the rows is the goal: a write must not cost more because other \
             services exist.\n\n",
        );
        md.push_str(
            "| services present | registrations, 64 in flight | rate (registrations/s) | latency p50 / p99 (ms) | one at a time: p50 / p99 (ms) |\n\
             |---:|---:|---:|---|---|\n",
        );
        for r in &s.rounds {
            md.push_str(&format!(
                "| {} | {} | {:.0} | {} / {} | {} / {} |\n",
                thousands(r.services),
                thousands(r.concurrent),
                r.rate(),
                ms(percentile(&r.concurrent_latency, 50.0)),
                ms(percentile(&r.concurrent_latency, 99.0)),
                ms(percentile(&r.sequential_latency, 50.0)),
                ms(percentile(&r.sequential_latency, 99.0)),
            ));
        }
    }
    if let Some(s) = &results.scale {
        md.push_str(&format!(
            "\n**{} instances** in one service (`big`, two labels each) and {} in another \
             (`small`), registered over the HTTP API {} at a time, with 1 h leases.\n\n",
            thousands(s.instances),
            crate::scale::SMALL,
            s.concurrency
        ));
        md.push_str("| what | value |\n|---|---|\n");
        md.push_str(&format!(
            "| control-plane RSS: idle / after the registrations / after DNS load (peak) | {} / {} / {} ({}) |\n",
            mib(s.rss_idle),
            mib(s.rss_loaded),
            mib(s.rss_after_dns),
            mib(s.rss_peak)
        ));
        md.push_str(&format!(
            "| registering {} instances | {:.1} s ({:.0} registrations/s) |\n",
            thousands(s.instances),
            s.register_seconds,
            s.instances as f64 / s.register_seconds
        ));
        if let (Some(first), Some(last)) = (s.chunk_rates.first(), s.chunk_rates.last()) {
            if s.chunk_rates.len() > 1 {
                md.push_str(&format!(
                    "| registration rate while the service grows: instances {}–{} / {}–{} | {:.0} / {:.0} registrations/s |\n",
                    thousands(first.0),
                    thousands(first.1),
                    thousands(last.0),
                    thousands(last.1),
                    first.2,
                    last.2
                ));
            }
        }
        md.push_str(&format!(
            "| full snapshot, `GET /v1/services/big/instances` | {} bytes ({:.0} per instance), answered in {:.1} ms; `small`: {} bytes |\n",
            thousands(s.snapshot_bytes),
            s.snapshot_bytes as f64 / s.instances as f64,
            s.snapshot_ms,
            thousands(s.small_snapshot_bytes)
        ));
        md.push_str(&format!(
            "| `DELETE /v1/services/big`: the service and its {} instances | {:.0} ms, {} |\n",
            thousands(s.delete_removed as usize),
            s.delete_ms,
            if s.delete_one_revision {
                "one revision (one write)"
            } else {
                "**more than one revision**"
            }
        ));
        for d in &s.dns {
            md.push_str(&format!(
                "| DNS `{}` A ({} instances), 4 UDP sockets × 8 in flight, {:.1} s | {} queries/s; answer {} records, {} bytes{}{} |\n",
                d.name,
                thousands(d.instances),
                d.seconds,
                thousands(d.qps().round() as usize),
                d.answer_records,
                d.answer_bytes,
                if d.truncated { ", TC set (truncated)" } else { "" },
                if d.lost > 0 {
                    format!("; {} lost", d.lost)
                } else {
                    String::new()
                }
            ));
        }
    }
    md
}

/// Replaces the text between the markers in `path` (creating the file, or appending the
/// markers, when missing); the rest of the file is left alone.
pub fn write_docs(path: &Path, section: &str) -> anyhow::Result<()> {
    let current = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_string(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let block = format!("{START}\n{}\n{END}", section.trim_end());
    let updated = match (current.find(START), current.find(END)) {
        (Some(start), Some(end)) if start < end => {
            format!(
                "{}{block}{}",
                &current[..start],
                &current[end + END.len()..]
            )
        }
        _ => format!("{}\n\n{block}\n", current.trim_end_matches('\n')),
    };
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
    }

    #[test]
    fn docs_replace_only_between_the_markers() {
        let dir = malla_tests::control::TempDir::new("bench-docs");
        let path = dir.path().join("benchmarks.md");
        write_docs(&path, "first").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("# Benchmarks\n\n{START}\nfirst\n{END}\n"));
        let other = "<!-- bench:proxy:start -->\nproxy\n<!-- bench:proxy:end -->\n";
        std::fs::write(&path, format!("{text}\n{other}")).unwrap();
        write_docs(&path, "second").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("# Benchmarks\n\n{START}\nsecond\n{END}\n\n{other}")
        );
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(100), "100");
    }
}
