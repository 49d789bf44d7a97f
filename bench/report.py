#!/usr/bin/env python3
"""Turns a bench results JSON into medians, ratios and a markdown section (stdlib only).

    bench/report.py bench/out/results-TIMESTAMP.json            # print the markdown section
    bench/report.py RESULTS.json --md OUT.md                    # also write it to a file
    bench/report.py RESULTS.json --docs docs/benchmarks.md      # replace the proxy section there

Ratios are taken within each round (target and direct / peer measured minutes apart in the
same run), then the median over rounds is reported, with the range when there are several.
"""

import argparse
import json
import os
import statistics
import sys

START = "<!-- bench:proxy:start -->"
END = "<!-- bench:proxy:end -->"
PEERS = ["haproxy", "nginx", "envoy"]
NAMES = {"direct": "direct (no proxy)", "malla": "**malla** (1 worker)",
         "malla-default": "**malla** (default: a worker per core)", "haproxy": "HAProxy", "nginx": "nginx",
         "envoy": "Envoy"}

# The project's goals for malla (from the benchmark issue).
GOALS = {
    "h1_vs_direct": 0.70,      # HTTP/1.1 throughput >= 0.70 x direct
    "added_p99_ms": 0.10,      # added p99 at 2,000 req/s <= 0.10 ms
    "h2_vs_haproxy": 1.0,      # h2c throughput >= HAProxy
    "idle_rss_mib": 10.0,      # idle RSS < 10 MiB
    "load_rss_mib": 20.0,      # peak RSS under load < 20 MiB
}


