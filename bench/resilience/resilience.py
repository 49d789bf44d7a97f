#!/usr/bin/env python3
"""What malla's resilience stack costs on the hot path (stdlib only).

Normally started by `bench/resilience/run`, which installs the tools and builds malla first;
see bench/README.md. The upstream, the load generators, the per-measurement process handling,
the quiet-machine wait and the round rotation are bench/harness.py's (imported, not copied);
this file adds the malla variants, which differ only in their `[upstream.policy]` table:

    off       retries, outlier detection and locality failover disabled
    defaults  no policy table: the documented defaults (docs/resilience.md)
    all       the defaults plus a request deadline (30 s: every request carries a deadline and
              a rewritten malla-timeout-ms), latency outlier detection, generous service
              limits, a rate limit far above the load, and a fault rule for /chaos that every
              request is checked against and none matches

plus `direct` (the load generator against the upstream itself) for reference.

    resilience.py measure --malla-bin BIN --out-json F --run-dir D --pidfile P [options]
    resilience.py report RESULTS.json [--md FILE] [--docs docs/benchmarks.md] [--quiet]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
sys.path.insert(0, BENCH)
sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
import harness  # noqa: E402  (bench/harness.py)
import report  # noqa: E402  (bench/report.py)

START = "<!-- bench:resilience:start -->"
END = "<!-- bench:resilience:end -->"

VARIANTS = ["direct", "off", "defaults", "all"]
TESTS = ["h1", "h2", "lat"]
# Which variants each test measures (before --variants filters them).
PLAN = {
    "h1": ["direct", "off", "defaults", "all"],
    "h2": ["off", "all"],
    "lat": ["direct", "off", "defaults", "all"],
}
NAMES = {"direct": "direct (no proxy)", "off": "malla, resilience **off**",
         "defaults": "malla, **defaults**", "all": "malla, **all on**"}

# The `[upstream.policy]` part of each variant's config (TOML, under the one [[upstream]]).
POLICY = {
    "off": """\
[upstream.policy.retries]
enabled = false
[upstream.policy.outlier]
enabled = false
[upstream.policy.failover]
enabled = false
""",
    "defaults": "",
    "all": """\
[upstream.policy.timeouts]
request = "30s"
[upstream.policy.outlier.latency]
enabled = true
[upstream.policy.limits]
max_connections = 100000
max_pending_requests = 100000
max_requests = 100000
max_retries = 100000
[[upstream.policy.rate_limit]]
requests_per_second = 100000000.0
[[upstream.policy.fault]]
path_prefix = "/chaos"
abort_percent = 100
""",
}


def malla_toml(variant, listen, upstream, admin):
    """The whole config of one malla variant: `listen` forwards to `upstream` (HOST:PORT)."""
    return f"""\
# bench/resilience: variant {variant!r}
workers = 1

[[upstream]]
name = "bench"
endpoints = ["{upstream}"]
{POLICY[variant]}
[[outbound]]
listen = "{listen}"
upstream = "bench"
# as `malla proxy --listen` (bench/run): HTTP/1.1 and h2c prior knowledge, detected
protocol = "http"