def one_line(rec):
    t = rec["test"]
    if t == "lat":
        s = f"p50 {rec['p50_ms']:.3f} ms  p99 {rec['p99_ms']:.3f} ms  p99.9 {rec['p999_ms']:.3f} ms  ({rec['rps']:.0f} req/s)"
    else:
        s = f"{rec['rps']:,.0f} req/s"
    if rec.get("errors"):
        s += f"  ERRORS {rec['errors']}"
    if "rss_peak_kib" in rec:
        s += f"  rss idle {rec['rss_idle_kib'] / 1024:.1f} / peak {rec['rss_peak_kib'] / 1024:.1f} MiB"
        s += f"  cpu {rec['cpu_s']:.2f} s"
    return s


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _stat(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _cpu_per_request(r):
    """The proxy's CPU seconds per request in one measurement, in microseconds."""
    if not r or not r.get("cpu_s") or not r.get("rps") or not r.get("wall_s"):
        return None
    return r["cpu_s"] / (r["rps"] * r["wall_s"]) * 1e6


def summarize(res):
    runs = res.get("runs", [])
    targets = res.get("targets", [])
    by = {}  # (test, target, round) -> rec
    for r in runs:
        by[(r["test"], r["target"], r["round"])] = r
    rounds = sorted({r["round"] for r in runs})
    out = {"h1": {}, "lat": {}, "h2": {}, "rss": {}, "goals": {}}

    def val(test, tgt, rnd, key):
        r = by.get((test, tgt, rnd))
        return r.get(key) if r else None

    for test in ("h1", "h2"):
        present = [t for t in targets if any((test, t, k) in by for k in rounds)]
        peers = [p for p in PEERS if p in present]
        for t in present:
            rps = [val(test, t, k, "rps") for k in rounds]
            d = {"rps": _stat(rps), "errors": sum((val(test, t, k, "errors") or 0) for k in rounds)}
            if "direct" in present and t != "direct":
                d["vs_direct"] = _stat([(val(test, t, k, "rps") / val(test, "direct", k, "rps"))
                                        if val(test, t, k, "rps") and val(test, "direct", k, "rps") else None
                                        for k in rounds])
            if peers and t != "direct":
                per = []
                for k in rounds:
                    best = max((val(test, p, k, "rps") or 0) for p in peers)
                    x = val(test, t, k, "rps")
                    per.append(x / best if x and best else None)
                d["vs_best_peer"] = _stat(per)
            if test == "h2" and "haproxy" in present and t not in ("direct", "haproxy"):
                d["vs_haproxy"] = _stat([(val(test, t, k, "rps") / val(test, "haproxy", k, "rps"))
                                         if val(test, t, k, "rps") and val(test, "haproxy", k, "rps") else None
                                         for k in rounds])
            if peers:
                med = {p: (_med([val(test, p, k, "rps") for k in rounds]) or 0) for p in peers}
                out[test + "_best_peer"] = max(med, key=med.get)
            if t != "direct":
                # The proxy's CPU per request at full load, and against nginx's in the same round.
                cpr = {k: _cpu_per_request(by.get((test, t, k))) for k in rounds}
                d["cpu_us_per_request"] = _stat([cpr[k] for k in rounds])
                if "nginx" in present and t != "nginx":
                    d["cpu_vs_nginx"] = _stat([
                        cpr[k] / n if cpr[k] and (n := _cpu_per_request(by.get((test, "nginx", k)))) else None
                        for k in rounds])
            out[test][t] = d

    present = [t for t in targets if any(("lat", t, k) in by for k in rounds)]
    for t in present:
        d = {"errors": sum((val("lat", t, k, "errors") or 0) for k in rounds),
             "rps": _stat([val("lat", t, k, "rps") for k in rounds])}
        for q in ("p50_ms", "p99_ms", "p999_ms"):
            d[q] = _stat([val("lat", t, k, q) for k in rounds])
            if "direct" in present and t != "direct":
                d["added_" + q] = _stat([(val("lat", t, k, q) - val("lat", "direct", k, q))
                                         if val("lat", t, k, q) is not None and val("lat", "direct", k, q) is not None
                                         else None for k in rounds])
        if t != "direct":
            cpk = []
            for k in rounds:
                r = by.get(("lat", t, k))
                if r and r.get("wall_s") and r.get("rps"):
                    cpk.append(r["cpu_s"] / r["wall_s"] / (r["rps"] / 1000.0))
            d["vcpu_per_1k_rps"] = _stat(cpk)
            if "nginx" in present and t != "nginx":
                d["cpu_vs_nginx"] = _stat([
                    c / n if c and (n := _cpu_per_request(by.get(("lat", "nginx", k)))) else None
                    for k in rounds for c in [_cpu_per_request(by.get(("lat", t, k)))]])
        out["lat"][t] = d

    for t in targets:
        if t == "direct":
            continue
        mine = [r for r in runs if r["target"] == t and "rss_idle_kib" in r]
        if not mine:
            continue
        mib = lambda kib: kib / 1024.0 if kib is not None else None  # noqa: E731
        out["rss"][t] = {
            "idle_mib": _stat([mib(r["rss_idle_kib"]) for r in mine]),
            "peak_h1_mib": _stat([mib(r["rss_peak_kib"]) for r in mine if r["test"] == "h1"]),
            "peak_lat_mib": _stat([mib(r["rss_peak_kib"]) for r in mine if r["test"] == "lat"]),
            "peak_h2_mib": _stat([mib(r["rss_peak_kib"]) for r in mine if r["test"] == "h2"]),
            "peak_max_mib": max(mib(r["rss_peak_kib"]) for r in mine),
            "processes": max(r.get("nproc", 1) for r in mine),
        }

    g = out["goals"]

    def goal(key, measured, ok, text):
        g[key] = {"goal": text, "measured": measured, "met": ok}

    m = out["h1"].get("malla", {}).get("vs_direct")
    if m:
        goal("h1_vs_direct", m["median"], m["median"] >= GOALS["h1_vs_direct"],
             f"HTTP/1.1 throughput ≥ {GOALS['h1_vs_direct']:.2f}× direct")
    m = out["lat"].get("malla", {}).get("added_p99_ms")
    if m:
        goal("added_p99_ms", m["median"], m["median"] <= GOALS["added_p99_ms"],
             f"added p99 at {res.get('params', {}).get('lat_rate', 2000):,} req/s ≤ {GOALS['added_p99_ms']:.2f} ms")
    m = out["h2"].get("malla", {}).get("vs_haproxy")
    if m:
        goal("h2_vs_haproxy", m["median"], m["median"] >= GOALS["h2_vs_haproxy"], "h2c throughput ≥ HAProxy")
    m = out["rss"].get("malla")
    if m:
        goal("idle_rss_mib", m["idle_mib"]["median"], m["idle_mib"]["median"] < GOALS["idle_rss_mib"],
             f"idle RSS < {GOALS['idle_rss_mib']:.0f} MiB")
        goal("load_rss_mib", m["peak_max_mib"], m["peak_max_mib"] < GOALS["load_rss_mib"],
             f"peak RSS under load < {GOALS['load_rss_mib']:.0f} MiB")
    return out


# --------------------------------------------------------------------------- markdown

def _f(x, fmt="{:.2f}", rng=True, sign=False):
    if x is None:
        return "—"
    if isinstance(x, dict):
        s = (("{:+.3f}" if sign else fmt).format(x["median"]))
        if rng and x["n"] > 1:
            lo = ("{:+.3f}" if sign else fmt).format(x["min"])
            hi = ("{:+.3f}" if sign else fmt).format(x["max"])
            s += f" ({lo} … {hi})"
        return s
    return ("{:+.3f}" if sign else fmt).format(x)


def render(res):
    s = res.get("summary") or summarize(res)
    p = res["params"]
    mi = res["machine"]
    v = res["versions"]
    targets = res["targets"]
    L = []
    a = L.append
    a(START)
    a("## Sidecar proxy vs peers (HTTP/1.1, latency, h2c, memory)")
    a("")
    a("<!-- generated by bench/run (bench/report.py); edit bench/report.py, not this section -->")
    a("")
    if res.get("malla_standin"):
        a(f"> **STAND-IN RUN**: the `malla` rows are **{res['malla_standin']}** started in malla's slot "
          "(harness check only). These are not malla's numbers.")
        a("")
    if res.get("mode") != "full":
        a(f"> Mode `{res.get('mode')}`: short runs, {p['rounds']} round(s); numbers are a smoke test, not a result.")
        a("")
    a(f"Measured {mi['date']} on {mi['nproc']} × {mi['cpu_model']} ({mi['memory']}), Linux {mi['kernel']}. "
      f"{p['rounds']} round(s); every target is measured once per round, in an order rotated each round; the "
      "table shows the median over rounds with the range in parentheses; ratios and added latency are taken "
      "within each round, then the median. One worker thread/process per proxy, everything on 127.0.0.1, "
      "one nginx upstream (1 worker) answering `200 hello\\n`. "
      + ("CPU layout: proxy pinned to CPU 1, load generator and upstream to CPU 0 (taskset)."
         if p["pin"] else "CPU layout: no pinning; load generator, proxy and upstream share both CPUs "
                          "(as in shared/PERF.md)."))
    a("")
    a(f"Versions: malla {v.get('malla', '?')}; HAProxy {v.get('haproxy')}; nginx {v.get('nginx')}; "
      f"Envoy {v.get('envoy')}; load: wrk {v.get('wrk')}, oha {v.get('oha')}, h2load (nghttp2) {v.get('h2load')}.")
    a("")

    fg = [r["foreign_cpu"] for r in res.get("runs", []) if "foreign_cpu" in r]
    if fg:
        busy = sum(1 for x in fg if x > 0.05)
        a(f"CPU taken by other processes during the measurements (share of the machine): median "
          f"{statistics.median(fg):.1%}, max {max(fg):.1%}"
          + (f" — **{busy} of {len(fg)} measurements had > 5 % of the CPU going elsewhere; the numbers are "
             "skewed, re-run on a quiet machine**." if busy else "."))
        a("")
    if s.get("goals"):
        a("### malla against its goals")
        a("")
        a("| goal | measured (median) | met |")
        a("|---|---|---|")
        for k, g in s["goals"].items():
            unit = {"h1_vs_direct": "× direct", "added_p99_ms": "ms", "h2_vs_haproxy": "× HAProxy",
                    "idle_rss_mib": "MiB", "load_rss_mib": "MiB"}[k]
            fmt = "{:+.3f}" if k == "added_p99_ms" else "{:.2f}"
            a(f"| {g['goal']} | {fmt.format(g['measured'])} {unit} | {'yes' if g['met'] else '**no**'} |")
        a("")

    if s.get("h1"):
        a(f"### HTTP/1.1 keep-alive throughput (`wrk -t1 -c{p['wrk_conns']} -d{p['h1_duration']}s`)")
        a("")
        bp = s.get("h1_best_peer")
        a(f"| target | req/s | ÷ direct | ÷ best peer ({NAMES.get(bp, '—')}) | proxy CPU µs/request | CPU ÷ nginx | errors |")
        a("|---|---|---|---|---|---|---|")
        for t in targets:
            d = s["h1"].get(t)
            if d:
                a(f"| {NAMES[t]} | {_f(d['rps'], '{:,.0f}')} | {_f(d.get('vs_direct'))} | "
                  f"{_f(d.get('vs_best_peer'))} | {_f(d.get('cpu_us_per_request'), '{:.1f}', False)} | "
                  f"{_f(d.get('cpu_vs_nginx'))} | {d['errors']} |")
        a("")

    if s.get("lat"):
        th = f" --worker-threads {p['oha_threads']}" if p.get("oha_threads") else ""
        a(f"### Latency at a fixed {p['lat_rate']:,} req/s (`oha -q {p['lat_rate']} -c {p['lat_conns']} "
          f"-z {p['lat_duration']}s{th}`), ms")
        a("")
        a("| target | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 | proxy vCPU per 1k req/s | CPU ÷ nginx | errors |")
        a("|---|---|---|---|---|---|---|---|---|---|")
        for t in targets:
            d = s["lat"].get(t)
            if d:
                a(f"| {NAMES[t]} | {_f(d['p50_ms'], '{:.3f}', False)} | {_f(d['p99_ms'], '{:.3f}', False)} | "
                  f"{_f(d['p999_ms'], '{:.3f}', False)} | {_f(d.get('added_p50_ms'), sign=True)} | "
                  f"{_f(d.get('added_p99_ms'), sign=True)} | {_f(d.get('added_p999_ms'), sign=True)} | "
                  f"{_f(d.get('vcpu_per_1k_rps'), '{:.3f}', False)} | {_f(d.get('cpu_vs_nginx'))} | "
                  f"{d['errors']} |")
        a("")

    if s.get("h2") or res.get("not_applicable"):
        a(f"### HTTP/2 cleartext (h2c prior knowledge) throughput (`h2load -t1 -c{p['h2_conns']} "
          f"-m{p['h2_streams']} -D {p['h2_duration']}`), h2c end to end")
        a("")
        bp = s.get("h2_best_peer")
        a(f"| target | req/s | ÷ direct | ÷ HAProxy | ÷ best peer ({NAMES.get(bp, '—')}) | errors |")
        a("|---|---|---|---|---|---|")
        for t in targets:
            d = s["h2"].get(t)
            if d:
                vh = "1.00" if t == "haproxy" else _f(d.get("vs_haproxy"))
                a(f"| {NAMES[t]} | {_f(d['rps'], '{:,.0f}')} | {_f(d.get('vs_direct'))} | "
                  f"{vh if t != 'direct' else '—'} | {_f(d.get('vs_best_peer'))} | {d['errors']} |")
            elif f"h2/{t}" in res.get("not_applicable", {}):
                a(f"| {NAMES[t]} | n/a | n/a | n/a | n/a | — |")
        a("")
        for k, why in res.get("not_applicable", {}).items():
            a(f"- {k.split('/')[1]}: {why}.")
        a("")

    if s.get("rss"):
        a("### Proxy memory (VmRSS, MiB)")
        a("")
        a("| target | idle | peak, h1 throughput | peak, 2k req/s | peak, h2c | max of all | processes |")
        a("|---|---|---|---|---|---|---|")
        for t in targets:
            d = s["rss"].get(t)
            if d:
                a(f"| {NAMES[t]} | {_f(d['idle_mib'], '{:.1f}')} | {_f(d['peak_h1_mib'], '{:.1f}')} | "
                  f"{_f(d['peak_lat_mib'], '{:.1f}')} | {_f(d['peak_h2_mib'], '{:.1f}')} | "
                  f"{d['peak_max_mib']:.1f} | {d['processes']} |")
        a("")
        a("Idle: after start and one probe request, before load. Peak: highest of samples every 100 ms "
          "during the measured run. Multi-process nginx counts master + worker (sum of both VmRSS; the "
          "shared pages are counted twice; the JSON also has the largest single process).")
        a("")
    failures_section(res, a)
    a("Command: `bench/run" + ("" if res.get("mode") == "full" else " --quick") + "`; see bench/README.md. "
      f"The whole run took {res.get('elapsed_s', 0) / 60:.1f} min.")
    a(END)
    return "\n".join(L) + "\n"


INTRO = """# Benchmarks

Results of the project's benchmark harnesses, measured on this project's 2-core machine. Each
section between `<!-- bench:...:start -->` / `<!-- bench:...:end -->` markers is generated and
replaced by its harness; compare numbers from the same run only (machines differ between
sessions).

"""


def failures_section(res, a):
    """The "Failures and errors" section, when a run had any (shared with bench/resilience)."""
    errs = [r for r in res.get("runs", []) if r.get("errors")]
    if res.get("failures") or errs:
        a("### Failures and errors")
        a("")
        for f_ in res.get("failures", []):
            a(f"- FAILED: {f_.splitlines()[0]}")
        for r in errs:
            a(f"- round {r['round'] + 1} {r['test']} {r['target']}: {r['errors']} failed/non-2xx responses "
              f"of {r.get('requests')}" + (f" ({r['error_kinds']})" if r.get("error_kinds") else ""))
        a("")


def update_docs(path, section, start=START, end=END):
    """Replaces the text between the `start` and `end` markers of `path` with `section`
    (which carries both markers), or appends `section` when the markers are absent."""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = INTRO
    i, j = text.find(start), text.find(end)
    if i != -1 and j != -1 and j > i:
        text = text[:i] + section.rstrip("\n") + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    if not text.endswith("\n"):
        text += "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--md", help="write the section to this file")
    ap.add_argument("--docs", help="replace the section between the proxy markers in this file")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    with open(a.results) as f:
        res = json.load(f)
    res["summary"] = summarize(res)  # recompute: the rules here may be newer than the file
    sec = render(res)
    if a.md:
        with open(a.md, "w") as f:
            f.write(sec)
    if a.docs:
        update_docs(a.docs, sec)
    if not a.quiet:
        sys.stdout.write(sec)


if __name__ == "__main__":
    main()