[admin]
listen = "{admin}"
"""


class ResilienceBench(harness.Bench):
    """harness.Bench whose targets are the malla variants (and direct)."""

    def argv_for(self, kind, d, port, up, proto):
        if kind not in POLICY:
            return super().argv_for(kind, d, port, up, proto)
        admin = port
        while admin == port:
            (admin,) = harness.free_ports(1)
        path = os.path.join(d, "malla.toml")
        with open(path, "w") as f:
            f.write(malla_toml(kind, f"127.0.0.1:{port}", f"127.0.0.1:{up}", f"127.0.0.1:{admin}"))
        return [self.a.malla_bin, "proxy", "--config", path]


def check_configs(malla_bin, variants, run_dir):
    """Every variant's config through `malla proxy --config F --print-config` (validates
    without starting); the effective configs are kept in RUN_DIR/configs/."""
    d = os.path.join(run_dir, "configs")
    os.makedirs(d, exist_ok=True)
    for v in variants:
        if v not in POLICY:
            continue
        path = os.path.join(d, f"{v}.toml")
        with open(path, "w") as f:
            f.write(malla_toml(v, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))
        r = subprocess.run([malla_bin, "proxy", "--config", path, "--print-config"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SystemExit(f"malla rejects the {v!r} variant's config ({path}):\n{r.stderr.strip()}\n"
                             "(a binary built before [upstream.policy] existed? rebuild without --no-build)")
        with open(os.path.join(d, f"{v}.effective.toml"), "w") as f:
            f.write(r.stdout)
        if v != "defaults" and "[upstream.policy" not in r.stdout:
            raise SystemExit(f"malla accepted the {v!r} config but its effective config has no "
                             f"[upstream.policy]; see {d}")


# --------------------------------------------------------------------------- measure

def measure(a):
    variants = [v for v in a.variants.split(",") if v]
    tests = [t for t in a.tests.split(",") if t]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {VARIANTS}")
    for t in tests:
        if t not in TESTS:
            raise SystemExit(f"unknown test {t!r}; choose from {TESTS}")
    # what harness.Bench reads from its arguments
    a.h1_duration = a.lat_duration = a.h2_duration = a.duration
    a.malla_cmd, a.malla_standin, a.envoy_bin = a.malla_bin, "", None
    plan = [(t, [v for v in PLAN[t] if v in variants]) for t in tests]
    plan = [(t, names) for t, names in plan if names]

    b = ResilienceBench(a)
    harness.exit_on_signals()
    check_configs(a.malla_bin, variants, a.run_dir)
    versions = {k: v for k, v in b.versions().items() if k in ("malla", "nginx", "wrk", "h2load", "oha", "python")}
    if "lat" not in tests:
        versions.pop("oha", None)
    results = {
        "schema": 1,
        "bench": "resilience",
        "mode": a.mode,
        "machine": harness.machine_info(),
        "versions": versions,
        "malla_bin": a.malla_bin,
        "params": {k: getattr(a, k) for k in ("rounds", "duration", "warmup", "wrk_conns", "lat_rate", "lat_conns",
                                              "oha_threads", "h2_conns", "h2_streams", "pin")},
        "variants": variants, "tests": tests, "plan": plan,
        "policies": {v: POLICY[v] for v in variants if v in POLICY},
        "failures": [],
        "runs": [],
    }
    harness.log(f"machine: {results['machine']}")
    harness.log(f"versions: {versions}")
    harness.log("plan: " + "; ".join(f"{t}: {', '.join(n)}" for t, n in plan))
    t_start = time.monotonic()
    try:
        b.start_upstream()
        harness.run_rounds(b, a.rounds, plan, results)
    finally:
        b.procs.stop_all()
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        results["summary"] = summarize(results)
        with open(a.out_json, "w") as f:
            json.dump(results, f, indent=1)
        harness.log(f"wrote {a.out_json}")


# --------------------------------------------------------------------------- summary

def summarize(res):
    by = {(r["test"], r["target"], r["round"]): r for r in res.get("runs", [])}
    rounds = sorted({r["round"] for r in res.get("runs", [])})
    out = {}

    def val(test, v, k, key):
        r = by.get((test, v, k))
        return r.get(key) if r else None

    def ratio(test, num, den, key="rps"):
        xs = []
        for k in rounds:
            x, y = val(test, num, k, key), val(test, den, k, key)
            xs.append(x / y if x and y else None)
        return report._stat(xs)

    def diff(test, num, den, key):
        xs = []
        for k in rounds:
            x, y = val(test, num, k, key), val(test, den, k, key)
            xs.append(x - y if x is not None and y is not None else None)
        return report._stat(xs)

    for test in ("h1", "h2", "lat"):
        present = [v for v in VARIANTS if any((test, v, k) in by for k in rounds)]
        if not present:
            continue
        t = out[test] = {}
        for v in present:
            mine = [by[(test, v, k)] for k in rounds if (test, v, k) in by]
            d = {"rps": report._stat([r.get("rps") for r in mine]),
                 "errors": sum(r.get("errors") or 0 for r in mine)}
            if v != "direct":
                d["cpu_us_per_req"] = report._stat([r["cpu_s"] / r["requests"] * 1e6 for r in mine
                                                    if r.get("requests") and "cpu_s" in r])
                d["rss_peak_mib"] = report._stat([r["rss_peak_kib"] / 1024 for r in mine if "rss_peak_kib" in r])
            if test == "lat":
                for q in ("p50_ms", "p99_ms", "p999_ms"):
                    d[q] = report._stat([r.get(q) for r in mine])
                    if "off" in present and v != "off":
                        d[q + "_minus_off"] = diff(test, v, "off", q)
            else:
                if "off" in present and v not in ("off", "direct"):
                    d["vs_off"] = ratio(test, v, "off")
                if "direct" in present and v != "direct":
                    d["vs_direct"] = ratio(test, v, "direct")
            t[v] = d
    return out


# --------------------------------------------------------------------------- markdown

def render(res):
    s = res.get("summary") or summarize(res)
    p, mi, ver = res["params"], res["machine"], res["versions"]
    L = []
    a = L.append
    a(START)
    a("## Resilience cost")
    a("")
    a("<!-- generated by bench/resilience/run (bench/resilience/resilience.py); edit that file, not this section -->")
    a("")
    if res.get("mode") != "full":
        a(f"> Mode `{res.get('mode')}`: short runs, {p['rounds']} round(s); numbers are a smoke test, not a result.")
        a("")
    a("What malla's resilience policies cost per request when nothing fails: one `malla proxy` "
      "(1 worker) in front of the nginx upstream of `bench/run`, with its `[upstream.policy]` set three "
      "ways. **off**: retries, outlier detection and locality failover disabled (the service limits have "
      "no switch and keep their defaults; no request deadline). **defaults**: no policy table, i.e. "
      "budgeted retries of idempotent requests, consecutive-failure and success-rate outlier detection "
      "and failover on, no request deadline. **all on**: the defaults plus a 30 s request deadline (every "
      "request carries a deadline and a rewritten `malla-timeout-ms` header), latency outlier detection, "
      "service limits of 100,000, a 10⁸ req/s rate limit and a fault rule for `/chaos` that every request "
      "is checked against and none matches. The exact tables are in the JSON (`policies`).")
    a("")
    a(f"Measured {mi['date']} on {mi['nproc']} × {mi['cpu_model']} ({mi['memory']}), Linux {mi['kernel']}; "
      f"malla {ver.get('malla', '?')}; nginx {ver.get('nginx')}, wrk {ver.get('wrk')}, h2load {ver.get('h2load')}"
      + (f", oha {ver['oha']}" if ver.get("oha") else "") + ". "
      f"{p['rounds']} round(s) of {p['duration']} s per measurement (after {p['warmup']} s of warm-up), "
      "variants in an order rotated every round, each malla started fresh per measurement; medians over "
      "rounds with the range in parentheses; ratios taken within each round, then the median. "
      + ("CPU layout: proxy pinned to CPU 1, load generator and upstream to CPU 0."
         if p["pin"] else "No CPU pinning: load generator, proxy and upstream share the cores."))
    a("")
    fg = [r["foreign_cpu"] for r in res.get("runs", []) if "foreign_cpu" in r]
    if fg:
        busy = sum(1 for x in fg if x > 0.05)
        a(f"CPU taken by other processes during the measurements: median {statistics.median(fg):.1%}, "
          f"max {max(fg):.1%}" + (f" — **{busy} of {len(fg)} measurements had > 5 % of the CPU going "
                                  "elsewhere; the numbers are skewed, re-run on a quiet machine**." if busy else "."))
        a("")

    h1, h2, lat = s.get("h1", {}), s.get("h2", {}), s.get("lat", {})
    rows = [("defaults ÷ off", "defaults", "vs_off"), ("all on ÷ off", "all", "vs_off"),
            ("off ÷ direct", "off", "vs_direct")]
    if any(h.get(v, {}).get(k) for h in (h1, h2) for _, v, k in rows):
        a("**Throughput ratios** (the cost of resilience: 1.00 = free):")
        a("")
        a("| ratio | HTTP/1.1 | h2c |")
        a("|---|---|---|")
        for label, v, k in rows:
            a(f"| {label} | {report._f(h1.get(v, {}).get(k))} | {report._f(h2.get(v, {}).get(k))} |")
        a("")

    for test, title in (("h1", f"HTTP/1.1 keep-alive throughput (`wrk -t1 -c{p['wrk_conns']} -d{p['duration']}s`)"),
                        ("h2", f"h2c throughput, h2c end to end (`h2load -t1 -c{p['h2_conns']} -m{p['h2_streams']} "
                               f"-D {p['duration']}`)")):
        t = s.get(test)
        if not t:
            continue
        a(f"### {title}")
        a("")
        a("| variant | req/s | ÷ off | ÷ direct | proxy CPU µs/request | peak RSS MiB | errors |")
        a("|---|---|---|---|---|---|---|")
        for v in VARIANTS:
            d = t.get(v)
            if not d:
                continue
            vs_off = "1.00" if v == "off" else report._f(d.get("vs_off"))
            vs_dir = "1.00" if v == "direct" else report._f(d.get("vs_direct"))
            a(f"| {NAMES[v]} | {report._f(d['rps'], '{:,.0f}')} | {vs_off if v != 'direct' else '—'} | "
              f"{vs_dir} | {report._f(d.get('cpu_us_per_req'), '{:.1f}')} | "
              f"{report._f(d.get('rss_peak_mib'), '{:.1f}', rng=False)} | {d['errors']} |")
        a("")

    if lat:
        th = f" --worker-threads {p['oha_threads']}" if p.get("oha_threads") else ""
        a(f"### Latency at a fixed {p['lat_rate']:,} req/s (`oha -q {p['lat_rate']} -c {p['lat_conns']} "
          f"-z {p['duration']}s{th}`), ms")
        a("")
        a("| variant | p50 | p99 | p99.9 | p50 − off | p99 − off | proxy CPU µs/request | errors |")
        a("|---|---|---|---|---|---|---|---|")
        for v in VARIANTS:
            d = lat.get(v)
            if not d:
                continue
            a(f"| {NAMES[v]} | {report._f(d['p50_ms'], '{:.3f}', False)} | {report._f(d['p99_ms'], '{:.3f}', False)} | "
              f"{report._f(d['p999_ms'], '{:.3f}', False)} | "
              f"{report._f(d.get('p50_ms_minus_off'), sign=True) if v != 'off' else '0'} | "
              f"{report._f(d.get('p99_ms_minus_off'), sign=True) if v != 'off' else '0'} | "
              f"{report._f(d.get('cpu_us_per_req'), '{:.1f}')} | {d['errors']} |")
        a("")

    a("Proxy CPU per request: the malla process's utime + stime during the measurement (`/proc/PID/stat`) "
      "÷ the requests completed; at full load (wrk, h2load) it is the most direct measure of the per-request "
      "work each variant adds.")
    a("")
    report.failures_section(res, a)
    a("Reproduce: `bench/resilience/run" + ("" if res.get("mode") == "full" else " --quick")
      + "` (see bench/README.md). " f"The whole run took {res.get('elapsed_s', 0) / 60:.1f} min.")
    a(END)
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="run the benchmark, write the results JSON")
    m.add_argument("--variants", default=",".join(VARIANTS))
    m.add_argument("--tests", default="h1,h2,lat")
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--duration", type=int, default=10, help="seconds per measurement, every test")
    m.add_argument("--warmup", type=int, default=1, help="seconds of load before each measurement (0: none)")
    # the same load as bench/run (harness.py's defaults)
    m.add_argument("--wrk-conns", type=int, default=50)
    m.add_argument("--h2-conns", type=int, default=10)
    m.add_argument("--h2-streams", type=int, default=10)
    m.add_argument("--lat-rate", type=int, default=2000)
    m.add_argument("--lat-conns", type=int, default=16)
    m.add_argument("--oha-threads", type=int, default=1)
    m.add_argument("--oha-bin", default="oha")
    m.add_argument("--pin", action="store_true")
    m.add_argument("--quiet-wait", type=int, default=120,
                   help="seconds, over the whole run, to wait for other CPU use to stop before a measurement")
    m.add_argument("--mode", default="full")
    m.add_argument("--malla-bin", required=True)
    m.add_argument("--out-json", required=True)
    m.add_argument("--run-dir", required=True)
    m.add_argument("--pidfile", required=True)
    r = sub.add_parser("report", help="print the markdown section of a results JSON")
    r.add_argument("results")
    r.add_argument("--md", help="write the section to this file")
    r.add_argument("--docs", help="replace the section between the resilience markers in this file "
                                  "(appended at its end when absent)")
    r.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    if a.cmd == "measure":
        measure(a)
        return
    with open(a.results) as f:
        res = json.load(f)
    res["summary"] = summarize(res)  # recompute: the rules here may be newer than the file
    sec = render(res)
    if a.md:
        with open(a.md, "w") as f:
            f.write(sec)
    if a.docs:
        report.update_docs(a.docs, sec, START, END)
    if not a.quiet:
        sys.stdout.write(sec)


if __name__ == "__main__":
    main()
